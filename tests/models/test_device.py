"""Where training runs (models/device.py): train.device, threads, autocast, and the CLI's OpenMP wait
policy. Tests run on the CPU; the CUDA branches are checked for their error on a machine without a GPU."""
from __future__ import annotations

import os
from pathlib import Path

import pydantic
import pytest
import torch

from flows.environment import configure_environment
from models.device import AUTO_THREADS, DeviceUnavailable, autocast, resolve_device, resolve_threads
from models.params import TrainParams
from models.training import fit
from training_data import sampled_synthetic, stream_and_config

NO_GPU = not torch.cuda.is_available()


def test_auto_picks_the_gpu_when_there_is_one_else_the_cpu():
    assert resolve_device("auto").type == ("cpu" if NO_GPU else "cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    if not NO_GPU:          # a GPU machine: cuda resolves, and a GPU beyond the count is the clear error
        assert resolve_device(name).type == "cuda"
        with pytest.raises(DeviceUnavailable, match=r"train.device is 'cuda:99' but only"):
            resolve_device("cuda:99")
        return
    with pytest.raises(DeviceUnavailable, match=r"train.device is 'cuda.*(CPU-only|no CUDA GPU).*auto"):
        resolve_device(name)


def test_unknown_device_names_are_refused():
    with pytest.raises(DeviceUnavailable, match="auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(pydantic.ValidationError):
        TrainParams(device="gpu")


def test_threads_auto_is_at_most_two_and_counts_pass_through():
    cores = len(os.sched_getaffinity(0))
    assert resolve_threads("auto") == min(AUTO_THREADS, cores)
    assert resolve_threads(3) == 3
    assert TrainParams().threads == "auto"
    with pytest.raises(ValueError, match="positive count or 'auto'"):
        resolve_threads(0)


def test_autocast_is_a_no_op_on_the_cpu():
    with autocast(torch.device("cpu"), True):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_cli_environment_gives_idle_openmp_threads_a_short_spin(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    configure_environment(tmp_path)
    assert os.environ["GOMP_SPINCOUNT"] == "10000"
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")             # a user's own choice stays
    configure_environment(tmp_path)
    assert os.environ["GOMP_SPINCOUNT"] == "0"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")     # and so does a policy: no spin count over it
    configure_environment(tmp_path)
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[Path, Path, Path]:
    return sampled_synthetic(tmp_path_factory.mktemp("synthetic"))


def test_fit_on_the_cpu_returns_a_cpu_model_and_cuda_fails_before_training(sampled):
    torch.set_num_threads(1)
    _, stream, tower_cfg, _ = stream_and_config(*sampled)
    result = fit(stream, tower_cfg, TrainParams(epochs=1, batch_size=256, device="cpu", threads=1), seed=0)
    assert {p.device.type for p in result.model.parameters()} == {"cpu"}
    if NO_GPU:
        with pytest.raises(DeviceUnavailable, match="train.device is 'cuda'"):
            fit(stream, tower_cfg, TrainParams(epochs=1, batch_size=256, device="cuda", threads=1), seed=0)
