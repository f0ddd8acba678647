"""`dvc repro` of the whole pipeline in a throwaway git repo, as a user would run it, and experiments."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import conftest, eval_data
from tests.conftest import ROOT, Reproduced, copy_of, copy_project, shared_build

pytestmark = pytest.mark.slow
STAGES = ("fetch", "fetch_eval", "filter", "stratify", "train", "evaluate", "report", "release")


def sh(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "GIT_AUTHOR_NAME": "t",
                        "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@example.com"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def set_params(project: Path, **sections) -> None:
    for section, values in sections.items():
        conftest.set_params(project, section, **values)


def dvc(project: Path, *args: str, check: bool = True):
    return sh(project, sys.executable, "-m", "dvc", *args, check=check)


def make_project(target: Path, magpie_source: Path, model_dir: Path, eval_sources: Path) -> Path:
    """A git + DVC repo of the pipeline, as cloned, with params pointing at fixture data and the tiny model."""
    project = copy_project(target)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for name, source in eval_data.write_all(eval_sources).items():
        raw["eval_data"][name]["source"] = str(source)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    set_params(project, data={"source": str(magpie_source)},
               model={"name": str(model_dir), "max_seq_length": 1024},
               train={"max_steps": 2, "eval_every_steps": 1, "sequences_per_step": 4},
               eval={"limit": 2, "max_new_tokens": 8})
    sh(project, "git", "init", "-q")
    dvc(project, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")  # the repo's cache settings
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "project as cloned")
    return project


@pytest.fixture
def project(tmp_path, messy_source, tiny_model_dir) -> Path:
    return make_project(tmp_path / "project", messy_source[0], tiny_model_dir, tmp_path / "eval-sources")


def ran_stages(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def test_repro_builds_splits_and_adapter_reruns_only_what_changed_and_diffs_metrics(reproduced, tmp_path):
    assert ran_stages(reproduced.output) == set(STAGES)
    project = copy_of(reproduced, tmp_path / "project")
    assert (project / "models" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((project / "metrics" / "train.json").read_text())["steps"] == 2
    for name in ("heldout", "gsm8k", "math500"):
        accuracy = json.loads((project / "metrics" / "eval" / name / "accuracy.json").read_text())
        assert accuracy["low"] <= accuracy["delta"] <= accuracy["high"]
    assert (project / "reports" / "verdict.md").is_file() and (project / "release" / "README.md").is_file()
    assert (project / "data" / "eval" / "samples.parquet").is_file()
    for name in ("train", "val", "test"):
        assert (project / "data" / "splits" / f"{name}.parquet").is_file()
    funnel = json.loads((project / "metrics" / "data.json").read_text())
    assert funnel["rows_out"] == reproduced.kept
    splits = json.loads((project / "metrics" / "splits.json").read_text())
    assert sum(s["rows"] for s in splits.values()) == funnel["rows_out"]

    assert ran_stages(dvc(project, "repro").stdout) == set()
    assert "up to date" in dvc(project, "status").stdout

    set_params(project, filter={"input_qualities": ["good", "excellent"]})
    # report re-runs only if the graded samples changed: the tiny model may answer the same with another adapter
    assert ran_stages(dvc(project, "repro").stdout) - {"report"} == {"filter", "stratify", "train", "evaluate",
                                                                      "release"}

    params_diff = json.loads(dvc(project, "params", "diff", "--json").stdout)
    assert params_diff["params.yaml"] == {
        "filter.input_qualities": {"old": str(["excellent"]), "new": str(["good", "excellent"])}}
    metrics_diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)["metrics/data.json"]
    assert metrics_diff["rows_out"] == {"old": funnel["rows_out"], "new": funnel["rows_out"] + 1, "diff": 1}
    assert metrics_diff["dropped.input_quality"]["diff"] == -1
    assert "rows_in" not in metrics_diff and "dropped.null_field" not in metrics_diff  # unchanged: not shown


def test_a_failing_stage_reports_the_problem_and_leaves_no_output(project):
    set_params(project, filter={"task_categories": ["Planning"]})
    result = dvc(project, "repro", check=False)
    assert result.returncode != 0
    assert "no row passed the filter" in result.stdout + result.stderr
    assert not (project / "data" / "filtered.parquet").exists()
    assert not list((project / "data").glob(".filtered*"))


@pytest.fixture(scope="session")
def experimented(tmp_path_factory, worker_id, reproduced) -> Reproduced:
    """The reproduced project with one experiment run in its workspace (a train param changed: `dvc exp run -n
    rank16 -S train.lora.r=16`), run once per test session and shared as `reproduced` is: copy it."""
    def build(root: Path) -> dict:
        project = copy_of(reproduced, root / "project")
        return {"output": dvc(project, "exp", "run", "-n", "rank16", "-S", "train.lora.r=16").stdout,
                "kept": reproduced.kept}

    root, built = shared_build(tmp_path_factory, worker_id, "experimented", build)
    return Reproduced(root / "project", built["output"], built["kept"])


def test_changing_a_train_param_reruns_only_train_and_identical_training_keeps_evaluate(experimented, tmp_path):
    project = copy_of(experimented, tmp_path / "project")  # the experiment's results are in the workspace
    assert ran_stages(experimented.output) - {"report"} == {"train", "evaluate", "release"}
    plots = json.loads(dvc(project, "plots", "show", "--json").stdout)
    assert "reports/figures/training.png" in plots["data"] and not plots.get("errors")
    loss = (project / "metrics/train/plots/metrics/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in loss[:3]] == ["step", "1", "2"]  # the curve the figure draws

    # Retraining with identical inputs (a new process, another string hash seed) rebuilds identical bytes,
    # so the hours-long evaluation is not re-run.
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "rank 16")
    assert ran_stages(dvc(project, "repro", "--single-item", "--force", "train").stdout) == {"train"}
    assert "up to date" in dvc(project, "status", "evaluate").stdout
    assert json.loads(dvc(project, "metrics", "diff", "--json").stdout) == {}  # timings are no metrics: nothing moved
    # An upstream param re-running the stages after it: the filter change in test_repro_builds_...; an empty
    # val split (stratify.val_fraction: 0) trained without validation: tests/test_stratify.py, tests/test_train.py.


def experiment_params(project: Path) -> set[tuple]:
    """(train.lora.r, eval.max_new_tokens) of every experiment that `dvc exp show --json` lists."""
    runs = set()
    for commit in json.loads(dvc(project, "exp", "show", "--json").stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                values = rev["data"]["params"]["params.yaml"]["data"]
                runs.add((values["train"]["lora"]["r"], values["eval"]["max_new_tokens"]))
    return runs


def test_a_queued_experiment_runs_in_a_background_worker_and_shows(reproduced, tmp_path):
    project = copy_of(reproduced, tmp_path / "project")
    dvc(project, "exp", "run", "--queue", "-S", "eval.max_new_tokens=6")  # evaluation only: no training
    dvc(project, "queue", "start")
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            status = dvc(project, "queue", "status").stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(5)  # the experiment takes half a minute; each poll is a dvc start, CPU the other tests need
    finally:
        dvc(project, "queue", "stop", check=False)  # no worker outlives the test
    assert status.count("Success") == 1, status
    assert (8, 6) in experiment_params(project)


def test_an_experiment_runs_shows_as_a_table_and_compares_with_the_commit(experimented, tmp_path):
    project = copy_of(experimented, tmp_path / "project")
    assert (16, 8) in experiment_params(project)
    table = dvc(project, "exp", "show", "--only-changed", "--md").stdout
    assert "train.lora.r" in table and "rank16" in table
    # two runs compared, paired, from their samples read through DVC: the committed baseline and an experiment
    compared = sh(project, sys.executable, "-m", "stages.scoring.compare", "HEAD", "rank16", "--out", "c.json")
    assert compared.stdout.startswith("# rank16 against HEAD\n") and "## Control: base models" in compared.stdout
    result = json.loads((project / "c.json").read_text())
    control = [row for row in result["base"]["verdict"] if row["measure"] == "accuracy"]
    assert control and all(row["delta"] == 0 for row in control)  # one base model, one seed: the same responses
    assert {row["set"] for row in result["finetuned"]["verdict"]} == {"heldout", "gsm8k", "math500"}
