"""Item vectors in Qdrant: versioned collections behind one alias, and the serving query.

Publishing never edits what is being served. Each publish builds a new collection
`<prefix>_<version>` (version = a hash of the vectors and ids), verifies it, and only then moves the
alias to it in one `update_collection_aliases` call, so readers see the old index or the new one and
never a half-built one. Older versions stay for rollback until `keep_versions` is exceeded.

Everything here takes plain numpy vectors and ids, so it is tested with real Qdrant on its own; the
model and the catalog are the publish stage's business.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from flows.errors import PublishError, TowerflowError

VERSION_CHARS = 12
# Stored vectors come back as float32 after Qdrant's own cosine normalization.
VECTOR_ATOL = 1e-5
QUERY_CHUNK = 256


@contextmanager
def open_qdrant(path: Path | str) -> Iterator[QdrantClient]:
    """A client for QDRANT_URL (+ QDRANT_API_KEY) when set, else embedded local mode at `path`.

    `path` may be ":memory:". The client is closed on exit: local mode locks its folder against
    every other client, in this process or another.
    """
    url = os.environ.get("QDRANT_URL")
    if url:
        client = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None)
    elif str(path) == ":memory:":
        client = QdrantClient(location=":memory:")
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        try:
            client = QdrantClient(path=str(path))
        except RuntimeError as exc:
            raise TowerflowError(
                f"{path}: the embedded Qdrant storage is open in another process (a running server?); "
                f"stop it or set QDRANT_URL to a Qdrant server ({exc})"
            ) from exc
    try:
        yield client
    finally:
        client.close()


@dataclass
class PublishResult:
    collection: str
    alias: str
    version: str
    count: int
    dim: int
    verified: bool
    previous: str | None
    reused: bool
    pruned: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plain_id(value: Any) -> int | str:
    """An item/user id as a JSON- and payload-safe Python int or str (numpy scalars unwrapped)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PublishError(f"ids must be int64 or string, got {value!r} ({type(value).__name__})")
    return value


