"""Training machinery for the train stage: tokenized examples, the base model with its LoRA adapter
(Unsloth on CUDA or transformers + PEFT anywhere), and one transformers Trainer for both backends.

Import this module only after `unsloth` (when used): Unsloth patches transformers on import.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from stages import params
from stages.artifacts import atomic_file
from stages.base_model import check_tokenizer
from stages.cli import StageError
from stages.prompts import encode_pairs, example_texts

log = logging.getLogger("stages.train")
IGNORE_INDEX = -100  # label value the loss skips: the prompt is context, not a target
FINGERPRINT = "fingerprint.json"


class TrainError(StageError):
    """Training cannot start or continue as configured."""


def resolve_backend(name: str) -> str:
    """The backend to use: auto picks Unsloth on a CUDA GPU and PEFT elsewhere."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        return "unsloth" if cuda else "peft"
    if name == "unsloth" and not cuda:
        raise TrainError("train.backend is 'unsloth', which needs a CUDA GPU, and none is visible here "
                         "(check CUDA_VISIBLE_DEVICES / the driver); use backend 'auto' or 'peft' on this machine")
    return name


def micro_batch_size(config: params.TrainParams, cuda_memory_gib: float | None) -> int:
    """Sequences per forward pass: the param, or for 'auto' the largest that the GPU memory allows
    and that divides the per-GPU share of sequences_per_step."""
    per_gpu, rest = divmod(config.sequences_per_step, config.num_gpus)
    if rest:
        raise TrainError(f"train.sequences_per_step={config.sequences_per_step} must be divisible by "
                         f"train.num_gpus={config.num_gpus}")
    if config.micro_batch_size != "auto":
        if per_gpu % config.micro_batch_size:
            raise TrainError(f"train.micro_batch_size={config.micro_batch_size} must divide sequences_per_step / "
                             f"num_gpus = {per_gpu}")
        return config.micro_batch_size
    # Measured on an H100 at 4096 tokens, packed, 4-bit: micro-batch 8 is the fastest that keeps
    # 16 sequences per step; smaller cards get proportionally less.
    size = 2 if cuda_memory_gib is None else 8 if cuda_memory_gib >= 60 else 4 if cuda_memory_gib >= 30 else 2
    while per_gpu % size:
        size //= 2
    return max(size, 1)


# Activation memory without gradient checkpointing, measured on an H200 (bench/train_speed.py --routes
# --min-length 4096: every sequence 4096 tokens, packed, Unsloth 4-bit LoRA, the R1-Distill-1.5B shape):
# 52.9 GiB peak at 32,768 tokens a micro-batch, 104.0 GiB at 65,536, i.e. 1.8 GiB + 1.56 MiB a token.
# Other shapes are scaled by layers x (hidden + intermediate) width, a linear estimate.
NO_CHECKPOINTING_GIB = 1.8
NO_CHECKPOINTING_MIB_PER_TOKEN = 1.56
REFERENCE_WIDTH = 28 * (1536 + 8960)
SIXTEEN_BIT_EXTRA_GIB = 12.0  # the same runs with 16-bit base weights peaked 12.0 GiB higher
MEMORY_HEADROOM = 0.9  # of the GPU's memory, for the allocator's fragmentation and CUDA's own


def gradient_checkpointing(config: params.TrainParams, backend: str, micro: int, max_seq_length: int, model_config,
                           cuda_memory_gib: float | None) -> tuple[bool, str]:
    """Whether to recompute activations in the backward pass, and why. 'auto' turns it off (up to 2.1x the
    tokens/s in one H200 call; README) when a micro-batch of max_seq_length-token sequences fits in GPU
    memory without it, by the estimate above; it stays on on CPU and with the PEFT backend, which the
    estimate does not describe."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing, "train.gradient_checkpointing"
    if cuda_memory_gib is None or backend != "unsloth":
        return True, "auto: on without a CUDA GPU or with the peft backend"
    width = model_config.num_hidden_layers * (model_config.hidden_size + model_config.intermediate_size)
    scale = width / REFERENCE_WIDTH
    need = (NO_CHECKPOINTING_GIB + (0 if config.load_in_4bit else SIXTEEN_BIT_EXTRA_GIB) * scale
            + NO_CHECKPOINTING_MIB_PER_TOKEN * scale * micro * max_seq_length / 1024)
    fits = need <= MEMORY_HEADROOM * cuda_memory_gib
    return not fits, (f"auto: {'off' if fits else 'on'}, a micro-batch of {micro} x {max_seq_length} tokens needs "
                      f"about {need:.0f} GiB without it, of {cuda_memory_gib:.0f} GiB")


def local_rank() -> int:
    """This process's GPU: torchrun numbers the processes of a machine from 0 (LOCAL_RANK); 0 when run alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def cuda_memory_gib() -> float | None:
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def check_merge(config: params.TrainParams, backend: str) -> None:
    if config.merge_16bit and backend == "peft" and config.load_in_4bit and torch.cuda.is_available():
        raise TrainError("train.merge_16bit needs 16-bit base weights with backend peft: set load_in_4bit: "
                         "false, or use backend unsloth (which merges into the original 16-bit weights)")


