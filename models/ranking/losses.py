"""Click losses for the ranking models: small pure functions over padded (R, L) request lists.

mask (R, L) is True on shown impressions, False on padding; clicked (R, L) is 0/1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Mächler 2012, "Accurately computing
    log(1 - exp(-|a|))"); the product model (PAL) needs log P(no click) from log P(click)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bernoulli_nll(log_p: torch.Tensor, log_not_p: torch.Tensor, clicked: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy from log P(click) and log P(no click), averaged over shown impressions."""
    nll = -(clicked * log_p + (1 - clicked) * log_not_p)                     # (R, L)
    return masked_mean(nll, mask)


def logit_pair(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log σ(z), log σ(-z)): both sides of a click logit, computed stably."""
    return F.logsigmoid(z), F.logsigmoid(-z)


def weighted_list_softmax_loss(logits: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R,) −Σ_i weights_i · log softmax(logits)_i over each list's shown impressions: the softmax
    cross-entropy with (unnormalized) weighted click labels, as ULTRA's softmax loss; 0 for a list
    without a weighted click."""
    log_prob = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=1)  # (R, L)
    return -(weights * log_prob.masked_fill(~mask, 0.0)).sum(dim=1)                # (R,)


def list_softmax_loss(logits: torch.Tensor, clicked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R,) softmax cross-entropy of each list, averaged over its clicks (the listwise loss of Yan et
    al. 2022); 0 for a list without a click, which says nothing about which item was preferred."""
    n_clicks = (clicked * mask).sum(dim=1)                                         # (R,)
    return weighted_list_softmax_loss(logits, clicked, mask) / n_clicks.clamp(min=1)


class _GradReverse(torch.autograd.Function):
    """Identity forward, gradient times -weight backward (Ganin & Lempitsky 2015, ICML)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.weight * grad, None


def grad_reverse(x: torch.Tensor, weight: float) -> torch.Tensor:
    return _GradReverse.apply(x, weight)
