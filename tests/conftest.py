import shutil
from pathlib import Path

import pytest

from stages import params
from stages.base_model import load_tokenizer
from tests import magpie_data, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("tiny-r1"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return load_tokenizer(params.ModelParams(name=str(tiny_model_dir), revision="main", max_seq_length=4096))


@pytest.fixture
def filter_params() -> params.FilterParams:
    return params.build(params.FilterParams, params.read(ROOT / "params.yaml")["filter"], "filter")


@pytest.fixture
def messy_source(tmp_path) -> tuple[Path, list[tuple[dict, str]]]:
    """Two shards of 40 clean rows and every kind of messy row, shuffled together."""
    cases = [(r, "kept") for r in magpie_data.clean_rows(40)] + magpie_data.messy_rows()
    source = tmp_path / "magpie"
    magpie_data.write_shards(source, [r for r, _ in cases], shards=2)
    return source, cases


def copy_project(target: Path) -> Path:
    """The pipeline's files in a fresh folder, for dvc runs that must not touch the checkout."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "stages", target / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    return target
