"""Model files (models/checkpoint.py): save and load round trip; missing files name the path only."""
from __future__ import annotations

import pytest
import torch

from models.checkpoint import load_model, save_model
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
