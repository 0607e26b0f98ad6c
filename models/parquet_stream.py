"""Parquet files read batch by batch in bounded memory.

pyarrow's `ParquetFile` pre-buffers by default (`pre_buffer=True`: the column chunks of each row group
are fetched in coalesced ranges, made for object stores' latency), and `iter_batches` keeps what it
fetched until the iterator ends: reading the 10M scale bench's training examples (875 MB, ten row
groups of 1M rows) batch by batch held ~100 MB more after each row group, with every batch already
dropped and the allocator's free pages handed back (Arrow's own count of allocated bytes grew the
same). A stage that streams a file once held about the whole compressed file by the end; the
training-set check, whose forked workers each read the whole file, held it once per worker (the 10M
materialize stage's tree reached 8.2 GB of PSS). Read as a buffered stream (`pre_buffer=False` with
a read buffer) the same loop stays flat (193-247 MB over the file), and one pass over it was no slower
here (8.7-9.6 s against 10.5-11.9 s, the file in the page cache). It costs time where decoding is most
of the work: the 10M training-set check with two workers, alternated on an idle host, 83.1-90.4 s
against 77.0-77.6 s (peak 3,644-3,815 against 5,037-5,179 MiB), whatever the buffer (1-64 MiB); the
700k validate stage took the same 33.6-33.7 s. Reading one row group at a time with pre-buffering (a
fresh iterator per group, so what it fetched goes with it) was tried in the row checks and not kept:
the 10M check 77.1-77.5 s against 72.9-80.6 buffered, the 700k validate stage 34.8-35.6 against
29.1-34.9 (alternated; the check's workers by then read only their own part of the file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

READ_BUFFER_BYTES = 1 << 20    # each column's read buffer (1 MiB; 8 MiB read no faster)


def open_stream(path: Path | str, **options: Any) -> pq.ParquetFile:
    """`path` to be read batch by batch (`iter_batches`), memory bounded by the batches; `options`
    go to pq.ParquetFile (e.g. read_dictionary)."""
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES, **options)
