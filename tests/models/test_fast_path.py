"""The faster training path computes what the reference path computes: the fused listwise loss
(models/losses.py in_batch_listwise) against in_batch_softmax, value, gradients and a training run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.losses import in_batch_listwise, in_batch_softmax
from models.objective import BatchLoss, make_augmenter
from models.params import TrainParams
from models.towers import TwoTower
from training_data import sampled_synthetic, stream_and_config


def _inputs(n: int = 12, d: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    item_ids = torch.randint(1, 6, (n,), generator=g)                   # repeated items: masked columns
    also = torch.rand((n, n), generator=g) < 0.2                        # accidental hits
    return {"q": F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            "c": F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            "item_ids": item_ids, "log_q": torch.randn(n, generator=g, dtype=torch.float64),
            "weights": torch.rand(n, generator=g, dtype=torch.float64) + 0.5, "also_positive": also}


@pytest.mark.parametrize("drop", [[], ["item_ids"], ["log_q", "weights"], ["also_positive", "item_ids"]])
def test_fused_listwise_has_the_reference_value_and_gradients(drop):
    args = {k: v for k, v in _inputs().items() if k not in drop}
    results = []
    for loss_fn in (in_batch_softmax, in_batch_listwise):
        q = args["q"].clone().requires_grad_()
        c = args["c"].clone().requires_grad_()
        tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)   # a learned temperature gets its gradient
        rest = {k: v for k, v in args.items() if k not in ("q", "c")}
        loss = loss_fn(q, c, tau, **rest)
        loss.backward()
        results.append((loss.detach(), q.grad, c.grad, tau.grad))
    for ref, fused in zip(*results):
        torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)


def test_fused_listwise_gradcheck():
    a = _inputs(n=6, d=3, seed=1)
    q, c = a["q"].requires_grad_(), a["c"].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, c: in_batch_listwise(q, c, 0.5, a["item_ids"], a["log_q"], a["weights"], a["also_positive"]), (q, c))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[Path, Path, Path]:
    return sampled_synthetic(tmp_path_factory.mktemp("synthetic"))


def _trajectory(stream, tower_cfg, train_cfg: TrainParams, fused: bool, steps: int) -> list[float]:
    """Loss of each of `steps` Adam steps from the same start, batches, negatives and SSL views."""
    torch.manual_seed(0)
    model = TwoTower(tower_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg.lr)
    gen = torch.Generator().manual_seed(0)
    batch_loss = BatchLoss(stream, train_cfg, make_augmenter(stream, train_cfg, []), fused=fused)
    perm = torch.randperm(len(stream), generator=torch.Generator().manual_seed(1))
    losses = []
    for i in range(steps):
        b = perm[(i * train_cfg.batch_size) % len(perm):][:train_cfg.batch_size]
        loss = batch_loss(model, b, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_fused_training_follows_the_reference_loss_trajectory(sampled):
    torch.set_num_threads(1)
    _, stream, tower_cfg, _ = stream_and_config(*sampled)
    train_cfg = TrainParams(batch_size=128, lr=0.01, ssl_weight=0.1)
    assert BatchLoss(stream, train_cfg, None).fused                      # the default takes the fast path
    reference = _trajectory(stream, tower_cfg, train_cfg, fused=False, steps=25)
    fused = _trajectory(stream, tower_cfg, train_cfg, fused=True, steps=25)
    assert reference[-1] < reference[0] - 0.2                           # it learns: the comparison means something
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=2e-4, atol=2e-4)


def test_extra_negatives_or_other_losses_keep_the_reference_path(sampled):
    _, stream, _, _ = stream_and_config(*sampled)
    assert not BatchLoss(stream, TrainParams(negatives=8), None).fused
    assert not BatchLoss(stream, TrainParams(loss="pairwise"), None).fused


# 0: the matched pairs are always spread one by one; 10**9: always through the batch's dense table;
# "stream": the whole stream's (users x items) table (the others: a catalog too large for it)
# and on each device there is: a GPU step builds its masks on the GPU (from copies of the positives made once)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dense_hits", [0, 10**9, "stream"], ids=["spread", "table", "stream_table"])
def test_accidental_hits_match_a_dense_user_item_table(sampled, dense_hits, device, monkeypatch):
    import models.stream

    if dense_hits != "stream":
        monkeypatch.setattr(models.stream, "TABLE_MAX_ITEMS", 0)
        monkeypatch.setattr(models.stream, "DENSE_HITS", dense_hits)
    _, stream, _, _ = stream_and_config(*sampled)
    counts = stream.pos_ptr[1:] - stream.pos_ptr[:-1]
    dense = torch.zeros((len(counts), stream.n_items), dtype=torch.bool)     # fine at test size only
    dense[torch.repeat_interleave(torch.arange(len(counts)), counts), stream.pos_items] = True
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        b = torch.randint(0, len(stream), (300,), generator=g)              # users repeat within a batch
        user, item = stream.users["user"][b], stream.item_idx[b]
        hits = stream.hits(user.to(device), item.to(device))
        assert hits.device.type == device and torch.equal(hits.cpu(), dense[user][:, item])
        other = torch.randint(0, stream.n_items, (17,), generator=g)        # candidates outside the batch
        assert torch.equal(stream.hits(user.to(device), other.to(device)).cpu(), dense[user][:, other])
    assert dense[user][:, item].any() and not dense[user][:, item].all()     # the check is not vacuous
    assert (stream.table is not None) == (dense_hits == "stream")


def test_fused_listwise_rows_lost_to_underflow_are_redone_exactly():
    # row 0's accidental hit (column 1) scores 400 above everything it keeps at temperature 0.005:
    # shifted by the row's overall maximum, its kept columns underflow in float32
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    q0 = torch.stack([e1, e2, e2, -e1])
    c0 = torch.stack([-e1, e1, e2, e2])
    also = torch.zeros((4, 4), dtype=torch.bool)
    also[0, 1] = True
    out = []
    for loss_fn in (in_batch_softmax, in_batch_listwise):
        q, c = q0.clone().requires_grad_(), c0.clone().requires_grad_()
        loss = loss_fn(q, c, 0.005, also_positive=also)
        loss.backward()
        out.append((loss.detach(), q.grad, c.grad))
    assert torch.isfinite(out[1][0])
    shifted = (q0[0] @ c0.T - (q0[0] @ c0.T).max()) / 0.005
    assert torch.exp(shifted[[0, 2, 3]]).sum() < 1e-30                        # the redo path ran
    for ref, fused in zip(*out):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-4)
