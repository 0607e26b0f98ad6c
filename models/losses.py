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


# --- losses over a positive and a set of negatives per example ---------------------------------
# pos (B,) logits of each example's positive item; neg (B, M) logits of its negatives (in-batch
# columns, shared easy negatives and per-example hard negatives, concatenated); valid (B, M) False
# where a column is not a negative of that row (its own positive, an accidental hit, padding).

def _weighted_mean(loss: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum().clamp(min=1e-12)


def sampled_softmax(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise: cross-entropy of the positive against its negatives. Pass logits already corrected by
    each negative source's own log Q (Yi et al. 2019), so the sampled softmax stays consistent."""
    logits = torch.cat([pos.unsqueeze(1), neg.masked_fill(~valid, float("-inf"))], dim=1)  # (B, 1+M)
    return _weighted_mean(torch.logsumexp(logits, dim=1) - pos, weights)


def bpr(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor,
        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise: BPR (Rendle et al. 2009), -log σ(pos - neg) averaged over each row's valid negatives;
    a row without negatives contributes 0."""
    pair = F.softplus(neg - pos.unsqueeze(1)) * valid                        # (B, M)
    per_row = pair.sum(dim=1) / valid.sum(dim=1).clamp(min=1)                # (B,)
    return _weighted_mean(per_row, weights)


def bce(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor,
        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pointwise: binary cross-entropy with label 1 for the positive and 0 for the mean negative,
    -log σ(pos) - mean_j log(1 - σ(neg_j))."""
    negative = (F.softplus(neg) * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # (B,)
    return _weighted_mean(F.softplus(-pos) + negative, weights)


LOSSES = {"listwise": sampled_softmax, "pairwise": bpr, "pointwise": bce}


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between two views (B, D) of the same B items: row i's positive is column i of the other
    view, the other items of the batch are its negatives (Yao et al. 2021, eq. 2)."""
    logits = z1 @ z2.T / temperature                                         # (B, B)
    labels = torch.arange(z1.shape[0], device=z1.device)                     # (B,)
    return F.cross_entropy(logits, labels)
