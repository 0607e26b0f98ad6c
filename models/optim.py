"""The two-tower's optimizer: Adam, with the large embedding tables on sparse gradients (SparseAdam).

Dense Adam reads and writes every row of every table at every step (the weights, their gradient and
two moments): the cost of a step grows with the catalog, not the batch. Measured on 2 idle threads,
one step of 1,024 examples with 50-item histories took 30 ms with 14k items, 163 ms with 200k and
845 ms with 1M (docs/TRAINING.md): at the 200k-item scale the optimizer, not the model, is the work.
A table of at least `train.sparse_min_rows` rows (the item-id table shared by the item tower and
the history pooling, the user-id table, large categorical vocabularies) therefore gets sparse
gradients and SparseAdam, which touches only the rows a batch used (the "lazy Adam" of the
recommender literature: a row's moments decay only when it is used), stepped by rows
(`RowSparseAdam`: torch's results, without its sparse-tensor slow paths). Smaller tables and the MLPs
stay on Adam. Weight decay has no sparse form in torch, so with `train.weight_decay > 0` every table stays
dense (with a note).

The pair presents one optimizer and one LR schedule to the training loop and the checkpoint: step,
zero_grad, state_dict and load_state_dict act on both parts.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.params import TrainParams
from models.towers import rows_in_order

# `train.sparse_min_rows: auto`. Measured on 2 idle threads, a step of 1,024 examples with 50-item
# histories (ms, dense Adam / sparse + SparseAdam): 14k items 29.6 / 62.4, 100k 68.7 / 96.5, 200k
# 162.8 / 107.8, 1M 844.8 / 132.0; the sparse step pays for coalescing the batch's ~50k row indices,
# so below ~135k rows dense is faster
SPARSE_AUTO_ROWS = 150_000


def sparse_min_rows(setting: int | str, weight_decay: float, compiled: bool = False,
                    auto_rows: int = SPARSE_AUTO_ROWS) -> int | None:
    """The table size from which gradients are sparse (`setting`: a count, "auto" = auto_rows, "off"),
    or None when none are (off, weight decay, torch.compile)."""
    if setting == "off" or sparse_note(setting, weight_decay, compiled) is not None:
        return None
    return auto_rows if setting == "auto" else int(setting)


def sparse_note(setting: int | str, weight_decay: float, compiled: bool = False) -> str | None:
    """Why sparse gradients are off although asked for (for the run's notes)."""
    if setting == "off":
        return None
    if weight_decay > 0:
        return "embedding gradients dense: weight_decay > 0 has no sparse form (SparseAdam)"
    if compiled:
        return "embedding gradients dense: torch.compile does not take sparse gradients"
    return None


def set_sparse(model: nn.Module, min_rows: int | None) -> list[nn.Embedding]:
    """Mark the embedding tables of at least min_rows rows sparse (their gradients then are); the
    others dense. Returns the sparse ones. The flag is not part of the weights: a saved model loads dense."""
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for table in tables:
        table.sparse = min_rows is not None and table.num_embeddings >= min_rows
    return [t for t in tables if t.sparse]


class RowSparseAdam(torch.optim.SparseAdam):
    """torch's SparseAdam, the same state and arithmetic in the same order, its update done with row
    reads and writes of the dense moments instead of sparse tensors: torch's results to the bit, but
    for the sums of a row's many entries in a large gradient (`coalesced`, below).

    torch's step builds a sparse tensor per moment, reads each moment through `sparse_mask` and adds
    the updates back as sparse tensors: on the CPU each of those is a slow path. With the gradient
    coalesced (its rows distinct and sorted, as torch's step has them too), every operation below is
    torch's own on the same values in the same order: `old + update` written with `index_copy_` equals
    the sparse add's `old + update`, and the weights get `index_add_` of distinct rows. One step of a
    30,001 x 16 table with 1,280 rows used (the rankers' item table on the 700k shape): 1,067 -> 602 us;
    200,001 x 64 with 50,000 (the 10M shape's item table): 78 -> 48 ms (one thread). A checkpoint of
    either loads into the other (the same state keys)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, maximize = float(group["lr"]), group["eps"], group.get("maximize", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                _row_adam(p, -p.grad if maximize else p.grad, state["exp_avg"], state["exp_avg_sq"],
                          state["step"], lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        return loss


# From this many gradient entries `coalesced` sorts by radix (numpy) and sums by embedding_bag: 53,000
# entries (a 10M-shape batch's histories) into 200,001 rows 14.0 -> 4.2 ms on one thread. A ranker's
# ~1,300 entries stay with torch's (0.09 against 0.15 ms), and so do its bits.
FAST_COALESCE_ENTRIES = 10_000


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """grad.coalesce() of a sparse row gradient: each row once, rows sorted, the row's entries summed.
    From FAST_COALESCE_ENTRIES entries on the CPU by a stable radix sort (rows_in_order) and
    embedding_bag's sums, in the entries' order: the same rows, the same bits where a row has one
    entry (or a few), the sums of many entries within float rounding of torch's (whose CPU coalesce
    took 3x as long), and the same bits run after run."""
    if (grad.is_coalesced() or grad.device.type != "cpu" or grad.sparse_dim() != 1
            or grad._nnz() < FAST_COALESCE_ENTRIES):
        return grad.coalesce()
    rows, values = grad._indices()[0], grad._values()
    order = rows_in_order(rows)
    distinct, counts = torch.unique_consecutive(rows[order], return_counts=True)
    summed = F.embedding_bag(order, values.reshape(len(rows), -1), counts.cumsum(0) - counts, mode="sum")
    return torch.sparse_coo_tensor(distinct.unsqueeze(0), summed.view(-1, *values.shape[1:]), grad.shape,
                                   is_coalesced=True, check_invariants=False)


def _row_adam(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              step: int, *, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """torch.optim._functional.sparse_adam for one parameter, by rows (RowSparseAdam)."""
    grad = coalesced(grad)                      # the update is not linear: each row once
    rows, values = grad._indices()[0], grad._values()
    if values.numel() == 0:
        return
    # old <- old + (1 - b) * (new - old), as torch's step computes it
    old = exp_avg.index_select(0, rows)
    numer = values.sub(old).mul_(1 - beta1).add_(old)
    exp_avg.index_copy_(0, rows, numer)
    old_sq = exp_avg_sq.index_select(0, rows)
    denom = values.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
    exp_avg_sq.index_copy_(0, rows, denom)
    denom.sqrt_().add_(eps)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    param.index_add_(0, rows, numer.div_(denom).mul_(-step_size))


class _Parts:
    """State of several torch optimizers (or schedules) saved and restored as one."""

    parts: list[Any]

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("parts")
        if parts is None or len(parts) != len(self.parts):
            raise ValueError("the checkpoint's optimizer has other parts (dense/sparse tables) than this run's")
        for part, saved in zip(self.parts, parts):
            part.load_state_dict(saved)


def _fusable(params: list[torch.Tensor]) -> bool | None:
    """Whether Adam's fused kernel takes these parameters (floating point, on the CPU or a CUDA GPU)."""
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


