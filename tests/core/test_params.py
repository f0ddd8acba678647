import dataclasses
import os
import re
import subprocess
import sys

import pytest

from stages.core import params
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


def test_every_problem_of_a_section_is_reported_in_one_line_with_its_key_path():
    raw = params.read(ROOT / "params.yaml")["train"]
    raw = raw | {"lora": raw["lora"] | {"r": 0}, "learning_rate": "2e-4", "micro_batch_size": 0, "optimiser": "adamw"}
    del raw["epochs"]
    with pytest.raises(params.ParamsError) as error:
        params.build(params.TrainParams, raw, "train")
    message = str(error.value)
    assert message.startswith("params: ") and "\n" not in message
    for problem in [r"train\.lora\.r: input should be greater than 0, got 0",
                    r"train\.learning_rate: input should be a valid number, got '2e-4'",
                    r"train\.micro_batch_size: must be 'auto' or a positive integer, got 0",
                    r"train\.epochs is missing", r"unknown key train\.optimiser"]:
        assert re.search(problem, message), (problem, message)
    assert message.count(";") == 4


def test_nested_key_path_names_the_lora_field():
    raw = params.read(ROOT / "params.yaml")["train"]
    with pytest.raises(params.ParamsError, match=r"^params: train\.lora\.r: input should be greater than 0, got -8$"):
        params.build(params.TrainParams, raw | {"lora": raw["lora"] | {"r": -8}}, "train")


@pytest.mark.parametrize(("section", "cls", "key"), [("model", params.ModelParams, "max_seq_length"),
                                                     ("train", params.TrainParams, "num_gpus"),
                                                     ("train", params.TrainParams, "micro_batch_size"),
                                                     ("eval", params.EvalParams, "limit"),
                                                     ("eval", params.EvalParams, "num_gpus")])
def test_bool_is_rejected_where_an_integer_is_expected(section, cls, key):
    raw = params.read(ROOT / "params.yaml")[section] | {key: True}
    with pytest.raises(params.ParamsError, match=rf"{section}\.{key}: .*got True"):
        params.build(cls, raw, section)


