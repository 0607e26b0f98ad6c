"""What a benchmark ran on, written beside its figures.

The same code gives other absolute rates on another host, and on the same host in another hour: in issue
23's twenty-fifth session the demo's training epochs ran at 40-47k examples/s and, an hour later with the
same code and bit-identical losses, at 15-18k, while a pure-Python loop kept its speed and a matrix
product lost a fifth at most: what slowed was memory (copies, gathers, the step's Python around them).
`host_speed` times one probe of each kind, at a benchmark's start and at its end; compare figures (or
their ratios to the minimal two-tower) only between runs whose probes agree.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()                                                   # first touch, thread pool start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_speed() -> dict[str, float]:
    """Three probes of about 0.2 s each, on torch's current threads: float32 GFLOP/s of the in-batch
    logits' product (1,024 x 64 by 64 x 1,024), GB/s of copying 64 MiB (read + write), and seconds
    of 10^6 Python additions."""
    import torch

    a, b = torch.randn(1024, 64), torch.randn(64, 1024)
    flops = 2 * 1024 * 64 * 1024 / _median_seconds(lambda: a @ b, 100)
    src = torch.randn(16 * 2**20)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * src.element_size() / _median_seconds(lambda: dst.copy_(src), 20)

    def loop() -> int:
        total = 0
        for i in range(10**6):
            total += i
        return total
    return {"matmul_gflops": round(flops / 1e9, 1), "copy_gb_s": round(copy / 1e9, 1),
            "python_loop_s": round(_median_seconds(loop, 3), 3), "torch_threads": torch.get_num_threads()}


def machine(speed: bool = True) -> dict[str, Any]:
    """The host's facts (CPU, cores, Python, load average) and, with `speed`, its speed now."""
    facts: dict[str, Any] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                             "load_average_1min": round(os.getloadavg()[0], 2)}
    if speed:
        facts["speed"] = host_speed()
    return facts