class TowerOptimizer(_Parts):
    """Adam over the dense parameters and SparseAdam over the sparse tables' weights, as one."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, min_rows: int | None):
        sparse = {id(t.weight) for t in set_sparse(model, min_rows)}
        dense_params = [p for p in model.parameters() if id(p) not in sparse]
        sparse_params = [p for p in model.parameters() if id(p) in sparse]
        # fused: one kernel over every tensor instead of torch's default per-tensor loop on the CPU (a step
        # of 30k + 6k-row tables and the MLPs: 28 ms -> 4-5 ms on 2 threads; foreach 12-14 ms)
        self.parts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense_params, lr=lr, weight_decay=weight_decay,
                                                                    fused=_fusable(dense_params))]
        if sparse_params:
            self.parts.append(RowSparseAdam(sparse_params, lr=lr))
        self.sparse_tables = len(sparse_params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.parts:
            opt.step()


class TowerSchedule(_Parts):
    """One LambdaLR per optimizer part, stepped together."""

    def __init__(self, opt: TowerOptimizer, factor: Callable[[int], float]):
        self.parts = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in opt.parts]

    @property
    def last_epoch(self) -> int:
        return self.parts[0].last_epoch

    def step(self) -> None:
        for sched in self.parts:
            sched.step()


def train_sparse_rows(train_cfg: TrainParams) -> int | None:
    """`train.sparse_min_rows` resolved for the two-tower (None: every table dense)."""
    return sparse_min_rows(train_cfg.sparse_min_rows, train_cfg.weight_decay, train_cfg.compile)


def make_optimizer(model: nn.Module, train_cfg: TrainParams,
                   factor: Callable[[int], float]) -> tuple[TowerOptimizer, TowerSchedule]:
    """The run's optimizer and LR schedule (factor: the multiplier of train.lr at step t)."""
    opt = TowerOptimizer(model, train_cfg.lr, train_cfg.weight_decay, train_sparse_rows(train_cfg))
    return opt, TowerSchedule(opt, factor)
