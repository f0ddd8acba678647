"""What dvc.yaml runs, for tests and benchmarks that run a stage as `dvc repro` would: dvc.yaml is the one home
of the stages' paths (the stages take no default paths)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage_args(stage: str, **paths: str | Path) -> list[str]:
    """The arguments dvc.yaml's command gives `python -m stages.<stage>`, with some paths replaced
    (eval_sets="x" for --eval-sets x)."""
    command = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    words = shlex.split(command)
    words = words[words.index(f"stages.{stage}") + 1:]
    for name, path in paths.items():
        words[words.index("--" + name.replace("_", "-")) + 1] = str(path)
    return words


def stage_command(stage: str, **paths: str | Path) -> list[str]:
    """dvc.yaml's command of the stage, run with this Python."""
    return [sys.executable, "-m", f"stages.{stage}", *stage_args(stage, **paths)]


def project_pythonpath() -> str:
    """PYTHONPATH for a process that runs the project's code: this checkout first, then the path already given
    (packages carried to a machine come through it)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
