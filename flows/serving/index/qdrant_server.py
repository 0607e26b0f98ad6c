"""A Qdrant server or cluster (QDRANT_URL, + QDRANT_API_KEY): one collection per published version,
`<prefix>_<version>`, and Qdrant's own alias moved to the live one in a single atomic call.

The bundle still holds the model files and vectors; its bundle.json names the collection, so a
service reads the collection of its bundle (never a half-switched alias) and other consumers can
follow the alias.
"""
from __future__ import annotations

import os
from typing import Any

from qdrant_client import QdrantClient, models

from flows.errors import PublishError, TowerflowError
from flows.serving.index.base import ITEM_ID, IndexSettings, collection_name, server_url  # noqa: F401 (re-exported)
from flows.serving.index.qdrant_local import ClientIndex

# Quantized search: score 2x the candidates with int8 vectors, rescore them with the originals
# (with limit 1 and no oversampling, a near-duplicate can win on int8 rounding alone).
OVERSAMPLING = 2.0
PAYLOAD_SCHEMA = {"keyword": models.PayloadSchemaType.KEYWORD, "integer": models.PayloadSchemaType.INTEGER,
                  "float": models.PayloadSchemaType.FLOAT}


def server_client() -> QdrantClient:
    url = server_url()
    if url is None:
        raise TowerflowError("QDRANT_URL is not set: a qdrant-server bundle needs the server it was published to")
    return QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None)


class ServerIndex(ClientIndex):
    """HNSW, quantization and payload indexes are the server's own; filters are native."""

    backend = "qdrant-server"

    def __init__(self, client: QdrantClient, collection: str, settings: IndexSettings, create: bool = False):
        super().__init__(client, collection, settings)
        if create:
            if client.collection_exists(collection):   # the leftover of a killed build of this version
                client.delete_collection(collection)
            self._create(models.VectorParams(
                size=settings.dim, distance=models.Distance.COSINE,
                hnsw_config=models.HnswConfigDiff(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct),
                quantization_config=_quantization(settings.quantization)))
            for name, kind in {ITEM_ID: settings.id_kind, **settings.fields}.items():
                self.client.create_payload_index(collection, field_name=name, field_schema=PAYLOAD_SCHEMA[kind])
        elif not client.collection_exists(collection):
            raise TowerflowError(f"Qdrant at {server_url()}: collection '{collection}' not found")

    def _search_params(self, limit: int) -> models.SearchParams:
        # ef below the limit would return fewer, worse hits; Qdrant does not raise it by itself.
        quantization = models.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING) if self.settings.quantization == "scalar" else None
        return models.SearchParams(hnsw_ef=max(self.settings.search_ef, limit), quantization=quantization)


def _quantization(kind: str) -> models.ScalarQuantization | None:
    if kind != "scalar":
        return None
    return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
        type=models.ScalarType.INT8, quantile=0.99, always_ram=True))


def alias_target(client: QdrantClient, alias: str) -> str | None:
    return next((a.collection_name for a in client.get_aliases().aliases if a.alias_name == alias), None)


def switch_alias(client: QdrantClient, alias: str, collection: str) -> None:
    """Point `alias` at `collection`: delete + create in one call, which Qdrant applies atomically."""
    if alias_target(client, alias) == collection:
        return
    if client.collection_exists(alias) and alias_target(client, alias) is None:
        raise PublishError(f"'{alias}' is the name of a collection, not an alias; choose another publish.alias")
    ops: list[Any] = []
    if alias_target(client, alias) is not None:
        ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
    ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
    client.update_collection_aliases(change_aliases_operations=ops)
    if alias_target(client, alias) != collection:
        raise PublishError(f"alias '{alias}' did not move to '{collection}'")


def drop_collection(client: QdrantClient, collection: str) -> bool:
    """Delete a version's collection unless an alias serves it; True when it was deleted."""
    if collection in {a.collection_name for a in client.get_aliases().aliases}:
        return False
    if client.collection_exists(collection):
        client.delete_collection(collection)
    return True
