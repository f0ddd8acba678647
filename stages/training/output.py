"""What a training run leaves: the numbers of metrics/train.json, the adapter (and, when asked, the merged
16-bit model) in stable bytes, and per-step curves through dvclive.

Imports torch only; transformers is imported inside functions, so stages/train.py can import Unsloth first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.core.artifacts import atomic_file
from stages.training.checkpoints import checkpoint_step


def step_clock(synchronize: bool = False):
    """A callback that notes the time and tokens seen at the end of every optimizer step (synchronize: after
    waiting for the GPU, as benchmarks timing single steps want; the stage's logging waits a moment later
    anyway), so speed can be given without the first step (Unsloth's compilation, kernel tuning and CUDA
    start-up land there), and over the second half of the steps: the next few steps are slower still (on an
    H100 1.7 s, then about 1.0 s from the eighth; probably compilation for new micro-batch lengths), which a
    long run does not feel."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if synchronize:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def tokens_per_second_after_first_step(self) -> float | None:
            return self.tokens_per_second_since(0)

        def tokens_per_second_second_half(self) -> float | None:
            return self.tokens_per_second_since((len(self.marks) - 1) // 2)

        def tokens_per_second_since(self, mark: int) -> float | None:
            if len(self.marks) < 2:
                return None
            (start, seen), (end, last) = self.marks[mark], self.marks[-1]
            return (last - seen) / (end - start) if end > start else None

    return StepClock()


def summary(trainer, train_output, wall_seconds: float, resumed_from: int, tokens_before: int,
            clock=None) -> tuple[dict, dict]:
    """(metrics, run): what metrics/train.json keeps (losses, where and why training ended, the batch geometry:
    micro-batch x accumulation x processes = train.sequences_per_step, and how it ran: optimizer), and the run's
    speed, time and memory, which differ on every run: they go to a file `dvc metrics diff` does not compare."""
    state, args = trainer.state, trainer.args
    evals = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    best_step = checkpoint_step(state.best_model_checkpoint) if state.best_model_checkpoint else None
    tokens = state.num_input_tokens_seen - tokens_before
    runtime = train_output.metrics.get("train_runtime") or wall_seconds
    metrics = {
        "train_loss": train_output.training_loss,
        "validated": bool(evals),  # false: no validation split, so no early stopping and the last step is the result
        "val_loss": {"best": state.best_metric, "last": evals[-1] if evals else None, "evaluations": len(evals)},
        "best_step": best_step,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs_run": state.epoch,
        "stopped_early": state.global_step < state.max_steps,
        "resumed_from_step": resumed_from,
        "micro_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "tokens_seen": state.num_input_tokens_seen,
        "optimizer": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
        "compute_dtype": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",  # each process's kind
    }
    run = {
        "tokens_per_second": tokens / runtime if runtime else None,
        "tokens_per_second_after_first_step": clock.tokens_per_second_after_first_step() if clock else None,
        "tokens_per_second_second_half": clock.tokens_per_second_second_half() if clock else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "wall_seconds": wall_seconds,
    }
    return metrics, run


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
    class Quiet(Live):
        """Live without the Studio update it assembles at every step when no Studio is set up (dvclive 3.49
        re-reads the params file and every curve file to build it, then drops it): a cost that grows with
        the steps, quadratic over a run, paid on rank 0 while the other ranks wait."""

        def post_data_to_studio(self):
            if "data" not in getattr(self, "_studio_events_to_skip", ()):
                super().post_data_to_studio()

    return StepAligned(live=Quiet(str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=bool(resumed_from)))


def step_line(logs: dict, step: int, max_steps: int) -> str:
    """One plain log line for one logging step: `step 50/3566: loss 0.6123, grad_norm 0.3402, ...`."""
    values = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in logs.items() if key != "total_flos")
    return f"step {step}/{max_steps}: {values}"


def progress_callback():
    """transformers' progress bar, writing step_line for each logging step instead of a dict of quoted numbers."""
    from transformers import ProgressCallback

    class StepLines(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(step_line(logs, state.global_step, state.max_steps))

    return StepLines()
