"""Shared fixtures: a temporary towerflow project (git + DVC) running on a small synthetic dataset."""
from __future__ import annotations

import gc
import importlib.machinery
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from flows.environment import configure_environment, skip_type_instrumentation

# as every `towerflow` command does, before any test module imports Feast (configure_environment
# below runs after collection)
skip_type_instrumentation()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from datagen import make_contract_dataset  # noqa: E402

def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):      # a pytest-xdist worker
        # execnet starts a worker with `python -c`, so its __main__ has neither __spec__ nor __file__.
        # pyspark (the Spark offline store) takes that for a doctest run: `import pyspark.sql.connect`,
        # which great_expectations does on import, calls sys.exit(0) when the connect extras are
        # missing. A spec named __main__ says "a real program"; multiprocessing's spawn skips
        # re-importing a main of that name, exactly as it skips one with no spec at all.
        main = sys.modules["__main__"]
        if main.__spec__ is None and not hasattr(main, "__file__"):
            main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules marked long_running first, then the others by their count of tests (pytest-xdist's own
    order, which `make test` turns off with --no-loadscope-reorder: the count of a file's tests says
    little of its time). `--dist loadfile` hands each worker whole files in this order, so the long
    ones start at once on different workers and the run ends on short files: the last run (2 workers)
    had one worker idle for 37 s while the other ran a 69 s module it got last. Within a module the
    order stays."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    count = Counter(module(item) for item in items)

    def key(item: pytest.Item) -> tuple[bool, int]:
        return item.get_closest_marker("long_running") is None, -count[module(item)]

    items.sort(key=key)      # stable: a module's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory):
    configure_environment(tmp_path_factory.mktemp("prefect_home"))


@pytest.fixture(scope="module", autouse=True)
def _long_lived_objects_frozen():
    """What the worker holds when a test module starts (the libraries imported so far, session
    fixtures) is moved out of the garbage collector's sight (gc.freeze): the stages' full collections
    (features/memory.py return_freed_memory) then scan only what tests made since. In a worker that
    has imported GX, Feast, torch, Evidently and Prefect a full collection took ~1 s, and the
    materialize, online-store and train tests make a few hundred of them. The previous module's
    garbage is collected first (a collection that scans only what was made since the last freeze).
    TOWERFLOW_TEST_NO_FREEZE=1 turns this off, to measure what it saves."""
    if os.environ.get("TOWERFLOW_TEST_NO_FREEZE"):
        return
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary API server on a temporary SQLite database) for the tests
    that run the real flow in this process, started by the first of them and kept to the end of the
    session: each start cost 14-18 s of a 2-core machine, and the three modules that need it started
    it once each. No test reads the server's run history, so they can share one."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def recbole_wheel(request: pytest.FixtureRequest) -> Path:
    """The real recbole wheel (the demo's data), fetched with `pip download` into the pytest cache
    the first time only (under a lock: xdist workers share the cache, and a second download could
    see the first one's half-written file)."""
    from flows.locks import file_lock
    from flows.sources.demo import wheel
    cache = Path(request.config.cache.mkdir("towerflow-recbole"))
    with file_lock(cache.parent / "towerflow-recbole.lock", wait_s=None):
        return wheel(cache)


@pytest.fixture()
def demo_cache(recbole_wheel: Path, tmp_path: Path) -> Path:
    """A fresh demo cache that already holds the wheel (as after a first download)."""
    (tmp_path / "cache").mkdir()
    shutil.copy(recbole_wheel, tmp_path / "cache" / recbole_wheel.name)
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def contract_source(tmp_path_factory) -> Path:
    return make_contract_dataset(tmp_path_factory.mktemp("source"), n_users=300, n_items=200, seed=3)