class Examples(torch.utils.data.Dataset):
    """Tokenized examples kept as int32 arrays: 4 bytes a token, where Python lists of ints take ~10x
    that (a real train split holds ~10^8 tokens)."""

    def __init__(self, ids: list[np.ndarray], prompt_lengths: list[int]):
        self.ids, self.prompt_lengths = ids, prompt_lengths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        ids = self.ids[index].tolist()
        prompt = self.prompt_lengths[index]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def tokenize(tokenizer, table: pa.Table, max_seq_length: int, split: str, *, directive: str,
             chunk_rows: int = 1024) -> Examples:
    """Examples as input ids + labels, the prompt masked out of the loss. Nothing is truncated."""
    ids, prompt_lengths = [], []
    for start in range(0, table.num_rows, chunk_rows):
        chunk = table.slice(start, chunk_rows)
        rows = zip(chunk["instruction"].to_pylist(), chunk["reasoning"].to_pylist(), chunk["answer"].to_pylist(),
                   strict=True)
        pairs = [example_texts(tokenizer, *row, directive=directive) for row in rows]
        prompts, completions = encode_pairs(tokenizer, pairs)
        for prompt, completion in zip(prompts, completions, strict=True):
            length = len(prompt) + len(completion)
            if length > max_seq_length:
                raise TrainError(f"train: a {split} example has {length} tokens, above model.max_seq_length="
                                 f"{max_seq_length}; re-run the filter stage with this model's tokenizer "
                                 "(filter.check_length: true) so such examples are dropped, not truncated")
            ids.append(np.array(prompt.ids + completion.ids, dtype=np.int32))
            prompt_lengths.append(len(prompt))
    return Examples(ids, prompt_lengths)


def check_model_limits(model_params: params.ModelParams, target_modules: list[str] | None = None):
    """Fail before loading weights (and before any checkpoint is touched) if the base model cannot take
    max_seq_length tokens or lacks a LoRA target module; the modules are read from a weightless copy.
    Returns the model's config."""
    from stages.base_model import local_model_dir

    folder = local_model_dir(model_params, weights=False)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and model_params.max_seq_length > limit:
        raise TrainError(f"model.max_seq_length={model_params.max_seq_length} is above the base model's limit of "
                         f"{limit} positions ({model_params.name}); lower it")
    if target_modules:
        with torch.device("meta"):  # shapes only: no memory, no weights read
            check_target_modules(AutoModelForCausalLM.from_config(config), target_modules)
    return config


def check_target_modules(model, target_modules: list[str]) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target_modules) - present)
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TrainError(f"train.lora.target_modules: {missing} not found in the base model; "
                         f"its linear layers are {linear}")


def name_base(model, model_params: params.ModelParams) -> None:
    """The adapter names its base as params.yaml does (hub id), not the local snapshot folder it was loaded from."""
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = model_params.name


def load_unsloth(model_params: params.ModelParams, config: params.TrainParams, seed: int, checkpointing: bool):
    from unsloth import FastLanguageModel

    from stages.base_model import local_model_dir

    # From the local folder, so model.config._name_or_path is where merged_16bit finds the pinned 16-bit weights.
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(local_model_dir(model_params)), max_seq_length=model_params.max_seq_length, dtype=None,
        load_in_4bit=config.load_in_4bit, use_exact_model_name=True)
    check_tokenizer(tokenizer, model_params.name)
    model.config.use_cache = False  # see load_peft
    model = FastLanguageModel.get_peft_model(
        model, r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules, bias="none", random_state=seed,
        use_gradient_checkpointing="unsloth" if checkpointing else False,
        max_seq_length=model_params.max_seq_length)
    name_base(model, model_params)
    return model, tokenizer


