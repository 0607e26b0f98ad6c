"""Users' online rows read from Feast's SQLite online store without importing Feast (serving).

`import feast` costs 0.9-1.3 s on these machines: feast/__init__.py imports every data source, the
feature server (FastAPI) and the SQL registry (SQLAlchemy), and every `feast.*` import runs it, so
Feast 0.67 has no lighter entry point. A one-shot `towerflow recommend` on the demo took 2.1-2.4 s,
more than half of it that import, for one SQL query per feature view; in a warm service Feast's read
was a quarter of a one-user answer's CPU. Here the rows that Feast's SqliteOnlineStore wrote are read
the way its `online_read` reads them: table `<project>_<view>` (no feature view versioning), the
entity key in Feast's serialization version 3 (the entity_key_serialization_version features/store.py
sets), each value a Feast `Value` proto, decoded with Feast's own generated class
(feast/protos/feast/types/Value_pb2.py, which needs only protobuf; loaded from its file, so
feast/__init__.py does not run).

What this reader does not know it does not guess: a read that meets an empty or missing table or any
SQLite error goes through Feast (that read only), and a value of a kind beyond plain scalars and lists
(features/online.py `plain_value`) sends this and every later read through Feast. A Redis store is
always read through Feast (`open_user_rows`). tests/features/test_feature_repo.py holds its rows to
Feast's `get_online_features` (int and string ids, unknown users, pushed events, threads, a rebuilt file).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sqlite3
import struct
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.definitions import PROJECT, USER_HISTORY_FV, USER_KEY, user_count_order
from features.errors import FeatureStoreConfigError

if TYPE_CHECKING:
    from feast import FeatureStore

VALUE_MODULE = "feast.protos.feast.types.Value_pb2"
# SQLite's default limit on bound parameters is 999 in older builds: keys are looked up in chunks
KEYS_PER_QUERY = 500


class NotReadableHere(Exception):
    """Rows this reader cannot decode as Feast would: the caller reads them through Feast."""


def open_user_rows(feast_dir: Path, features_dir: Path) -> "SqliteUserRows | FeatureStore":
    """What serving reads users' online rows with: this reader for a SQLite store, Feast's store for
    Redis (Feast imported without torch where torch is not imported yet: a one-shot answer)."""
    rows = SqliteUserRows.open(feast_dir, features_dir)
    if rows is not None:
        return rows
    from features.store import import_feast_without_torch, open_store

    import_feast_without_torch()
    return open_store(feast_dir, features_dir, offline=None)


@functools.cache
def value_module() -> Any:
    """Feast's generated Value_pb2 module, without running feast/__init__.py when Feast is not
    imported yet; loaded once per process. Protobuf keeps one class per message descriptor, so a
    later `import feast` in this process gets the same classes (its registration of the same file
    is a no-op)."""
    if VALUE_MODULE in sys.modules:
        return sys.modules[VALUE_MODULE]
    spec = importlib.util.find_spec("feast")      # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FeatureStoreConfigError("feast is not installed")
    path = Path(spec.submodule_search_locations[0]) / "protos/feast/types/Value_pb2.py"
    loaded = importlib.util.spec_from_file_location("_towerflow_feast_value_pb2", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def entity_key_bytes(join_key: str, value: int | str, value_types: Any) -> bytes:
    """Feast's `serialize_entity_key` (version 3) of a one-key entity: the key count, the key as a
    STRING with its length, then the value's type, length and bytes (int64 little-endian, str utf-8)."""
    name = join_key.encode("utf8")
    if isinstance(value, str):
        kind, raw = value_types.Value("STRING"), value.encode("utf8")
    else:
        kind, raw = value_types.Value("INT64"), struct.pack("<q", value)
    return b"".join([struct.pack("<III", 1, value_types.Value("STRING"), len(name)), name,
                     struct.pack("<II", kind, len(raw)), raw])


