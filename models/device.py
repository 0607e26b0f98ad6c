"""Where a model trains and scores: the device, its mixed precision, and the CPU thread count.

One small helper for every torch model of the project (the two-tower now; the rankers of
models/ranking can adopt it as they are: `device = resolve_device(cfg.device)`, `model.to(device)`,
each batch `.to(device)`, the forward under `autocast(device, cfg.mixed_precision)`, and the loss
computed in float32 outside it).
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch

from models.cores import usable_cores
from models.errors import ModelError

DeviceName = Literal["auto", "cpu", "cuda"]
# the thread count `threads: auto` picks: two cores keep a 1-2k batch's GEMMs busy, and more threads
# than that mostly wait on each other on a machine whose cores other processes share
AUTO_THREADS = 2


class DeviceUnavailable(ModelError):
    """The configured device is not on this machine."""


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """'auto': the first CUDA GPU when torch sees one, else the CPU; 'cpu'; 'cuda' (or 'cuda:N'): that
    GPU, or DeviceUnavailable saying why not (a CPU-only torch build, or no GPU visible)."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if torch.version.cuda is None:
            raise DeviceUnavailable(f"{setting} is {name!r} but this torch ({torch.__version__}) is a CPU-only "
                                    f"build: install a CUDA build of torch, or set {setting}: auto (or cpu)")
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"{setting} is {name!r} but no CUDA GPU is visible (driver missing, or "
                                    f"CUDA_VISIBLE_DEVICES empty): set {setting}: auto (or cpu)")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"{setting} is {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
        return torch.device(name)
    raise DeviceUnavailable(f"{setting} must be auto, cpu or cuda[:N] (got {name!r})")


def resolve_threads(threads: int | str) -> int:
    """torch CPU threads: a positive count as given, or 'auto' = min(AUTO_THREADS, usable cores)."""
    if threads == "auto":
        return max(1, min(AUTO_THREADS, usable_cores()))
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive count or 'auto' (got {threads!r})")
    return threads


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast of the towers' matmuls on a GPU when `enabled`; a no-op on the CPU (CPU bf16
    autocast is slower than float32 on most CPUs, and the reference results are float32). bfloat16
    keeps float32's exponent range, so no loss scaling is needed; the losses (logsumexp over
    temperature-scaled logits) run outside it in float32."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
