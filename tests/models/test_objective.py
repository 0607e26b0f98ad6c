"""The batch objective (models/objective.py): its in-batch part is the library's in-batch softmax."""
from __future__ import annotations

import math

import torch

from models.encoding import FeatureEncoder
from models.losses import in_batch_softmax
from models.objective import BatchLoss
from models.params import ModelParams, TrainParams
from models.stream import TrainingStream, gather
from models.towers import TwoTower
from models.training import tower_config
from training_data import TINY_SCHEMA, tiny_frames


def test_listwise_loss_without_extra_negatives_is_the_in_batch_softmax():
    items, examples = tiny_frames()
    encoder = FeatureEncoder.fit(TINY_SCHEMA, items, examples)
    stream = TrainingStream.build(encoder, examples.assign(weight=[1.0, 2.0, 0.5]), items)
    torch.manual_seed(0)
    model = TwoTower(tower_config(encoder, ModelParams(dim=4, embedding_dim=4, hidden=[8])))
    b = torch.tensor([2, 0, 1])
    # every positive with its id (the item tower below reads them all)
    cfg = TrainParams(negatives=0, ssl_weight=0.0, item_id_dropout=0.0)
    loss = BatchLoss(stream, cfg, None, fused=False)(model, b, torch.Generator())
    fused = BatchLoss(stream, cfg, None)(model, b, torch.Generator())

    item, user = stream.item_idx[b], stream.users["user"][b]
    q, c = model(gather(stream.users, b), gather(stream.items, item))
    # log Q of each item among the B in-batch negatives (Yi et al. 2019): its stream share times B
    log_q = stream.log_q[item] + math.log(len(b))
    expected = in_batch_softmax(q, c, model.tau(), item, log_q, stream.weights[b], stream.hits(user, item))
    assert torch.equal(loss, expected)
    assert torch.allclose(fused, expected, rtol=1e-6, atol=1e-6)    # the training path: same loss, fewer passes
    assert stream.hits(user, item)[1, 2]          # user 1's other positive is masked, not a negative
    no_logq = BatchLoss(stream, cfg.model_copy(update={"logq": False}), None)(model, b, torch.Generator())
    assert torch.allclose(no_logq, in_batch_softmax(q, c, model.tau(), item, None, stream.weights[b],
                                                 stream.hits(user, item)), rtol=1e-6, atol=1e-6)


def _ssl_step() -> tuple[TrainingStream, TwoTower, TrainParams, object]:
    """A tiny stream, a tower pair and SSL on (random masking: it hides the item id in some views)."""
    from models.objective import make_augmenter

    items, examples = tiny_frames()
    encoder = FeatureEncoder.fit(TINY_SCHEMA, items, examples)
    stream = TrainingStream.build(encoder, examples, items)
    torch.manual_seed(0)
    model = TwoTower(tower_config(encoder, ModelParams(dim=4, embedding_dim=4, hidden=[8])))
    # no id dropout: its draw follows the views, and the retrieval-only loss below draws no views
    cfg = TrainParams(negatives=0, ssl_weight=0.5, ssl_batch_size=4, ssl_dropout=0.0, ssl_masking="random",
                      item_id_dropout=0.0)
    augmenter = make_augmenter(stream, cfg, [])
    assert augmenter is not None
    return stream, model, cfg, augmenter


def test_the_ssl_views_encoded_in_one_pass_give_the_info_nce_of_each_view_encoded_alone():
    from models.losses import info_nce

    stream, model, cfg, augmenter = _ssl_step()
    b = torch.tensor([2, 0, 1])
    total = BatchLoss(stream, cfg, augmenter)(model, b, torch.Generator().manual_seed(3))
    retrieval = BatchLoss(stream, cfg, None)(model, b, torch.Generator().manual_seed(3))
    # the same draws: the views come first from the step's generator
    v1, v2 = BatchLoss(stream, cfg, augmenter).ssl_views(torch.Generator().manual_seed(3))
    assert not all(torch.equal(v1[k], v2[k]) for k in v1)          # two different views
    expected = retrieval + 0.5 * info_nce(model.encode_items(v1), model.encode_items(v2), cfg.ssl_temperature)
    assert torch.allclose(total, expected, rtol=1e-6, atol=1e-6)


def _edges_into(loss: torch.Tensor, leaf: torch.Tensor) -> int:
    """How many gradients of the graph behind `loss` flow into `leaf` (edges to its AccumulateGrad)."""
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and getattr(nxt, "variable", None) is leaf:
                count += 1
            stack.append(nxt)
    return count


def test_a_step_reads_the_item_table_once_with_the_loss_and_gradients_of_each_tower_reading_it():
    # random masking hides the item id (index 0, the padding row) in some views: that row must get no gradient
    stream, model, cfg, augmenter = _ssl_step()
    b = torch.tensor([2, 0, 1])
    views = BatchLoss(stream, cfg, augmenter).ssl_views(torch.Generator().manual_seed(3))
    assert any((v["item"] == 0).any() for v in views)

    grads, losses = [], []
    for shared in (True, False):
        model.zero_grad(set_to_none=True)
        loss = BatchLoss(stream, cfg, augmenter, shared_table=shared)(model, b, torch.Generator().manual_seed(3))
        # one gradient for the table shared by the item tower, the SSL views and the history pooling
        assert _edges_into(loss, model.item_emb.weight) == (1 if shared else 3)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])                         # the same values, bit for bit
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
    assert not grads[0]["item_emb.weight"][0].any()                   # the padding row does not learn
