"""params.yaml → one typed object: unknown keys and wrong types name the key; --set overrides."""
from pathlib import Path

import pytest

from flows.errors import ConfigError
from flows.params import Params, load_params, parse_override

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_file_is_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    import yaml
    raw_sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert raw_sections == set(Params.model_fields)


def test_override_uses_dvc_dotted_keys_and_yaml_values():
    params = load_params(ROOT / "params.yaml", ["train.epochs=3", "model.hidden=[32, 16]", "data.max_users=50"])
    assert params.train.epochs == 3
    assert params.model.hidden == [32, 16]
    assert params.data.max_users == 50


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=3", "unknown key 'train.epoch'"),
    ("trian.epochs=3", "unknown key 'trian'"),
    ("train.epochs=abc", "'train.epochs'"),
    ("split.test_fraction=1.5", "'split.test_fraction'"),
    ("data.ranking_logs=sometimes", "'data.ranking_logs'"),
])
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_params(ROOT / "params.yaml", [override])
    assert needle in str(exc.value)


def test_unknown_key_in_file_is_an_error(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((ROOT / "params.yaml").read_text() + "\nextra_section:\n  a: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'extra_section'"):
        load_params(f)


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.epochs")


def test_demo_checks_apply_to_the_demo_only():
    from flows.params import DataParams, validate_for_source
    from validation.params import ValidateParams

    general = ValidateParams()
    assert general.rating_range is None          # the contract promises a float rating, no scale
    demo = validate_for_source(DataParams(source="demo"), general)
    assert demo.rating_range == (1.0, 5.0) and demo.rating_mean == (2.5, 4.5)
    own = validate_for_source(DataParams(source="/data/ml-latest"), general)
    assert own.rating_range is None and own.rating_mean is None
    # a value set in validate wins over the demo's
    wide = validate_for_source(DataParams(source="demo"), ValidateParams(rating_range=(0.5, 5.0)))
    assert wide.rating_range == (0.5, 5.0) and wide.rating_mean == (2.5, 4.5)


def test_shipped_params_do_not_assume_the_demo_scale():
    from flows.params import load_params

    params = load_params(ROOT / "params.yaml")
    assert params.validate.rating_range is None and params.validate.rating_mean is None
    assert params.data.demo.rating_range == (1.0, 5.0)
