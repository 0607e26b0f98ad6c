"""A ranking log's splits encoded once, for the many passes the rank stage makes over them.

The rank stage reads each split of the prepared log dozens of times: every fit's epochs, every
model's held-out measures, the choice of the served model, the ensemble's fits. A RankingLog pass
re-reads the parquet file, hashes each request id to its split, maps ids to vocabulary indices and
sorts each chunk by request (2.2 s for the train split of the 700k / 14M-log shape, a fifth of an
epoch). `encode_splits` does that once for every split in one read, and writes each split's sorted
model inputs as flat binary columns; an EncodedLog pass then only reads row ranges and pads them into
the very batches the RankingLog would yield (the same requests, in the same order, cut at the same
places), so a fit on either gives the same model. Memory stays bounded: a pass holds about
`read_rows` rows at a time (plain reads, not a memory map, so a pass leaves no file pages in RSS).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from models.ranking.data import LogSpec, RankBatch, RankingLog, batch_bounds, request_batch

META = "encoded.json"


@dataclass(frozen=True)
class _Column:
    file: str
    dtype: str                   # as RankingLog builds it (batches get this dtype back)
    stored: str                  # on disk: int32 for indices and positions (half the bytes)
    width: tuple[int, ...]       # trailing shape of a row: () or (C,)

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.stored).itemsize * int(np.prod(self.width, dtype=np.int64))


def _stored(v: np.ndarray) -> np.dtype:
    """Integer inputs are vocabulary indices, positions and grid cells: int32 holds them."""
    if v.dtype.kind in "iu" and v.dtype.itemsize > 4:
        if v.size and (v.max() > np.iinfo(np.int32).max or v.min() < np.iinfo(np.int32).min):
            raise ValueError("an encoded log column holds values beyond int32")
        return np.dtype(np.int32)
    return v.dtype


class EncodedLog:
    """One split's batches, read from the columns `encode_splits` wrote: re-iterable, and its length
    (the lr schedule's) is known without a read."""

    def __init__(self, directory: Path, spec: LogSpec, read_rows: int):
        self.directory, self.spec, self.read_rows = Path(directory), spec, read_rows
        meta = json.loads((self.directory / META).read_text())
        self.columns = {name: _Column(c["file"], c["dtype"], c["stored"], tuple(c["width"]))
                        for name, c in meta["columns"].items()}
        self.starts = np.load(self.directory / "starts.npy")      # (R + 1,) first row of each request
        self.bounds = np.load(self.directory / "bounds.npy")      # (B, 2) [r0, r1) requests of each batch
        self.rows = int(self.starts[-1])

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self) -> Iterator[RankBatch]:
        for first, last in self._spans():
            r_lo, r_hi = int(self.bounds[first, 0]), int(self.bounds[last - 1, 1])
            lo, hi = int(self.starts[r_lo]), int(self.starts[r_hi])
            cols = {name: self._read(c, lo, hi) for name, c in self.columns.items()}
            starts = self.starts[r_lo:r_hi + 1] - lo
            for r0, r1 in self.bounds[first:last]:
                yield request_batch(cols, starts, int(r0) - r_lo, int(r1) - r_lo, self.spec)

    def _spans(self) -> Iterator[tuple[int, int]]:
        """[first, last) batches read together: about read_rows rows (at least one batch)."""
        row_end = self.starts[self.bounds[:, 1]]                  # (B,) the row after each batch
        first = 0
        while first < len(self.bounds):
            begin = self.starts[self.bounds[first, 0]]
            last = max(first + 1, int(np.searchsorted(row_end, begin + self.read_rows, side="right")))
            yield first, last
            first = last

    def _read(self, c: _Column, lo: int, hi: int) -> np.ndarray:
        count = (hi - lo) * int(np.prod(c.width, dtype=np.int64))
        v = np.fromfile(self.directory / c.file, dtype=c.stored, count=count, offset=lo * c.row_bytes)
        return v.reshape((hi - lo, *c.width)).astype(c.dtype, copy=False)


class _Writer:
    """Appends one split's sorted chunks to its column files."""

    def __init__(self, directory: Path, batch_requests: int):
        self.directory, self.batch_requests = directory, batch_requests
        directory.mkdir(parents=True, exist_ok=True)
        self.columns: dict[str, _Column] = {}
        self.files: dict[str, BinaryIO] = {}
        self.starts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.bounds: list[tuple[int, int]] = []
        self.rows = self.requests = 0

    def add(self, cols: dict[str, np.ndarray], starts: np.ndarray) -> None:
        requests = len(starts) - 1
        if requests == 0:
            return
        for name, v in cols.items():
            stored = _stored(v)        # each chunk's values checked against int32
            if name not in self.columns:
                self.columns[name] = _Column(f"{len(self.columns)}.bin", v.dtype.str, stored.str, tuple(v.shape[1:]))
                self.files[name] = open(self.directory / self.columns[name].file, "wb")
            column = self.columns[name]
            if v.dtype.str != column.dtype or tuple(v.shape[1:]) != column.width:
                raise ValueError(f"encoded log column {name!r} changed from {column.dtype}{column.width} "
                                 f"to {v.dtype.str}{v.shape[1:]} between chunks")
            np.ascontiguousarray(v, dtype=stored).tofile(self.files[name])
        self.bounds += [(self.requests + r0, self.requests + r1) for r0, r1 in batch_bounds(requests, self.batch_requests)]
        self.starts.append(starts[1:] + self.rows)
        self.rows += int(starts[-1])
        self.requests += requests

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        np.save(self.directory / "starts.npy", np.concatenate(self.starts))
        np.save(self.directory / "bounds.npy", np.array(self.bounds, dtype=np.int64).reshape(-1, 2))
        meta = {"columns": {name: {"file": c.file, "dtype": c.dtype, "stored": c.stored, "width": list(c.width)}
                            for name, c in self.columns.items()},
                "rows": self.rows, "requests": self.requests, "batches": len(self.bounds)}
        (self.directory / META).write_text(json.dumps(meta, indent=1) + "\n")


def encode_splits(logs: Mapping[str, RankingLog], directory: Path) -> dict[str, EncodedLog]:
    """Every log of `logs` (splits of one file, read the same way) encoded in one read of the file,
    each into directory/<name>/: an EncodedLog yields what iterating the RankingLog yields."""
    first = next(iter(logs.values()))
    for name, log in logs.items():
        if (log.path, log.read_rows, log.spec) != (first.path, first.read_rows, first.spec):
            raise ValueError(f"encode_splits reads one file one way: {name!r} differs in its path, "
                             "read_rows or columns")
    writers = {name: _Writer(Path(directory) / name, log.batch_requests) for name, log in logs.items()}
    try:
        for chunk in first.chunks(first.spec.columns):
            shown = first.shown_rows(chunk)
            # each row's split hashed once a chunk for the splits that share how (3 passes of hashing
            # request and user ids were 3.5 of the 700k bench log's 9.8 s encoding)
            sides: dict[tuple | None, np.ndarray | None] = {}
            for name, log in logs.items():
                if log.split_key not in sides:
                    sides[log.split_key] = log.sides(shown)
                writers[name].add(*log.sorted_rows(log.split_rows(shown, sides[log.split_key])))
    finally:
        for w in writers.values():
            w.close()
    return {name: EncodedLog(Path(directory) / name, log.spec, log.read_rows) for name, log in logs.items()}
