"""Retrieval losses: small pure functions of the two towers' embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_logits(
    q: torch.Tensor,
    c: torch.Tensor,
    temperature: torch.Tensor | float,
    item_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    also_positive: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-batch negatives: row i's positive is item i, the other positives of the batch are its
    negatives. Returns (pos (B,), neg (B, B), valid (B, B)) for the losses below.

    q (B, D) user embeddings, c (B, D) their positive items' embeddings.
    item_ids (B,): columns holding the same item as row i's positive (its own column included) are
    not negatives; None: only its own column is excluded.
    log_q (B,): log of each batch item's expected count among a row's in-batch negatives. Popular
    items turn up as negatives more often than a full softmax would weigh them, so their logits are
    lowered by log Q (Yi et al. 2019, "Sampling-bias-corrected neural modeling", RecSys); the same
    correction of the positive keeps the estimator consistent.
    also_positive (B, B) bool: column j is another positive of row i's user (an accidental hit).
    """
    pos = (q * c).sum(dim=1) / temperature                          # (B,)
    neg = q @ c.T / temperature                                     # (B, B)
    if item_ids is None:
        valid = ~torch.eye(len(q), dtype=torch.bool, device=q.device)               # (B, B)
    else:
        valid = item_ids.unsqueeze(0) != item_ids.unsqueeze(1)                      # (B, B)
    if also_positive is not None:
        valid = valid & ~also_positive
    if log_q is not None:
        neg = neg - log_q.unsqueeze(0)                              # (B, B)
        pos = pos - log_q                                           # (B,)
    return pos, neg, valid


def in_batch_softmax(
    q: torch.Tensor,
    c: torch.Tensor,
    temperature: torch.Tensor | float,
    item_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    also_positive: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax over in-batch negatives (see in_batch_logits); weights (B,): per-example
    weights, the loss is their weighted mean. The trainer's listwise loss without extra negatives."""
    pos, neg, valid = in_batch_logits(q, c, temperature, item_ids, log_q, also_positive)
    return sampled_softmax(pos, neg, valid, weights)


_TINY = 1e-30     # below: a softmax row sum that lost its kept columns to float32 underflow


class _InBatchListwise(torch.autograd.Function):
    """The listwise in-batch loss in a few passes over the (B, B) logits, with a hand-written
    backward: autograd of the reference (in_batch_logits + sampled_softmax) walks the (B, B) matrix
    about fifteen times (divide, log Q, mask, concatenate, logsumexp and their backwards), which
    was a third of a training step in the profile; this keeps one matrix and reuses it in place."""

    @staticmethod
    def softmax(qs: torch.Tensor, c: torch.Tensor, bias: torch.Tensor,
                drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prob (B, B) the masked softmax of each row, top (B, 1) its shift, total (B, 1) its sum
        before normalizing, pos (B,) the positives' logits)."""
        logits = torch.addmm(bias.neg().unsqueeze(0), qs, c.T)                     # (B, B)
        pos = logits.diagonal().clone()                                             # (B,)
        # shift each row by its maximum over every column (one pass, no masked copy): the shifted
        # logits are <= 0 and never overflow. exp over the unmasked logits, then the dropped columns
        # zeroed: exp over -inf entries took 4.5x as long as over finite ones here (3.4 vs 0.74 ms,
        # 1024 x 1024)
        top = logits.amax(dim=1, keepdim=True)                                      # (B, 1)
        prob = logits.sub_(top).exp_()                                              # (B, B), in place
        if drop is not None:
            # the dropped columns zeroed, then the diagonal (each row's positive, in `drop` too when the
            # accidental-hit mask holds it) put back: the same values as multiplying by the kept mask,
            # without negating the mask and widening it to float (1.35 against 0.55 ms a step, 1 thread)
            own = prob.diagonal().clone()                                           # (B,)
            prob.masked_fill_(drop, 0.0).diagonal().copy_(own)
        total = prob.sum(dim=1, keepdim=True)                                       # (B, 1)
        # a row whose kept columns all underflow (masked columns ~87 above every kept one: only at a
        # tiny learned temperature) is redone shifted by its kept maximum, as the reference does
        low = total.squeeze(1) < _TINY
        if drop is not None and bool(low.any()):      # nothing dropped: each row keeps its exp(0) = 1
            rows = low.nonzero().squeeze(1)
            masked = drop[rows]                                                     # (R, B), a copy
            masked[torch.arange(len(rows), device=rows.device), rows] = False      # the positive stays
            redo = torch.addmm(bias.neg().unsqueeze(0), qs[rows], c.T).masked_fill_(masked, float("-inf"))
            top[rows] = redo.amax(dim=1, keepdim=True)
            prob[rows] = redo.sub_(top[rows]).exp_()
            total[rows] = prob[rows].sum(dim=1, keepdim=True)
        return prob.div_(total), top, total, pos                                    # softmax over each row

    @staticmethod
    def forward(ctx, qs: torch.Tensor, c: torch.Tensor, bias: torch.Tensor, drop: torch.Tensor | None,
                weights: torch.Tensor) -> torch.Tensor:
        # qs (B, D) = q / temperature, c (B, D), bias (B,) log Q per column, drop (B, B) bool or None:
        # the columns left out of each row (accidental hits; a True diagonal is ignored: the positive
        # always counts), weights (B,) summing to 1
        prob, top, total, pos = _InBatchListwise.softmax(qs, c, bias, drop)
        loss = ((top.squeeze(1) + total.squeeze(1).log() - pos) * weights).sum()
        ctx.save_for_backward(qs, c, bias, drop, weights)
        # not a saved tensor: the backward turns it into the gradient in place (below), which torch's
        # version check of saved tensors would refuse on a second backward
        ctx.prob = prob
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qs, c, bias, drop, weights = ctx.saved_tensors
        # d loss / d logits in prob's own memory: no fresh (B, B) output to fill (3.8-7.4 % of a demo
        # step, alternated in one process). A second backward through the same graph (retain_graph,
        # gradcheck) finds prob spent and computes it again
        prob = ctx.prob if ctx.prob is not None else _InBatchListwise.softmax(qs, c, bias, drop)[0]
        ctx.prob = None
        g = prob.mul_(weights.unsqueeze(1) * grad)            # (B, B)
        g.diagonal().sub_(weights * grad)                     # the positive's own -1
        return g @ c, g.T @ qs, None, None, None


def in_batch_listwise(q: torch.Tensor, c: torch.Tensor, temperature: torch.Tensor | float,
                      item_ids: torch.Tensor | None = None, log_q: torch.Tensor | None = None,
                      weights: torch.Tensor | None = None, also_positive: torch.Tensor | None = None) -> torch.Tensor:
    """The same loss as in_batch_softmax (same arguments, same value and gradients up to float
    rounding), computed by _InBatchListwise: the training step's path when there are no extra negatives."""
    n = len(q)
    # dropped columns: accidental hits and other rows of the same item (each row's own positive stays)
    drop = also_positive
    if item_ids is not None:
        same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)                     # (B, B)
        drop = same if drop is None else drop | same
    bias = log_q.to(q.dtype) if log_q is not None else q.new_zeros(n)
    w = weights.to(q.dtype) if weights is not None else q.new_ones(n)
    w = w / w.sum().clamp(min=1e-12)
    return _InBatchListwise.apply(q / temperature, c, bias, drop, w)


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
