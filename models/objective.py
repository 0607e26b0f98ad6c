"""The training objective of one batch: the retrieval loss over in-batch, easy and hard negatives,
plus the self-supervised item-tower loss (Yao et al. 2021) weighted by train.ssl_weight.

The in-batch part is models.losses.in_batch_logits (the same scoring in_batch_softmax uses); the
extra negatives are appended as further columns, each source corrected by its own log Q, and the
configured loss (listwise / pairwise / pointwise) reads them all.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.profiler import record_function

from models.device import autocast
from models.losses import LOSSES, in_batch_listwise, in_batch_logits, info_nce
from models.negatives import popularity_distribution
from models.params import TrainParams
from models.ssl import ItemAugmenter, build_augmenter, distinct_uniform
from models.stream import TrainingStream, gather, widen
from models.towers import Batch, TwoTower, shared_lookups


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on `device` (the same tensors on the CPU); non_blocking from pinned memory."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _joined(batches: list[Batch]) -> Batch:
    """Several batches as one, rows in order (the towers' rows do not interact)."""
    return {k: torch.cat([batch[k] for batch in batches]) for k in batches[0]}


class BatchLoss:
    """Retrieval loss (+ α · SSL loss) of one batch: in-batch negatives, shared easy negatives drawn
    ∝ popularity^easy_power, the examples' own hard negatives, accidental hits masked.

    Every random draw and gather is made on the CPU from the run's generator, whatever the device: a
    GPU run sees the same batches, negatives and SSL views as a CPU run. The towers, the accidental-hit
    masks (the same booleans anywhere; copied over they were most of a large-batch GPU step) and the
    losses run on `device` (the towers under bf16 autocast when `mixed_precision`, on a GPU).
    `fused` (default): the listwise loss without extra negatives through losses.in_batch_listwise (the
    same loss, fewer passes); False keeps the reference path (in_batch_logits + sampled_softmax).
    `shared_table` (default): the item-id table read once a step for the towers (towers.shared_lookups,
    the same values, one gradient instead of three); False: each tower reads it itself."""

    def __init__(self, stream: TrainingStream, train_cfg: TrainParams, augmenter: ItemAugmenter | None,
                 device: torch.device | None = None, mixed_precision: bool = False, fused: bool = True,
                 compile: bool = False, shared_table: bool = True):
        self.stream, self.train_cfg, self.augmenter = stream, train_cfg, augmenter
        self.compile, self.shared_table = compile, shared_table
        self._compiled: dict[tuple[int, str], Callable[[Batch], torch.Tensor]] = {}
        self.device = device or torch.device("cpu")
        self.mixed_precision = mixed_precision
        counts = stream.counts.numpy()
        self.n_hard = min(round(train_cfg.negatives * train_cfg.hard_ratio), stream.hard.shape[1])
        self.n_easy = train_cfg.negatives - round(train_cfg.negatives * train_cfg.hard_ratio)
        self.easy_p = torch.from_numpy(popularity_distribution(counts, train_cfg.easy_power)).to(torch.float32)
        self.ssl_p = torch.from_numpy(popularity_distribution(counts, train_cfg.ssl_power)).to(torch.float32)
        self.log_q = stream.log_q
        self.items = training_items(stream, train_cfg.item_id_dropout)
        self.listwise_logq = train_cfg.loss == "listwise" and train_cfg.logq
        self.fused = fused and train_cfg.loss == "listwise" and self.n_easy == 0 and self.n_hard == 0

    def _tower(self, model: TwoTower, name: str) -> Callable[[Batch], torch.Tensor]:
        """model.<name> (encode_users / encode_items), through torch.compile when asked. The method is
        compiled, not the module, so the saved weights keep their names; dynamic shapes: the last
        batch, the SSL and negative batches differ in size and must not recompile."""
        if not self.compile:
            return getattr(model, name)
        key = (id(model), name)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(getattr(model, name), dynamic=True)
        return self._compiled[key]

    def _encode(self, model: TwoTower, name: str, batch: Batch) -> torch.Tensor:
        """One tower on `device`, under autocast when asked; float32 out (the losses stay float32)."""
        with autocast(self.device, self.mixed_precision):
            return self._tower(model, name)(to_device(batch, self.device)).float()

    def _encode_together(self, model: TwoTower, name: str, batches: list[Batch]) -> list[torch.Tensor]:
        """Several batches through one tower in one call, split back: the rows do not interact, so each
        comes out as it would alone, but the tower runs once and its embedding tables get one gradient."""
        sizes = [len(batch["item"]) for batch in batches]
        return list(self._encode(model, name, _joined(batches)).split(sizes))

    def _shared_table(self, model: TwoTower) -> bool:
        """Whether the step reads the item-id table once (towers.shared_lookups): a dense table on the
        CPU, towers not compiled (a compiled tower reads its own tables)."""
        return self.shared_table and self.device.type == "cpu" and not self.compile and not model.item_emb.sparse

    def _encode_shared(self, model: TwoTower, users: Batch, items: Batch,
                       views: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(q, c, SSL view embeddings) as _encode / _encode_together give them, the item-id table read
        once for the batch's items, the views' items and the users' histories: one table gradient a
        step instead of three (the towers themselves run as before, each batch on its own)."""
        joined = _joined(views) if views else None
        ids = [items["item"]] + ([joined["item"]] if joined is not None else [])
        rows, means = shared_lookups(model.item_emb, ids, [users["history"]])
        q = model.encode_users(users, history_mean=means[0])                        # (B, D)
        c = model.encode_items(items, item_rows=rows[0])                            # (B, D)
        if joined is None:
            return q, c, []
        z = model.encode_items(joined, item_rows=rows[1]).split([len(v["item"]) for v in views])
        return q, c, list(z)                                                        # (S, D) x 2

    def __call__(self, model: TwoTower, b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # record_function labels name the parts of a step in a profile (the training benchmark); they
        # cost nothing measurable when no profiler is running
        s, tau, dev = self.stream, model.tau(), self.device
        item = s.item_idx[b]                                                # (B,)
        user = s.users["user"][b]                                           # (B,)
        ssl = self.augmenter is not None and self.train_cfg.ssl_weight > 0
        with record_function("ssl"):
            views = self.ssl_views(gen) if ssl else []                      # two (S,) item batches
        with record_function("towers"):
            positives = self.positives(item, gen)
            if self._shared_table(model):
                q, c, z = self._encode_shared(model, gather(s.users, b), positives, views)
            else:
                q = self._encode(model, "encode_users", gather(s.users, b))        # (B, D)
                c = self._encode(model, "encode_items", positives)                 # (B, D)
                # the two SSL views in one pass: one item-table gradient instead of two. The batch's own
                # items keep their pass: joined to the views too, 2 of 7 runs of 185 steps ended on
                # another loss (2 threads); this split repeated its loss 17 times of 17
                z = self._encode_together(model, "encode_items", views) if ssl else []   # (S, D) x 2
        with record_function("in-batch logits + hit mask"):
            # log Q of item j among the B in-batch negatives: its stream share times B (Yi et al. 2019)
            correction = (self.log_q[item] + math.log(len(b))).to(dev) if self.listwise_logq else None   # (B,)
            item_on = item.to(dev)                                           # (B,) a copy on a GPU, else itself
            hits = s.hits(user.to(dev), item_on)                            # (B, B), built on `dev`
            weights = s.weights[b].to(dev)                                  # (B,)
            if self.fused:
                # no item ids: every stream row is one of its user's positives, so a column holding
                # row i's own item is already one of row i's hits
                loss = in_batch_listwise(q, c, tau, None, correction, weights, hits)
            else:
                pos, inb, valid = in_batch_logits(q, c, tau, item_on, correction, hits)
        if not self.fused:
            negs, valids = [inb], [valid]
            if self.n_easy:
                with record_function("easy negatives"):
                    easy, valid = self.easy_negatives(model, q, item, user, tau, gen)
                    negs.append(easy)
                    valids.append(valid)
            if self.n_hard:
                with record_function("hard negatives"):
                    hard, valid = self.hard_negatives(model, q, b, item, tau, gen)
                    negs.append(hard)
                    valids.append(valid)
            with record_function("retrieval loss"):
                loss = LOSSES[self.train_cfg.loss](pos, torch.cat(negs, dim=1), torch.cat(valids, dim=1), weights)
        if ssl:
            with record_function("ssl"):
                loss = loss + self.train_cfg.ssl_weight * info_nce(*z, self.train_cfg.ssl_temperature)
        return loss

    def positives(self, item: torch.Tensor, gen: torch.Generator) -> Batch:
        """The item tower's inputs for the batch's positives: a share train.item_id_dropout of them
        without their id (OOV, index 0), so the tower learns to place an item from its features alone,
        as it must for an item with no interactions or one added to the index after training
        (DropoutNet, Volkovs et al. 2017). The hit masks and log Q still read the real items."""
        batch = gather(self.items, item)
        rate = self.train_cfg.item_id_dropout
        if rate <= 0:
            return batch
        hide = torch.rand(len(item), generator=gen) < rate
        return {**batch, "item": batch["item"].masked_fill(hide, 0)}

    def easy_negatives(self, model: TwoTower, q: torch.Tensor, item: torch.Tensor, user: torch.Tensor,
                       tau: torch.Tensor | float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) logits of K items shared by the batch, drawn ∝ popularity^easy_power, and their mask."""
        s = self.stream
        e = torch.multinomial(self.easy_p, self.n_easy, replacement=True, generator=gen)  # (K,)
        easy = q @ self._encode(model, "encode_items", gather(self.items, e)).T / tau   # (B, K)
        if self.listwise_logq:
            easy = easy - torch.log(self.n_easy * self.easy_p[e]).unsqueeze(0).to(self.device)
        dev = self.device
        return easy, (e.unsqueeze(0) != item.unsqueeze(1)).to(dev) & ~s.hits(user.to(dev), e.to(dev))

    def hard_negatives(self, model: TwoTower, q: torch.Tensor, b: torch.Tensor, item: torch.Tensor,
                       tau: torch.Tensor | float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H) logits of a random n_hard of each row's stored hard negatives, and their mask. No log Q:
        they are chosen per example, not sampled from a proposal."""
        pool = widen(self.stream.hard[b])                               # (B, W)
        # padding (0) sorts last
        key = torch.rand(pool.shape, generator=gen) + (pool == 0).to(torch.float32)
        h = pool.gather(1, key.argsort(dim=1)[:, :self.n_hard])         # (B, H)
        uniq, inv = torch.unique(h, return_inverse=True)
        ch = self._encode(model, "encode_items", gather(self.items, uniq))          # (U, D)
        hard = (q.unsqueeze(1) * ch[inv.to(self.device)]).sum(dim=-1) / tau     # (B, H)
        return hard, ((h != 0) & (h != item.unsqueeze(1))).to(self.device)

    def ssl_views(self, gen: torch.Generator) -> list[Batch]:
        """Two masked views of an item batch drawn closer to uniform than the stream; their InfoNCE
        is the self-supervised loss (models.losses.info_nce)."""
        n = min(self.train_cfg.ssl_batch_size, int((self.ssl_p > 0).sum()))
        if self.train_cfg.ssl_power == 0:
            # uniform over the catalog (every index but 0, popularity_distribution): a draw whose cost
            # is the batch's, not the catalog's
            idx = distinct_uniform(1, len(self.ssl_p), n, gen)                        # (S,) distinct items
        else:
            idx = torch.multinomial(self.ssl_p, n, replacement=False, generator=gen)   # (S,) distinct items
        assert self.augmenter is not None, "ssl_views needs an augmenter (make_augmenter)"
        return list(self.augmenter.views(gather(self.items, idx), gen))


def training_items(stream: TrainingStream, id_dropout: float) -> Batch:
    """The item table the towers read while training. With train.item_id_dropout, an item with no
    positive in the stream shows no id wherever it turns up (SSL views, extra negatives): its id row
    then never moves from zero (forget_unseen_items), so it is scored from its features by a tower
    that learned to do so, like an item added later. Without, the stream's own table: such rows are
    trained by the SSL loss alone, into directions no user pulled (where every item is read once, a
    held-out item's AUC among the other unread ones 0.58-0.60 so, 0.71 hidden; docs/TRAINING.md)."""
    if id_dropout <= 0:
        return stream.items
    return {**stream.items, "item": torch.where(stream.counts > 0, stream.items["item"], 0)}


def forget_unseen_items(model: TwoTower, counts: torch.Tensor) -> None:
    """Zero the id rows of the items with no positive in the stream (the OOV row is zero): a fresh
    model's, before training (training_items keeps them there)."""
    with torch.no_grad():
        rows = model.item_emb.weight
        rows[(counts == 0).to(rows.device)] = 0.0


def make_augmenter(stream: TrainingStream, train_cfg: TrainParams, notes: list[str]) -> ItemAugmenter | None:
    """The SSL view maker, or None (with a note when SSL was asked for but cannot work on this catalog)."""
    if train_cfg.ssl_weight <= 0:
        return None
    aug = build_augmenter(stream.items, stream.counts.numpy(), train_cfg.ssl_masking, train_cfg.ssl_dropout)
    if not aug.can_mask and not any(k.startswith("multi:") for k in stream.items):
        notes.append("ssl skipped: the item tower has a single feature, so two views cannot differ")
        return None
    return aug
