"""rank.device: the neural rankers train where models/device.py says (a GPU when torch sees one) and
come back on the CPU; a device that is not there stops before any weight changes."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tests.models.ranking.rank_simulator import SimConfig, simulate, read_split

from models.device import DeviceUnavailable
from models.ranking.params import RankParams
from models.ranking.train import RANK_SPARSE_AUTO_ROWS, build_model, fit


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    sim = simulate(SimConfig(etas=(1.0, 1.0), logging_strength=0.0, seed=1))
    return read_split(sim, tmp_path_factory.mktemp("device"), RankParams(epochs=1))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_auto_trains_on_this_machine_and_returns_a_cpu_model(split) -> None:  # noqa: ANN001
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model("pal", split.config, split.features, seed=0)
    report = fit(model, split.train, RankParams(epochs=1, device="auto"), seed=0)
    assert report.examples > 0
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    if expected == "cpu":   # the same run as an explicit cpu one, to the bit
        again = build_model("pal", split.config, split.features, seed=0)
        fit(again, split.train, RankParams(epochs=1, device="cpu"), seed=0)
        assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(again).values()))


def test_a_missing_gpu_stops_before_training(split) -> None:  # noqa: ANN001
    model = build_model("pal", split.config, split.features, seed=0)
    before = _weights(model)
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"     # not on this machine either way
    with pytest.raises(DeviceUnavailable, match=f"rank.device is '{missing}'"):
        fit(model, split.train, RankParams(epochs=1, device=missing), seed=0)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_a_batch_on_the_cpu_is_not_copied(split) -> None:  # noqa: ANN001
    batch = next(iter(split.train))
    assert batch.to(torch.device("cpu")) is batch


def test_large_id_tables_train_on_sparse_gradients_by_default(split) -> None:  # noqa: ANN001
    """Dense Adam updates every row of the user and item tables at every step (1M users + 200k items:
    140 ms a step against 5 ms sparse); at rank.sparse_min_rows' default they go sparse, and the model
    comes back dense (scored, saved and served as any other)."""
    rows = RANK_SPARSE_AUTO_ROWS
    big = build_model("pal", replace(split.config, n_users=rows, n_items=rows), None, seed=0)
    report = fit(big, split.train[:10], RankParams(epochs=1), seed=0)
    assert (report.sparse_tables, report.note) == (2, None)
    assert not any(m.sparse for m in big.modules() if isinstance(m, torch.nn.Embedding))
    small = fit(build_model("pal", split.config, split.features, seed=0), split.train[:10], RankParams(epochs=1), seed=0)
    assert small.sparse_tables == 0          # the demo's tables (hundreds of rows) stay on dense Adam
    decayed = fit(build_model("pal", replace(split.config, n_users=rows, n_items=rows), None, seed=0),
                  split.train[:10], RankParams(epochs=1, weight_decay=1e-4), seed=0)
    assert decayed.sparse_tables == 0 and "weight_decay" in (decayed.note or "")
