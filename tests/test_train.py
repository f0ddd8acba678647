"""The train stage on CPU with the tiny random Qwen2 model (PEFT backend), through its real main()."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from stages import train as train_stage
from stages.core import artifacts, cli, params
from stages.training import choices as train_choices
from stages.training import data as train_data
from stages.training import model as train_model
from tests import magpie_data
from tests.conftest import DIRECTIVE, ROOT, copy_project, set_params, splits_table, train_project, write_splits
from tests.dvc_stages import project_pythonpath, stage_args, stage_command


def logged(project: Path, name: str) -> list[float]:
    lines = (project / "metrics" / "train" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [float(line.split("\t")[1]) for line in lines]


def train_metrics(project: Path) -> dict:
    return json.loads((project / "metrics" / "train.json").read_text())


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    return train_project(tmp_path, tiny_model_dir, monkeypatch)


def test_loss_goes_down_on_a_small_repeated_data_set(project):
    write_splits(project, [magpie_data.row(1)] * 16, [magpie_data.row(1)] * 2)
    set_params(project, "train", learning_rate=5.0e-2, max_steps=30, eval_every_steps=10)
    train_stage.main(stage_args("train"))
    losses = logged(project, "loss")
    assert losses[-1] < 0.1 * losses[0]
    metrics = train_metrics(project)
    assert metrics["steps"] == 30 and not metrics["stopped_early"]
    assert metrics["val_loss"]["best"] < losses[0]
    assert metrics["tokens_seen"] > 0 and json.loads((project / "reports" / "train_run.json").read_text())[
        "tokens_per_second"] > 0
    assert (metrics["backend"], metrics["base_weights"], metrics["optimizer"]) == ("peft", "float32", "adamw_torch")
    assert (metrics["device"], metrics["processes"]) == ("cpu", 1)  # what ran it, for the model card
    assert "tokens_per_second" not in metrics and "wall_seconds" not in metrics  # noise: kept out of the diffs


def overfit_one_example(project: Path) -> None:
    """Memorizing one example at a high learning rate makes the loss on unrelated text climb."""
    write_splits(project, [magpie_data.row(1)] * 16,
                 [magpie_data.row(i, instruction="Name a prime.", response="<think>zzz qqq</think>xyz")
                  for i in range(4)])
    set_params(project, "train", learning_rate=5.0e-2, epochs=50, eval_every_steps=1, early_stopping_patience=2)


def test_early_stopping_stops_a_run_whose_val_loss_rises(project):
    overfit_one_example(project)
    train_stage.main(stage_args("train"))
    metrics = train_metrics(project)
    assert metrics["stopped_early"]
    assert metrics["steps"] < metrics["max_steps"]
    assert metrics["steps"] == metrics["best_step"] + 2  # two evaluations without improvement


def kill_after_step(monkeypatch, step: int):
    """Make the next run die while training the step after `step` (Ctrl-C, preemption or OOM, as far as
    the run is concerned); returns the function that undoes it."""
    from transformers import Trainer

    original_step = Trainer.training_step

    def dies(self, *args, **kwargs):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dies)
    return lambda: monkeypatch.setattr(Trainer, "training_step", original_step)


def killed_run(project: Path, monkeypatch) -> None:
    """A 4-step run that died during step 3, leaving checkpoint-2."""
    set_params(project, "train", max_steps=4, eval_every_steps=2)
    revive = kill_after_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_stage.main(stage_args("train"))
    revive()


def logged_steps(project: Path, name: str) -> list[int]:
    lines = (project / "metrics" / "train" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [int(line.split("\t")[0]) for line in lines]


def test_a_killed_run_resumes_from_its_last_checkpoint_and_continues_its_curves(project, monkeypatch):
    set_params(project, "train", max_steps=6, eval_every_steps=2)
    train_stage.main(stage_args("train"))
    uninterrupted = train_metrics(project)
    shutil.rmtree(project / "models")  # metrics/train stays: it is a persistent output, as DVC keeps it

    revive = kill_after_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_stage.main(stage_args("train"))
    assert not (project / "models" / "adapter").exists()
    assert (project / "models" / "checkpoints" / "checkpoint-2").is_dir()
    assert logged_steps(project, "loss") == [1, 2, 3]

    revive()
    train_stage.main(stage_args("train"))
    resumed = train_metrics(project)
    assert resumed["resumed_from_step"] == 2
    assert resumed["steps"] == 6
    assert resumed["val_loss"]["best"] == pytest.approx(uninterrupted["val_loss"]["best"], abs=1e-3)
    assert logged_steps(project, "loss") == [1, 2, 3, 4, 5, 6]  # step 3 trained again, logged once


def test_the_training_curves_are_a_persistent_output():
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["outs"]
    assert {"metrics/train": {"cache": False, "persist": True}} in outs  # else DVC deletes them before a resume


def test_a_finished_run_is_never_resumed(project):
    set_params(project, "train", max_steps=2)
    train_stage.main(stage_args("train"))
    train_stage.main(stage_args("train"))  # e.g. dvc repro -f, or a change DVC sees that the fingerprint would not
    assert train_metrics(project)["resumed_from_step"] == 0


def test_a_code_change_discards_the_checkpoints_of_a_killed_run(project, monkeypatch, tmp_path):
    from stages.core import artifacts

    code = copy_project(tmp_path / "code")  # the stage's code deps, as dvc.yaml lists them, from this copy
    monkeypatch.setattr(artifacts, "PROJECT_ROOT", code)
    killed_run(project, monkeypatch)
    prompts = code / "stages" / "core" / "prompts.py"
    prompts.write_text(prompts.read_text() + "\n# a changed line of the stage's code\n")
    train_stage.main(stage_args("train"))
    assert train_metrics(project)["resumed_from_step"] == 0


def test_the_train_fingerprint_covers_the_code_dvc_reruns_the_stage_for():
    code = {path.relative_to(ROOT).as_posix() for path in artifacts.stage_code("train")}
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert code == {dep for dep in deps if dep.endswith(".py")}
    assert {"stages/core/prompts.py", "stages/training/choices.py", "stages/train.py"} <= code


def test_the_train_modules_leave_transformers_unimported_for_unsloth_to_patch_first():
    modules = "checkpoints, choices, data, model, output"
    check = (f"import sys; from stages.training import {modules}; "
             "print(sorted({'transformers', 'peft'} & sys.modules.keys()))")
    imported = subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True, capture_output=True, text=True)
    assert imported.stdout.strip() == "[]"


def test_early_stopping_patience_survives_a_resume(project, monkeypatch):
    overfit_one_example(project)
    train_stage.main(stage_args("train"))
    uninterrupted = train_metrics(project)
    assert uninterrupted["stopped_early"]
    shutil.rmtree(project / "models")

    revive = kill_after_step(monkeypatch, uninterrupted["best_step"] + 1)  # one evaluation without improvement
    with pytest.raises(KeyboardInterrupt):
        train_stage.main(stage_args("train"))
    revive()
    train_stage.main(stage_args("train"))
    resumed = train_metrics(project)
    assert resumed["resumed_from_step"] == uninterrupted["best_step"] + 1
    assert resumed["steps"] == uninterrupted["steps"]  # stops where the uninterrupted run stopped


CANNOT_START = {
    "unsloth_without_gpu": ("train", {"backend": "unsloth"}, "needs a CUDA GPU"),
    "unknown_target_module": ("train", {"lora": {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["qkv_proj"]}},
                              r"\['qkv_proj'\] not found"),
    "too_long_for_the_model": ("model", {"max_seq_length": 8192}, "above the base model's limit"),
    "indivisible_micro_batch": ("train", {"micro_batch_size": 3}, "must divide"),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("case", CANNOT_START)
def test_a_run_that_cannot_start_keeps_the_checkpoints_of_a_killed_run(project, monkeypatch, case):
    killed_run(project, monkeypatch)
    checkpoints = project / "models" / "checkpoints"
    before = sorted(p.relative_to(checkpoints) for p in checkpoints.rglob("*"))
    section, change, error = CANNOT_START[case]
    original = yaml.safe_load((project / "params.yaml").read_text())
    set_params(project, section, **change)
    with pytest.raises(cli.StageError, match=error):
        train_stage.main(stage_args("train"))
    assert sorted(p.relative_to(checkpoints) for p in checkpoints.rglob("*")) == before
    (project / "params.yaml").write_text(yaml.safe_dump(original, sort_keys=False))
    train_stage.main(stage_args("train"))
    assert train_metrics(project)["resumed_from_step"] == 2


def test_each_ddp_process_loads_the_model_onto_its_own_gpu(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    class Loaded(Exception):
        pass

    def from_pretrained(*args, **kwargs):
        raise Loaded(kwargs["device_map"])

    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process on this machine, as torchrun numbers them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    config = params.load("train", ROOT / "params.yaml")
    config = params.TrainParams(**{**config.__dict__, "load_in_4bit": False})
    model_params = params.ModelParams(name=str(tiny_model_dir), revision="main", max_seq_length=1024, directive="")
    with pytest.raises(Loaded) as loaded:
        train_model.load_peft(model_params, config)
    assert loaded.value.args[0] == {"": 1}


def test_without_a_validation_split_the_last_step_is_the_result(project):
    write_splits(project, magpie_data.clean_rows(24), [])  # stratify.val_fraction: 0
    set_params(project, "train", max_steps=4, eval_every_steps=2, early_stopping_patience=2)
    train_stage.main(stage_args("train"))
    metrics = train_metrics(project)
    assert metrics["validated"] is False and metrics["best_step"] is None
    assert metrics["steps"] == 4 and not metrics["stopped_early"]
    assert (project / "models" / "adapter" / "adapter_model.safetensors").is_file()


def train_in_new_process(project: Path, hash_seed: str) -> dict[str, str]:
    """Run the train stage as `dvc repro` does, in a process of its own; the sha256 of each adapter file."""
    path = project_pythonpath()
    subprocess.run(stage_command("train"), cwd=project, check=True, capture_output=True,
                   env=os.environ | {"PYTHONHASHSEED": hash_seed, "PYTHONPATH": path})
    adapter = project / "models" / "adapter"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(adapter.iterdir())}


def test_identical_training_gives_byte_identical_adapter_files(project):
    """Each run is a new process with its own string hash seed, as under dvc repro."""
    set_params(project, "train", max_steps=2)
    first, second = (train_in_new_process(project, hash_seed) for hash_seed in ("1", "2"))
    assert first == second
    assert {"adapter_config.json", "adapter_model.safetensors"} <= first.keys()


def test_changed_params_discard_old_checkpoints(project):
    set_params(project, "train", max_steps=2)
    train_stage.main(stage_args("train"))
    set_params(project, "train", max_steps=4, learning_rate=2.0e-3)
    train_stage.main(stage_args("train"))
    assert train_metrics(project)["resumed_from_step"] == 0


def test_saved_adapter_reloads_and_changes_the_models_outputs(project, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    set_params(project, "train", learning_rate=1.0e-2, max_steps=4)
    train_stage.main(stage_args("train"))
    adapter = project / "models" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    inputs = torch.tensor([[0, 2, 30, 31, 32, 3, 4]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter).eval()
        tuned_logits = tuned(inputs).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8


def test_merged_export_matches_the_adapted_model(project, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    set_params(project, "train", learning_rate=1.0e-2, max_steps=2, merge_16bit=True)
    train_stage.main(stage_args("train"))
    merged = AutoModelForCausalLM.from_pretrained(project / "models" / "merged")
    assert merged.dtype == torch.bfloat16
    assert not any("lora" in name for name, _ in merged.named_parameters())


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_packed_examples_do_not_attend_to_each_other(tokenizer, tiny_model_dir, gradient_checkpointing):
    config = params.load("train", ROOT / "params.yaml")
    model_params = params.ModelParams(name=str(tiny_model_dir), revision="main", max_seq_length=1024, directive="")
    model = train_model.load_peft(model_params, config, gradient_checkpointing).train()
    table = splits_table([magpie_data.row(3), magpie_data.row(40), magpie_data.row(77)])
    examples = train_data.tokenize(tokenizer, table, 1024, "train", directive=DIRECTIVE)
    examples = list(examples)
    packed = train_data.collator(tokenizer, packing=True)(examples)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            end = start + len(example["input_ids"])
            assert torch.allclose(packed_logits[start:end], alone, atol=1e-5)
            start = end
        packed_loss = model(**packed).loss
        padded_loss = model(**train_data.collator(tokenizer, packing=False)(examples)).loss
    assert packed_loss == pytest.approx(float(padded_loss), rel=1e-5)


def test_tokenized_examples_keep_every_token_at_4_bytes_each(tokenizer):
    table = splits_table(magpie_data.clean_rows(5))
    # chunks must not lose rows
    examples = train_data.tokenize(tokenizer, table, 1024, "train", directive=DIRECTIVE, chunk_rows=2)
    assert len(examples) == 5
    assert all(ids.dtype.itemsize == 4 for ids in examples.ids)
    assert [e["input_ids"][-1] for e in examples] == [tokenizer.eos_token_id] * 5


def test_loss_covers_the_completion_only(tokenizer):
    table = splits_table([magpie_data.row(7)])
    (example,) = train_data.tokenize(tokenizer, table, 1024, "train", directive=DIRECTIVE)
    prompt_length = example["labels"].count(train_data.IGNORE_INDEX)
    prompt = tokenizer.decode(example["input_ids"][:prompt_length])
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(("memory_gib", "expected"), [(None, 2), (80.0, 8), (40.0, 4), (16.0, 2)])
def test_auto_micro_batch_follows_gpu_memory(memory_gib, expected):
    config = params.load("train", ROOT / "params.yaml")
    assert train_choices.micro_batch_size(config, memory_gib) == expected


def test_micro_batch_must_divide_each_process_s_share_of_the_sequences_per_step():
    """params checks that it divides sequences_per_step; the share of each of the run's processes is known here."""
    config = params.load("train", ROOT / "params.yaml")
    config = params.TrainParams(**{**config.__dict__, "sequences_per_step": 16, "micro_batch_size": 4})
    assert train_choices.micro_batch_size(config, None, processes=2) == 4
    divides = "micro_batch_size=4 must divide sequences_per_step / processes = 2"
    with pytest.raises(train_choices.TrainError, match=divides):
        train_choices.micro_batch_size(config, None, processes=8)


