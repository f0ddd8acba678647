"""train: data/splits/{train,val}.parquet -> a LoRA adapter of the base model in models/adapter/, with
metrics/train.json and per-step loss/learning-rate plots (dvclive) in metrics/train/.

Resumes from the last checkpoint in models/checkpoints/ of a run that died, when nothing it depends on
changed (params, data, base model, the stage's code); a run that finished is never resumed. Runs as one
process, as train.num_gpus DDP processes under torchrun, or under a torchrun the user starts on several
nodes; global rank 0 alone prepares the checkpoints and writes the adapter and metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import cli, params
from stages.core.artifacts import atomic_dir, fingerprint, stage_code, write_json
from stages.core.base_model import model_identity

log = logging.getLogger("stages.train")  # not __name__: `python -m` runs a stage as __main__


def read_split(path: Path, limit: int | None = None, required: bool = True) -> pa.Table:
    try:
        table = pq.read_table(path, columns=["instruction", "reasoning", "answer"])
    except (pa.ArrowInvalid, OSError) as e:
        raise cli.StageError(f"train: cannot read {path} ({e}); re-run the stratify stage") from e
    if table.num_rows == 0 and required:
        raise cli.StageError(f"train: {path} has no rows; the train split needs examples "
                             "(check stratify.train_fraction and metrics/splits.json)")
    return table if limit is None else table.slice(0, limit)


# NVLink multicast stays off: on shared hosts it can take every GPU of the machine down.
NO_NVLINK_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def relaunch_distributed(num_gpus: int, argv: list[str]) -> int:
    """Run this stage as num_gpus DDP processes under torchrun (gloo on CPU, NCCL on GPUs)."""
    env = os.environ | NO_NVLINK_MULTICAST
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_gpus}",
               "-m", "stages.train", *argv]
    log.info("launching %d processes: %s", num_gpus, " ".join(command))
    return subprocess.call(command, env=env)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--splits", type=Path, required=True,
                        help="in: stratify's train.parquet and val.parquet")
    parser.add_argument("--adapter", type=Path, required=True,
                        help="out: the LoRA adapter (the best checkpoint's weights) and tokenizer")
    parser.add_argument("--merged", type=Path, required=True,
                        help="out: the base model with the adapter merged in (train.merge_16bit)")
    parser.add_argument("--checkpoints", type=Path, required=True,
                        help="in/out: checkpoints a stopped run resumes from")
    parser.add_argument("--metrics", type=Path, required=True,
                        help="out: losses, steps, batch geometry (dvc metrics)")
    parser.add_argument("--live", type=Path, required=True,
                        help="out: dvclive's loss and learning-rate curves (dvc plots)")
    parser.add_argument("--run-stats", type=Path, required=True,
                        help="out: speed, wall time and memory of the run (not a metric: they vary run to run)")
    return parser.parse_args(argv)


@dataclasses.dataclass
class Plan:
    """What the checks before training decided; nothing (an earlier run's checkpoints included) is touched
    before all of them pass."""
    config: params.TrainParams
    model_params: params.ModelParams
    seed: int
    backend: str
    train_file: Path
    val_file: Path
    train_table: pa.Table
    val_table: pa.Table
    micro: int  # sequences per micro-batch
    processes: int  # DDP processes: under torchrun, its WORLD_SIZE
    worker: bool  # this process is one that torchrun started
    model_config: object  # the base model's config
    checkpointing: bool
    why_checkpointing: str


def check(args: argparse.Namespace) -> Plan:
    """Params, data, memory, batch geometry and model limits, all checked before anything is written."""
    # These import torch only; transformers comes after Unsloth.
    from stages.training import choices as train_choices
    from stages.training import model as train_model

    config, model_params = params.load("train"), params.load("model")
    backend = train_choices.resolve_backend(config.backend)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (patches transformers, so before anything imports it)
    train_file, val_file = args.splits / "train.parquet", args.splits / "val.parquet"
    train_table, val_table = read_split(train_file), read_split(val_file, config.max_val_rows, required=False)
    memory = train_choices.cuda_memory_gib()
    worker = train_choices.under_torchrun()  # one of the processes torchrun started: ours, or the user's (nodes)
    if worker:
        os.environ.update(NO_NVLINK_MULTICAST)  # under the user's torchrun too, before the processes connect
    processes = train_choices.world_size(config)
    micro = train_choices.micro_batch_size(config, memory, processes)
    train_choices.check_merge(config, backend)
    model_config = train_model.check_model_limits(model_params, config.lora.target_modules)
    checkpointing, why = train_choices.gradient_checkpointing(config, backend, micro, model_params.max_seq_length,
                                                              model_config, memory)
    if config.num_gpus > 1 and not worker and memory is None:  # no CUDA
        log.warning("train.num_gpus=%d without CUDA: %d CPU processes (DDP over gloo), which only tests use; "
                    "set train.num_gpus: 1 for one CPU process", config.num_gpus, config.num_gpus)
    return Plan(config, model_params, params.load_seed(), backend, train_file, val_file, train_table, val_table,
                micro, processes, worker, model_config, checkpointing, why)


@dataclasses.dataclass
class Run:
    """The model, its trainer and where it resumes from; global rank 0 alone writes files."""
    trainer: object
    model: object
    tokenizer: object
    validate: bool  # a validation split: early stopping, the best checkpoint is the result
    global_zero: bool
    resume: Path | None
    resumed_from: int  # optimizer steps done before this process started
    tokens_before: int  # tokens seen before this process started
    clock: object  # per-step timings for the run's speed figures


def prepare(plan: Plan, args: argparse.Namespace, extra_callbacks: tuple) -> Run:
    """Load the model and tokenize the splits, then (global rank 0) discard checkpoints of other inputs and
    find the one to resume from, and build the trainer."""
    from transformers import EarlyStoppingCallback, ProgressCallback, TrainerState, set_seed

    from stages.core.base_model import load_tokenizer
    from stages.training import checkpoints as train_checkpoints
    from stages.training import choices as train_choices
    from stages.training import data as train_data
    from stages.training import model as train_model
    from stages.training import output as train_output
    from stages.training.order import BalancedTrainer, attention_weight

    config, model_params = plan.config, plan.model_params
    set_seed(plan.seed)  # LoRA weights are initialized before the Trainer would seed anything
    if plan.backend == "unsloth":
        model, tokenizer = train_model.load_unsloth(model_params, config, plan.seed, plan.checkpointing)
    else:
        tokenizer = load_tokenizer(model_params)
        model = train_model.load_peft(model_params, config, plan.checkpointing)
    train_examples, val_examples = (
        train_data.tokenize(tokenizer, table, model_params.max_seq_length, name, directive=model_params.directive)
        for table, name in ((plan.train_table, "train"), (plan.val_table, "val")))
    validate = len(val_examples) > 0
    if not validate:
        log.info("no validation rows in %s: no early stopping, the last checkpoint is the result", plan.val_file)

    arguments = train_choices.training_arguments(config, args.checkpoints, plan.micro, plan.seed, validate,
                                                 plan.processes)
    global_zero = arguments.process_index == 0  # global rank 0, on whichever node: it alone writes files
    if global_zero:  # the other processes, on every node, wait for it
        # num_gpus as the processes actually used: they set the data order and the accumulation.
        made_from = fingerprint(dataclasses.asdict(model_params),
                                dataclasses.asdict(dataclasses.replace(config, num_gpus=plan.processes)), plan.seed,
                                model_identity(model_params), plan.train_file, plan.val_file, *stage_code("train"))
        train_checkpoints.prepare_checkpoints(args.checkpoints, made_from)
    resume = train_checkpoints.resume_point(args.checkpoints, arguments.process_index)
    resumed_from = train_checkpoints.checkpoint_step(resume) if resume else 0
    # Rank 0 alone logs: dvclive clears and writes its folder, which ranks must not do at once.
    clock = train_output.step_clock()
    callbacks = [clock, *([train_output.live_callback(args.live, resumed_from)] if global_zero else []),
                 *extra_callbacks]
    if validate and config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = BalancedTrainer(model=model, args=arguments, train_dataset=train_examples,
                              eval_dataset=val_examples if validate else None,
                              data_collator=train_data.collator(tokenizer, config.packing), callbacks=callbacks,
                              attention_weight=attention_weight(plan.model_config))
    if trainer.pop_callback(ProgressCallback):  # the bar stays; its log lines become plain ones
        trainer.add_callback(train_output.progress_callback())
    log.info("%s backend, %d train / %d val examples, micro-batch %d x accumulation %d x %d process(es)%s%s",
             plan.backend, len(train_examples), len(val_examples), plan.micro,
             trainer.args.gradient_accumulation_steps, trainer.args.world_size,
             " (packed: sequences per micro-batch vary, tokens balanced)" if config.packing else "",
             f", resuming from {resume}" if resume else "")
    log.info("gradient checkpointing %s (%s)", "on" if plan.checkpointing else "off", plan.why_checkpointing)
    tokens_before = (TrainerState.load_from_json(str(resume / "trainer_state.json")).num_input_tokens_seen
                     if resume else 0)
    return Run(trainer, model, tokenizer, validate, global_zero, resume, resumed_from, tokens_before, clock)


def write_outputs(plan: Plan, run: Run, args: argparse.Namespace, output, wall_seconds: float) -> None:
    """The adapter (the best checkpoint's weights), the merged model, metrics and run statistics, each whole."""
    from stages.training import checkpoints as train_checkpoints
    from stages.training import output as train_output

    trainer, model, tokenizer, backend = run.trainer, run.model, run.tokenizer, plan.backend
    with atomic_dir(args.adapter) as tmp:  # load_best_model_at_end: the model holds the best checkpoint
        train_output.save_adapter(model, tokenizer, tmp)
    with atomic_dir(args.merged) as tmp:
        train_output.export_merged(model, tokenizer, tmp, backend, plan.config.merge_16bit)
    metrics, stats = train_output.summary(trainer, output, wall_seconds, run.resumed_from, run.tokens_before,
                                          run.clock)
    base_weights = "4-bit" if backend == "unsloth" and plan.config.load_in_4bit else str(model.dtype).removeprefix(
        "torch.")
    write_json(args.metrics, metrics | {"backend": backend, "base_weights": base_weights,
                                        "gradient_checkpointing": plan.checkpointing})
    write_json(args.run_stats, stats)
    train_checkpoints.mark_finished(args.checkpoints)
    log.info("adapter -> %s (%s)", args.adapter,
             f"best val loss {trainer.state.best_metric} at {trainer.state.best_model_checkpoint}" if run.validate
             else f"last step {trainer.state.global_step}, no validation split")


def main(argv: list[str] | None = None, extra_callbacks: tuple = ()) -> None:
    """extra_callbacks: more Trainer callbacks (benchmarks that time the run from inside, bench/train_phases.py)."""
    args = parse_args(argv)
    plan = check(args)
    if plan.config.num_gpus > 1 and not plan.worker:  # this process starts the DDP processes and waits
        if code := relaunch_distributed(plan.config.num_gpus, sys.argv[1:] if argv is None else argv):
            raise cli.StageError(f"train: a distributed worker failed (exit code {code}); see its log above")
        return
    if plan.processes != plan.config.num_gpus and rank_zero():
        log.info("train.num_gpus=%d is ignored: torchrun started %d processes (WORLD_SIZE), which set the "
                 "accumulation", plan.config.num_gpus, plan.processes)
    run = prepare(plan, args, extra_callbacks)
    started = time.perf_counter()
    output = run.trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
    if run.global_zero:  # one adapter, however many nodes
        write_outputs(plan, run, args, output, time.perf_counter() - started)


if __name__ == "__main__":
    cli.run(main, kept="the checkpoints in models/checkpoints/ (one every train.eval_every_steps); `dvc repro` "
            "resumes from the last one")
