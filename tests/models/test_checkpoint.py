"""Model files (models/checkpoint.py): save and load round trip; missing files name the path only;
checkpoints load as data only (weights_only), so a planted one cannot run code."""
from __future__ import annotations

import pickle

import pytest
import torch

from models.checkpoint import load_model, restore_checkpoint, save_checkpoint, save_model
from models.encoding import FeatureEncoder
from models.errors import ModelNotFound
from models.params import ModelParams
from models.towers import TwoTower
from models.training import tower_config
from training_data import TINY_SCHEMA, tiny_frames


def test_saved_model_loads_with_its_encoder(tmp_path):
    items, examples = tiny_frames()
    encoder = FeatureEncoder.fit(TINY_SCHEMA, items, examples)
    model = TwoTower(tower_config(encoder, ModelParams(dim=4, embedding_dim=4, hidden=[8])))
    save_model(tmp_path / "m", model, encoder, extra={"seed": 1})
    loaded, loaded_encoder = load_model(tmp_path / "m")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert loaded_encoder.to_json() == encoder.to_json()
    with pytest.raises(ModelNotFound, match=r"nowhere/model.pt: not found$"):
        load_model(tmp_path / "nowhere")


def _training_state(seed: int):  # noqa: ANN202
    items, examples = tiny_frames()
    encoder = FeatureEncoder.fit(TINY_SCHEMA, items, examples)
    torch.manual_seed(seed)
    model = TwoTower(tower_config(encoder, ModelParams(dim=4, embedding_dim=4, hidden=[8])))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    return model, opt, sched, torch.Generator().manual_seed(seed)


def test_a_checkpoint_round_trips_as_plain_data(tmp_path):
    model, opt, sched, gen = _training_state(1)
    torch.rand(3, generator=gen)
    save_checkpoint(tmp_path / "c.pt", model, opt, sched, gen,
                    {"losses": [0.5, 0.25], "best_epoch": None, "stopped_early": False})
    model2, opt2, sched2, gen2 = _training_state(2)
    progress = restore_checkpoint(tmp_path / "c.pt", model2, opt2, sched2, gen2, ("losses", "best_epoch"))
    assert progress == {"losses": [0.5, 0.25], "best_epoch": None}
    assert torch.equal(torch.rand(3, generator=gen2), torch.rand(3, generator=gen))
    for name, tensor in model.state_dict().items():
        assert torch.equal(model2.state_dict()[name], tensor)


class _Planted:
    """What a tampered checkpoint could hold: unpickling it would call Path.touch (any callable)."""

    def __init__(self, marker):  # noqa: ANN001
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (type(self.marker).touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    model, opt, sched, gen = _training_state(1)
    marker = tmp_path / "code-ran"
    torch.save({"model": model.state_dict(), "planted": _Planted(marker)}, tmp_path / "c.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        restore_checkpoint(tmp_path / "c.pt", model, opt, sched, gen, ())
    assert not marker.exists()
