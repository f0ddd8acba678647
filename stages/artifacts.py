"""Atomic writers for stage outputs: a file or folder appears complete or not at all.

Metrics JSON is kept small and diffable: sorted keys, rounded floats, no timestamps or paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # holds dvc.yaml and the stages package


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; swap it in for `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rounded(value, digits: int = 4):
    """Round every float in a nested structure so metrics diffs show signal, not noise."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def write_json(path: str | Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rounded(data), indent=2, sort_keys=True) + "\n")


def fingerprint(*parts) -> str:
    """A short digest of what made an output: JSON-able values, and the bytes of files or folders."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            for file in sorted(part.rglob("*")) if part.is_dir() else [part]:
                if file.is_file():
                    with open(file, "rb") as f:
                        digest.update(hashlib.file_digest(f, "sha256").digest())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def stage_code(stage: str) -> list[Path]:
    """The Python files that dvc.yaml lists as deps of `stage`: what DVC re-runs the stage for, and so what
    a fingerprint of the stage's outputs must cover. Every module of the package when dvc.yaml is absent."""
    dvc_file = PROJECT_ROOT / "dvc.yaml"
    if not dvc_file.is_file():
        return sorted((PROJECT_ROOT / "stages").glob("*.py"))
    deps = yaml.safe_load(dvc_file.read_text())["stages"][stage].get("deps", [])
    return [PROJECT_ROOT / dep for dep in deps if dep.endswith(".py")]
