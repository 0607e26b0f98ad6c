"""The published bundle store: the one owner of its on-disk format and of the live state.

    <published>/versions/<version>/     model/ (model.pt, encoder.json, model.json), schema.json,
                                        item_vectors.parquet, items.parquet, index/, ranker/ (the
                                        rank stage's served ranker, when there is one), the run's
                                        reports, bundle.json (with `files`: sha256 of each file)
    <published>/versions/<version>/added_items/   the one append-only part: items added since
    <published>/versions/.partial-<version>-<pid>/   a bundle being built
    <published>/versions/.deleting-<version>-<pid>/  a pruned version being removed
    <published>/LIVE                    {"version": ...}: the one serving reads
    <published>/history.jsonl           one line per publish / rollback: who, when, from, to, why
    <published>/.lock                   held by a publish, rollback or prune (flows/locks.py)
    <published>/.additions.lock         held while items are added or an index is copied

Every change goes through `BundleStore`: a bundle is built under a .partial name, fsynced and
renamed into place with its file digests; LIVE is replaced atomically, and only ever to a version
whose digests match; a pruned version is renamed to .deleting-* before it is removed, so a kill
leaves either a complete version or a name that listing ignores. Names starting with '.' are never
versions. Others read through this module (serving, the reports, fine-tuning, the CLI). It imports
no index code: what a version keeps outside its folder (a Qdrant server collection and alias) is
handled by the `Outside` the caller passes (flows/serving/bundles.py), so that reading the store
stays cheap for the stages that only look at the live model.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flows.durable import append_records, fsync_dir, fsync_tree, pause_point, replace_file, write_atomic
from flows.errors import PublishError, StoreBusy, TowerflowError
from flows.locks import file_lock

if TYPE_CHECKING:  # pyarrow and pandas are imported where used: reading LIVE stays cheap (the CLI)
    import pandas as pd
    import pyarrow as pa

MODEL_DIR, RANKER_DIR, INDEX_DIR, ADDED_DIR = "model", "ranker", "index", "added_items"
# the model its run evaluated (trained without that run's holdout): what the next run's gate scores
EVAL_MODEL_DIR = "eval_model"
MODEL_FILES = ("model.pt", "encoder.json", "model.json")
BUNDLE_JSON = "bundle.json"
PARTIAL_JSON = "partial.json"     # what a partial build created outside its folder (a server collection)
LAST_PUBLISH = "last_publish.json"
PARTIAL = re.compile(r"^\.partial-(?P<version>.+)-(?P<pid>\d+)$")
DELETING = re.compile(r"^\.deleting-(?P<version>.+)-(?P<pid>\d+)$")
TMP = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp$")          # flows/durable.py replace_file
ADDITIONS_WAIT_S = 30.0
ADDITIONS_LOCK = ".additions.lock"     # in the store's root: one addition or removal at a time           # an addition holds the lock for an encode and a few writes
# Not covered by the digests: the index and the sidecar change after publishing (added items).
UNHASHED = {INDEX_DIR, ADDED_DIR, BUNDLE_JSON, PARTIAL_JSON}


class NothingPublished(TowerflowError):
    """No live bundle yet."""


class Outside(Protocol):
    """What a version keeps outside its folder (flows/serving/bundles.py: a Qdrant server)."""

    def switch(self, meta: dict[str, Any]) -> None: ...

    def drop(self, meta: dict[str, Any]) -> None: ...


def model_digest(model_dir: Path) -> str:
    """Hash of the model files: which model a bundle serves (shown by `towerflow index list`)."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        path = Path(model_dir) / name
        if path.exists():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def file_digests(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every immutable file of a bundle, by path relative to it."""
    out = {}
    for path in sorted(Path(bundle_dir).rglob("*")):
        rel = path.relative_to(bundle_dir)
        if path.is_file() and rel.parts[0] not in UNHASHED:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel.as_posix()] = h.hexdigest()
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):   # no passwd entry (containers)
        return str(os.getuid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


class BundleStore:
    """The published folder: complete versions, the LIVE pointer, history, additions, pruning."""

    def __init__(self, root: Path, outside: Outside | None = None):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.live_file = self.root / "LIVE"
        self.history_file = self.root / "history.jsonl"
        self.outside = outside

    @classmethod
    def containing(cls, bundle_dir: Path) -> "BundleStore":
        """The store a version folder belongs to."""
        return cls(Path(bundle_dir).parent.parent)

    # --- reading ----------------------------------------------------------------------------------
    def live(self) -> str | None:
        try:
            version = json.loads(self.live_file.read_text()).get("version")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            raise PublishError(f"{self.live_file}: unreadable ({exc}); roll back to a listed version") from None
        return version if isinstance(version, str) and version else None

    def live_dir(self) -> Path:
        version = self.live()
        if version is None:
            raise NothingPublished(f"{self.live_file} not found: nothing is published yet; run the publish "
                                   "stage (`towerflow run`)")
        return self.versions / version

    def version_dir(self, version: str) -> Path:
        return self.versions / version

    def model_dir(self, version: str) -> Path:
        return self.versions / version / MODEL_DIR

    def ranker_dir(self, version: str) -> Path:
        return self.versions / version / RANKER_DIR

    def complete(self) -> list[str]:
        """Complete versions, oldest first (by created_at: names have one-second resolution)."""
        if not self.versions.is_dir():
            return []
        names = [p.name for p in self.versions.iterdir() if not p.name.startswith(".") and (p / BUNDLE_JSON).is_file()]
        return sorted(names, key=lambda v: (str(self.meta(v).get("created_at", "")), v))

    def meta(self, version: str) -> dict[str, Any]:
        path = self.versions / version / BUNDLE_JSON
        if version.startswith(".") or not path.is_file():
            raise PublishError(f"unknown version '{version}'; available: {self._available()}")
        return json.loads(path.read_text())

    def find_digest(self, digest: str) -> str | None:
        """The newest complete version with this content, if any."""
        return next((v for v in reversed(self.complete()) if self.meta(v).get("digest") == digest), None)

    def history(self) -> list[dict[str, Any]]:
        """Publish / rollback records, oldest first (a torn last line of a killed writer is skipped)."""
        if not self.history_file.is_file():
            return []
        out = []
        for line in self.history_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def rolled_back_from(self, version: str) -> dict[str, Any] | None:
        """The rollback that took `version` off live, unless it was made live again since."""
        for entry in reversed(self.history()):
            if entry.get("to") == version:
                return None
            if entry.get("action") == "rollback" and entry.get("from") == version:
                return entry
        return None

    def verify(self, version: str) -> None:
        """Raise PublishError unless the version's files are the ones published (bundle.json `files`;
        a bundle from before digests were recorded: its model files)."""
        meta, folder = self.meta(version), self.versions / version
        expected = meta.get("files")
        if expected is None:
            if model_digest(folder / MODEL_DIR) != meta.get("model_digest"):
                raise PublishError(f"version {version}: the model files differ from the ones published")
            return
        found = file_digests(folder)
        for name, digest in expected.items():
            if name not in found:
                raise PublishError(f"version {version}: {name} is missing; the bundle is damaged")
            if found[name] != digest:
                raise PublishError(f"version {version}: {name} differs from the published file (sha256); "
                                   "the bundle is damaged")

    def _available(self) -> str:
        live = self.live()
        names = [f"{v} (live)" if v == live else v for v in self.complete()]
        return ", ".join(names) or "none"

    # --- writing (under `locked`) -----------------------------------------------------------------
    @contextmanager
    def locked(self, wait_s: float = 0.0) -> Iterator[None]:
        """One publish, rollback or prune at a time (across processes)."""
        self.versions.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / ".lock", wait_s=wait_s, error=StoreBusy,
                       busy=f"{self.root}: another publish or rollback is running; try again when it has finished"):
            yield

    def partial(self, version: str, created: dict[str, Any] | None = None) -> Path:
        """A fresh build folder; `created` records what the build makes outside it (cleanup)."""
        path = self.versions / f".partial-{version}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        write_atomic(path / PARTIAL_JSON, json.dumps(created or {}))
        return path

    def promote(self, partial: Path, version: str, meta: dict[str, Any]) -> Path:
        """Make a verified build a complete version: bundle.json (meta + the file digests), fsync it
        all, then one rename."""
        (partial / PARTIAL_JSON).unlink(missing_ok=True)
        meta = {**meta, "files": file_digests(partial)}
        write_atomic(partial / BUNDLE_JSON, json.dumps(meta, indent=2, default=str) + "\n")
        fsync_tree(partial)
        final = self.versions / version
        os.rename(partial, final)
        fsync_dir(self.versions)
        return final

    def switch(self, version: str, action: str, reason: str) -> str | None:
        """Make `version` live (after checking its digests; its server alias first, then LIVE) and
        record it; returns the old one."""
        previous = self.live()
        meta = self.meta(version)
        self.verify(version)
        self._outside(meta, "switch")
        pause_point("live")
        write_atomic(self.live_file, json.dumps({"version": version}) + "\n")
        entry = {"action": action, "from": previous, "to": version, "who": _user(),
                 "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason}
        append_records(self.history_file, [json.dumps(entry)])
        return previous

    def prune(self, keep: int) -> list[str]:
        """Delete complete versions beyond the newest `keep` (the live one always stays and counts).
        Each is renamed out of the listing first: a kill part way never leaves a half version."""
        live = self.live()
        others = [v for v in reversed(self.complete()) if v != live]
        doomed = others[max(0, keep - (1 if live else 0)):]
        for version in doomed:
            meta = self.meta(version)
            gone = self.versions / f".deleting-{version}-{os.getpid()}"
            os.rename(self.versions / version, gone)
            fsync_dir(self.versions)
            pause_point("prune")
            self._outside(meta, "drop")
            shutil.rmtree(gone)
        return doomed

    def clean_partials(self) -> list[str]:
        """Remove builds, deletions and temporary files left by killed processes (their pid is gone);
        a running one's are kept."""
        removed = self._clean_tmp()
        for path in sorted(self.versions.glob(".*-*")) if self.versions.is_dir() else []:
            m = PARTIAL.match(path.name) or DELETING.match(path.name)
            if m is None or (_pid_alive(int(m["pid"])) and int(m["pid"]) != os.getpid()):
                continue
            created = path / (PARTIAL_JSON if path.name.startswith(".partial-") else BUNDLE_JSON)
            if created.is_file():
                try:
                    self._outside(json.loads(created.read_text() or "{}"), "drop")
                except ValueError:   # torn by the kill: nothing was created outside yet
                    pass
            shutil.rmtree(path)
            removed.append(path.name)
        return removed

    def _clean_tmp(self) -> list[str]:
        """durable.replace_file's `.<name>.<pid>.tmp` of killed writers: in the root and the sidecars."""
        folders = [self.root, *(self.versions / v / ADDED_DIR for v in self.complete())]
        removed = []
        for folder in folders:
            for path in folder.glob(".*.tmp") if folder.is_dir() else []:
                m = TMP.match(path.name)
                if m is not None and not _pid_alive(int(m["pid"])):
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        return removed

    def write_last_publish(self, summary: dict[str, Any]) -> None:
        write_atomic(self.root / LAST_PUBLISH, json.dumps(summary, indent=2) + "\n")

    def _outside(self, meta: dict[str, Any], action: str) -> None:
        if meta.get("backend") != "qdrant-server" or not meta.get("collection"):
            return
        if self.outside is None:
            raise PublishError(f"version {meta.get('version')} lives on a Qdrant server: open the store with "
                               "flows.serving.bundles.open_store to change it")
        getattr(self.outside, action)(meta)

    # --- additions: the one part of a bundle that changes (flows/serving/items.py) ---------------
    @contextmanager
    def additions_locked(self, wait_s: float = ADDITIONS_WAIT_S) -> Iterator[None]:
        """One addition (or index copy) at a time across processes (the service and the CLI)."""
        busy = f"another process has been adding or removing items for {wait_s:g} s; try again later"
        with file_lock(self.root / ADDITIONS_LOCK, wait_s=wait_s, error=StoreBusy, busy=busy):
            yield


