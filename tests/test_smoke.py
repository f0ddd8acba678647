"""The README's smoke run in a copy of the checkout made a git repo, as a user's clone: the experiment's
metrics show in `dvc exp show` and a branch keeps them, while the checkout stays byte for byte as it was.
"""

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import smoke
from tests.conftest import ROOT
from tests.test_pipeline import dvc, sh

pytestmark = pytest.mark.slow
# Fewer steps and tokens than the smoke run prints, for a test of the command's shape, not of the stages.
FASTER = {"train.max_steps": 2, "train.eval_every_steps": 1, "eval.limit": 2, "eval.max_new_tokens": 8}


def clone_of_checkout(target: Path) -> Path:
    """The files a commit of the checkout would hold (tracked and untracked, not ignored), committed afresh."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    sh(target, "git", "init", "-q")
    sh(target, "git", "add", "-A")
    sh(target, "git", "commit", "-qm", "as cloned")
    return target


def experiments(project: Path) -> dict[str, dict]:
    """Name -> data (params, metrics) of every experiment that `dvc exp show --json` lists."""
    rows = json.loads(dvc(project, "exp", "show", "--json").stdout)
    return {rev["name"]: rev["data"] for commit in rows for exp in commit.get("experiments") or []
            for rev in exp["revs"]}


def recorded_outputs(project: Path) -> dict[str, bytes]:
    """dvc.lock, the metrics and the data folder's files in the checkout: what a run in the workspace would write."""
    paths = [path for pattern in ("dvc.lock", "metrics/**/*", "data/**/*") for path in project.glob(pattern)]
    return {path.relative_to(project).as_posix(): path.read_bytes() for path in paths if path.is_file()}


def readme_line(start: str) -> str:
    """The smoke run's line of the README that begins with `start`, as a shell gets it (its comment dropped)."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(start))
    return line.split(" # ")[0].strip()


def test_smoke_command_leaves_the_checkout_untouched_and_its_experiment_shows_and_can_be_kept(tmp_path):
    project = clone_of_checkout(tmp_path / "clone")
    params_before = (project / "params.yaml").read_bytes()
    recorded = recorded_outputs(project)  # a user's checkout may hold a run's dvc.lock and metrics: kept as they are
    head = sh(project, "git", "rev-parse", "HEAD").stdout
    overrides = smoke.write_inputs(tmp_path / "smoke") | FASTER
    program, *args = shlex.split(smoke.command(overrides))
    assert program == "dvc"
    run = dvc(project, *args)
    assert "Running stage 'evaluate'" in run.stdout

    assert sh(project, "git", "status", "--porcelain").stdout == ""
    assert (project / "params.yaml").read_bytes() == params_before
    assert recorded_outputs(project) == recorded

    (name, data), = experiments(project).items()
    assert data["params"]["params.yaml"]["data"]["model"]["name"] == str(overrides["model.name"])
    evaluation = data["metrics"]["metrics/eval/gsm8k/accuracy.json"]["data"]
    assert {"base", "finetuned", "delta", "low", "high"} <= set(evaluation)
    show = shlex.split(readme_line("dvc exp show --md --drop"))
    shown = dvc(project, *show[1:]).stdout  # the README's table of the experiment shows its accuracy per set
    assert all(f"metrics/eval/{name}/accuracy.json:{column}" in shown for name in ("gsm8k", "heldout", "math500")
               for column in ("base", "finetuned", "delta", "low", "high"))  # the delta with its interval

    # the README's way to keep the experiment and see its outputs, then to go back and drop it
    sh(project, "bash", "-c", readme_line("dvc exp branch NAME smoke").replace("NAME", name))
    kept = json.loads((project / "metrics" / "eval" / "gsm8k" / "accuracy.json").read_text())
    assert kept == evaluation
    assert (project / "release" / "README.md").is_file() and (project / "models" / "adapter").is_dir()
    assert sh(project, "git", "status", "--porcelain").stdout == ""  # no gigabytes waiting for a `git add -A`
    sh(project, "bash", "-c", readme_line("git checkout - && ").replace("NAME", name))
    assert sh(project, "git", "rev-parse", "HEAD").stdout == head and experiments(project) == {}
    assert sh(project, "git", "branch", "--list", "smoke").stdout == ""
    assert sh(project, "git", "status", "--porcelain").stdout == ""
    if "dvc.lock" not in recorded:  # a checkout with no run recorded: the experiment's outputs are gone again
        assert not (project / "models" / "adapter").exists() and recorded_outputs(project) == recorded
