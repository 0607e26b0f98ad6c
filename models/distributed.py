"""Data-parallel training: torch DistributedDataParallel over processes, gloo backend (CPU).

`fit` (models/training.py) comes here in two cases:
- `train.workers: N > 1` in one process: `spawn_fit` starts N processes with torch.multiprocessing.spawn
  (the pre-encoded stream travels through shared memory, not as copies), each joins a gloo group
  through the torch.distributed env:// variables and runs `fit` as its rank;
- a process already in a group (one of those, or a torchrun launch across machines, which sets
  MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE itself): `fit` trains the rank's shard.

Per epoch every rank draws the same seeded permutation and takes a disjoint strided shard of it
(padded to equal length, like DistributedSampler, because every rank must take the same number of
steps). `train.batch_size` is per process, so one step sees workers × batch_size examples.
In-batch softmax under DDP: each rank's negatives are its local batch only (gathering the candidate
embeddings across ranks would give every row workers × more negatives; left for later).
"""
from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from models.early_stopping import ValidationTask
    from models.params import TrainParams
    from models.towers import TwoTower, TwoTowerConfig
    from models.training import BatchLoss, FitResult, TrainingStream


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(perm: "torch.Tensor", rank: int, world: int) -> "torch.Tensor":
    """This rank's part of an epoch's permutation: every world-th index from `rank`, after padding the
    permutation with its own head to a multiple of world (a few examples are seen twice per epoch)."""
    import torch

    pad = (-len(perm)) % world
    return torch.cat([perm, perm[:pad]])[rank::world]


def rank_generator(seed: int, epoch: int, rank: int) -> "torch.Generator":
    import torch

    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def sum_over_ranks(*values: float) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def from_rank0(values: list[Any]) -> list[Any]:
    """Rank 0's values on every rank (e.g. the early-stopping decision)."""
    import torch.distributed as dist

    dist.broadcast_object_list(values, src=0)
    return values


def parallel_step(model: "TwoTower", batch_loss: "BatchLoss") -> Callable[..., "torch.Tensor"]:
    """The whole batch loss as the forward of one DDP module: the towers, the extra negatives and the
    SSL views all run inside it, so DDP sees one forward per backward and every parameter is used in
    each step (no find_unused_parameters, which costs a graph traversal per step)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class LossModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return batch_loss(self.model, b, gen)

    return DistributedDataParallel(LossModule())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_fit(stream: "TrainingStream", config: "TwoTowerConfig", cfg: "TrainParams", seed: int,
              epochs: int | None, validation: "ValidationTask | None", checkpoint: Path | None,
              log: Callable[[str], None] | None, on_epoch: Callable[[int], None] | None) -> "FitResult":
    """Run fit in cfg.workers processes; returns rank 0's result (its model equals every rank's).
    log and on_epoch must be picklable (module-level functions or instances); only rank 0 calls them."""
    import torch
    import torch.multiprocessing as mp

    from models.towers import TwoTower
    from models.training import FitResult

    port = int(os.environ.get("MASTER_PORT") or free_port())
    with tempfile.TemporaryDirectory(prefix="towerflow-ddp-") as tmp:
        out = Path(tmp) / "result.pt"
        mp.spawn(_worker, nprocs=cfg.workers, join=True,
                 args=(cfg.workers, port, out, stream, config, cfg, seed, epochs, validation, checkpoint,
                       log, on_epoch))
        state = torch.load(out, map_location="cpu", weights_only=False)
    model = TwoTower(config)
    model.load_state_dict(state.pop("model"))
    model.eval()
    return FitResult(model=model, **state)


def _worker(rank: int, world: int, port: int, out: Path, stream: "TrainingStream", config: "TwoTowerConfig",
            cfg: "TrainParams", seed: int, epochs: int | None, validation: "ValidationTask | None",
            checkpoint: Path | None, log: Callable[[str], None] | None,
            on_epoch: Callable[[int], None] | None) -> None:
    import torch
    import torch.distributed as dist

    from models.training import fit

    os.environ.update(MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world))
    # the processes share the machine's cores: threads per rank split train.threads between them
    torch.set_num_threads(max(1, cfg.threads // world))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        result = fit(stream, config, cfg, seed, epochs, validation, checkpoint, log, on_epoch)
        if rank == 0:
            torch.save({"model": result.model.state_dict(), "losses": result.losses, "seconds": result.seconds,
                        "val_ndcg": result.val_ndcg, "best_epoch": result.best_epoch,
                        "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
                        "notes": result.notes}, out)
    finally:
        dist.destroy_process_group()


def join_launched_group(cfg: "TrainParams") -> int:
    """Inside a torchrun launch (RANK and WORLD_SIZE set, world > 1), join its gloo group once and
    return this process's rank; else 0. The train stage then trains each rank's shard in place and
    writes its outputs from rank 0 only."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0
    if not dist.is_initialized():
        torch.set_num_threads(max(1, cfg.threads // world))
        dist.init_process_group("gloo", init_method="env://")
    return dist.get_rank()