def content_version(vectors: np.ndarray, item_ids: Sequence[int | str]) -> str:
    """Hash of ids + float32 vectors: the same model and catalog always give the same version."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(item_ids)).encode())
    digest.update(repr(vectors.shape).encode())
    digest.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return digest.hexdigest()[:VERSION_CHARS]


def alias_target(client: QdrantClient, alias: str) -> str | None:
    for a in client.get_aliases().aliases:
        if a.alias_name == alias:
            return a.collection_name
    return None


def publish_vectors(
    client: QdrantClient,
    vectors: np.ndarray,
    item_ids: Sequence[Any],
    *,
    prefix: str,
    alias: str,
    keep_versions: int,
    batch_size: int = 1000,
    verify_sample: int = 32,
) -> PublishResult:
    """Build + verify `<prefix>_<version>`, switch `alias` to it atomically, prune old versions.

    Re-publishing identical vectors reuses the existing collection once it verifies. On any failure
    before the switch the alias is untouched, the new collection is removed, and PublishError says
    which step failed.
    """
    vectors, ids = _checked(vectors, item_ids)
    version = content_version(vectors, ids)
    name = f"{prefix}_{version}"
    previous = alias_target(client, alias)
    if client.collection_exists(alias) and previous is None:
        raise PublishError(f"alias '{alias}' is already the name of a collection; choose another publish.alias")

    reused = False
    if client.collection_exists(name):
        try:
            verify_collection(client, name, vectors, ids, verify_sample)
            reused = True
        except PublishError as exc:
            if name in _served(client):
                raise PublishError(
                    f"collection '{name}' is served by an alias but does not match the vectors being "
                    f"published ({exc}); alias '{alias}' left on '{previous}'"
                ) from exc
            # A leftover of an interrupted publish (a killed process skips the cleanup below).
            client.delete_collection(name)
    if not reused:
        _build_verified(client, name, vectors, ids, batch_size, verify_sample, alias, previous)

    switch_alias(client, alias, name)
    pruned = prune_versions(client, prefix, alias, keep_versions)
    return PublishResult(collection=name, alias=alias, version=version, count=len(ids), dim=vectors.shape[1],
                         verified=True, previous=previous, reused=reused, pruned=pruned)


def _checked(vectors: np.ndarray, item_ids: Sequence[Any]) -> tuple[np.ndarray, list[int | str]]:
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = [plain_id(i) for i in item_ids]
    if vectors.ndim != 2 or vectors.shape[0] != len(ids) or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise PublishError(f"expected one non-empty vector per item: {len(ids)} ids, vectors of shape {vectors.shape}")
    bad = ~np.isfinite(vectors).all(axis=1) | (np.linalg.norm(vectors, axis=1) == 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise PublishError(f"{int(bad.sum())} item vectors are zero or not finite (first: item_id {ids[first]!r})")
    seen: set[int | str] = set()
    for i in ids:
        if i in seen:
            raise PublishError(f"item_id {i!r} appears more than once in the catalog")
        seen.add(i)
    return vectors, ids


def _build_verified(client: QdrantClient, name: str, vectors: np.ndarray, ids: list[int | str],
                    batch_size: int, verify_sample: int, alias: str, previous: str | None) -> None:
    step = "create"
    try:
        client.create_collection(
            name,
            # Cosine: the towers' outputs are L2-normalized, so this ranks like their dot product
            # and an item's own vector is always its best match (checked by verify_collection).
            vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.COSINE),
            metadata={"created_at": datetime.now(timezone.utc).isoformat(), "count": len(ids)},
        )
        step = "upsert"
        upsert_points(client, name, vectors, ids, batch_size)
        step = "verify"
        verify_collection(client, name, vectors, ids, verify_sample)
    except Exception as exc:
        try:
            if client.collection_exists(name):
                client.delete_collection(name)
        except Exception:  # the original failure is the one to report
            pass
        raise PublishError(
            f"collection '{name}': {step} failed: {exc}; alias '{alias}' left on '{previous}'"
        ) from exc


def upsert_points(client: QdrantClient, name: str, vectors: np.ndarray, ids: list[int | str],
                  batch_size: int) -> None:
    """Point ids are 0..n-1 (Qdrant accepts only unsigned ints/UUIDs); the item id is the payload."""
    for start in range(0, len(ids), batch_size):
        stop = min(start + batch_size, len(ids))
        client.upsert(
            name,
            points=models.Batch(ids=list(range(start, stop)), vectors=vectors[start:stop].tolist(),
                                payloads=[{"item_id": i} for i in ids[start:stop]]),
            wait=True,
        )


def _unit(v: np.ndarray) -> np.ndarray:
    v64 = np.asarray(v, dtype=np.float64)
    return v64 / np.linalg.norm(v64, axis=-1, keepdims=True)


def verify_collection(client: QdrantClient, name: str, vectors: np.ndarray, ids: list[int | str],
                      sample: int) -> None:
    """Raise PublishError unless `name` holds exactly these points.

    Checks: vector size, exact count, a spread sample of stored vectors and payload ids against what
    was encoded, and that querying a sampled item's own vector returns it (or an identical vector) first.
    """
    n, dim = vectors.shape
    params = client.get_collection(name).config.params.vectors
    size = params.size if isinstance(params, models.VectorParams) else None   # ours are unnamed vectors
    if size != dim:
        raise PublishError(f"collection '{name}' has vectors of size {size}, expected {dim}")
    count = client.count(name, exact=True).count
    if count != n:
        raise PublishError(f"collection '{name}' holds {count} points, expected {n}")

    # Evenly spread (first and last included) so every upsert batch region is looked at.
    picks = np.unique(np.linspace(0, n - 1, min(sample, n)).round().astype(int)).tolist()
    records = {r.id: r for r in client.retrieve(name, ids=picks, with_payload=True, with_vectors=True)}
    expected = _unit(vectors)
    for p in picks:
        rec = records.get(p)
        if rec is None:
            raise PublishError(f"collection '{name}': point {p} (item_id {ids[p]!r}) is missing")
        if rec.payload is None or rec.payload.get("item_id") != ids[p]:
            got = None if rec.payload is None else rec.payload.get("item_id")
            raise PublishError(f"collection '{name}': point {p} has item_id {got!r}, expected {ids[p]!r}")
        diff = float(np.max(np.abs(np.asarray(rec.vector, dtype=np.float64) - expected[p])))
        if not diff <= VECTOR_ATOL:
            raise PublishError(f"collection '{name}': stored vector of item_id {ids[p]!r} differs from the "
                               f"encoded one (max abs difference {diff:.3g})")

    responses = client.query_batch_points(
        name, requests=[models.QueryRequest(query=vectors[p].tolist(), limit=1) for p in picks])
    for p, resp in zip(picks, responses):
        top = resp.points[0].id if resp.points else None
        if top is None or not np.allclose(expected[int(top)], expected[p], atol=VECTOR_ATOL):
            got = None if top is None else ids[int(top)]
            raise PublishError(f"collection '{name}': a query with item_id {ids[p]!r}'s own vector returned "
                               f"item_id {got!r} first")


def switch_alias(client: QdrantClient, alias: str, name: str) -> None:
    """Point `alias` at `name`: delete + create in one call, which Qdrant applies atomically."""
    previous = alias_target(client, alias)
    if previous == name:
        return
    ops: list[Any] = []
    if previous is not None:
        ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
    ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=name, alias_name=alias)))
    client.update_collection_aliases(change_aliases_operations=ops)
    if alias_target(client, alias) != name:
        raise PublishError(f"alias '{alias}' did not move to '{name}' (it points to '{alias_target(client, alias)}')")


def _served(client: QdrantClient) -> set[str]:
    return {a.collection_name for a in client.get_aliases().aliases}


def prune_versions(client: QdrantClient, prefix: str, alias: str, keep_versions: int) -> list[str]:
    """Delete the oldest `<prefix>_<version>` collections beyond `keep_versions` (the live one counts).

    A collection that any alias points to is never deleted; names that are not ours are never touched.
    """
    ours = re.compile(rf"^{re.escape(prefix)}_[0-9a-f]{{{VERSION_CHARS}}}$")
    names = [c.name for c in client.get_collections().collections if ours.match(c.name)]
    newest_first = sorted(names, key=lambda n: (_created_at(client, n), n), reverse=True)
    live = alias_target(client, alias)
    keep = {live} if live in names else set()
    for n in newest_first:
        if len(keep) >= keep_versions:
            break
        keep.add(n)
    served = _served(client)
    doomed = [n for n in newest_first if n not in keep and n not in served]
    for n in doomed:
        client.delete_collection(n)
    return doomed


def _created_at(client: QdrantClient, name: str) -> str:
    metadata = client.get_collection(name).config.metadata or {}
    return str(metadata.get("created_at", ""))


def query_top_k(
    client: QdrantClient,
    collection: str,
    query_vectors: np.ndarray,
    k: int,
    exclude: Sequence[Collection[Any]] | None = None,
) -> list[list[tuple[int | str, float]]]:
    """The top-k (item_id, score) for each query vector, best first, skipping exclude[i]'s item ids.

    Excluded items are dropped by asking for k + len(exclude[i]) hits and filtering here: a
    must_not filter is evaluated in Python by local-mode Qdrant and is far slower than over-fetching.
    """
    query_vectors = np.asarray(query_vectors, dtype=np.float32)
    if exclude is not None and len(exclude) != len(query_vectors):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(query_vectors)} query vectors")
    out: list[list[tuple[int | str, float]]] = []
    for start in range(0, len(query_vectors), QUERY_CHUNK):
        chunk = range(start, min(start + QUERY_CHUNK, len(query_vectors)))
        skips = [set(exclude[i]) if exclude is not None else set() for i in chunk]
        requests = [models.QueryRequest(query=query_vectors[i].tolist(), limit=k + len(s), with_payload=["item_id"])
                    for i, s in zip(chunk, skips)]
        for resp, skip in zip(client.query_batch_points(collection, requests=requests), skips):
            hits = [(p.payload["item_id"], float(p.score)) for p in resp.points
                    if p.payload is not None and p.payload["item_id"] not in skip]
            out.append(hits[:k])
    return out
