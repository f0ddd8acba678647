"""How the train stage runs here, from its params and the machine: the backend, the training processes, the
micro-batch, gradient checkpointing, and the transformers TrainingArguments that carry them.

Imports torch only; transformers is imported inside functions, so stages/train.py can import Unsloth first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stages.core import params
from stages.core.cli import StageError


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


def under_torchrun() -> bool:
    """Whether torchrun started this process: the stage's own relaunch (train.num_gpus > 1) or the user's."""
    return "LOCAL_RANK" in os.environ


def world_size(config: params.TrainParams) -> int:
    """The training processes of the run: under torchrun, the launcher's WORLD_SIZE (every node's processes, which
    the stage's own relaunch makes train.num_gpus); otherwise train.num_gpus, the processes main() relaunches."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else config.num_gpus


def local_rank() -> int:
    """This process's GPU: torchrun numbers the processes of a machine from 0 (LOCAL_RANK); 0 when run alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def cuda_memory_gib() -> float | None:
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def micro_batch_size(config: params.TrainParams, cuda_memory_gib: float | None, processes: int | None = None) -> int:
    """Sequences per forward pass: the param, or for 'auto' the largest that the GPU memory allows and that divides
    each process's share of sequences_per_step. processes: the run's world size (default train.num_gpus)."""
    processes = processes or config.num_gpus
    per_process, rest = divmod(config.sequences_per_step, processes)
    if rest:
        raise TrainError(f"train.sequences_per_step={config.sequences_per_step} must be divisible by the {processes} "
                         "training processes (train.num_gpus, or under torchrun nnodes x nproc-per-node)")
    if config.micro_batch_size != "auto":
        if per_process % config.micro_batch_size:
            raise TrainError(f"train.micro_batch_size={config.micro_batch_size} must divide sequences_per_step / "
                             f"processes = {per_process}")
        return config.micro_batch_size
    # Measured on an H100 at 4096 tokens, packed, 4-bit: micro-batch 8 is the fastest that keeps
    # 16 sequences per step; smaller cards get proportionally less.
    size = 2 if cuda_memory_gib is None else 8 if cuda_memory_gib >= 60 else 4 if cuda_memory_gib >= 30 else 2
    while per_process % size:
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


def check_merge(config: params.TrainParams, backend: str) -> None:
    if config.merge_16bit and backend == "peft" and config.load_in_4bit and torch.cuda.is_available():
        raise TrainError("train.merge_16bit needs 16-bit base weights with backend peft: set load_in_4bit: "
                         "false, or use backend unsloth (which merges into the original 16-bit weights)")


def training_arguments(config: params.TrainParams, checkpoints: Path, micro: int, seed: int, validate: bool = True,
                       processes: int | None = None):
    """Without validation rows: no evaluation and no best checkpoint; the last step is the result. processes: the
    run's world size (default train.num_gpus); accumulation keeps sequences_per_step whatever it is. Building them
    connects the processes of a torchrun launch (torch.distributed)."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    processes = processes or config.num_gpus
    accumulation = config.sequences_per_step // (micro * processes)
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
        # a NaN or infinite loss is logged as it is, not replaced by earlier ones (transformers' default, which
        # also waits for the GPU after every micro-batch to check the loss)
        logging_nan_inf_filter=False,
        gradient_checkpointing=False,  # set on the model by each backend
        remove_unused_columns=False, include_num_input_tokens_seen="all" if config.packing else "non_padding",
        # Packed: each step's shuffled sequences split into micro-batches of equal cost (stages/training/order.py).
        train_sampling_strategy="batch_rebalance" if config.packing else "group_by_length",
        dataloader_num_workers=0, ddp_find_unused_parameters=False if processes > 1 else None,
        # DDP would send rank 0's buffers to every rank before each forward; this model's (rotary tables) are
        # the same everywhere and never change, so that is a copy and a sync a micro-batch for nothing.
        ddp_broadcast_buffers=False if processes > 1 else None,
    )
