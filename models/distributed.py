"""Data-parallel training: torch DistributedDataParallel over processes, gloo backend (CPU).

Two ways in, both running the one training loop (models.training.fit) with a GroupContext:
- `train.workers: N > 1`: the train stage calls `spawn_fit`, which starts N processes with
  torch.multiprocessing, each forked from multiprocessing's fork server (the pre-encoded stream
  travels through shared memory or as the paths of its memory maps, not as copies); each joins a
  gloo group through the torch.distributed env:// variables and runs `fit` as its rank;
- a torchrun launch across machines (it sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE itself): the train
  stage runs in every process, `join_launched_group` joins the group and returns the rank's context.

Per epoch every rank draws the same seeded permutation and takes a disjoint strided shard of it
(padded to equal length, like DistributedSampler, because every rank must take the same number of
steps). `train.batch_size` is per process, so one step sees workers × batch_size examples.
In-batch softmax under DDP: each rank's negatives are its local batch only (gathering the candidate
embeddings across ranks would give every row workers × more negatives; left for later).
This module imports models.training; models.training never imports it.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from models.device import resolve_threads
from models.early_stopping import ValidationTask
from models.errors import ModelError
from models.objective import BatchLoss
from models.params import TrainParams
from models.stream import TrainingStream
from models.towers import TwoTower, TwoTowerConfig
from models.training import DistContext, FitResult, Step, check_stream, fit


ERROR_SUFFIX = ".error.pickle"    # a rank's ModelError, for spawn_fit to raise in the parent


def shard(perm: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of an epoch's permutation: every world-th index from `rank`, after padding the
    permutation with its own head to a multiple of world (a few examples are seen twice per epoch)."""
    pad = (-len(perm)) % world
    return torch.cat([perm, perm[:pad]])[rank::world]


