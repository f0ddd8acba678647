"""What a stage's outputs are fingerprinted by, and what dvc.yaml re-runs a stage for: the same code."""

import importlib
import logging

import pytest
import yaml

from stages.core import artifacts
from tests.conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_exactly_the_project_code_it_runs_as_deps():
    for name, stage in STAGES.items():
        code = {path.relative_to(ROOT).as_posix() for path in artifacts.stage_code(name)}
        assert code == {dep for dep in stage["deps"] if dep.endswith(".py")}, name  # else a change would not re-run it


def test_stage_code_follows_imports_made_inside_functions():
    code = {path.relative_to(ROOT).as_posix() for path in artifacts.stage_code("evaluate")}
    assert {"stages/generation/batched.py", "stages/scoring/overthinking.py", "stages/core/base_model.py"} <= code


def test_every_package_init_is_empty_so_no_code_hides_from_the_deps():
    assert all(not init.read_text().strip() for init in (ROOT / "stages").rglob("__init__.py"))


def test_a_missing_module_is_an_error_not_a_smaller_list():
    with pytest.raises(ModuleNotFoundError, match="stages.core.nowhere"):
        artifacts.module_file("stages.core.nowhere")


def test_a_missing_path_in_a_fingerprint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.py"):
        artifacts.fingerprint({"a": 1}, tmp_path / "gone.py")


def test_a_folder_fingerprint_changes_when_a_file_is_renamed(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    before = artifacts.fingerprint(tmp_path / "model")
    (tmp_path / "model" / "config.json").rename(tmp_path / "model" / "other.json")
    assert artifacts.fingerprint(tmp_path / "model") != before


def test_every_module_logs_under_its_own_name():
    for file in sorted((ROOT / "stages").rglob("*.py")):
        name = ".".join(file.relative_to(ROOT).with_suffix("").parts)
        module = importlib.import_module(name)
        log = getattr(module, "log", None)
        if isinstance(log, logging.Logger):
            assert log.name == name, name  # stages name theirs: `python -m` runs them as __main__


def test_packages_never_import_a_stage_and_core_imports_only_core():
    stage_modules = {f"stages.{name}" for name in STAGES}
    for file in sorted((ROOT / "stages").glob("*/*.py")):
        name = ".".join(file.relative_to(ROOT).with_suffix("").parts)
        imported = set(artifacts.imported_modules(name)) - {name}
        assert not imported & stage_modules, name
        if name.startswith("stages.core."):
            assert all(m.startswith("stages.core.") for m in imported), name


def test_every_cached_output_is_ignored_by_the_root_gitignore():
    ignored = {line for line in (ROOT / ".gitignore").read_text().splitlines() if line.startswith("/")}
    for name, stage in STAGES.items():
        for out in stage.get("outs", []):
            path, options = (next(iter(out.items())) if isinstance(out, dict) else (out, {}))
            if (options or {}).get("cache", True):
                assert f"/{path}" in ignored, (name, path)  # else a checkout of an experiment lists it untracked
