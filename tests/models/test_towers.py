"""The two towers (models/towers.py): unit vectors, shared item table, config invariants."""
from __future__ import annotations

import pytest
import torch

import numpy as np

from models.towers import TwoTower, TwoTowerConfig, masked_mean, rows_in_order


def _config(**kw) -> TwoTowerConfig:
    base = dict(n_items=6, n_users=4, user_categorical=[3], user_numeric=1, user_multi={"tags": 4},
                item_categorical=[3, 2], item_numeric=1, item_multi={"genres": 5},
                embedding_dim=8, hidden=[16], dim=4)
    return TwoTowerConfig(**{**base, **kw})


def _batches(b: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    users = {"user": torch.randint(0, 4, (b,), generator=g), "history": torch.randint(0, 6, (b, 5), generator=g),
             "cat": torch.randint(0, 3, (b, 1), generator=g), "num": torch.randn(b, 1, generator=g),
             "multi:tags": torch.randint(0, 4, (b, 2), generator=g)}
    items = {"item": torch.randint(0, 6, (b,), generator=g),
             "cat": torch.stack([torch.randint(0, 3, (b,), generator=g), torch.randint(0, 2, (b,), generator=g)], 1),
             "num": torch.randn(b, 1, generator=g), "multi:genres": torch.randint(0, 5, (b, 3), generator=g)}
    return users, items


@pytest.mark.parametrize("user_id_embedding", [False, True])
def test_towers_return_unit_vectors_of_the_configured_dim(user_id_embedding):
    model = TwoTower(_config(user_id_embedding=user_id_embedding))
    users, items = _batches(7)
    users["history"][0] = 0  # an empty history is a valid user
    q, c = model(users, items)
    assert q.shape == (7, 4) and c.shape == (7, 4)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(c.norm(dim=1), torch.ones(7))
    assert torch.isfinite(q).all()


def test_history_shares_the_item_embedding_table_and_ignores_padding():
    model = TwoTower(_config())
    idx = torch.tensor([[2, 3, 0, 0], [0, 0, 0, 0]])
    pooled = masked_mean(model.item_emb, idx)
    torch.testing.assert_close(pooled[0], model.item_emb.weight[[2, 3]].mean(0))
    torch.testing.assert_close(pooled[1], torch.zeros(8))


@pytest.mark.parametrize("sparse", [False, True])
def test_pooling_has_the_gradients_of_a_mean_over_the_non_padding_values(sparse):
    """masked_mean sums the kept values and divides (faster than embedding_bag's mode="mean"): the
    same values and the same gradients as that mean, a dense or a sparse table alike."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 9, (12, 6), generator=g)
    idx[0] = 0                                                    # an all-padding row
    idx[1, 1:] = 0                                                # a single value
    upstream = torch.randn(12, 5, generator=g)
    grads = []
    for pool in (lambda t: masked_mean(t, idx),
                 lambda t: torch.nn.functional.embedding_bag(idx, t.weight, mode="mean", padding_idx=0)):
        torch.manual_seed(0)
        table = torch.nn.Embedding(9, 5, padding_idx=0, sparse=sparse)
        out = pool(table)
        (out * upstream).sum().backward()
        grads.append((out.detach(), table.weight.grad.to_dense()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][1][0].abs().sum() == 0                       # padding never learns


def test_pooling_gradient_puts_each_entry_on_its_row_beyond_16_bit_row_numbers():
    """A dense table's gradient sums each history entry's bag gradient into its row; the entries are put
    in row order by a radix sort on 16-bit keys, two passes where a row number needs more than 16 bits.
    Rows 1 and 65,537 share their low 16 bits: one pass would mix them up."""
    g = torch.Generator().manual_seed(5)
    rows = 70_000
    idx = torch.randint(1, rows, (64, 20), generator=g)
    idx[:, :4] = torch.tensor([1, 65_537, 65_536, 69_999])     # the same low bits, in every row
    idx[torch.rand(idx.shape, generator=g) < 0.3] = 0
    flat = idx[idx != 0]
    order = rows_in_order(flat).numpy()
    np.testing.assert_array_equal(order, np.argsort(flat.numpy(), kind="stable"))
    upstream = torch.randn(64, 3, generator=g)
    table = torch.nn.Embedding(rows, 3, padding_idx=0)
    (masked_mean(table, idx) * upstream).sum().backward()
    # the reference: every entry's share of its bag's gradient added to its row
    share = upstream / (idx != 0).sum(dim=1, keepdim=True).clamp(min=1)
    expected = torch.zeros(rows, 3).index_put_((idx.reshape(-1),), share.repeat_interleave(20, dim=0),
                                               accumulate=True)
    expected[0] = 0
    torch.testing.assert_close(table.weight.grad, expected)


def test_config_invariants_are_checked():
    with pytest.raises(ValueError, match="item vocabulary is empty"):
        TwoTower(_config(n_items=1))


def test_shared_lookups_read_a_table_as_its_own_lookups_do_with_one_gradient():
    from models.towers import shared_lookups

    model = TwoTower(_config())
    users, items = _batches(7)
    users["history"][0] = 0                                   # an empty history
    ids = [items["item"], torch.tensor([0, 3, 3, 5])]          # the padding row, a repeated row
    rows, means = shared_lookups(model.item_emb, ids, [users["history"]])
    assert all(torch.equal(r, model.item_emb(x)) for r, x in zip(rows, ids))
    assert torch.equal(means[0], masked_mean(model.item_emb, users["history"]))
    assert not means[0][0].any()

    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(r.shape, generator=g) for r in rows + means]
    sum(((x * u).sum() for x, u in zip(rows + means, upstream))).backward()
    shared = model.item_emb.weight.grad.clone()
    model.item_emb.weight.grad = None
    own = [model.item_emb(x) for x in ids] + [masked_mean(model.item_emb, users["history"])]
    sum(((x * u).sum() for x, u in zip(own, upstream))).backward()
    torch.testing.assert_close(shared, model.item_emb.weight.grad)
    assert not shared[0].any()                                # padding_idx: row 0 never learns
