"""The optimizer pair (models/optim.py): large tables on sparse gradients + SparseAdam, the rest on Adam."""
from __future__ import annotations

import pytest
import torch

from models.optim import (FAST_COALESCE_ENTRIES, SPARSE_AUTO_ROWS, RowSparseAdam, TowerOptimizer, coalesced,
                          make_optimizer, set_sparse, sparse_min_rows, sparse_note, train_sparse_rows)
from models.params import TrainParams
from models.towers import TwoTower, TwoTowerConfig


def _model(n_items: int = 60) -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(TwoTowerConfig(n_items=n_items, n_users=1, user_categorical=[5], user_numeric=1, user_multi={},
                                   item_categorical=[7], item_numeric=2, item_multi={"genre": 9}))


def _batch(n_items: int, gen: torch.Generator) -> tuple[dict, dict]:
    b = 32
    users = {"user": torch.zeros(b, dtype=torch.long), "history": torch.randint(0, n_items, (b, 6), generator=gen),
             "cat": torch.randint(0, 5, (b, 1), generator=gen), "num": torch.randn(b, 1, generator=gen)}
    items = {"item": torch.randint(1, n_items, (b,), generator=gen), "cat": torch.randint(0, 7, (b, 1), generator=gen),
             "num": torch.randn(b, 2, generator=gen), "multi:genre": torch.randint(0, 9, (b, 3), generator=gen)}
    return users, items


def _steps(model: TwoTower, opt: TowerOptimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        users, items = _batch(model.cfg.n_items, gen)
        q, c = model(users, items)
        # scaled so that every used row's gradient is far above Adam's eps, which the two optimizers
        # place differently (SparseAdam adds it before the bias correction)
        loss = -1e4 * (q * c).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_only_tables_of_at_least_min_rows_get_sparse_gradients():
    model = _model(n_items=60)
    sparse = set_sparse(model, 50)
    assert [t.num_embeddings for t in sparse] == [60]            # the item-id table, not the 5/7/9-row ones
    users, items = _batch(60, torch.Generator().manual_seed(0))
    q, c = model(users, items)
    (q.sum() + c.sum()).backward()
    assert model.item_emb.weight.grad.is_sparse                   # history pooling and item id, both sparse
    assert not model.item_cat.tables[0].weight.grad.is_sparse
    set_sparse(model, None)
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))


