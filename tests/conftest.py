import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.core import params
from stages.core.base_model import load_tokenizer
from stages.data.magpie import split_response
from stages.filter import OUTPUT_SCHEMA
from tests import magpie_data, tiny_model

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = params.load("model", ROOT / "params.yaml").directive  # the prompt line every stage adds


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("tiny-r1"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return load_tokenizer(params.ModelParams(name=str(tiny_model_dir), revision="main", max_seq_length=4096,
                                             directive=DIRECTIVE))


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


def splits_table(rows: list[dict]) -> pa.Table:
    records = []
    for row in rows:
        reasoning, answer = split_response(row["response"], require_think_open=False)
        records.append({"id": row["uuid"], "instruction": row["instruction"], "reasoning": reasoning,
                        "answer": answer, "difficulty": row["difficulty"]})
    return pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)


def train_project(tmp_path: Path, model_dir: Path, monkeypatch, max_seq_length: int = 1024, **train) -> Path:
    """A working folder (made the cwd) with params for model_dir and small train/val splits."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(name=str(model_dir), max_seq_length=max_seq_length)
    raw["train"].update({"epochs": 2, "eval_every_steps": 2, "sequences_per_step": 4, "learning_rate": 1.0e-3,
                         **train})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_splits(tmp_path, magpie_data.clean_rows(24), magpie_data.clean_rows(6, start=500))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_splits(project: Path, train_rows: list[dict], val_rows: list[dict]) -> None:
    splits = project / "data" / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    pq.write_table(splits_table(train_rows), splits / "train.parquet")
    pq.write_table(splits_table(val_rows), splits / "val.parquet")


def set_params(project: Path, section: str, **values) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
