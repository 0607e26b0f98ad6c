"""The pre-encoded training stream (models/stream.py): hard negatives, per-user positives, and the
stream read from disk in batches."""
from __future__ import annotations

import pickle

import pandas as pd
import torch

from models.encoding import FeatureEncoder
from models.params import SampleParams, TrainParams
from models.stream import TrainingStream, gather
from models.training import fit
from training_data import (TINY_SCHEMA, retrieved_logs, run_sample, stream_and_config, synthetic_training_dir,
                           tiny_frames)


def test_stream_holds_hard_negatives_and_each_users_positives():
    items, examples = tiny_frames()
    enc = FeatureEncoder.fit(TINY_SCHEMA, items, examples)
    examples["hard_negatives"] = [[12, 13], [], [10]]
    stream = TrainingStream.build(enc, examples, items)
    assert stream.hard.tolist() == [[3, 4], [0, 0], [1, 0]]
    user = stream.users["user"]                         # users 1, 1, 2
    # user 1 has items 10 and 11 (indices 1, 2); user 2 has item 12 (index 3)
    assert stream.hits(user, torch.tensor([1, 2, 3, 4])).tolist() == [
        [True, True, False, False], [True, True, False, False], [False, False, True, False]]
    assert stream.hard_negative_summary() == {"hard_negatives_per_example": 1.0}
    # index columns are held as int32 (half the memory of a 10M stream's history) and gathered as int64
    assert stream.hard.dtype == stream.users["history"].dtype == torch.int32
    rows = gather(stream.users, torch.tensor([2, 0]))
    assert rows["history"].dtype == torch.int64 and rows["history"].tolist() == stream.users["history"][[2, 0]].tolist()


def test_stream_read_from_disk_in_batches_equals_the_in_memory_one(tmp_path):
    """from_parquet (small batches, memory-mapped spill) builds the same arrays as build(), trains to
    the same weights, and pickles as file paths (what data-parallel workers receive)."""
    torch.set_num_threads(1)
    training, schema = synthetic_training_dir(tmp_path / "data")
    run_sample(training, tmp_path / "samples", SampleParams(hard_negatives=4),
               ranking_logs=retrieved_logs(training, tmp_path / "logs.parquet"))
    encoder, memory, tower_cfg, _ = stream_and_config(training, schema, tmp_path / "samples")
    items = pd.read_parquet(training / "items.parquet")
    disk = TrainingStream.from_parquet(encoder, tmp_path / "samples" / "train.parquet", items,
                                       spill=tmp_path / "spill", batch_rows=97)
    assert len(disk) == len(memory) > 97 * 3
    assert memory.users.keys() == disk.users.keys()
    for name in memory.users:
        torch.testing.assert_close(disk.users[name], memory.users[name], rtol=0, atol=0, msg=name)
    for name in ("item_idx", "weights", "counts", "hard", "pos_ptr", "pos_items"):
        torch.testing.assert_close(getattr(disk, name), getattr(memory, name), rtol=0, atol=0, msg=name)
    assert disk.hard.shape[1] > 0 and {"history", "hard"} <= set(disk.mapped)
    assert all(p.parent == tmp_path / "spill" and p.exists() for p in disk.mapped.values())

    wire = pickle.dumps(disk)
    assert len(wire) < disk.users["history"].numel() * 8 / 4      # the history travels as a path
    again = pickle.loads(wire)
    torch.testing.assert_close(again.users["history"], disk.users["history"], rtol=0, atol=0)

    train_cfg = TrainParams(epochs=2, batch_size=128, threads=1, negatives=4, ssl_weight=0.1)
    a, b = fit(memory, tower_cfg, train_cfg, seed=5), fit(disk, tower_cfg, train_cfg, seed=5)
    assert a.losses == b.losses


def test_the_per_batch_matching_reads_each_users_list_even_beside_users_without_one(monkeypatch):
    """hits without the whole-stream table (a large catalog): the batch users' positive lists are read
    end to end, a user with no list (index 0 here) in between gets no hit, and the mask is the table's."""
    import models.stream as stream_module

    items, examples = tiny_frames()
    enc = FeatureEncoder.fit(TINY_SCHEMA, items, examples)
    stream = TrainingStream.build(enc, examples, items)
    user = torch.tensor([2, 0, 1, 0, 2, 1])
    candidates = torch.tensor([3, 1, 2, 4, 1, 3])
    expected = stream.hits(user, candidates)                           # the table path (a tiny catalog)
    monkeypatch.setattr(stream_module, "TABLE_MAX_ITEMS", 0)
    stream.table = None
    assert stream._user_item_table() is None
    monkeypatch.setattr(stream_module, "DENSE_HITS", 0)                # matches spread one by one
    assert torch.equal(stream.hits(user, candidates), expected)
    assert not expected[[1, 3]].any() and expected[0, 0] and expected[2, 1] and expected[2, 2]
    monkeypatch.setattr(stream_module, "DENSE_HITS", 10**9)            # the dense (users x items) branch
    assert torch.equal(stream.hits(user, candidates), expected)
