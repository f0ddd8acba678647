import os
import shutil

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter (set before they are defined).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.core import params
from stages.core.base_model import load_tokenizer
from stages.core.cli import usable_cpus
from stages.data.magpie import split_response
from stages.filter import OUTPUT_SCHEMA
from tests import magpie_data, tiny_model

ROOT = Path(__file__).resolve().parents[1]
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Workers already fill the cores: a thread pool of each per core in every worker, and in every stage or
    # training process it starts, only makes them wait on each other (torch's CPU tests ran 3-6x slower).
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(1)
DIRECTIVE = params.load("model", ROOT / "params.yaml").directive  # the prompt line every stage adds


def gpu_run(config: pytest.Config) -> bool:
    """The GPU run (pytest -m gpu, or any -m that asks for gpu tests without excluding them)."""
    expression = config.getoption("markexpr") or ""
    return "gpu" in expression and "not gpu" not in expression


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are deselected unless -m asks for them, whatever else -m says: `pytest -m "not slow"` keeps
    them out too (a -m in addopts would be replaced by the command line's)."""
    if gpu_run(config):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    # Longest first, so that the pytest-xdist workers end together. xdist starts each worker with two
    # consecutive tests, then hands out one at a time as each finishes (--maxschedchunk 1). So pairs: the
    # test whose fixture builds the shared reproduced pipeline, then a long test that needs it (no wait: the
    # same worker built it); the smoke run (needs none) and one that needs it by the time the smoke run ends;
    # a long training test and one that needs the shared experiment (built on the shared pipeline); then the
    # other dvc runs, the rest.
    first = ("test_repro_builds_splits", "test_an_experiment_runs", "test_smoke_command", "test_a_queued_experiment",
             "test_two_process_ddp", "test_changing_a_train_param")

    def rank(item: pytest.Item) -> int:
        named = [k for k, name in enumerate(first) if item.name.startswith(name)]
        return named[0] if named else len(first) if item.get_closest_marker("slow") else len(first) + 1

    items.sort(key=rank)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """-n auto (in addopts): a worker per core plus one, at most 4 (tests wait on the processes they start, on
    dvc and on the shared build: the extra worker fills those gaps); none for the GPU run, whose tests share
    one GPU."""
    return 0 if gpu_run(config) else min(4, usable_cpus() + 1)


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


@dataclass(frozen=True)
class Reproduced:
    project: Path  # the whole pipeline run once and committed: copy it, never change it
    output: str  # what that dvc repro printed
    kept: int  # rows of the source that the filter must keep


def shared_build(tmp_path_factory, worker_id, name: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """build(folder) run once per test session, by the first pytest-xdist worker to need it (under a lock; the
    others wait and read it): the folder, and the record build returned."""
    import json

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root, record = shared / name, shared / f"{name}.json"
    with FileLock(shared / f"{name}.lock"):
        if not record.exists():
            record.write_text(json.dumps(build(root)))
    return root, json.loads(record.read_text())


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, worker_id) -> Reproduced:
    """One `dvc repro` of the whole pipeline on the messy fixtures, committed, for every test that starts from a
    finished run (each works on its own copy, see copy_of): the pipeline runs once per test session, shared by
    the pytest-xdist workers."""
    from tests.test_pipeline import dvc, make_project, sh

    def build(root: Path) -> dict:
        cases = [(r, "kept") for r in magpie_data.clean_rows(40)] + magpie_data.messy_rows()
        magpie_data.write_shards(root / "magpie", [r for r, _ in cases], shards=2)
        model = tiny_model.build(root / "tiny-r1")
        project = make_project(root / "project", root / "magpie", model, root / "eval-sources")
        output = dvc(project, "repro").stdout
        sh(project, "git", "add", "-A")
        sh(project, "git", "commit", "-qm", "baseline run")
        return {"output": output, "kept": sum(1 for _, rule in cases if rule == "kept")}

    root, built = shared_build(tmp_path_factory, worker_id, "reproduced", build)
    return Reproduced(root / "project", built["output"], built["kept"])


def copy_of(reproduced: Reproduced, target: Path) -> Path:
    """A copy of the reproduced project (its git history, DVC cache and outputs) that a test may change."""
    shutil.copytree(reproduced.project, target, symlinks=True)
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
                         "max_steps": -1, **train})  # max_steps pinned: a checkout with an experiment applied has a cap
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
