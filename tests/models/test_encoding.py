"""Model library units: encoding, towers, loss, sampler, metrics, baseline (tiny hand-made inputs)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from models.encoding import FeatureEncoder, NumericStats, Vocab, pad_lists
from models.towers import TwoTower, TwoTowerConfig, masked_mean

SCHEMA = {
    "user_id_dtype": "int64", "item_id_dtype": "int64",
    "user_features": {"categorical": ["gender"], "numeric": ["age"], "multi": ["tags"]},
    "item_features": {"categorical": ["studio"], "numeric": ["year"], "multi": ["genres"]},
}


def _tiny_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    items = pd.DataFrame({
        "item_id": [10, 11, 12, 13],
        "studio": ["a", "b", "a", None],
        "year": [1990, 2000, np.nan, 2010],
        "genres": [["x", "y"], ["y"], [], ["z"]],
    })
    examples = pd.DataFrame({
        "user_id": [1, 1, 2],
        "item_id": [10, 11, 12],
        "timestamp": pd.to_datetime([1, 2, 3], unit="s", utc=True),
        "gender": ["F", "F", "M"],
        "age": [20.0, 20.0, 40.0],
        "tags": [["t1"], ["t1", "t2"], []],
        "recent_items": [[], [10], []],
    })
    return items, examples


# --- encoding ---------------------------------------------------------------------------------

def test_vocab_maps_unknown_and_null_to_oov_and_normalizes_int_ids():
    v = Vocab.fit(pd.Series([5, 3, 5, 7]), kind="int64")
    assert v.values == [5, 3, 7] and v.size == 4
    assert v.lookup(pd.Series([5.0, np.nan, 9, 7])).tolist() == [1, 0, 0, 3]
    assert v.lookup(["3", "x"]).tolist() == [2, 0]
    s = Vocab.fit(pd.Series(["a", "b", "b", None]), min_count=2)
    assert s.values == ["b"] and s.lookup(["a", "b", None]).tolist() == [0, 1, 0]
    assert Vocab.from_json(v.to_json()).lookup([7, 5]).tolist() == [3, 1]


def test_pad_lists_pads_truncates_and_treats_null_as_empty():
    v = Vocab.fit(pd.Series(["a", "b", "c"]))
    lists = pd.Series([np.array(["c", "a", "b"]), np.array([], dtype=object), None, ["zzz", "b"]])
    out = pad_lists(lists, v, max_len=2)
    assert out.tolist() == [[3, 1], [0, 0], [0, 0], [0, 2]]


def test_numeric_standardization_fills_nulls_with_mean():
    s = NumericStats.fit(pd.Series([1.0, 3.0, np.nan]))
    assert (s.mean, s.std) == (2.0, 1.0)
    assert s.transform(pd.Series([3.0, np.nan])).tolist() == [1.0, 0.0]
    assert NumericStats.fit(pd.Series([5.0, 5.0])).std == 1.0  # constant column: no division by 0


def test_feature_encoder_round_trips_through_json_and_tolerates_missing_columns(tmp_path):
    items, examples = _tiny_frames()
    enc = FeatureEncoder.fit(SCHEMA, items, examples)
    assert enc.item_ids.values == [10, 11, 12, 13] and enc.history_length == 1
    enc.save(tmp_path / "encoder.json")
    loaded = FeatureEncoder.load(tmp_path / "encoder.json")
    for a, b in ((enc.encode_items(items), loaded.encode_items(items)),
                 (enc.encode_users(examples), loaded.encode_users(examples))):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    users = loaded.encode_users(pd.DataFrame({"user_id": [99]}))  # unknown user, no features, no history
    assert users["user"].tolist() == [0] and users["history"].tolist() == [[0]]
    assert users["cat"].tolist() == [[0]] and users["num"].tolist() == [[0.0]]


def test_behaviour_counts_are_log_scaled_user_numerics_unless_switched_off(tmp_path):
    items, examples = _tiny_frames()
    examples = examples.assign(interactions_total=[0, 1, 0], interactions_7d=[0, 1, 0])
    enc = FeatureEncoder.fit(SCHEMA, items, examples)
    assert list(enc.users.numeric) == ["age", "interactions_total", "interactions_7d"]
    stats = enc.users.numeric["interactions_total"]
    logs = np.log1p([0, 1, 0])
    assert stats.log and math.isclose(stats.mean, logs.mean()) and math.isclose(stats.std, logs.std())
    enc.save(tmp_path / "encoder.json")
    num = FeatureEncoder.load(tmp_path / "encoder.json").encode_users(
        examples.assign(interactions_total=[0, 1, 1000]))["num"]
    assert num[2, 1] == pytest.approx((np.log1p(1000) - logs.mean()) / logs.std())
    off = FeatureEncoder.fit(SCHEMA, items, examples, behaviour_counts=False)
    assert list(off.users.numeric) == ["age"]


# --- towers -----------------------------------------------------------------------------------

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


def test_config_invariants_are_checked():
    with pytest.raises(ValueError, match="item vocabulary is empty"):
        TwoTower(_config(n_items=1))


# --- loss -------------------------------------------------------------------------------------

def test_in_batch_softmax_matches_hand_computed_values():
    from models.losses import in_batch_softmax

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
    from models.losses import in_batch_softmax

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


def test_listwise_pairwise_pointwise_losses_match_hand_computed_values():
    from models.losses import bce, bpr, sampled_softmax

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


def test_batch_loss_masks_the_users_other_positives_and_corrects_each_source():
    from models.training import TrainingStream

    items, examples = _tiny_frames()
    enc = FeatureEncoder.fit(SCHEMA, items, examples)
    examples["hard_negatives"] = [[12, 13], [], [10]]
    stream = TrainingStream.build(enc, examples, items)
    assert stream.hard.tolist() == [[3, 4], [0, 0], [1, 0]]
    user = stream.users["user"]                         # users 1, 1, 2
    # user 1 has items 10 and 11 (indices 1, 2); user 2 has item 12 (index 3)
    assert stream.hits(user, torch.tensor([1, 2, 3, 4])).tolist() == [
        [True, True, False, False], [True, True, False, False], [False, False, True, False]]


# --- sampler ----------------------------------------------------------------------------------

def test_keep_probability_follows_the_word2vec_formula():
    from models.sampling import downsample_mask, keep_probability

    ids = pd.Series([1] * 90 + [2] * 9 + [3])
    p = keep_probability(ids, threshold=0.01)
    f1 = 0.9
    assert p[0] == pytest.approx(math.sqrt(0.01 / f1) + 0.01 / f1)
    assert p[-1] == 1.0  # an item at 1% with t = 1% keeps everything
    u = np.random.default_rng(3).random(len(ids))
    np.testing.assert_array_equal(downsample_mask(ids, 0.01, u), downsample_mask(ids, 0.01, u.copy()))
    with pytest.raises(ValueError):
        keep_probability(ids, 0.0)


# --- metrics and baseline ---------------------------------------------------------------------

def test_recall_and_ndcg_on_a_hand_made_ranking():
    from models.metrics import ranking_metrics

    top = torch.tensor([[2, 0, 4, 1, 3]])
    relevant = torch.zeros((1, 5), dtype=torch.bool)
    relevant[0, [0, 3]] = True
    m = ranking_metrics(top, relevant, [2, 5])
    d = lambda rank: 1 / math.log2(rank + 1)  # noqa: E731  (1-based rank)
    assert m["recall@2"].item() == pytest.approx(0.5)
    assert m["ndcg@2"].item() == pytest.approx(d(2) / (d(1) + d(2)))
    assert m["recall@5"].item() == pytest.approx(1.0)
    assert m["ndcg@5"].item() == pytest.approx((d(2) + d(5)) / (d(1) + d(2)))


def test_full_catalog_metrics_excludes_seen_items_and_averages_users():
    from models.metrics import full_catalog_metrics

    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    seen = (np.array([0]), np.array([0]))               # user 0 already had item 0
    relevant = (np.array([0, 1]), np.array([2, 0]))     # user 0 wants item 2, user 1 wants item 0
    m = full_catalog_metrics(lambda s, e: scores[s:e], 2, 4, seen, relevant, ks=[2], batch_size=1)
    # user 0: item 0 removed, ranking 1, 2 -> hit at rank 2 (without the exclusion: 0, 1 -> miss);
    # user 1: ranking 3, 2 -> miss
    assert m == {"recall@2": 0.5, "ndcg@2": pytest.approx(0.5 * (1 / math.log2(3)))}
    # a catalog smaller than K still scores
    m10 = full_catalog_metrics(lambda s, e: scores[s:e], 2, 4, seen, relevant, ks=[10])
    assert m10["recall@10"] == 1.0


def test_most_popular_scores_count_training_interactions():
    from models.baselines import most_popular_scores

    assert most_popular_scores(np.array([2, 2, 0, 2]), 4).tolist() == [1.0, 0.0, 3.0, 0.0]