def rank_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class _LossModule(torch.nn.Module):
    """The whole batch loss as the forward of one module: the towers, the extra negatives and the SSL
    views all run inside it, so DDP sees one forward per backward and every parameter is used in each
    step (no find_unused_parameters, which costs a graph traversal per step)."""

    def __init__(self, model: TwoTower, batch_loss: BatchLoss) -> None:
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss

    def forward(self, b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.batch_loss(self.model, b, gen)


class GroupContext(DistContext):
    """One rank of an initialized gloo process group."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def shard(self, perm: torch.Tensor) -> torch.Tensor:
        return shard(perm, self.rank, self.world)

    def sampler(self, seed: int, epoch: int, gen: torch.Generator) -> torch.Generator:
        # each rank draws its own negatives and SSL items; seeded per (seed, epoch, rank), so a
        # resumed run draws what the uninterrupted one did without saving every rank's state
        return rank_generator(seed, epoch, self.rank)

    def step(self, model: TwoTower, batch_loss: BatchLoss) -> Step:
        ddp = DistributedDataParallel(_LossModule(model, batch_loss))
        if any(isinstance(m, torch.nn.Embedding) and m.sparse for m in model.modules()):
            ddp.register_comm_hook(None, one_at_a_time)
        return ddp

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, values: list[Any]) -> list[Any]:
        dist.broadcast_object_list(values, src=0)
        return values


def one_at_a_time(_state, bucket):  # unannotated: DDP compares the annotations with its classes, not strings
    """(None, dist.GradBucket) -> Future[Tensor]: DDP's averaging all-reduce of one bucket, finished
    before the next bucket's starts.

    gloo runs a process group's collectives on two worker threads; a sparse gradient's all-reduce
    (allgatherv of its indices and values) running beside a dense bucket's corrupted the heap in 3
    of 346 two-process runs on torch 2.13 ("malloc(): unaligned tcache chunk detected", SIGABRT or
    SIGSEGV in a rank; the core showed the two gloo threads in those two collectives). One at a time
    they never overlap. With one torch thread per rank there is little backward compute to overlap
    with anyway; dense-only models keep DDP's own overlapping hook."""
    tensor = bucket.buffer()
    tensor.div_(dist.get_world_size())
    dist.all_reduce(tensor)                 # returns when done (async_op=False)
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(tensor)
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preload_ranks() -> None:
    """The ranks start from multiprocessing's fork server, which imports this module (torch, the
    towers, the training loop) once, before any torch work, and forks a rank per call: a spawned rank
    imported them itself, 3.5 s of CPU per rank on 2 cores, paid again by every `spawn_fit` (the train
    stage calls it twice: the evaluation model, then the refit). The server is a fresh interpreter,
    not a copy of this process, so a fork of it inherits no OpenMP or gloo threads; it lives as long as
    this process. Its environment is this process's at the first call: what changes from call to call
    travels as an argument (the port, the caller's pid); a rank reads from os.environ only what is set
    before this process starts (MASTER_ADDR)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])


def spawn_fit(stream: TrainingStream, tower_cfg: TwoTowerConfig, train_cfg: TrainParams, seed: int,
              epochs: int | None = None, validation: ValidationTask | None = None, checkpoint: Path | None = None,
              log: Callable[[str], None] | None = None, on_epoch: Callable[[int], None] | None = None) -> FitResult:
    """Run fit in train_cfg.workers processes; returns rank 0's result (its model equals every rank's).
    log and on_epoch must be picklable (module-level functions or instances); only rank 0 calls them."""
    check_stream(stream)
    _preload_ranks()
    port = int(os.environ.get("MASTER_PORT") or free_port())
    with tempfile.TemporaryDirectory(prefix="towerflow-ddp-") as tmp:
        out = Path(tmp) / "result.pt"
        ranks = mp.start_processes(_worker, nprocs=train_cfg.workers, join=False, start_method="forkserver",
                                   args=(os.getpid(), train_cfg.workers, port, out, stream, tower_cfg, train_cfg,
                                         seed, epochs, validation, checkpoint, log, on_epoch))
        try:
            while not ranks.join():
                pass
        except mp.ProcessRaisedException:
            # A rank's own error (a non-finite loss, say) as it would be raised in one process, not
            # as torch's report of a child's traceback; anything else stays as torch reports it.
            for error in sorted(Path(tmp).glob(f"*{ERROR_SUFFIX}")):
                raise pickle.loads(error.read_bytes()) from None
            raise
        finally:
            # torch writes a failed rank's traceback to a pytorch-errorfile-*.pickle in the system's temp
            # folder and never removes it: one left behind per failed run
            for name in ranks.error_files:
                Path(name).unlink(missing_ok=True)
        state = torch.load(out, map_location="cpu", weights_only=True)   # rank 0's result: data only
    model = TwoTower(tower_cfg)
    model.load_state_dict(state.pop("model"))
    model.eval()
    return FitResult(model=model, **state)


def _end_with_caller(caller: int) -> None:
    """End this rank when the process that called spawn_fit is gone (killed with -9, or by the
    kernel's OOM killer). A rank forked by the fork server is the server's child, not the caller's:
    the parent-death signal torch sets for it watches the server, which outlives a killed caller for
    as long as ranks hold its pipe, so the ranks would train on, unwatched, to the end of the fit."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(caller, 0)
            except (ProcessLookupError, PermissionError):   # gone (its pid maybe another user's by now)
                os.kill(os.getpid(), signal.SIGKILL)     # nothing is left to hand a result to

    threading.Thread(target=watch, name="end-with-caller", daemon=True).start()


def _worker(rank: int, caller: int, world: int, port: int, out: Path, stream: TrainingStream,
            tower_cfg: TwoTowerConfig, train_cfg: TrainParams, seed: int, epochs: int | None,
            validation: ValidationTask | None, checkpoint: Path | None, log: Callable[[str], None] | None,
            on_epoch: Callable[[int], None] | None) -> None:
    _end_with_caller(caller)
    os.environ.update(MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world))
    # the processes share the machine's cores: threads per rank split train.threads between them
    torch.set_num_threads(max(1, resolve_threads(train_cfg.threads) // world))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        result = fit(stream, tower_cfg, train_cfg, seed, epochs, validation, checkpoint, log, on_epoch,
                     dist=GroupContext(rank, world))
        if rank == 0:
            torch.save({"model": result.model.state_dict(), **result.progress(),
                        "resumed_from": result.resumed_from, "notes": result.notes}, out)
    except ModelError as exc:
        out.with_name(f"rank{rank}{ERROR_SUFFIX}").write_bytes(pickle.dumps(exc))
        raise
    finally:
        dist.destroy_process_group()


def join_launched_group(train_cfg: TrainParams) -> DistContext:
    """Inside a torchrun launch (RANK and WORLD_SIZE set, world > 1), join its gloo group once and
    return this rank's context; else the one-process context. The train stage then trains each
    rank's shard in place and writes its outputs from rank 0 only."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistContext()
    if not dist.is_initialized():
        torch.set_num_threads(max(1, resolve_threads(train_cfg.threads) // world))
        dist.init_process_group("gloo", init_method="env://")
    return GroupContext(dist.get_rank(), dist.get_world_size())
