"""Benchmark: the train stage itself on 1 GPU and on N GPUs (train.num_gpus, DDP under torchrun), same data,
seed and 16 sequences per step, on the real 1.5B shape (random weights): tokens/s of each (after the first
step, which holds compilation; over the second half of the steps, past the slower early ones; and of the whole
run), their ratios, the
per-step loss curves side by side, and each GPU's peak use while the run lasted.

    python -m tests.random_model /tmp/r1
    python -m bench.train_gpus /tmp/r1 --gpus 1,2 --steps 20 [--backend unsloth|peft] [--out FILE --commit SHA]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tests.dvc_stages import stage_command

ROOT = Path(__file__).resolve().parents[1]
WORDS = "find x if two x plus three equals seven wait so the answer is boxed".split()


def write_project(project: Path, model_dir: str, gpus: int, steps: int, backend: str, rows: int, seed: int,
                  max_seq_length: int = 4096) -> None:
    """params.yaml for model_dir, and a train split of `rows` examples of up to max_seq_length / 4 words (about
    256 to 3,300 tokens at 4096), made the same way for every run; the val split is empty (no evaluation pauses)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(name=model_dir, max_seq_length=max_seq_length)
    raw["train"].update(num_gpus=gpus, max_steps=steps, epochs=1, eval_every_steps=10 * steps, backend=backend)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    rng = random.Random(seed)
    longest = max_seq_length // 4  # words: the random model's tokenizer spends about 3.2 tokens on each
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(longest // 15, longest))) for _ in range(rows)]
    table = pa.table({"instruction": [f"Problem {i}: what is {i} + {i}?" for i in range(rows)],
                      "reasoning": text, "answer": [f"The answer is \\boxed{{{2 * i}}}." for i in range(rows)]})
    splits = project / "data" / "splits"
    splits.mkdir(parents=True)
    pq.write_table(table, splits / "train.parquet")
    pq.write_table(table.slice(0, 0), splits / "val.parquet")


def watch_gpus(samples: list[list[tuple[int, int]]], stop: threading.Event) -> None:
    """Every second: (utilization %, memory MiB) of each GPU, from nvidia-smi."""
    while not stop.wait(1.0):
        if not shutil.which("nvidia-smi"):
            return
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        samples.append([tuple(int(v) for v in line.split(", ")) for line in out.strip().splitlines()])


def run(model_dir: str, gpus: int, steps: int, backend: str, rows: int, max_seq_length: int) -> dict:
    project = Path(tempfile.mkdtemp(prefix=f"train-{gpus}gpu-"))
    write_project(project, model_dir, gpus, steps, backend, rows, seed=0, max_seq_length=max_seq_length)
    samples: list[list[tuple[int, int]]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_gpus, args=(samples, stop), daemon=True)
    watcher.start()
    started = time.perf_counter()
    process = subprocess.run(stage_command("train"), cwd=project, capture_output=True, text=True,
                             env=os.environ | {"PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    result = {"gpus": gpus, "backend": backend, "exit_code": process.returncode, "seconds": round(seconds, 1)}
    if process.returncode:
        return result | {"log_tail": (process.stdout + process.stderr)[-3000:]}
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    metrics |= json.loads((project / "reports" / "train_run.json").read_text())  # speed and time: no metrics
    per_step = project / "metrics" / "train" / "plots" / "metrics" / "loss.tsv"  # train/loss.tsv: the run's mean
    losses = {int(row["step"]): round(float(row["loss"]), 4)
              for row in csv.DictReader(per_step.open(), delimiter="\t")}
    adapter = project / "models" / "adapter"
    peaks = [max(s[g][k] for s in samples) for g in range(len(samples[0])) for k in (0, 1)] if samples else []
    return result | {
        "tokens_per_second": round(metrics["tokens_per_second"]),
        "tokens_per_second_after_first_step": round(metrics["tokens_per_second_after_first_step"]),
        "tokens_per_second_second_half": round(metrics["tokens_per_second_second_half"]),
        "micro_batch_size": metrics["micro_batch_size"], "accumulation": metrics["gradient_accumulation_steps"],
        "processes": metrics["processes"], "steps": metrics["steps"], "train_loss": metrics["train_loss"],
        "peak_utilization_and_memory_mib_per_gpu": [peaks[i:i + 2] for i in range(0, len(peaks), 2)],
        "adapter_files": sorted(p.name for p in adapter.iterdir()) if adapter.is_dir() else None,
        "loss_per_step": [losses[s] for s in sorted(losses)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--gpus", default="1,2", help="comma-separated GPU counts, run in this order")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=400, help="training rows (16 a step)")
    parser.add_argument("--backend", default="unsloth")
    parser.add_argument("--max-seq-length", type=int, default=4096, help="model.max_seq_length (longer rows dropped)")
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"gpu": gpu, "date": datetime.date.today().isoformat(), "commit": args.commit, "runs": []}
    for gpus in (int(n) for n in args.gpus.split(",")):
        results["runs"].append(run(args.model_dir, gpus, args.steps, args.backend, args.rows, args.max_seq_length))
        print(json.dumps(results["runs"][-1]), flush=True)
    done = [r for r in results["runs"] if not r["exit_code"]]
    if len(done) >= 2:
        one, more = done[0], done[-1]
        results["speedup"] = round(more["tokens_per_second_after_first_step"]
                                   / one["tokens_per_second_after_first_step"], 2)
        results["speedup_whole_run"] = round(more["tokens_per_second"] / one["tokens_per_second"], 2)
        # the same sequences in both runs' second halves: the speed past the slower early steps
        results["speedup_second_half"] = round(more["tokens_per_second_second_half"]
                                               / one["tokens_per_second_second_half"], 2)
        steps = min(len(one["loss_per_step"]), len(more["loss_per_step"]))
        results["largest_loss_difference"] = round(max(
            abs(a - b) for a, b in zip(one["loss_per_step"][:steps], more["loss_per_step"][:steps], strict=True)), 4)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
