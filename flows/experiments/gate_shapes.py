"""`towerflow gate-bench` (`make gate-bench`): does the gate, with default params, pass healthy runs of data shaped unlike
the demo and stop broken ones?

For each shape of flows/sources/shapes.py, in a temporary copy of the project: run 1 on the data up to
a month before the end publishes a model (forced, and recorded as such, if its own gate blocks it);
then each variant of run 2 starts from that published state with the whole span:

- `healthy`: the same process one month on: must pass;
- `one_epoch`: `train.epochs=1`: a worse model, must be stopped by the quality check;
- `shuffled`: the items' main feature column shuffled across item rows;
- `ratings_x10`: every rating multiplied by 10 (an upstream unit change);
- `duplicated`: half the interactions of the last month appear twice.

Each broken variant must be stopped before publish (by validation or the gate), with the reason naming
the check. Results go to a JSON file (default reports/gate_shapes.json).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from flows.experiments.bench import copy_project
from flows.sources.shapes import SHAPES, cut, end_of, generate

STOP_STAGES = ("validate", "materialize", "gate")
Frames = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]


def _shuffled(users: pd.DataFrame, items: pd.DataFrame, inter: pd.DataFrame, seed: int) -> Frames:
    column = next(c for c in items.columns if c not in ("item_id", "title"))
    rng = np.random.default_rng(seed)
    items = items.assign(**{column: items[column].to_numpy()[rng.permutation(len(items))]})
    return users, items, inter


def _ratings_x10(users: pd.DataFrame, items: pd.DataFrame, inter: pd.DataFrame, seed: int) -> Frames:
    return users, items, inter.assign(rating=inter["rating"] * 10)


def _duplicated(users: pd.DataFrame, items: pd.DataFrame, inter: pd.DataFrame, seed: int) -> Frames:
    last = inter[inter["timestamp"] > end_of(inter) - pd.Timedelta(days=30)]
    extra = last.sample(frac=0.5, random_state=seed)
    return users, items, pd.concat([inter, extra]).sort_values("timestamp", kind="stable", ignore_index=True)


VARIANTS: dict[str, tuple[Callable[..., Frames] | None, list[str]]] = {
    "healthy": (None, []),
    "one_epoch": (None, ["train.epochs=1"]),
    "shuffled": (_shuffled, []),
    "ratings_x10": (_ratings_x10, []),
    "duplicated": (_duplicated, []),
}


def _run(work: Path, overrides: list[str], start: str = "ingest") -> dict[str, Any]:
    """Every stage from `start` on, in order, until one stops the run; what stopped it and why."""
    from flows.params import load_params
    from flows.stages.registry import STAGES, run_stage

    params = load_params(work / "params.yaml", overrides)
    seconds: dict[str, float] = {}
    for name in STAGES[STAGES.index(start):]:
        t0 = time.perf_counter()
        try:
            run_stage(name, params, work)
        except Exception as exc:  # noqa: BLE001 - recorded: which stage stopped the run and its one line
            return {"published": False, "stopped_at": name, "error": type(exc).__name__,
                    "reason": str(exc).splitlines()[0][:600], "seconds": seconds}
        seconds[name] = round(time.perf_counter() - t0, 1)
    return {"published": True, "seconds": seconds, "gate": _gate(work)}


def _gate(work: Path) -> dict[str, Any]:
    path = work / "reports" / "gate.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def shape_runs(root: Path, shape_name: str, variants: list[str], seed: int = 0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    users, items, inter = generate(shape, seed)
    first_cut = end_of(inter) - pd.Timedelta(days=30)
    out: dict[str, Any] = {"shape": shape_name, "interactions": len(inter), "users": len(users),
                           "items": len(items)}
    with tempfile.TemporaryDirectory(prefix=f"towerflow-gate-{shape_name}-") as tmp:
        base = Path(tmp) / "project"
        copy_project(root, base)
        # a cache of its own (GX context, volume counts) with the workspace's vendored report assets
        (base / ".cache/towerflow").mkdir(parents=True)
        vendor = root / ".cache/towerflow/vendor"
        if vendor.is_dir():
            (base / ".cache/towerflow/vendor").symlink_to(vendor.resolve())
        cache = "paths.cache=.cache/towerflow"
        # one source folder, as a user's export is: a second run reads the same path with newer files
        # (another path would be another lineage, judged without comparing with the live model)
        source = Path(tmp) / "source"
        source1 = cut(users, items, inter, first_cut, source)
        first = _run(base, [cache, f"data.source={source1}"])
        log(f"{shape_name} run1 (before any force): {json.dumps(first)[:600]}")
        if not first["published"] and first.get("stopped_at") == "gate":
            first["forced"] = _run(base, [cache, f"data.source={source1}", "gate.force=true",
                                          "gate.force_reason=gate-bench first run of a shape"], start="gate")
        out["run1"] = first
        log(f"{shape_name} run1: {json.dumps(first)[:400]}")
        for variant in variants:
            change, overrides = VARIANTS[variant]
            frames = change(users, items, inter, seed) if change else (users, items, inter)
            source2 = cut(*frames, end_of(frames[2]), source)
            work = Path(tmp) / variant
            shutil.copytree(base, work, symlinks=True)
            result = _run(work, [cache, f"data.source={source2}", *overrides])
            out[variant] = result
            log(f"{shape_name} {variant}: {json.dumps(result)[:600]}")
    return out


def gate_bench(root: Path, out: Path, shapes: list[str], variants: list[str], seed: int = 0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    from flows.errors import ConfigError

    for given, known in ((shapes, SHAPES), (variants, VARIANTS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(f"unknown {', '.join(unknown)}: choose from {', '.join(known)}")
    result = {name: shape_runs(root, name, variants, seed, log) for name in shapes}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    import sys

    from flows.environment import configure_environment

    here = Path.cwd()
    configure_environment(here)
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(SHAPES)
    which = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    gate_bench(here, here / "reports" / "gate_shapes.json", names, which)