def test_first_update_equals_dense_adams():
    # Adam's first step moves exactly the rows a batch used (the moments of the others are zero), so
    # SparseAdam's must be the same update; afterwards they differ only by the lazy moments
    dense, sparse = _model(), _model()
    _steps(dense, TowerOptimizer(dense, 0.01, 0.0, None), 1)
    opt = TowerOptimizer(sparse, 0.01, 0.0, 1)
    assert len(opt.parts) == 2 and opt.sparse_tables == 4
    _steps(sparse, opt, 1)
    for (name, a), b in zip(dense.state_dict().items(), sparse.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_state_round_trips_and_refuses_another_layout():
    model = _model()
    opt, sched = make_optimizer(model, TrainParams(sparse_min_rows=1), lambda t: 0.5)
    _steps(model, opt, 2)
    sched.step()
    again, again_sched = make_optimizer(_model(), TrainParams(sparse_min_rows=1), lambda t: 0.5)
    again.load_state_dict(opt.state_dict())
    again_sched.load_state_dict(sched.state_dict())
    assert again_sched.last_epoch == sched.last_epoch == 1
    assert again.parts[1].state_dict()["state"].keys() == opt.parts[1].state_dict()["state"].keys()
    dense_only, _ = make_optimizer(_model(), TrainParams(sparse_min_rows="off"), lambda t: 1.0)
    try:
        dense_only.load_state_dict(opt.state_dict())
    except ValueError as exc:
        assert "other parts" in str(exc)
    else:
        raise AssertionError("a two-part optimizer state loaded into a one-part optimizer")


def test_auto_threshold_and_what_turns_sparse_off():
    assert train_sparse_rows(TrainParams()) == SPARSE_AUTO_ROWS
    assert train_sparse_rows(TrainParams(sparse_min_rows=10)) == 10
    assert train_sparse_rows(TrainParams(sparse_min_rows="off")) is None
    decayed = TrainParams(weight_decay=1e-4)
    assert train_sparse_rows(decayed) is None and "weight_decay" in sparse_note("auto", decayed.weight_decay)
    assert train_sparse_rows(TrainParams(compile=True)) is None
    assert sparse_note("auto", 0.0) is None and sparse_note("off", 1e-4) is None
    assert sparse_min_rows("auto", 0.0, auto_rows=7) == 7


def test_off_as_yaml_writes_it_turns_sparse_gradients_off():
    """`sparse_min_rows: off` in params.yaml reaches the params as false (YAML 1.1): it means off."""
    import yaml
    from models.ranking.params import RankParams
    value = yaml.safe_load("sparse_min_rows: off")["sparse_min_rows"]
    assert value is False
    assert TrainParams(sparse_min_rows=value).sparse_min_rows == "off"
    assert RankParams(sparse_min_rows=value).sparse_min_rows == "off"
    with pytest.raises(ValueError, match="auto, a row count or off"):
        TrainParams(sparse_min_rows=True)


def test_the_dense_part_is_adams_fused_kernel_with_adams_updates():
    """Dense parameters step with Adam's fused kernel (torch's default on the CPU loops over tensors:
    28 vs 4-5 ms a step at the 300k shape); the weights match the per-tensor Adam's."""
    fused, reference = _model(), _model()
    opt = TowerOptimizer(fused, 0.01, 0.0, None)
    assert opt.parts[0].defaults["fused"] is True
    _steps(fused, opt, 3)

    class _Reference(TowerOptimizer):
        def __init__(self, model):
            self.parts = [torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)]
            self.sparse_tables = 0
    _steps(reference, _Reference(reference), 3)
    for (name, a), b in zip(reference.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("maximize", [False, True])
def test_the_sparse_part_steps_as_torchs_sparse_adam_to_the_bit(maximize):
    """RowSparseAdam (row reads and writes instead of torch's sparse tensors: 1.8x faster a step on
    a 30k-row table) gives SparseAdam's weights and moments bit for bit: batches that repeat rows
    (gradients not coalesced), a batch that leaves some rows out, an lr changed between steps, a
    state from one loaded into the other halfway."""
    torch.manual_seed(0)
    tables = {name: torch.nn.EmbeddingBag(300, 8, mode="sum", sparse=True) for name in ("torch", "rows")}
    tables["rows"].load_state_dict(tables["torch"].state_dict())
    opts = {"torch": torch.optim.SparseAdam(tables["torch"].parameters(), lr=0.05, maximize=maximize),
            "rows": RowSparseAdam(tables["rows"].parameters(), lr=0.05, maximize=maximize)}
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        bags = torch.randint(0, 300 if step % 3 else 40, (64, 5), generator=gen)   # repeats: not coalesced
        weights = torch.randn(64, 8, generator=gen)
        for name, table in tables.items():
            opts[name].zero_grad()
            (table(bags) * weights).sum().backward()
            assert not table.weight.grad.is_coalesced() and table.weight.grad._nnz() < FAST_COALESCE_ENTRIES
            opts[name].step()
        if step == 5:       # the same state either way: each loads the other's
            saved = {name: opt.state_dict() for name, opt in opts.items()}
            opts["torch"].load_state_dict(saved["rows"])
            opts["rows"].load_state_dict(saved["torch"])
        if step == 8:
            for opt in opts.values():
                opt.param_groups[0]["lr"] = 0.01
        assert torch.equal(tables["rows"].weight, tables["torch"].weight), step
        ours, theirs = (opts[n].state[tables[n].weight] for n in ("rows", "torch"))
        assert ours["step"] == theirs["step"] == step + 1
        assert torch.equal(ours["exp_avg"], theirs["exp_avg"]) and torch.equal(ours["exp_avg_sq"], theirs["exp_avg_sq"])


def test_the_optimizer_pairs_sparse_part_is_row_sparse_adam():
    opt = TowerOptimizer(_model(), 0.01, 0.0, 1)
    assert type(opt.parts[1]) is RowSparseAdam


def _large_gradient(repeats: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    table = torch.nn.EmbeddingBag(70_000, 8, mode="sum", sparse=True)
    bags = torch.randperm(70_000, generator=gen)[:24_000].view(600, 40)      # rows beyond 65,535 too
    if repeats:
        bags[:, :5] = torch.randint(0, 50, (600, 5), generator=gen)         # rows used hundreds of times
    (table(bags) * torch.randn(600, 8, generator=gen)).sum().backward()
    grad = table.weight.grad
    assert grad._nnz() >= FAST_COALESCE_ENTRIES and not grad.is_coalesced()
    return grad


@pytest.mark.parametrize("repeats", [False, True])
def test_large_gradients_coalesce_as_torchs(repeats):
    """`coalesced` from FAST_COALESCE_ENTRIES entries (a radix sort and in-order sums: 14 -> 4 ms for
    53,000 entries into 200,001 rows): torch's rows (the radix sort's second pass included), its bits
    where no row repeats, within float rounding where rows repeat hundreds of times, the same bits
    twice; a 3-D value block too."""
    grad = _large_gradient(repeats)
    ours, theirs = coalesced(grad), grad.coalesce()
    assert ours.is_coalesced()
    assert torch.equal(ours._indices(), theirs._indices())
    if repeats:
        torch.testing.assert_close(ours._values(), theirs._values(), rtol=1e-5, atol=1e-5)
        assert torch.equal(coalesced(grad)._values(), ours._values())
    else:
        assert torch.equal(ours._values(), theirs._values())
    block = torch.sparse_coo_tensor(grad._indices(), grad._values().view(-1, 2, 4), (70_000, 2, 4), check_invariants=True)
    torch.testing.assert_close(coalesced(block)._values(), block.coalesce()._values(), rtol=1e-5, atol=1e-5)
