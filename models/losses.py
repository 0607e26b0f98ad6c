"""Retrieval losses: small pure functions of the two towers' embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax(
    q: torch.Tensor,
    c: torch.Tensor,
    temperature: float,
    item_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax where the other positives of the batch are the negatives.

    q (B, D) user embeddings, c (B, D) their positive items' embeddings; row i's label is column i.
    log_q (B,): log of each batch item's sampling probability in the training stream. Popular items
    turn up as negatives more often than a full softmax would weigh them, so their logits are lowered
    by log Q (Yi et al. 2019, "Sampling-bias-corrected neural modeling", RecSys; the same correction
    for the positive column keeps the estimator consistent).
    item_ids (B,): columns holding the same item as row i's positive are accidental hits, not
    negatives, and are masked out.
    weights (B,): per-example weights; the loss is their weighted mean.
    """
    logits = q @ c.T / temperature                                  # (B, B)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)                        # (B, B)
    if item_ids is not None:
        same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)       # (B, B)
        hit = same & ~torch.eye(len(item_ids), dtype=torch.bool, device=same.device)
        logits = logits.masked_fill(hit, float("-inf"))             # (B, B)
    labels = torch.arange(q.shape[0], device=q.device)              # (B,)
    loss = F.cross_entropy(logits, labels, reduction="none")        # (B,)
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum().clamp(min=1e-12)
