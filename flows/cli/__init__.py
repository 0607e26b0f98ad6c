"""The `towerflow` command line. Kept light: heavy libraries are imported inside the commands.

The commands live by topic (pipeline, serving, rank); importing them registers them on the one app.
"""
from __future__ import annotations

from pathlib import Path

from flows.cli import pipeline, rank, serving  # noqa: F401  (registers the commands)
from flows.cli.common import app
from flows.cli.pipeline import _force_overrides  # noqa: F401  (tests)
from flows.environment import configure_environment
from flows.process_groups import sigterm_exits


def main() -> None:
    configure_environment(Path.cwd())
    with sigterm_exits():     # a stopped command still cleans up (its temporary folders, what it started)
        app()


if __name__ == "__main__":
    main()
