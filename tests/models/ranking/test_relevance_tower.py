"""The relevance tower's first layer computed by parts is the layer over the concatenated inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ranking.config import RankerConfig
from models.ranking.relevance import RelevanceTower

torch.set_num_threads(1)


def _tower(item_numeric: int, user_dim: int, item_dim: int, hidden: list[int], logged: bool) -> RelevanceTower:
    cfg = RankerConfig(n_users=40, n_items=60, item_numeric=item_numeric, user_vector_dim=user_dim,
                       item_vector_dim=item_dim, hidden=hidden, use_logged_score=logged)
    rng = np.random.default_rng(0)
    tables = {"item_numeric": rng.standard_normal((60, item_numeric)).astype(np.float32),
              "user_vectors": rng.standard_normal((40, user_dim)).astype(np.float32),
              "item_vectors": rng.standard_normal((60, item_dim)).astype(np.float32)}
    torch.manual_seed(1)
    return RelevanceTower(cfg, 1, tables)


@pytest.mark.parametrize("item_numeric,user_dim,item_dim,hidden,logged", [
    (2, 8, 8, [64], False),        # the default shape: paired retrieval vectors (their product and dot)
    (3, 8, 8, [32, 16], True),     # two hidden layers, the logged score
    (2, 6, 4, [64], False),        # vectors of different sizes: not paired
    (4, 0, 0, [64], False),        # numeric item features only
    (0, 8, 8, [64], True),         # retrieval vectors only
    (2, 8, 8, [], False),          # no hidden layer: the head reads the inputs
])
def test_the_first_layer_by_parts_is_the_layer_over_the_inputs(item_numeric: int, user_dim: int, item_dim: int,
                                                                hidden: list[int], logged: bool) -> None:
    """Per-request parts once per request, learned and fixed inputs apart: the same output and the same
    gradients as body(inputs(...)), to float rounding (the sums run in another order)."""
    tower = _tower(item_numeric, user_dim, item_dim, hidden, logged).eval()
    g = torch.Generator().manual_seed(2)
    user = torch.randint(0, 40, (7,), generator=g)
    item = torch.randint(0, 60, (7, 5), generator=g)
    score = torch.randn(7, 5, generator=g) if logged else None
    by_parts = tower.hidden(user, item, score)
    whole = tower.body(tower.inputs(user, item, score))
    torch.testing.assert_close(by_parts, whole, rtol=1e-5, atol=1e-5)
    grads = []
    for out in (by_parts, whole):
        tower.zero_grad()
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 3
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)