def read_ops(bundle_dir: Path) -> "pd.DataFrame":
    """Every row of a bundle's sidecar, oldest file first, with `op` (its file's name: sorts in
    time) and `removed` (a tombstone row)."""
    import pandas as pd

    files = sorted((Path(bundle_dir) / ADDED_DIR).glob("*.parquet"))
    if not files:
        return pd.DataFrame({"item_id": [], "vector": [], "removed": pd.Series([], dtype=bool),
                             "op": pd.Series([], dtype=object)})
    import pyarrow.parquet as pq

    frames = [pq.read_table(f).to_pandas().assign(op=f.name) for f in files]
    ops = pd.concat(frames, ignore_index=True)
    ops["removed"] = ops["removed"].eq(True) if "removed" in ops else False    # addition rows: NaN
    return ops


def latest_ops(ops: "pd.DataFrame") -> "pd.DataFrame":
    """Each item's newest operation."""
    return ops.sort_values("op", kind="stable").drop_duplicates("item_id", keep="last")


def read_additions(bundle_dir: Path, ops: "pd.DataFrame | None" = None) -> "pd.DataFrame":
    """The items a bundle's sidecar adds and has not removed since: item_id, features, vector."""
    ops = read_ops(bundle_dir) if ops is None else ops
    added = latest_ops(ops)
    added = added.loc[~added["removed"].astype(bool)]
    return added.drop(columns=["removed", "op"]).reset_index(drop=True)


