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


def main(argv: list[str] | None = None, extra_callbacks: tuple = ()) -> None:
    """extra_callbacks: more Trainer callbacks (benchmarks that time the run from inside, bench/train_phases.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--splits", type=Path, default=Path("data/splits"),
                        help="in: stratify's train.parquet and val.parquet")
    parser.add_argument("--adapter", type=Path, default=Path("models/adapter"),
                        help="out: the LoRA adapter (the best checkpoint's weights) and tokenizer")
    parser.add_argument("--merged", type=Path, default=Path("models/merged"),
                        help="out: the base model with the adapter merged in (train.merge_16bit)")
    parser.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"),
                        help="in/out: checkpoints a stopped run resumes from")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train.json"),
                        help="out: losses, steps, batch geometry (dvc metrics)")
    parser.add_argument("--live", type=Path, default=Path("metrics/train"),
                        help="out: dvclive's loss and learning-rate curves (dvc plots)")
    parser.add_argument("--run-stats", type=Path, default=Path("reports/train_run.json"),
                        help="out: speed, wall time and memory of the run (not a metric: they vary run to run)")
    args = parser.parse_args(argv)

    config = params.load("train")
    model_params = params.load("model")
    seed = params.load_seed()
    # These import torch only; transformers comes after Unsloth.
    from stages.training import checkpoints as train_checkpoints
    from stages.training import choices as train_choices
    from stages.training import data as train_data
    from stages.training import model as train_model
    from stages.training import output as train_output

    # Everything that can fail is checked before the checkpoints of an earlier run are touched.
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
    if config.num_gpus > 1 and not worker:
        if memory is None:  # no CUDA
            log.warning("train.num_gpus=%d without CUDA: %d CPU processes (DDP over gloo), which only tests use; "
                        "set train.num_gpus: 1 for one CPU process", config.num_gpus, config.num_gpus)
        if code := relaunch_distributed(config.num_gpus, sys.argv[1:] if argv is None else argv):
            raise cli.StageError(f"train: a distributed worker failed (exit code {code}); see its log above")
        return
    if processes != config.num_gpus and rank_zero():
        log.info("train.num_gpus=%d is ignored: torchrun started %d processes (WORLD_SIZE), which set the "
                 "accumulation", config.num_gpus, processes)

    from transformers import EarlyStoppingCallback, set_seed

    from stages.core.base_model import load_tokenizer
    from stages.training.order import BalancedTrainer, attention_weight

    set_seed(seed)  # LoRA weights are initialized before the Trainer would seed anything
    if backend == "unsloth":
        model, tokenizer = train_model.load_unsloth(model_params, config, seed, checkpointing)
    else:
        tokenizer = load_tokenizer(model_params)
        model = train_model.load_peft(model_params, config, checkpointing)
    train_examples = train_data.tokenize(tokenizer, train_table, model_params.max_seq_length, "train",
                                         directive=model_params.directive)
    val_examples = train_data.tokenize(tokenizer, val_table, model_params.max_seq_length, "val",
                                       directive=model_params.directive)
    validate = len(val_examples) > 0
    if not validate:
        log.info("no validation rows in %s: no early stopping, the last checkpoint is the result", val_file)

    arguments = train_choices.training_arguments(config, args.checkpoints, micro, seed, validate, processes)
    global_zero = arguments.process_index == 0  # global rank 0, on whichever node: it alone writes files
    if global_zero:  # the other processes, on every node, wait for it
        # num_gpus as the processes actually used: they set the data order and the accumulation.
        made_from = fingerprint(dataclasses.asdict(model_params),
                                dataclasses.asdict(dataclasses.replace(config, num_gpus=processes)), seed,
                                model_identity(model_params), train_file, val_file, *stage_code("train"))
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
                              attention_weight=attention_weight(model_config))
    from transformers import ProgressCallback

    if trainer.pop_callback(ProgressCallback):  # the bar stays; its log lines become plain ones
        trainer.add_callback(train_output.progress_callback())
    log.info("%s backend, %d train / %d val examples, micro-batch %d x accumulation %d x %d process(es)%s%s",
             backend, len(train_examples), len(val_examples), micro, trainer.args.gradient_accumulation_steps,
             trainer.args.world_size, " (packed: sequences per micro-batch vary, tokens balanced)" if config.packing
             else "", f", resuming from {resume}" if resume else "")
    log.info("gradient checkpointing %s (%s)", "on" if checkpointing else "off", why)
    tokens_before = 0
    if resume:
        from transformers import TrainerState

        tokens_before = TrainerState.load_from_json(str(resume / "trainer_state.json")).num_input_tokens_seen
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall_seconds = time.perf_counter() - started

    if global_zero:  # one adapter, however many nodes
        with atomic_dir(args.adapter) as tmp:  # the best checkpoint's weights (load_best_model_at_end)
            train_output.save_adapter(model, tokenizer, tmp)
        with atomic_dir(args.merged) as tmp:
            train_output.export_merged(model, tokenizer, tmp, backend, config.merge_16bit)
        metrics, run = train_output.summary(trainer, output, wall_seconds, resumed_from, tokens_before, clock)
        base_weights = "4-bit" if backend == "unsloth" and config.load_in_4bit else str(model.dtype).removeprefix(
            "torch.")
        write_json(args.metrics, metrics | {"backend": backend, "base_weights": base_weights,
                                            "gradient_checkpointing": checkpointing})
        write_json(args.run_stats, run)
        train_checkpoints.mark_finished(args.checkpoints)
        log.info("adapter -> %s (%s)", args.adapter,
                 f"best val loss {trainer.state.best_metric} at {trainer.state.best_model_checkpoint}" if validate
                 else f"last step {trainer.state.global_step}, no validation split")


if __name__ == "__main__":
    cli.run(main, kept="the checkpoints in models/checkpoints/ (one every train.eval_every_steps); `dvc repro` "
            "resumes from the last one")