def test_seed_must_be_an_integer(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: true\n")
    with pytest.raises(params.ParamsError, match=r"seed: input should be a valid integer, got True"):
        params.load_seed(tmp_path / "params.yaml")


def test_eval_sets_are_checked_under_their_name(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "eval_data: {aime: {source: x/y, revision: main, file: '*.parquet', format: aime}}\n")
    expected = (r"eval_data\.aime\.files is missing; "
                r"eval_data\.aime\.format: input should be 'gsm8k' or 'math500', got 'aime'; "
                r"unknown key eval_data\.aime\.file$")
    with pytest.raises(params.ParamsError, match=expected):
        params.load("eval_data", tmp_path / "params.yaml")


def test_direct_construction_is_validated_and_frozen():
    with pytest.raises(params.ParamsError, match=r"^params: model\.max_seq_length: input should be greater than 0"):
        params.ModelParams(name="m", revision="main", max_seq_length=0, directive="")
    config = params.ModelParams("m", "main", 8, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_seq_length = 16
    assert dataclasses.asdict(config) == {"name": "m", "revision": "main", "max_seq_length": 8, "directive": ""}


@pytest.mark.parametrize("value", [0, -1, "two", "all", 1.5])
def test_eval_num_gpus_must_be_auto_or_a_positive_integer(value):
    raw = params.read(ROOT / "params.yaml")["eval"] | {"num_gpus": value}
    with pytest.raises(params.ParamsError, match=rf"^params: eval\.num_gpus: must be 'auto' or a positive integer, "
                                                 rf"got {re.escape(repr(value))}$"):
        params.build(params.EvalParams, raw, "eval")


def test_eval_samples_are_a_number_or_a_mapping_per_set_with_a_default():
    raw = params.read(ROOT / "params.yaml")["eval"]
    per_set = params.build(params.EvalParams, raw | {"samples": {"default": 2, "math500": 4}}, "eval")
    assert [per_set.samples_of(name) for name in ("math500", "gsm8k")] == [4, 2]
    without_default = params.build(params.EvalParams, raw | {"samples": {"math500": 4}}, "eval")
    assert without_default.samples_of("gsm8k") == 1
    assert params.build(params.EvalParams, raw | {"samples": 3}, "eval").samples_of("heldout") == 3
    with pytest.raises(params.ParamsError, match=r"eval\.samples"):
        params.build(params.EvalParams, raw | {"samples": {"math500": 0}}, "eval")


def test_eval_samples_naming_an_unknown_set_is_one_line(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    assert "samples: {default: 1, math500: 4}" in text
    (tmp_path / "params.yaml").write_text(text.replace("samples: {default: 1, math500: 4}",
                                                       "samples: {default: 1, math50: 4}"))
    with pytest.raises(params.ParamsError, match=r"^params: eval\.samples names 'math50', which is no evaluation set; "
                                                 r"use heldout, gsm8k, math500 or 'default'$"):
        params.check_all(tmp_path / "params.yaml")


@pytest.mark.parametrize(("key", "value", "said"), [
    ("lr_scheduler", "linaer", r"train\.lr_scheduler: must be a schedule transformers knows .*closest: 'linear'"),
    ("optimizer", "adamw_9bit", r"train\.optimizer: must be an optimizer transformers knows .*closest: 'adamw_8bit'"),
    ("weight_decay", -0.5, r"train\.weight_decay: input should be greater than or equal to 0"),
    ("micro_batch_size", 3, r"micro_batch_size=3 must divide sequences_per_step=16"),
    ("learning_rate", "2e-4", r"got '2e-4' \(YAML reads 2e-4 as text: write it with a dot, 2\.0e-4\)"),
    ("learning_rate", "2.0e-4", r"got '2\.0e-4' \(text: write it without quotes\)"),  # "2.0e-4", quoted
    ("lr_scheduler", None, r"train\.lr_scheduler: must be a schedule transformers knows \(SchedulerType\), got None"),
])
def test_train_values_that_would_fail_only_once_training_starts_fail_with_params(key, value, said):
    raw = params.read(ROOT / "params.yaml")["train"] | {"sequences_per_step": 16, key: value}
    with pytest.raises(params.ParamsError, match=said) as raised:
        params.build(params.TrainParams, raw, "train")
    assert "\n" not in str(raised.value)


def test_the_schedules_and_optimizers_params_accepts_are_the_installed_transformers_own():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(params.LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(params.OPTIMIZERS) == {o.value for o in OptimizerNames}


@pytest.mark.parametrize(("extra", "said"), [("evl:\n  limit: 2\n", r"unknown section 'evl' in .*did you mean 'eval'"),
                                             ("on: 1\n", r"section 'True' \(a key YAML reads as bool: quote it\)"),
                                             ("sede: 7\n", r"unknown section 'sede' in .*did you mean 'seed'"),
                                             ("notes: x\n", r"unknown section 'notes' in .*the sections: data, model")])
def test_an_unknown_section_of_params_yaml_is_named(tmp_path, extra, said):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text() + extra)
    with pytest.raises(params.ParamsError, match=said):
        params.check_all(path)
    path.write_text((ROOT / "params.yaml").read_text().replace("\neval:", "\nevl:"))  # renamed: eval is missing too
    with pytest.raises(params.ParamsError, match=r"unknown section 'evl' in .*did you mean 'eval'"):
        params.check_all(path)


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes((ROOT / "params.yaml").read_bytes() + b"# \xe9t\xe9 (Latin-1)\n")
    with pytest.raises(params.ParamsError, match=r"is not UTF-8 text \(byte \d+: invalid continuation byte\); save"):
        params.check_all(path)


def test_a_yaml_syntax_error_is_one_line_with_the_file_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    lines = (ROOT / "params.yaml").read_text().splitlines()
    at = next(k for k, line in enumerate(lines) if line.strip().startswith("r:"))
    lines[at] = "    r: [8"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(params.ParamsError) as raised:
        params.check_all(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"params: {path}:{at + 1}:8 is not valid YAML: ")
    lines[at] = '    r: "8'  # a quote left open: found at the file's end, told where it began
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(params.ParamsError, match=rf"params: {re.escape(str(path))}:{at + 1}:\d+ is not valid YAML: "
                                                 r"while scanning a quoted scalar, found unexpected end of stream "
                                                 rf"\(line {len(lines) + 1}\)$"):
        params.check_all(path)


def test_params_yaml_can_be_checked_alone_as_a_stage_checks_it(tmp_path):
    check = [sys.executable, "-m", "stages.core.params"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    done = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "params.yaml: every section, and the rules across them, hold" in done.stderr
    bad = tmp_path / "bad.yaml"  # another file, named
    bad.write_text(re.sub(r"(?m)^seed: .*$", "seed: x", (ROOT / "params.yaml").read_text()))
    done = subprocess.run([*check, str(bad)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "seed: input should be a valid integer, got 'x'" in done.stderr