def read_removed(bundle_dir: Path, ops: "pd.DataFrame | None" = None) -> set[Any]:
    """The items whose newest operation in a bundle's sidecar is a removal."""
    ops = read_ops(bundle_dir) if ops is None else ops
    latest = latest_ops(ops)
    return set(latest.loc[latest["removed"].astype(bool), "item_id"].tolist())


def sidecar_signature(bundle_dir: Path) -> tuple[str, ...]:
    """What the watcher compares to notice an addition made by another process."""
    folder = Path(bundle_dir) / ADDED_DIR
    return tuple(sorted(p.name for p in folder.glob("*.parquet"))) if folder.is_dir() else ()


def catalog_ids(bundle_dir: Path) -> set[Any]:
    """The bundle's catalog (items.parquet) and its added items: what events may refer to."""
    import pyarrow.parquet as pq

    ids = set(pq.read_table(Path(bundle_dir) / "items.parquet", columns=["item_id"]).column(0).to_pylist())
    ops = read_ops(bundle_dir)
    return (ids | set(read_additions(bundle_dir, ops)["item_id"].tolist())) - read_removed(bundle_dir, ops)


def write_additions(bundle_dir: Path, name: str, table: "pa.Table") -> Path:
    """One sidecar file (call under `additions_locked`): written, fsynced, renamed, its folder
    fsynced, before the index changes. A kill leaves the file whole or absent."""
    folder = Path(bundle_dir) / ADDED_DIR
    new = not folder.is_dir()
    folder.mkdir(exist_ok=True)
    if new:
        fsync_dir(folder.parent)
    path = folder / f"{name}.parquet"
    import pyarrow.parquet as pq

    replace_file(path, lambda tmp: pq.write_table(table, tmp))
    return path
