"""Benchmark: filter + stratify on a synthetic Magpie data set of the real size (250,000 rows,
responses of 2-20 KB, 20 shards); reports wall time and peak RSS of each stage's process.

    python -m bench.filter_speed [--rows 250000] [--shards 20] [--workdir /tmp/bench-filter] [--tokenizer tiny|none]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests import eval_data, magpie_data, tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("we add the two numbers then divide by three so x equals wait let me double check that the sum "
         "of squares is forty two hmm actually no the answer is frac one half since derivative of sine").split()
# Rough shares of the real data: about half Math, a third of inputs rated excellent.
CATEGORY_WEIGHTS = [50, 15, 15, 10, 5, 5]
QUALITY_WEIGHTS = [3, 7, 25, 30, 35]

RUN_STAGE = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def write_dataset(directory: Path, rows: int, shards: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    text = " ".join(rng.choices(WORDS, k=4_000_000))  # ~20 MB to slice responses from
    per_shard = rows // shards
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        batch = []
        for i in range(k * per_shard, (k + 1) * per_shard):
            size = rng.randint(2_000, 20_000)
            start = rng.randrange(len(text) - size)
            reasoning = text[start:start + size - 200]
            response = f"<think>\n{reasoning}\n</think>\n\nThe answer is $\\boxed{{{i}}}$."
            batch.append(magpie_data.row(
                i, instruction=f"Problem {i}: {text[start:start + rng.randint(80, 400)]}", response=response,
                difficulty=rng.choices(magpie_data.DIFFICULTIES, weights=[1, 3, 5, 3, 1])[0],
                input_quality=rng.choices(magpie_data.QUALITIES, weights=QUALITY_WEIGHTS)[0],
                task_category=rng.choices(magpie_data.CATEGORIES, weights=CATEGORY_WEIGHTS)[0]))
        pq.write_table(magpie_data.table(batch), directory / f"train-{k:05d}-of-{shards:05d}.parquet")
        print(f"wrote shard {k + 1}/{shards}", file=sys.stderr)


def run_stage(workdir: Path, module: str, *args: str) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RUN_STAGE, module, *args], cwd=workdir, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{module} failed:\n{result.stderr[-3000:]}")
    peak_kb = int(result.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(peak_kb / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-filter"))
    parser.add_argument("--tokenizer", choices=["tiny", "none"], default="tiny")
    args = parser.parse_args()

    raw = args.workdir / f"raw-{args.rows}x{args.shards}"
    if not raw.exists():
        write_dataset(raw, args.rows, args.shards)
    config = yaml.safe_load((ROOT / "params.yaml").read_text())
    config["filter"]["check_length"] = args.tokenizer == "tiny"
    if args.tokenizer == "tiny":
        config["model"]["name"] = str(tiny_model.build(args.workdir / "tiny-r1", with_weights=False))
    (args.workdir / "params.yaml").write_text(yaml.safe_dump(config))

    # decontamination runs too, against the fixture problems
    eval_sets = eval_data.write_sets(args.workdir / "eval-sets", args.workdir / "eval-sources")
    gib = sum(f.stat().st_size for f in raw.glob("*.parquet")) / 2**30
    filter_run = run_stage(args.workdir, "stages.filter", "--raw", str(raw), "--eval-sets", str(eval_sets))
    stratify_run = run_stage(args.workdir, "stages.stratify")
    funnel = json.loads((args.workdir / "metrics" / "data.json").read_text())
    print(json.dumps({"rows_in": funnel["rows_in"], "rows_out": funnel["rows_out"], "parquet_gib": round(gib, 2),
                      "tokenizer": args.tokenizer, "filter": filter_run, "stratify": stratify_run,
                      "total_seconds": round(filter_run["seconds"] + stratify_run["seconds"], 1)}, indent=2))


if __name__ == "__main__":
    main()
