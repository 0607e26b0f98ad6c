"""Retrieval losses (models/losses.py) against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from models.losses import bce, bpr, in_batch_logits, in_batch_softmax, sampled_softmax


def test_in_batch_softmax_matches_hand_computed_values():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = I / 1; each row: -log(e^1 / (e^1 + e^0))
    plain = in_batch_softmax(q, c, temperature=1.0)
    assert plain.item() == pytest.approx(math.log(1 + math.exp(-1)))
    # log Q correction: logit_ij - log Q_j with Q = (0.5, 0.25)
    lq = torch.log(torch.tensor([0.5, 0.25]))
    row0 = math.log(1 + math.exp((0 - math.log(0.25)) - (1 - math.log(0.5))))
    row1 = math.log(1 + math.exp((0 - math.log(0.5)) - (1 - math.log(0.25))))
    got = in_batch_softmax(q, c, temperature=1.0, log_q=lq)
    assert got.item() == pytest.approx((row0 + row1) / 2)
    # temperature scales the logits; weights give a weighted mean
    assert in_batch_softmax(q, c, temperature=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))
    w = torch.tensor([3.0, 1.0])
    assert in_batch_softmax(q, c, 1.0, log_q=lq, weights=w).item() == pytest.approx((3 * row0 + row1) / 4)


def test_accidental_hits_are_masked():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([7, 7, 3])
    # rows 0 and 1 hold the same item: each sees only itself and item 3 (logits 1 and 0)
    row01 = math.log(1 + math.exp(-1))
    row2 = math.log(1 + 2 * math.exp(-1))  # item 3 vs two copies of item 7, both real negatives
    got = in_batch_softmax(q, c, 1.0, item_ids=ids)
    assert got.item() == pytest.approx((2 * row01 + row2) / 3)
    unmasked = in_batch_softmax(q, c, 1.0)
    assert unmasked.item() > got.item()


def test_in_batch_logits_mask_the_users_other_positives():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    c = q.clone()
    also = torch.zeros((3, 3), dtype=torch.bool)
    also[0, 1] = True                       # row 0's user also had row 1's item: not a negative of row 0
    pos, neg, valid = in_batch_logits(q, c, 1.0, torch.tensor([1, 2, 3]), also_positive=also)
    assert pos.tolist() == [1.0, 1.0, 1.0] and neg.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert valid.tolist() == [[False, False, True], [True, False, True], [True, True, False]]
    rows = [math.log(1 + math.exp(-1)), math.log(2 + math.exp(-1)), math.log(1 + 2 * math.exp(-1))]
    got = in_batch_softmax(q, c, 1.0, torch.tensor([1, 2, 3]), also_positive=also)
    assert got.item() == pytest.approx(sum(rows) / 3)


def test_listwise_pairwise_pointwise_losses_match_hand_computed_values():
    pos = torch.tensor([2.0, 0.0])
    neg = torch.tensor([[1.0, 0.0, 5.0], [1.0, -1.0, 3.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])   # row 0's last column is a hit
    sp = lambda x: math.log(1 + math.exp(x))  # noqa: E731  softplus = -log sigmoid(-x)
    # listwise: -log softmax of the positive among the valid columns
    r0 = -2 + math.log(math.exp(2) + math.exp(1) + math.exp(0))
    r1 = math.log(1 + math.exp(1) + math.exp(-1) + math.exp(3))
    assert sampled_softmax(pos, neg, valid).item() == pytest.approx((r0 + r1) / 2)
    # pairwise (BPR): mean over valid negatives of -log sigmoid(pos - neg)
    b0, b1 = (sp(-1) + sp(-2)) / 2, (sp(1) + sp(-1) + sp(3)) / 3
    assert bpr(pos, neg, valid).item() == pytest.approx((b0 + b1) / 2)
    # pointwise (BCE): -log sigmoid(pos) - mean log(1 - sigmoid(neg))
    p0, p1 = sp(-2) + (sp(1) + sp(0)) / 2, sp(0) + (sp(1) + sp(-1) + sp(3)) / 3
    assert bce(pos, neg, valid).item() == pytest.approx((p0 + p1) / 2)
    w = torch.tensor([3.0, 1.0])
    assert bce(pos, neg, valid, w).item() == pytest.approx((3 * p0 + p1) / 4)
    # a row without any valid negative: listwise 0, BPR 0, BCE only the positive term
    none = torch.zeros_like(valid)
    assert sampled_softmax(pos, neg, none).item() == pytest.approx(0.0)
    assert bpr(pos, neg, none).item() == 0.0
    assert bce(pos, neg, none).item() == pytest.approx((sp(-2) + sp(0)) / 2)
