"""The contract gate's reading of schema.json (validation/contract.py); its suites run in
tests/stages/test_validate_stage.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from validation.contract import read_schema
from validation.errors import ValidationFailed


def test_schema_ids_must_be_int64_or_string(tmp_path: Path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"user_id_dtype": "int64", "item_id_dtype": "string"}))
    assert read_schema(path)["item_id_dtype"] == "string"
    path.write_text(json.dumps({"user_id_dtype": "float64", "item_id_dtype": "string"}))
    with pytest.raises(ValidationFailed,
                       match=r"schema.json: 'user_id_dtype' must be 'int64' or 'string', got 'float64'"):
        read_schema(path)
