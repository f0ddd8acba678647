"""Benchmark: where a step of the train stage goes, per rank. The stage itself runs on bench.train_gpus'
project (random 1.5B-shaped weights, synthetic sequences of ~256-3,300 tokens, 16 a step) with one more
callback, which waits for the GPU at each Trainer event and notes the time; printed per GPU count and
rank: mean milliseconds of each micro-batch (forward and backward; the last one also holds DDP's gradient
all-reduce and gradient clipping), the optimizer step (with the step's token count, summed over the ranks),
and what comes after it (logging, the next batch), over the steps from --skip on.

    python -m tests.random_model /tmp/r1
    python -m bench.train_phases /tmp/r1 --gpus 1,2 --steps 20 [--no-allreduce] [--out FILE]

The waits slow each step a little: compare phases here, speeds with bench.train_speed / train_gpus.
--no-allreduce runs every micro-batch under DDP's no_sync (wrong training; it times what the all-reduce
costs). Under torchrun the module runs as each rank's worker (--worker).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.dvc_stages import stage_args

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ("on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")


def phase_clock():
    """A Trainer callback noting (event, optimizer step, seconds) at each event of EVENTS, after waiting for
    the GPU; its `marks` are what summarize() reads. transformers is imported here, after the stage's
    backend (Unsloth patches transformers, so it must come first)."""
    import torch
    from transformers import TrainerCallback

    class PhaseClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[str, int, float]] = []

    def noting(event):
        def note(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((event, state.global_step, time.perf_counter()))
        return note

    for event in EVENTS:
        setattr(PhaseClock, event, noting(event))
    return PhaseClock()


def summarize(marks: list[tuple[str, int, float]], skip: int) -> dict:
    """Mean milliseconds of each phase over the steps that begin at optimizer step `skip` or later (the
    first ones hold compilation) and have a next step: each micro-batch (the last one ends at the
    optimizer's pre-step event), the optimizer step, what comes after it up to the next step's begin
    (logging, the next batch), and the whole step."""
    begins = [i for i, (event, _, _) in enumerate(marks) if event == "on_step_begin"]
    steps = []
    for begin, following in zip(begins, begins[1:], strict=False):
        if marks[begin][1] < skip:
            continue
        at = {event: seconds for event, _, seconds in marks[begin:following]}  # the last of each event
        ends = [seconds for event, _, seconds in marks[begin + 1:following]
                if event in ("on_substep_end", "on_pre_optimizer_step")]
        starts = [marks[begin][2], *ends[:-1]]
        steps.append({"micro_batches": [end - start for start, end in zip(starts, ends, strict=True)],
                      "optimizer": at["on_optimizer_step"] - at["on_pre_optimizer_step"],
                      "after_optimizer": marks[following][2] - at["on_optimizer_step"],
                      "step": marks[following][2] - marks[begin][2]})
    if not steps:
        return {"steps": 0}

    def mean_ms(values) -> float:
        return round(1e3 * statistics.fmean(values), 1)

    micro_batches = len(steps[0]["micro_batches"])
    return {"steps": len(steps), "step_ms": mean_ms([s["step"] for s in steps]),
            "micro_batch_ms": [mean_ms([s["micro_batches"][i] for s in steps]) for i in range(micro_batches)],
            "optimizer_ms": mean_ms([s["optimizer"] for s in steps]),
            "after_optimizer_ms": mean_ms([s["after_optimizer"] for s in steps])}


def worker(out: Path, no_allreduce: bool) -> None:
    """One rank: the train stage in this folder (its params.yaml and splits), timed by phase_clock."""
    from stages import train
    from stages.core import params
    from stages.training import choices as train_choices

    if train_choices.resolve_backend(params.load("train").backend) == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as the stage does)
    if no_allreduce:
        from contextlib import nullcontext

        from stages.training import order as train_order

        training_step = train_order.BalancedTrainer.training_step

        def unsynced(self, model, *args, **kwargs):
            with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
                return training_step(self, model, *args, **kwargs)

        train_order.BalancedTrainer.training_step = unsynced
    clock = phase_clock()
    train.main(stage_args("train"), extra_callbacks=(clock,))
    rank = os.environ.get("RANK", "0")
    out.with_name(f"{out.stem}-rank{rank}.json").write_text(json.dumps(clock.marks))


def run(model_dir: str, gpus: int, steps: int, skip: int, no_allreduce: bool, backend: str) -> dict:
    from bench.train_gpus import write_project
    from stages.train import NO_NVLINK_MULTICAST

    project = Path(tempfile.mkdtemp(prefix=f"phases-{gpus}gpu-"))
    write_project(project, model_dir, gpus, steps, backend, rows=20 * steps, seed=0)
    out = project / "marks.json"
    module = ["-m", "bench.train_phases", "--worker", str(out)] + (["--no-allreduce"] if no_allreduce else [])
    launcher = [sys.executable] if gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    path = {"PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.run([*launcher, *module], cwd=project, capture_output=True, text=True,
                             env=os.environ | NO_NVLINK_MULTICAST | path)
    if process.returncode:
        return {"gpus": gpus, "exit_code": process.returncode, "log_tail": (process.stdout + process.stderr)[-3000:]}
    ranks = sorted(project.glob("marks-rank*.json"))
    return {"gpus": gpus, "exit_code": 0, "no_allreduce": no_allreduce,
            "ranks": [summarize([tuple(m) for m in json.loads(path.read_text())], skip) for path in ranks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--gpus", default="1,2", help="comma-separated GPU counts, run in this order")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=8, help="optimizer steps left out of the means (warm-up)")
    parser.add_argument("--no-allreduce", action="store_true", help="DDP never syncs gradients (timing only)")
    parser.add_argument("--backend", default="unsloth")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.no_allreduce)
        return
    if not args.model_dir:
        parser.error("model_dir is required")
    results = []
    for gpus in (int(n) for n in args.gpus.split(",")):
        results.append(run(args.model_dir, gpus, args.steps, args.skip, args.no_allreduce, args.backend))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
