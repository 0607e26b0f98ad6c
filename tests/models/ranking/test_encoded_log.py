"""Encoded splits (models/ranking/encoded.py): the very batches a RankingLog pass yields, from one read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests.models.ranking.rank_simulator import SimConfig, simulate

from models.ranking.catalog import build_features
from models.ranking.data import RankBatch, RankingLog, inspect_log
from models.ranking.encoded import EncodedLog, encode_splits
from models.ranking.params import RankParams
from models.ranking.train import build_model, fit
from models.ranking.config import RankerConfig

torch.set_num_threads(1)
FIELDS = ("user", "item", "position", "context", "clicked", "mask", "row", "col", "logged_score")


def _assert_same(a: RankBatch, b: RankBatch) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    assert a.truth.keys() == b.truth.keys()
    for k in a.truth:    # NaN where a row has no truth, and in the padding
        assert torch.equal(a.truth[k].isnan(), b.truth[k].isnan()), k
        assert torch.equal(a.truth[k].nan_to_num(-1), b.truth[k].nan_to_num(-1)), k


@pytest.fixture(scope="module")
def grid_log(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Lists of 3-14 rows, a device context, a grid layout with one list request, the logged score and
    the truth columns: every part a batch can carry."""
    sim = simulate(SimConfig(requests=120, list_len=(3, 14), devices=True, grid_cols=4, seed=11))
    sim.logs.loc[sim.logs.request_id == "r000002", ["grid_row", "grid_col"]] = np.nan
    path = sim.write(tmp_path_factory.mktemp("log"))
    features = build_features(path, ["device"], item_table=sim.items)
    spec = inspect_log(path, context=["device"], truth=("relevance", "user_type"), logged_score=True)
    assert spec.grid
    return path, features, spec


@pytest.mark.parametrize("read_rows,batch_requests", [(37, 5), (1_000_000, 16), (13, 1)])
def test_encoded_splits_yield_the_batches_of_a_pass_over_the_file(grid_log: tuple, tmp_path: Path,
                                                                  read_rows: int, batch_requests: int) -> None:
    """Each split, encoded in one read, yields the batches of a RankingLog pass: the same requests cut
    at the same places (read chunks end batches early), every field with its dtype; pass after pass."""
    path, features, spec = grid_log
    kw = dict(batch_requests=batch_requests, read_rows=read_rows, test_fraction=0.2, valid_fraction=0.2,
              valid_by="user")
    logs = {s: RankingLog(path, features, spec, split=s, **kw) for s in ("train", "test", "valid")}
    encoded = encode_splits(logs, tmp_path / "enc")
    for name, log in logs.items():
        expected = list(log)
        assert len(expected) > 1 and len(encoded[name]) == len(log) == len(expected)
        for _ in range(2):
            got = list(encoded[name])
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                _assert_same(a, b)
    # a log opened from the folder alone (as a forked fit would) reads the same
    again = EncodedLog(tmp_path / "enc" / "test", spec, read_rows)
    for a, b in zip(again, logs["test"]):
        _assert_same(a, b)


def test_splits_decided_differently_are_encoded_each_its_own_way(grid_log: tuple, tmp_path: Path) -> None:
    """One read serves logs whose sides differ (validation by user and by request, another test
    share, the whole file): a chunk's rows are hashed to their sides once per way, never one log's
    sides used for another's."""
    path, features, spec = grid_log
    kw = dict(batch_requests=4, read_rows=29)
    logs = {"by_user": RankingLog(path, features, spec, split="valid", test_fraction=0.2, valid_fraction=0.3,
                                  valid_by="user", **kw),
            "by_request": RankingLog(path, features, spec, split="valid", test_fraction=0.2, valid_fraction=0.3,
                                     **kw),
            "test": RankingLog(path, features, spec, split="test", test_fraction=0.5, **kw),
            "all": RankingLog(path, features, spec, **kw)}
    encoded = encode_splits(logs, tmp_path / "enc")
    sizes = {}
    for name, log in logs.items():
        expected = list(log)
        got = list(encoded[name])
        assert len(got) == len(expected) > 0
        for a, b in zip(got, expected):
            _assert_same(a, b)
        sizes[name] = sum(int(b.mask.sum()) for b in expected)
    assert len(set(sizes.values())) == len(sizes), sizes          # four different row sets


def test_a_pass_holds_about_read_rows_rows_at_a_time(grid_log: tuple, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, features, spec = grid_log
    log = RankingLog(path, features, spec, batch_requests=2, read_rows=40)
    encoded = encode_splits({"all": log}, tmp_path / "enc")["all"]
    spans: list[int] = []
    read = EncodedLog._read

    def spy(self: EncodedLog, c, lo: int, hi: int) -> np.ndarray:
        spans.append(hi - lo)
        return read(self, c, lo, hi)

    monkeypatch.setattr(EncodedLog, "_read", spy)
    batches = list(encoded)
    longest_batch = max(int(b.mask.sum()) for b in batches)
    assert sum(b.n_examples for b in batches) == encoded.rows and len(spans) > 10
    assert max(spans) <= 40 + longest_batch < encoded.rows


def test_a_fit_on_the_encoded_split_gives_the_same_model(grid_log: tuple, tmp_path: Path) -> None:
    path, features, spec = grid_log
    params = RankParams(context_columns=["device"], epochs=2, batch_requests=8, read_rows=50, shuffle_buffer=4)
    log = RankingLog(path, features, spec, batch_requests=8, read_rows=50, split="train", test_fraction=0.2)
    encoded = encode_splits({"train": log}, tmp_path / "enc")["train"]
    states, losses = [], []
    for batches in (log, encoded):
        model = build_model("pal", RankerConfig.build(params, features, grid=True), features, seed=4)
        losses.append(fit(model, batches, params, seed=4).losses)
        states.append(model.state_dict())
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_splits_of_different_reads_are_refused(grid_log: tuple, tmp_path: Path) -> None:
    path, features, spec = grid_log
    logs = {"a": RankingLog(path, features, spec, read_rows=10), "b": RankingLog(path, features, spec, read_rows=20)}
    with pytest.raises(ValueError, match="read_rows"):
        encode_splits(logs, tmp_path / "enc")