class SqliteUserRows:
    """The online user rows of feast_dir's SQLite store, read with sqlite3 (read-only, one connection
    per thread); a read it cannot decode goes through Feast (`feast()`), and every read after a value
    of a kind it does not know."""

    def __init__(self, db: Path, feast_dir: Path, features_dir: Path):
        self.db = db
        self.uri = f"{db.resolve().as_uri()}?mode=ro"      # read-only: this reader never writes
        self.feast_dir = feast_dir
        self.features_dir = features_dir
        self._feast: "FeatureStore | None" = None
        self._through_feast = False
        # a service reads from several threads: each its own connection, kept while the file is the
        # same one (a rebuild replaces it: features/store.py `reset_online`)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._counts: tuple[tuple[int, int], list[str]] | None = None

    @classmethod
    def open(cls, feast_dir: Path, features_dir: Path) -> "SqliteUserRows | None":
        """The reader of feast_dir's online store; None when it is not a SQLite one (Redis) or was
        never filled (Feast then says what is wrong)."""
        from features.store import recorded_kind

        db = Path(feast_dir) / "online.db"
        if recorded_kind(Path(feast_dir)) != "sqlite" or not db.is_file():
            return None
        return cls(db, Path(feast_dir), Path(features_dir))

    def feast(self) -> "FeatureStore":
        """Feast's store over the same folder (imported without torch when it is not yet), opened once."""
        if self._feast is None:
            from features.store import import_feast_without_torch, open_store

            import_feast_without_torch()
            self._feast = open_store(self.feast_dir, self.features_dir, offline=None)
        return self._feast

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def _file(self) -> tuple[int, int]:
        try:
            stat = os.stat(self.db)
        except OSError as exc:                # between a rebuild's delete and its new file
            raise NotReadableHere(str(exc)) from exc
        return stat.st_dev, stat.st_ino

    def _query(self, sql: str, args: list) -> list[tuple]:
        if self._through_feast:
            raise NotReadableHere("read through Feast since a value this reader does not decode")
        file = self._file()
        held = getattr(self._local, "held", None)
        try:
            if held is None or held[0] != file:
                conn = sqlite3.connect(self.uri, uri=True, check_same_thread=False)   # closed by close()
                with self._lock:
                    if held is not None:      # a replaced file: let go of it (its disk space with it)
                        held[1].close()
                        self._connections.remove(held[1])
                    self._connections.append(conn)
                held = self._local.held = (file, conn)
            return held[1].execute(sql, args).fetchall()
        except sqlite3.Error as exc:          # a missing table, a locked or damaged file: Feast says
            raise NotReadableHere(str(exc)) from exc

    def behaviour_counts(self) -> list[str]:
        """The count features of user_history_fv, as the registry orders them. Every row of the view
        holds all of its features (materialization and pushes write whole rows; a rebuilt repo starts
        from an empty file: features/store.py `reset_online`), so one entity's names are the view's."""
        file, cached = self._file(), self._counts
        if cached is not None and cached[0] == file:
            return cached[1]
        table = _table(USER_HISTORY_FV)
        names = [n for (n,) in self._query(
            f'SELECT feature_name FROM "{table}" WHERE entity_key = (SELECT entity_key FROM "{table}" LIMIT 1)', [])]
        if not names:
            raise NotReadableHere(f"{table} is empty")
        self._counts = (file, user_count_order(names))
        return self._counts[1]

    def read(self, refs: list[str], keys: list) -> tuple[dict[str, list], list[bool]]:
        """What features/online.py reads from Feast's response: feature name -> one value per key
        (None: no value), and whether each key has any non-null value (a known user)."""
        from features.online import NOT_PLAIN, plain_value

        module = value_module()
        views: dict[str, list[str]] = {}
        for ref in refs:
            view, name = ref.split(":", 1)
            views.setdefault(view, []).append(name)
        encoded = [entity_key_bytes(USER_KEY, k, module.ValueType.Enum) for k in keys]
        position = {key: i for i, key in enumerate(encoded)}
        values = {name: [None] * len(keys) for names in views.values() for name in names}
        present = [False] * len(keys)
        for view, names in views.items():
            wanted = set(names)
            for start in range(0, len(encoded), KEYS_PER_QUERY):
                chunk = encoded[start:start + KEYS_PER_QUERY]
                rows = self._query(f'SELECT entity_key, feature_name, value FROM "{_table(view)}" '
                                   f'WHERE entity_key IN ({",".join("?" * len(chunk))})', chunk)
                for key, name, blob in rows:
                    if name not in wanted:
                        continue
                    proto = module.Value()
                    proto.ParseFromString(blob)
                    value = plain_value(proto)
                    if value is NOT_PLAIN:
                        self._through_feast = True       # it will be there on the next read too
                        raise NotReadableHere(f"{view}:{name} holds a {proto.WhichOneof('val')} value")
                    i = position[bytes(key)]
                    values[name][i] = value
                    present[i] = present[i] or value is not None
        return values, present


def _table(view: str) -> str:
    """Feast's online table of a view (`compute_table_id` without versioning)."""
    return f"{PROJECT}_{view}"
