"""The per-run params file: params.yaml plus one run's `--set` / `--force` overrides.

`towerflow run --set k=v` (and `--force --reason`) never edit params.yaml: a run stopped half-way used
to leave it rewritten (comments gone, `gate.force: true` for every later run). Instead the flow, once
it holds the run lock, writes the run's params to `.towerflow/run/params.yaml` (atomically); every
stage of the run reads that file (`TOWERFLOW_RUN_PARAMS`, set by flows/reproduce.py), and DVC reads
params.yaml's values from it for that run, so dvc.lock records what the run used. params.yaml itself
is only ever read; the next run writes its own file from it, so an override never outlives its run.
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flows.durable import write_atomic
from flows.errors import ConfigError
# flows.params (its pydantic models: 0.3 s) is imported by the functions that read params, not here:
# every stage of a run starts a flows/reproduce.py process that needs only ENV, RUN_PARAMS and
# dvc_reads_params_from from this module

RUN_PARAMS = Path(".towerflow") / "run" / "params.yaml"
# set for the stage commands a run starts: `towerflow stage` reads its params from this file
ENV = "TOWERFLOW_RUN_PARAMS"


def check_overrides(overrides: list[str]) -> None:
    """paths.* shape dvc.yaml's outputs (DVC templates them from params.yaml itself): a per-run value
    would make a stage write where DVC does not look."""
    from flows.params import parse_override

    for text in overrides:
        keys, _ = parse_override(text)
        if keys[0] == "paths":
            raise ConfigError(f"--set {'.'.join(keys)}: paths.* decide where dvc.yaml's outputs are; "
                              "change them in params.yaml")


def write_run_params(root: Path, overrides: list[str]) -> Path:
    """Validate params.yaml + overrides and write them to root/.towerflow/run/params.yaml (fsynced,
    then renamed over the previous run's file); returns that path. The file is params.yaml's own
    text with only the overridden values changed (a round-trip edit, as `dvc exp run -S` makes), so
    DVC and the stages read every other value exactly as they would read it from params.yaml."""
    from flows.params import apply_overrides, read_raw, validate_params

    check_overrides(overrides)
    source = root / "params.yaml"
    # the override errors (unknown keys, a value where a section is) name the key, before any write
    validate_params(apply_overrides(read_raw(source), overrides),
                    origin="params.yaml" + (" with --set overrides" if overrides else ""))
    header = ("# Written by towerflow for one run: params.yaml with this run's overrides "
              f"({', '.join(overrides) or 'none'}).\n# Do not edit: the next run rewrites it; "
              "edit params.yaml instead.\n")
    path = root / RUN_PARAMS
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, header + _overridden_text(source.read_text(), overrides, str(source)))
    return path


def _overridden_text(text: str, overrides: list[str], origin: str) -> str:
    """params.yaml's text with the overridden values changed (comments and layout kept). Checked by
    reading it back: the result must hold exactly params.yaml + overrides, or the run stops here."""
    if not overrides:
        return text
    import yaml
    from ruamel.yaml import YAML

    from flows.params import apply_overrides, parse_override

    # quotes kept as written: a round trip without them turns `"::1"` in a flow list into `::1`,
    # which no YAML parser reads back (DVC's own editor drops them)
    editor = YAML()
    editor.preserve_quotes = True
    editor.width = 4096           # never fold a long line: the comments stay where they are
    editor.representer.add_representer(    # `null` as params.yaml writes it, not an empty value
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = editor.load(text)
    for override in overrides:
        keys, value = parse_override(override)
        node = document
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    out = io.StringIO()
    editor.dump(document, out)
    result = out.getvalue()
    expected = apply_overrides(yaml.safe_load(text) or {}, overrides)
    if yaml.safe_load(result) != expected:
        raise ConfigError(f"{origin}: the overrides {', '.join(overrides)} could not be written back as the same "
                          "values; write them in params.yaml instead")
    return result


def stage_params_file(params_file: Path) -> Path:
    """The file a stage reads its params from: the run's file when a run started it, else `params_file`."""
    run_file = os.environ.get(ENV)
    return Path(run_file) if run_file else params_file


@contextmanager
def dvc_reads_params_from(params_yaml: Path, run_file: Path) -> Iterator[None]:
    """While inside, DVC (in this process) reads the values of `params_yaml` from `run_file`.

    DVC has no per-invocation params file: `dvc exp run -S` edits params.yaml in the workspace, the
    very thing a stopped run must not leave behind. So the one function through which a stage's
    params dependency reads its file is pointed at the run's file for params.yaml: DVC's skip
    decisions, run-cache keys and dvc.lock then see the run's values, under params.yaml's name (as a
    user who had edited params.yaml would get). tests/flows/test_run_params.py checks dvc.lock."""
    from dvc.dependency import param

    original = param.read_param_file
    target = os.path.realpath(params_yaml)

    def read(fs, path, *args, **kwargs):  # noqa: ANN001, ANN202 - DVC's own signature
        if os.path.realpath(path) == target:
            path = os.fspath(run_file)
        return original(fs, path, *args, **kwargs)

    param.read_param_file = read
    try:
        yield
    finally:
        param.read_param_file = original