def test_an_empty_train_split_is_a_clear_error_and_leaves_no_adapter(project):
    write_splits(project, [], [magpie_data.row(1)])
    with pytest.raises(cli.StageError, match=r"train\.parquet has no rows"):
        train_stage.main(stage_args("train"))
    assert not (project / "models" / "adapter").exists()


def test_a_sequence_length_above_the_models_limit_is_refused(project):
    set_params(project, "model", max_seq_length=8192)
    with pytest.raises(train_choices.TrainError, match="above the base model's limit of 4096"):
        train_stage.main(stage_args("train"))


def test_an_unknown_target_module_is_named(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"]["lora"]["target_modules"] = ["q_proj", "qkv_proj"]
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(train_choices.TrainError, match=r"\['qkv_proj'\] not found.*q_proj"):
        train_stage.main(stage_args("train"))
    assert not (project / "models" / "adapter").exists()


def test_ddp_neither_searches_unused_parameters_nor_broadcasts_the_unchanging_buffers(tmp_path):
    config = params.load("train", ROOT / "params.yaml")
    two = train_choices.training_arguments(config, tmp_path, micro=2, seed=0, processes=2)
    assert (two.ddp_find_unused_parameters, two.ddp_broadcast_buffers) == (False, False)
    one = train_choices.training_arguments(config, tmp_path, micro=2, seed=0, processes=1)
    assert (one.ddp_find_unused_parameters, one.ddp_broadcast_buffers) == (None, None)


@pytest.mark.slow
def test_two_process_ddp_keeps_sequences_per_step_and_saves_one_adapter(project, capfd):
    # One process first, in this one: the tokens to match, and finished checkpoints that are stale for two
    # processes. One torchrun launch, not two: each costs two processes' imports and model loads.
    set_params(project, "train", num_gpus=1, max_steps=4, sequences_per_step=8)  # the same sequences each step
    train_stage.main(stage_args("train"))
    alone = train_metrics(project)
    capfd.readouterr()
    set_params(project, "train", num_gpus=2, max_steps=4, sequences_per_step=8)  # stale checkpoints: cleared once
    train_stage.main(stage_args("train"))  # relaunches itself under torchrun: 2 processes, gloo on CPU
    log = capfd.readouterr().err
    assert log.count("micro-batch 2 x accumulation 2 x 2 process(es)") == 2  # one line per rank
    assert log.count("adapter -> models/adapter") == 1  # rank 0 alone saves
    metrics = train_metrics(project)
    assert metrics["steps"] == 4 and metrics["resumed_from_step"] == 0
    assert metrics["epochs_run"] == pytest.approx(4 * 8 / 24, abs=1e-3)  # 8 sequences a step, 24 rows
    assert (project / "models" / "adapter" / "adapter_model.safetensors").is_file()
    assert metrics["tokens_seen"] == alone["tokens_seen"]  # both ranks' tokens, summed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_unsloth_backend_without_a_gpu_says_so(project):
    set_params(project, "train", backend="unsloth")
    with pytest.raises(train_choices.TrainError, match="needs a CUDA GPU"):
        train_stage.main(stage_args("train"))


def test_training_prompt_tokens_are_exactly_what_evaluation_feeds_the_model(tokenizer):
    from stages.core.prompts import prompt_text

    table = splits_table([magpie_data.row(5)])
    (example,) = train_data.tokenize(tokenizer, table, 1024, "train", directive=DIRECTIVE)
    prompt_length = example["labels"].count(train_data.IGNORE_INDEX)
    evaluation_prompt = prompt_text(tokenizer, table["instruction"][0].as_py(), directive=DIRECTIVE)  # as evaluate
    assert DIRECTIVE and DIRECTIVE in evaluation_prompt
    assert example["input_ids"][:prompt_length] == tokenizer(evaluation_prompt, add_special_tokens=False)["input_ids"]


def test_the_same_seed_gives_the_same_adapter(project):
    from safetensors.torch import load_file

    set_params(project, "train", max_steps=3)
    train_stage.main(stage_args("train"))
    first = load_file(project / "models" / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(project / "models")  # a fresh run, not a resumed one
    train_stage.main(stage_args("train"))
    second = load_file(project / "models" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_train_stage_ends_every_prompt_with_the_model_directive(project, monkeypatch):
    set_params(project, "model", directive="Answer with one number.")
    real, prompts = train_data.tokenize, []

    class Tokenized(Exception):
        pass

    def tokenize(tokenizer, *args, **kwargs):
        for example in real(tokenizer, *args, **kwargs):
            prompts.append(tokenizer.decode(example["input_ids"][:example["labels"].count(train_data.IGNORE_INDEX)]))
        raise Tokenized  # the prompts are all this test needs: no training

    monkeypatch.setattr(train_data, "tokenize", tokenize)
    with pytest.raises(Tokenized):
        train_stage.main(stage_args("train"))
    assert len(prompts) == 24 and all(p.endswith("\nAnswer with one number.<｜Assistant｜><think>\n") for p in prompts)


R1_SHAPE = types.SimpleNamespace(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960)


@pytest.mark.parametrize(("memory_gib", "micro", "backend", "expected"), [
    (79.6, 8, "unsloth", False),  # H100: 8 x 4096 tokens need ~51 GiB without recomputing
    (79.6, 16, "unsloth", True),  # ~102 GiB: recompute
    (139.8, 16, "unsloth", False),  # H200
    (40.0, 4, "unsloth", False), (24.0, 4, "unsloth", True),
    (None, 2, "peft", True),  # CPU: as before
    (79.6, 8, "peft", True),  # the estimate is Unsloth's
])
def test_auto_gradient_checkpointing_turns_off_only_when_a_micro_batch_fits(memory_gib, micro, backend, expected):
    config = params.load("train", ROOT / "params.yaml")
    assert config.gradient_checkpointing == "auto"
    on, why = train_choices.gradient_checkpointing(config, backend, micro, 4096, R1_SHAPE, memory_gib)
    assert on is expected and why.startswith("auto")


def test_explicit_gradient_checkpointing_is_kept_and_recorded(project):
    set_params(project, "train", max_steps=2, gradient_checkpointing=False)
    train_stage.main(stage_args("train"))
    metrics = train_metrics(project)
    assert metrics["gradient_checkpointing"] is False and metrics["micro_batch_size"] == 2


def test_speed_after_the_first_step_and_over_the_second_half_counts_the_tokens_and_time_of_those_steps(monkeypatch):
    import time
    from types import SimpleNamespace

    from stages.training import output as train_output

    clock, now = train_output.step_clock(), iter([10.0, 12.0, 14.5, 15.0, 15.5])
    monkeypatch.setattr(time, "perf_counter", lambda: next(now))
    assert clock.tokens_per_second_after_first_step() is None
    for seen in (1_000, 3_000, 8_000):  # the first step's tokens and time (compilation) are left out
        clock.on_step_end(None, SimpleNamespace(num_input_tokens_seen=seen), None)
    assert clock.tokens_per_second_after_first_step() == (8_000 - 1_000) / (14.5 - 10.0)
    for seen in (10_000, 12_000):  # five steps: the second half is steps 4 and 5 (from the end of step 3)
        clock.on_step_end(None, SimpleNamespace(num_input_tokens_seen=seen), None)
    assert clock.tokens_per_second_second_half() == (12_000 - 8_000) / (15.5 - 14.5)


def log_steps(live_dir: Path, steps: int, tmp_path: Path):
    """The stage's dvclive callback fed `steps` optimizer steps of logs, as the Trainer feeds it."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from stages.training import output as train_output

    callback = train_output.live_callback(live_dir, resumed_from=0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    state = TrainerState()
    for step in range(1, steps + 1):
        state.global_step = step
        callback.on_log(args, state, TrainerControl(), logs={"loss": 1.0 / step, "learning_rate": 1e-4})
    return callback


def test_step_logging_does_not_reread_the_curves_unless_a_studio_wants_them(tmp_path, monkeypatch):
    """dvclive builds a Studio update at every step by re-reading every curve file (a cost that grows with
    the run); with no Studio set up the stage skips it, and every point is still written."""
    import dvclive.live

    for name in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_STUDIO_URL"):
        monkeypatch.delenv(name, raising=False)
    reads, posted = [], []
    parse = dvclive.live.parse_metrics
    monkeypatch.setattr(dvclive.live, "parse_metrics", lambda live: reads.append(live.step) or parse(live))
    monkeypatch.setattr(dvclive.live, "post_to_studio", lambda *args: posted.append(args[1]))
    callback = log_steps(tmp_path / "live", 5, tmp_path)
    assert reads == []
    lines = (tmp_path / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    assert [int(line.split("\t")[0]) for line in lines] == [1, 2, 3, 4, 5]

    callback.live._studio_events_to_skip.discard("data")  # a Studio that takes live updates gets them
    callback.on_log(None, types.SimpleNamespace(global_step=6, is_world_process_zero=True), None,
                    logs={"loss": 0.1})
    callback.live._wait_for_studio_updates_posted()
    assert reads == [6] and "data" in posted


def test_each_logging_step_is_one_plain_line_not_a_dict_of_quoted_numbers(project, capfd):
    from stages.training.output import step_line

    assert step_line({"loss": 0.61234, "grad_norm": 0.34, "learning_rate": 2e-4, "epoch": 0.5, "total_flos": 1.0},
                     50, 3566) == "step 50/3566: loss 0.6123, grad_norm 0.34, learning_rate 0.0002, epoch 0.5"
    set_params(project, "train", max_steps=2, eval_every_steps=1)
    train_stage.main(stage_args("train"))
    out, err = capfd.readouterr()
    err = out + err  # tqdm writes to stdout
    assert re.search(r"step 1/2: loss [\d.]+, grad_norm [\d.]+, learning_rate", err), err[-2000:]
    assert "{'loss'" not in err and "'loss':" not in err
