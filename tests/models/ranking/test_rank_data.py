"""The ranking-log reader: shown rows grouped into requests, in bounded memory, with clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tests.models.ranking.rank_simulator import SimConfig, simulate

from models.ranking.catalog import build_features
from models.ranking.data import RankingInputError, RankingLog, inspect_log
from models.ranking.params import RankParams
from models.ranking.config import RankerConfig
from models.ranking.train import build_model

torch.set_num_threads(1)


def _requests(batches) -> set[tuple]:
    """Each request as (user, items, positions, clicks), independent of how it was batched."""
    out = set()
    for b in batches:
        for r in range(len(b.user)):
            m = b.mask[r]
            out.add((int(b.user[r]), tuple(b.item[r][m].tolist()), tuple(b.position[r][m].tolist()),
                     tuple(b.clicked[r][m].tolist())))
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    sim = simulate(SimConfig(requests=80, list_len=(3, 14), seed=3))
    path = sim.write(tmp_path_factory.mktemp("log"))
    return sim, path, build_features(path, item_table=sim.items)


def test_reader_trains_on_shown_rows_grouped_into_requests(small: tuple) -> None:
    sim, path, features = small
    batches = list(RankingLog(path, features, inspect_log(path), batch_requests=16))
    shown = sim.logs[sim.logs.shown]
    assert sum(b.n_examples for b in batches) == len(shown)
    assert sum(float(b.clicked.sum()) for b in batches) == shown.clicked.sum()
    assert sum(len(b.user) for b in batches) == sim.logs.request_id.nunique()
    lengths = torch.cat([b.mask.sum(dim=1) for b in batches])
    assert lengths.min() == 3 and lengths.max() == 14          # lists of different lengths
    assert max(int(b.position.max()) for b in batches) == 14   # positions beyond 10
    assert any(bool(((b.clicked.sum(dim=1) == 0) & b.mask.any(dim=1)).any()) for b in batches)
    for b in batches:   # each list in position order, 1..n, padding after
        for r in range(len(b.user)):
            n = int(b.mask[r].sum())
            assert b.position[r, :n].tolist() == list(range(1, n + 1))


def test_small_read_batches_give_the_same_requests_and_bounded_tables(small: tuple) -> None:
    sim, path, features = small
    spec = inspect_log(path)
    sizes: list[int] = []
    log = RankingLog(path, features, spec, read_rows=10)
    original = log.sorted_rows
    log.sorted_rows = lambda table: (sizes.append(table.num_rows), original(table))[1]  # type: ignore[method-assign]
    pieces = _requests(log)
    whole = _requests(RankingLog(path, features, spec, read_rows=1_000_000))
    assert pieces == whole and len(whole) == 80
    # a read batch plus the held-back rows of one request, never the whole file
    longest = sim.logs.groupby("request_id").size().max()
    assert max(sizes) <= 10 + longest < len(sim.logs)


@pytest.mark.parametrize("split,kw", [("all", {}), ("train", dict(test_fraction=0.25)),
                                      ("valid", dict(test_fraction=0.2, valid_fraction=0.3, valid_by="user"))])
def test_a_log_knows_how_many_batches_a_pass_yields(small: tuple, split: str, kw: dict) -> None:
    """len(log) is what the lr schedule plans with: the batches of one pass, whatever the read size."""
    _, path, features = small
    spec = inspect_log(path)
    for read_rows, batch_requests in ((10, 3), (13, 16), (1_000_000, 7)):
        log = RankingLog(path, features, spec, split=split, read_rows=read_rows, batch_requests=batch_requests, **kw)
        assert len(log) == sum(1 for _ in log) > 0


def test_held_out_split_is_disjoint_complete_and_stable(small: tuple) -> None:
    _, path, features = small
    spec = inspect_log(path)
    kw = dict(test_fraction=0.25)
    train = _requests(RankingLog(path, features, spec, split="train", **kw))
    test = _requests(RankingLog(path, features, spec, split="test", **kw))
    assert train and test and not train & test
    assert train | test == _requests(RankingLog(path, features, spec))
    assert test == _requests(RankingLog(path, features, spec, split="test", read_rows=13, **kw))


def test_contract_stage_column_unknown_ids_and_numeric_only_items(small: tuple, tmp_path: Path) -> None:
    sim, path, features = small
    logs = sim.logs.assign(stage=np.where(sim.logs.shown, "shown", "retrieved")).drop(columns="shown")
    logs.loc[logs.request_id == "r000000", "user_id"] = "never-seen"
    logs.loc[logs.request_id == "r000001", "item_id"] = 10_000
    other = tmp_path / "contract.parquet"
    logs.to_parquet(other, index=False)
    spec = inspect_log(other)
    assert spec.shown_by == "stage"
    batches = list(RankingLog(other, features, spec, batch_requests=1000))
    assert sum(b.n_examples for b in batches) == int(sim.logs.shown.sum())
    b = batches[0]
    assert int(b.user[0]) == 0 and (b.item[1][b.mask[1]] == 0).all()   # OOV index, no error
    # users carry no features, items only numeric ones (web-search LTR catalogs)
    assert features.user_vectors.shape == (len(features.users), 0)
    assert features.item_numeric.shape == (len(features.items), 6)
    assert np.allclose(features.item_numeric[1:].mean(axis=0), 0, atol=1e-5)


@pytest.mark.parametrize("drop", ["clicked", "position", "request_id"])
def test_missing_log_columns_raise_a_clear_error(small: tuple, tmp_path: Path, drop: str) -> None:
    sim, _, _ = small
    bad = tmp_path / "bad.parquet"
    sim.logs.drop(columns=drop).to_parquet(bad, index=False)
    with pytest.raises(RankingInputError, match=rf"lacks column\(s\) \['{drop}'\]"):
        inspect_log(bad)


def test_bad_inputs_raise_clear_errors(small: tuple, tmp_path: Path) -> None:
    sim, path, features = small
    with pytest.raises(RankingInputError, match="not found"):
        inspect_log(tmp_path / "nope.parquet")
    with pytest.raises(RankingInputError, match=r"lacks column\(s\) \['device'\]"):
        inspect_log(path, context=["device"])
    with pytest.raises(RankingInputError, match="must be numeric; columns \\['colour'\\]"):
        build_features(path, item_table=sim.items.assign(colour="red"))
    with pytest.raises(RankingInputError, match="lacks column 'item_id'"):
        build_features(path, item_table=sim.items.drop(columns="item_id"))
    no_pos = sim.logs.copy()
    no_pos.loc[0, "position"] = pd.NA
    bad = tmp_path / "nopos.parquet"
    no_pos.to_parquet(bad, index=False)
    with pytest.raises(RankingInputError, match="1 shown row\\(s\\) have no position"):
        list(RankingLog(bad, features, inspect_log(bad)))
    with pytest.raises(RankingInputError, match="truth column 'user_id' must be numeric"):
        list(RankingLog(path, features, inspect_log(path, truth=["user_id"])))


def test_context_and_grid_columns_reach_the_batch(tmp_path: Path) -> None:
    sim = simulate(SimConfig(requests=30, devices=True, grid_cols=4, seed=5))
    sim.logs.loc[sim.logs.request_id == "r000002", ["grid_row", "grid_col"]] = np.nan   # a list layout
    path = sim.write(tmp_path)
    features = build_features(path, ["device"], item_table=sim.items)
    spec = inspect_log(path, context=["device"])
    assert spec.grid
    b = next(iter(RankingLog(path, features, spec, batch_requests=100)))
    assert b.context.shape == b.item.shape + (1,)
    assert set(b.context[b.mask].unique().tolist()) == {1, 2}
    assert b.row is not None and b.col is not None
    assert (b.row[2][b.mask[2]] == 0).all()                        # no grid: index 0
    assert b.col[0, :4].tolist() == [1, 2, 3, 4] and b.row[0, 4] == 2
    assert b.row.dtype == b.position.dtype == torch.int64   # nullable float columns become indices
    # one model over both layouts: the list request reads row/col as unknown
    params = RankParams(context_columns=["device"])
    model = build_model("xpa", RankerConfig.build(params, features, grid=True), features, seed=0)
    assert torch.isfinite(model.loss(b))


def test_the_validation_split_is_carved_from_training_only() -> None:
    from models.ranking.data import _held_out, split_of

    ids = np.array([f"r{i}" for i in range(20000)])
    side = split_of(ids, 0.2, 0.1)
    assert ((side == 1) == _held_out(ids, 0.2)).all()                        # the test split never moves
    assert abs((side == 2).mean() - 0.1) < 0.01 and abs((side == 0).mean() - 0.7) < 0.01
    assert (split_of(ids, 0.2) != 2).all()


def test_serve_auto_needs_validation_requests() -> None:
    with pytest.raises(ValueError, match="validation_fraction"):
        RankParams(serve="auto", validation_fraction=0.0)
    assert RankParams(serve="pal", validation_fraction=0.0).serve == "pal"


def test_validation_by_user_holds_out_every_request_of_its_users(small: tuple) -> None:
    """Validation by user must not leak: no validation user has a training request, the test split
    stays where it was, and together the three splits are the whole log."""
    _, path, features = small
    spec = inspect_log(path)
    kw = dict(test_fraction=0.2, valid_fraction=0.3, valid_by="user")

    def users(split: str) -> set[int]:
        return {u for b in RankingLog(path, features, spec, split=split, read_rows=17, **kw) for u in b.user.tolist()}

    train, valid = users("train"), users("valid")
    assert train and valid and not train & valid
    test_by_user = _requests(RankingLog(path, features, spec, split="test", **kw))
    assert test_by_user == _requests(RankingLog(path, features, spec, split="test", test_fraction=0.2))
    parts = [_requests(RankingLog(path, features, spec, split=s, **kw)) for s in ("train", "test", "valid")]
    assert sum(map(len, parts)) == len(set.union(*parts)) == 80


def test_validation_by_auto_needs_enough_users() -> None:
    from models.ranking.select import MIN_VALIDATION_USERS, validation_by

    assert validation_by("auto", 10 * MIN_VALIDATION_USERS, 0.1).by == "user"
    assert validation_by("auto", 5 * MIN_VALIDATION_USERS, 0.1).by == "request"
    assert validation_by("user", 3, 0.1).by == "user"
