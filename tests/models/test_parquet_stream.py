"""Parquet files streamed batch by batch hold a batch, not the file (models/parquet_stream.py), and every
streamed read in the pipeline goes through it."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.parquet_stream import open_stream

ROOT = Path(__file__).resolve().parents[2]
GROUP_ROWS = 50_000


def _file(folder: Path, groups: int) -> Path:
    """Row groups of ~1.4 MB compressed: random strings and numbers."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    path = folder / "rows.parquet"
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("x", pa.float64())])) as writer:
        for _ in range(groups):
            ids = rng.integers(0, 2**62, GROUP_ROWS).astype(str)
            writer.write_table(pa.table({"id": ids, "x": rng.random(GROUP_ROWS)}))
    return path


def _most_held_while_reading(f: pq.ParquetFile) -> int:
    """The most bytes Arrow held after any batch of a pass over f, each batch dropped at once."""
    most = 0
    for batch in f.iter_batches(batch_size=GROUP_ROWS // 2):
        del batch
        most = max(most, pa.total_allocated_bytes())
    return most


def _compressed(path: Path) -> int:
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(g).column(c).total_compressed_size
               for g in range(meta.num_row_groups) for c in range(meta.num_columns))


def test_a_streamed_read_holds_the_same_however_long_the_file(tmp_path):
    short, long = _file(tmp_path / "short", groups=4), _file(tmp_path / "long", groups=16)
    added = _compressed(long) - _compressed(short)          # 12 more row groups, ~16 MB
    ours = _most_held_while_reading(open_stream(long)) - _most_held_while_reading(open_stream(short))
    assert abs(ours) < added / 12, (ours, added)            # less than one more row group
    # pyarrow's default reader (pre_buffer) fetches the whole file's column chunks as it starts
    default = _most_held_while_reading(pq.ParquetFile(long)) - _most_held_while_reading(pq.ParquetFile(short))
    assert default > added / 2, (default, added)


def test_the_same_rows_as_the_default_reader(tmp_path):
    path = _file(tmp_path / "rows", groups=3)
    ours = pa.Table.from_batches(list(open_stream(path).iter_batches(batch_size=7_000, columns=["id"])))
    assert ours.equals(pq.read_table(path, columns=["id"]))


def _streamed_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, how the file was opened) of every `<file>.iter_batches(...)` call whose file is not an
    open_stream: a call on pq.ParquetFile(...) itself, or on a name assigned from anything else."""
    opened: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            opened[node.targets[0].id] = ast.unparse(node.value)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "iter_batches":
            receiver = node.func.value
            source = opened.get(receiver.id, "?") if isinstance(receiver, ast.Name) else ast.unparse(receiver)
            if not source.startswith("open_stream("):
                bad.append((node.lineno, source))
    return bad


def test_every_streamed_parquet_read_of_the_pipeline_is_bounded():
    found = {}
    for package in ("flows", "features", "models", "validation"):
        for module in (ROOT / package).rglob("*.py"):
            bad = _streamed_reads(ast.parse(module.read_text()))
            if bad:
                found[str(module.relative_to(ROOT))] = bad
    assert not found, f"parquet files streamed without models.parquet_stream.open_stream: {found}"
