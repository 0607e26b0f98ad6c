"""Shapes, serving and the loss definitions of the ranking models, on a tiny simulated log."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from tests.models.ranking.rank_simulator import SimConfig, Split, read_split, simulate

from models.ranking.data import RankBatch
from models.ranking.dla import MAX_WEIGHT, DualLearning, inverse_to_top
from models.ranking.losses import grad_reverse
from models.ranking.mixture import MixtureEM
from models.ranking.params import RankParams
from models.ranking.train import MODELS, build_model, fit
from models.ranking.xpa import CrossPositional

torch.set_num_threads(1)
PARAMS = RankParams(epochs=1, batch_requests=32, context_columns=["device"], hidden=[16],
                    observation_dropout=0.1, grad_reversal=0.1)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Split:
    """Devices, a grid layout and retrieval vectors: every optional input at once."""
    sim = simulate(SimConfig(requests=120, devices=True, grid_cols=4, vectors=True, seed=1))
    return read_split(sim, tmp_path_factory.mktemp("grid"), PARAMS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_and_serves_from_relevance_alone(grid: Split, name: str) -> None:
    model = build_model(name, grid.config, grid.features, seed=0)
    report = fit(model, grid.train, PARAMS, seed=0)
    assert all(torch.isfinite(torch.tensor(report.losses)))
    assert report.examples == sum(b.n_examples for b in grid.train) and report.examples_per_s > 0
    batch = grid.test[0]
    with torch.no_grad():
        ranked = model.ranking_scores(batch)                                  # (R, L)
        moved = model.ranking_scores(replace(batch, position=batch.position.flip(1),
                                             context=torch.zeros_like(batch.context)))
        users = batch.user.unsqueeze(1).expand_as(batch.item)[batch.mask]     # (N,)
        served = model.score(users, batch.item[batch.mask])                   # (N,)
    assert torch.equal(ranked, moved)                # position and context never reach serving
    assert torch.allclose(served, ranked[batch.mask], atol=1e-5)
    users, items = grid.features.pairs(np.array(["u1", "nobody"]), np.array([3, 99_999]))
    assert users[1] == 0 and items[1] == 0                                    # unknown ids: OOV
    assert torch.isfinite(model.score(torch.from_numpy(users), torch.from_numpy(items))).all()


def test_same_seed_same_model(grid: Split) -> None:
    states = []
    for _ in range(2):
        model = build_model("pal", grid.config, grid.features, seed=7)
        fit(model, grid.train, PARAMS, seed=7)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _batch(clicked: list[list[float]], mask: list[list[bool]]) -> RankBatch:
    c, m = torch.tensor(clicked), torch.tensor(mask)
    R, L = c.shape
    pos = torch.arange(1, L + 1).expand(R, L) * m
    return RankBatch(user=torch.ones(R, dtype=torch.long), item=torch.ones(R, L, dtype=torch.long) * m,
                     position=pos, context=torch.ones(R, L, 1, dtype=torch.long), clicked=c, mask=m,
                     row=pos.clamp(max=1), col=pos.clamp(max=4))


def test_pal_is_bce_on_the_product_of_two_sigmoids(grid: Split) -> None:
    model = build_model("pal", replace(grid.config, grad_reversal=0.0), grid.features, seed=0).eval()
    batch = _batch([[1.0, 0.0, 0.0]], [[True, True, True]])
    _, rel = model.relevance(batch.user, batch.item, None)
    p = torch.sigmoid(model.bias(batch)).squeeze(-1) * torch.sigmoid(rel).squeeze(-1)   # (1, 3)
    expected = F.binary_cross_entropy(p, batch.clicked)
    assert torch.allclose(model.loss(batch), expected, atol=1e-6)


def test_mixture_requests_without_a_click_carry_no_weight(grid: Split) -> None:
    model = build_model("mixture", grid.config, grid.features, seed=0)
    assert isinstance(model, MixtureEM)
    batch = _batch([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
                   [[True, True, True], [True, True, False], [True, False, False]])
    post = model.posterior(batch)                                             # (K, R)
    assert post.shape == (2, 3)
    assert torch.allclose(post.sum(dim=0), torch.tensor([1.0, 0.0, 1.0]))
    clicked_only = replace(batch, **{f: getattr(batch, f)[[0, 2]] for f in
                                     ("user", "item", "position", "context", "clicked", "mask",
                                      "row", "col")})
    assert torch.allclose(model.loss(batch), model.loss(clicked_only))
    assert model.component_propensities(batch, [1, 2, 3]).shape == (2, 3)


def test_dla_weights_each_click_by_the_other_towers_estimate_relative_to_the_top() -> None:
    logits = torch.tensor([[0.0, -1.0, -2.0, 5.0], [1.0, 3.0, -9.0, 0.0]])
    position = torch.tensor([[2, 1, 3, 0], [1, 2, 3, 4]])       # list 0: the top is its 2nd impression
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    w = inverse_to_top(logits, position, mask)
    assert torch.allclose(w[0], torch.tensor([math.exp(-1.0), 1.0, math.exp(1.0), 0.0]))
    assert torch.allclose(w[1], torch.tensor([1.0, math.exp(-2.0), MAX_WEIGHT, math.exp(1.0)]))   # clipped


def test_dla_loss_is_two_weighted_listwise_losses_whose_weights_carry_no_gradient(grid: Split) -> None:
    model = build_model("dla", grid.config, grid.features, seed=0).eval()   # no id dropout: one draw
    assert isinstance(model, DualLearning)
    batch = _batch([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
                   [[True, True, True], [True, True, False], [True, False, False]])
    _, rel = model.relevance(batch.user, batch.item, None)
    f, g = rel.squeeze(-1), model.exam_logits(batch)                          # (R, L) each

    def listwise(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:            # ULTRA's softmax loss
        log_p = torch.log_softmax(s.masked_fill(~batch.mask, -torch.inf), dim=1).masked_fill(~batch.mask, 0)
        return -(batch.clicked * w * log_p).sum(dim=1)

    exam = listwise(g, torch.exp(f[:, :1] - f).clamp(max=MAX_WEIGHT).detach())   # top = first shown
    rank = listwise(f, torch.exp(g[:, :1] - g).clamp(max=MAX_WEIGHT).detach())
    loss = model.loss(batch)
    assert torch.allclose(loss, (exam + rank).mean(), atol=1e-6)
    # the bias tower learns from the examination loss alone: the relevance weights are read, not trained
    grads = torch.autograd.grad(loss, list(model.bias.parameters()))
    exam_grads = torch.autograd.grad(exam.mean(), list(model.bias.parameters()), allow_unused=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, exam_grads))


def test_xpa_one_item_list_attends_to_nothing_and_stays_finite(grid: Split) -> None:
    model = build_model("xpa", grid.config, grid.features, seed=0)
    batch = _batch([[1.0, 0.0], [0.0, 0.0]], [[True, False], [True, True]])
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_xpa_dim_must_split_into_heads(grid: Split) -> None:
    with pytest.raises(ValueError, match="xpa_dim must be a multiple of rank.xpa_heads"):
        CrossPositional(replace(grid.config, xpa_dim=10, xpa_heads=4))


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))


def test_unknown_model_name_lists_the_choices(grid: Split) -> None:
    with pytest.raises(ValueError, match="unknown ranking model 'lambdamart'.*'pal'"):
        build_model("lambdamart", grid.config, grid.features, seed=0)


@pytest.mark.parametrize("decay", [0.2, 0.0])
def test_the_lr_falls_to_zero_over_the_last_share_of_the_steps(grid: Split, decay: float) -> None:
    """rank.lr_decay: the lr each optimizer step used, recorded as the step runs: constant, then
    falling linearly towards 0 over the last `decay` of the steps (constant throughout at 0)."""
    params = PARAMS.model_copy(update={"epochs": 3, "lr_decay": decay})
    used: list[float] = []
    hook = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        fit(build_model("pal", grid.config, grid.features, seed=0), grid.train, params, seed=0)
    finally:
        hook.remove()
    steps = 3 * len(grid.train)
    assert len(used) == steps
    flat = steps - round(decay * steps)
    assert used[:flat] == [params.lr] * flat
    tail = used[flat:]
    assert all(a > b for a, b in zip(tail, tail[1:])) and (not tail or tail[-1] <= params.lr / len(tail) + 1e-12)
