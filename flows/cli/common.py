"""What every command shares: the app, the common options, one-line errors, loading params."""
from __future__ import annotations

import os
import traceback
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Optional

import typer

from flows.errors import BLOCKED_EXIT, EXPECTED_ERRORS, STAGE_ERROR, TRANSIENT_EXIT, GateBlocked, TransientError
from flows.params import load_params

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="towerflow: train two-tower retrieval models and ship them.")

SetOption = typer.Option(None, "--set", "-S", help="Override a params.yaml key for this run: key.sub=value (repeatable).")
ParamsOption = typer.Option(Path("params.yaml"), "--params", help="The params file; its folder is the project root.")


def _debug() -> bool:
    return os.environ.get("TOWERFLOW_DEBUG", "") not in ("", "0")


def _masked(exc: BaseException) -> str:
    """The message with passwords in URLs (REDIS_URL, QDRANT_URL) masked."""
    from flows.serving.guard import mask_secrets
    return mask_secrets(str(exc))


@contextmanager
def _errors(stage: bool = False) -> Iterator[None]:
    """Expected failures print one line and exit 1 (3 when the gate blocks, 75 when a retry may pass);
    --debug shows the traceback. A stage a run started (`stage`) also leaves that line where the run
    reads it (flows/errors.py STAGE_ERROR)."""
    def say(kind: str, message: str) -> None:
        typer.echo(f"towerflow: {kind}{message}", err=True)
        where = os.environ.get(STAGE_ERROR) if stage else None
        if where:
            with suppress(OSError):     # the run then says what DVC says: the exit code
                Path(where).write_text(message + "\n")

    try:
        yield
    except (TransientError, ConnectionError, TimeoutError) as exc:
        # exit 75 (EX_TEMPFAIL): the flow retries the stage with backoff (flows/pipeline.py)
        if _debug():
            traceback.print_exc()
        say("transient error (a retry may pass): ", f"{type(exc).__name__}: {_masked(exc)}")
        raise typer.Exit(TRANSIENT_EXIT) from None
    except EXPECTED_ERRORS as exc:
        if _debug():
            traceback.print_exc()
        say("error: ", _masked(exc))
        raise typer.Exit(BLOCKED_EXIT if isinstance(exc, GateBlocked) else 1) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug, or a library failing: still one line unless --debug
        if _debug():
            traceback.print_exc()
        say("unexpected error: ", f"{type(exc).__name__}: {_masked(exc)} (run with --debug for the traceback)")
        raise typer.Exit(1) from None


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    if debug:
        os.environ["TOWERFLOW_DEBUG"] = "1"  # inherited by the stage processes DVC starts


def _load(params_file: Path, overrides: Optional[list[str]]):  # noqa: ANN202
    return load_params(params_file, overrides or [])

