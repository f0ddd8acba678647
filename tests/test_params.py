import pytest

from stages import params
from tests.conftest import ROOT


def test_every_section_builds_from_the_real_params_yaml():
    raw = params.read(ROOT / "params.yaml")
    for section, cls in params.SECTIONS.items():
        assert isinstance(params.build(cls, raw[section], section), cls)
    assert isinstance(params.load_seed(ROOT / "params.yaml"), int)


def test_unknown_key_is_rejected_with_its_name():
    raw = params.read(ROOT / "params.yaml")["stratify"] | {"tain_fraction": 0.9}
    with pytest.raises(params.ParamsError, match=r"stratify\.tain_fraction"):
        params.build(params.StratifyParams, raw, "stratify")


def test_missing_key_is_rejected_with_its_name():
    raw = dict(params.read(ROOT / "params.yaml")["filter"])
    del raw["id_column"]
    with pytest.raises(params.ParamsError, match=r"filter\.id_column is missing"):
        params.build(params.FilterParams, raw, "filter")


@pytest.mark.parametrize(("key", "value"), [("check_length", "yes"), ("task_categories", "Math"),
                                             ("difficulties", ["hard", 3])])
def test_wrong_type_is_rejected_with_its_name(key, value):
    raw = params.read(ROOT / "params.yaml")["filter"] | {key: value}
    with pytest.raises(params.ParamsError, match=rf"filter\.{key}"):
        params.build(params.FilterParams, raw, "filter")


def test_split_fractions_must_sum_to_one():
    with pytest.raises(params.ParamsError, match="sum to 1"):
        params.StratifyParams(train_fraction=0.8, val_fraction=0.1, test_fraction=0.2)


def test_unknown_difficulty_is_rejected():
    raw = params.read(ROOT / "params.yaml")["filter"] | {"difficulties": ["medium", "impossible"]}
    with pytest.raises(params.ParamsError, match="impossible"):
        params.build(params.FilterParams, raw, "filter")


def test_integer_is_accepted_where_a_float_is_expected():
    config = params.build(params.StratifyParams, {"train_fraction": 1, "val_fraction": 0, "test_fraction": 0},
                          "stratify")
    assert config.train_fraction == 1.0 and isinstance(config.train_fraction, float)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(params.ParamsError, match="params.yaml not found"):
        params.load("filter", tmp_path / "params.yaml")
