"""Atomic writers for stage outputs: a file or folder appears complete or not at all.

Metrics JSON is kept small and diffable: sorted keys, rounded floats, no timestamps or paths.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds dvc.yaml and the stages package


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
    """Round every float in a nested structure so metrics diffs show signal, not noise; NaN (an undefined value,
    e.g. tokens per correct answer without one) becomes null, as JSON has no NaN."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def write_json(path: str | Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rounded(data), indent=2, sort_keys=True) + "\n")


def fingerprint(*parts) -> str:
    """A short digest of what made an output: JSON-able values, and the bytes of files or folders (a folder's
    files by their paths within it and their bytes, so a renamed file changes it). A path that does not exist
    is an error: skipping it would leave what it held out of the digest without a sound."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            if not part.exists():
                raise FileNotFoundError(f"fingerprint: {part} does not exist")
            for file in sorted(part.rglob("*")) if part.is_dir() else [part]:
                if file.is_file():
                    if part.is_dir():
                        digest.update(file.relative_to(part).as_posix().encode() + b"\0")
                    with open(file, "rb") as f:
                        digest.update(hashlib.file_digest(f, "sha256").digest())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def module_file(name: str) -> Path:
    """The source file of project module `name` (e.g. 'stages.core.params'), found without importing it."""
    file = PROJECT_ROOT.joinpath(*name.split(".")).with_suffix(".py")
    if not file.is_file():
        raise ModuleNotFoundError(f"{name} is not a module of the project (no {file})")
    return file


def imported_modules(module: str) -> list[str]:
    """Module `module` and every project module it imports, directly or through others, at any depth in the
    code (imports inside functions count: they run when the stage does)."""
    found, todo = {module}, [module]
    while todo:
        tree = ast.parse(module_file(todo.pop()).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom | ast.Import) or getattr(node, "level", 0):
                continue
            names = ([f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names])
            for name in names:
                if name.split(".")[0] != "stages":
                    continue
                while name not in found and not _is_module(name):  # `from stages.core.params import load`
                    name = name.rpartition(".")[0]
                if name and name not in found and _is_module(name):
                    found.add(name)
                    todo.append(name)
    return sorted(found)


def _is_module(name: str) -> bool:
    try:
        module_file(name)
    except ModuleNotFoundError:
        return False
    return True


def stage_code(stage: str) -> list[Path]:
    """The Python files that stage `stage` runs (stages/<stage>.py and the project modules it imports): what
    dvc.yaml lists as the stage's code deps, and what a fingerprint of the stage's outputs must cover."""
    return [module_file(name) for name in imported_modules(f"stages.{stage}")]