def load_peft(model_params: params.ModelParams, config: params.TrainParams, checkpointing: bool = True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stages.base_model import local_model_dir

    cuda = torch.cuda.is_available()
    extra = {}
    if cuda and config.load_in_4bit:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(
        local_model_dir(model_params), dtype=torch.bfloat16 if cuda else torch.float32,
        use_safetensors=True, trust_remote_code=False, device_map={"": local_rank()} if cuda else None, **extra)
    # With a KV cache in play, transformers skips the packed-sequence mask and attention leaks
    # across the examples of a padding-free batch; training never needs the cache.
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    name_base(model, model_params)
    return model


def prepare_checkpoints(checkpoints: Path, current: str) -> None:
    """Keep the checkpoints of a run that died with the same fingerprint (minus any checkpoint left
    half-written by the kill); clear them when anything the run depends on changed, or when that run
    finished (a new run starts from scratch, never from a finished run's last step). Runs once, before
    any training process starts."""
    stamp = checkpoints / FINGERPRINT
    previous = json.loads(stamp.read_text()) if stamp.exists() else {}
    if previous.get("fingerprint") == current and not previous.get("finished"):
        for partial in checkpoints.glob("checkpoint-*"):
            if not (partial / "trainer_state.json").exists():
                shutil.rmtree(partial)
        return
    if checkpoints.exists():
        why = ("the run that wrote them had finished" if previous.get("fingerprint") == current
               else "params, data, base model or code changed since they were written")
        log.info("checkpoints in %s: %s; starting over", checkpoints, why)
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    _write_stamp(stamp, {"fingerprint": current})


def mark_finished(checkpoints: Path) -> None:
    """Record that the run of these checkpoints completed, so no later run resumes from them."""
    stamp = checkpoints / FINGERPRINT
    _write_stamp(stamp, json.loads(stamp.read_text()) | {"finished": True})


def _write_stamp(stamp: Path, content: dict) -> None:
    with atomic_file(stamp) as tmp:  # never write into a file that may be a link into the DVC cache
        tmp.write_text(json.dumps(content, sort_keys=True) + "\n")


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step of a Trainer checkpoint folder (checkpoint-<step>)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last), if any."""
    complete = [d for d in checkpoints.glob("checkpoint-*") if (d / "trainer_state.json").exists()]
    return max(complete, key=checkpoint_step) if complete else None


def collator(tokenizer, packing: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        # One row of concatenated sequences; position ids restart per sequence, so attention
        # (SDPA, flash attention, Unsloth) stays within each example.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def training_arguments(config: params.TrainParams, checkpoints: Path, micro: int, seed: int, validate: bool = True):
    """Without validation rows: no evaluation and no best checkpoint; the last step is the result."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    accumulation = config.sequences_per_step // (micro * config.num_gpus)
    return TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation, learning_rate=config.learning_rate,
        num_train_epochs=config.epochs, max_steps=config.max_steps, warmup_steps=config.warmup,
        lr_scheduler_type=config.lr_scheduler, weight_decay=config.weight_decay,
        optim=config.optimizer if cuda else "adamw_torch", eval_strategy="steps" if validate else "no",
        eval_steps=config.eval_every_steps, save_strategy="steps", save_steps=config.eval_every_steps,
        save_total_limit=2, load_best_model_at_end=validate, metric_for_best_model="eval_loss" if validate else None,
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience survives a resume
        logging_steps=1, report_to="none", seed=seed, data_seed=seed, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=False,  # set on the model by each backend
        remove_unused_columns=False, include_num_input_tokens_seen="all" if config.packing else "non_padding",
        train_sampling_strategy="random" if config.packing else "group_by_length",
        dataloader_num_workers=0, ddp_find_unused_parameters=False if config.num_gpus > 1 else None,
    )


def summary(trainer, train_output, wall_seconds: float, resumed_from: int, tokens_before: int) -> dict:
    """The numbers metrics/train.json keeps: losses, where and why training ended, speed, memory."""
    state = trainer.state
    evals = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    best_step = checkpoint_step(state.best_model_checkpoint) if state.best_model_checkpoint else None
    tokens = state.num_input_tokens_seen - tokens_before
    runtime = train_output.metrics.get("train_runtime") or wall_seconds
    return {
        "train_loss": train_output.training_loss,
        "validated": bool(evals),  # false: no validation split, so no early stopping and the last step is the result
        "val_loss": {"best": state.best_metric, "last": evals[-1] if evals else None, "evaluations": len(evals)},
        "best_step": best_step,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs_run": state.epoch,
        "stopped_early": state.global_step < state.max_steps,
        "resumed_from_step": resumed_from,
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": tokens / runtime if runtime else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "wall_seconds": wall_seconds,
    }


def save_adapter(model, tokenizer, out: Path) -> None:
    """The adapter and tokenizer, byte-identical for identical training: PEFT keeps target_modules as a set
    and writes it in hash order, which changes from process to process; sorted lists are written instead."""
    for config in model.peft_config.values():
        for name, value in vars(config).items():
            if isinstance(value, set):
                setattr(config, name, sorted(value))
    # Embeddings are never trained here; without this PEFT asks the hub for the base config on every save.
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(out)


def export_merged(model, tokenizer, out: Path, backend: str, enabled: bool) -> None:
    """The base model with the adapter merged in, in 16 bit, for tools that take no adapters."""
    if not enabled:
        (out / "README.txt").write_text("Merged export is off: set train.merge_16bit: true to write it here.\n")
        return
    if backend == "unsloth":
        model.save_pretrained_merged(str(out), tokenizer, save_method="merged_16bit")
        return
    merged = model.merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def live_callback(live_dir: Path, resumed_from: int):
    """transformers' DVCLive callback with optimizer steps on the x axis (the stock one counts log calls,
    so train and eval points of one step land at different x). On a resume, the curves of the earlier run
    are kept up to the checkpoint's step and continued from there (metrics/train is a persistent output)."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepAligned(DVCLiveCallback):
        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            self.live.step = state.global_step
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    if resumed_from:
        for tsv in (live_dir / "plots").rglob("*.tsv"):
            rows = tsv.read_text().splitlines(keepends=True)
            step_column = rows[0].rstrip("\n").split("\t").index("step")
            kept = [rows[0]] + [r for r in rows[1:] if int(r.split("\t")[step_column]) <= resumed_from]
            with atomic_file(tsv) as tmp:  # steps after the checkpoint are trained (and logged) again
                tmp.write_text("".join(kept))
    return StepAligned(live=Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=bool(resumed_from)))
