"""Benchmark: filter + stratify on a synthetic Magpie data set of the real size (250,000 rows,
responses of 2-20 KB, 20 shards); reports wall time and peak RSS of each stage's process.

    python -m bench.filter_speed [--rows 250000] [--shards 20] [--workdir /tmp/bench-filter] [--tokenizer tiny|none|DIR]
                                 [--workers 1,2] [--out bench/results/NAME.json --commit SHA]

Each count of filter.workers runs the filter in the same call (then stratify once); their outputs and funnels must
be byte-identical, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from stages.core.cli import usable_cpus
from tests import eval_data, magpie_data, tiny_model
from tests.dvc_stages import project_pythonpath, stage_args

ROOT = Path(__file__).resolve().parents[1]
COMMON = ("we add the two numbers then divide by three so x equals wait let me double check that the sum "
          "of squares is hmm actually no answer frac one half since derivative sine").split()
# Rough shares of the real data: about half Math, a third of inputs rated excellent.
CATEGORY_WEIGHTS = [50, 15, 15, 10, 5, 5]
QUALITY_WEIGHTS = [3, 7, 25, 30, 35]


SYLLABLES = ("ta re ing tion con pro com ex in de al er ous ent ple ma the ter ver sum plu min fac tor ang ule "
             "ra di us pol y no mi al ge o met ric se ries lim it cal cu lus vec ma trix prime equ a lit").split()


def vocabulary(rng: np.random.Generator, words: int = 200_000, numbers: int = 1_000_000):
    """Text units and their probabilities, shaped like reasoning text: words of a Zipfian vocabulary
    (English-like syllables; some followed by punctuation or a paragraph break) and a long tail of
    numbers and LaTeX, 15% of units. Units are drawn independently for every row, so rows share words
    but rarely whole passages."""
    invented = ["".join(rng.choice(SYLLABLES, size=n)) for n in rng.integers(1, 5, size=words - len(COMMON))]
    forms, shares = ["{}", "{},", "{}.", "{}.\n\n"], [0.84, 0.08, 0.06, 0.02]
    units = [form.format(word) for word in [*COMMON, *invented] for form in forms]
    zipf = 1.0 / np.arange(1, words + 1) ** 1.05
    weights = (zipf[:, None] / zipf.sum() * np.array(shares)).ravel() * 0.85
    templates = ["{}", "{},", "${}$", "x^{{{}}}", "\\frac{{{}}}{{7}}", "{}.5", "({}", "={}"]
    values = (10 ** rng.uniform(0, 5, size=numbers)).astype(int)  # log-uniform: small numbers are common
    units += [templates[k % len(templates)].format(v) for k, v in enumerate(values)]
    weights = np.concatenate([weights, np.full(numbers, 0.15 / numbers)])
    return np.array(units, dtype=object), weights / weights.sum()


def write_dataset(directory: Path, rows: int, shards: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    units, weights = vocabulary(rng)
    per_shard = rows // shards
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        sizes = rng.integers(2_000, 20_000, size=per_shard) // 7  # ~7 characters per unit and space
        drawn = units[rng.choice(len(units), size=int(sizes.sum()) + 80 * per_shard, p=weights)]
        offsets = np.concatenate([[0], np.cumsum(sizes + 80)])
        batch = []
        for j, i in enumerate(range(k * per_shard, (k + 1) * per_shard)):
            lo, hi = offsets[j], offsets[j + 1]
            reasoning = " ".join(drawn[lo + 80:hi]).replace("\n\n ", "\n\n")  # paragraphs start flush
            response = f"<think>\n{reasoning}\n</think>\n\nThe answer is $\\boxed{{{i}}}$."
            batch.append(magpie_data.row(
                i, instruction=f"Problem {i}: " + " ".join(drawn[lo:lo + rng.integers(12, 80)]), response=response,
                difficulty=magpie_data.DIFFICULTIES[rng.choice(5, p=[1 / 13, 3 / 13, 5 / 13, 3 / 13, 1 / 13])],
                input_quality=magpie_data.QUALITIES[rng.choice(5, p=np.array(QUALITY_WEIGHTS) / 100)],
                task_category=magpie_data.CATEGORIES[rng.choice(6, p=np.array(CATEGORY_WEIGHTS) / 100)]))
        pq.write_table(magpie_data.table(batch), directory / f"train-{k:05d}-of-{shards:05d}.parquet")
        print(f"wrote shard {k + 1}/{shards}", file=sys.stderr)


RUN_STAGE = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run_stage(workdir: Path, module: str, *args: str) -> dict:
    env = os.environ | {"PYTHONPATH": project_pythonpath(), "HF_HUB_OFFLINE": "1"}
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
    parser.add_argument("--workers", default="1,2", help="filter.workers counts to run, comma-separated")
    parser.add_argument("--out", type=Path, help="also write the JSON here (bench/results/...)")
    parser.add_argument("--commit", default="", help="the commit measured, recorded in the JSON")
    parser.add_argument("--tokenizer", default="tiny",
                        help="tiny: the tests' tokenizer; none: no length check; or a tokenizer directory "
                             "(bench/qwen_tokenizer.py builds the real Qwen2 vocabulary offline)")
    args = parser.parse_args()

    raw = args.workdir / f"raw-v2-{args.rows}x{args.shards}"
    if not raw.exists():
        write_dataset(raw, args.rows, args.shards)
    config = yaml.safe_load((ROOT / "params.yaml").read_text())
    config["filter"]["check_length"] = args.tokenizer != "none"
    if args.tokenizer == "tiny":
        config["model"]["name"] = str(tiny_model.build(args.workdir / "tiny-r1", with_weights=False))
    elif args.tokenizer != "none":
        config["model"]["name"] = str(Path(args.tokenizer).resolve())
    # decontamination runs too, against the fixture problems
    eval_sets = eval_data.write_sets(args.workdir / "eval-sets", args.workdir / "eval-sources")
    gib = sum(f.stat().st_size for f in raw.glob("*.parquet")) / 2**30
    runs, outputs = {}, set()
    for workers in [int(w) for w in args.workers.split(",")]:
        config["filter"]["workers"] = workers
        (args.workdir / "params.yaml").write_text(yaml.safe_dump(config))
        runs[workers] = run_stage(args.workdir, "stages.filter", *stage_args("filter", raw=raw, eval_sets=eval_sets))
        outputs.add(tuple(hashlib.sha256((args.workdir / name).read_bytes()).hexdigest()
                          for name in ("data/filtered.parquet", "metrics/data.json")))
    if len(outputs) != 1:
        raise SystemExit(f"filter outputs differ between worker counts {sorted(runs)}")
    stratify_run = run_stage(args.workdir, "stages.stratify", *stage_args("stratify"))
    funnel = json.loads((args.workdir / "metrics" / "data.json").read_text())
    result = {"date": datetime.date.today().isoformat(), "commit": args.commit,
              "command": " ".join(["python -m bench.filter_speed", *sys.argv[1:]]),
              "rows_in": funnel["rows_in"], "rows_out": funnel["rows_out"], "parquet_gib": round(gib, 2),
              "tokenizer": args.tokenizer, "cpus": usable_cpus(), "machine": platform.machine(),
              "filter_by_workers": {str(k): v for k, v in runs.items()}, "outputs_identical": True,
              "stratify": stratify_run,
              "total_seconds_by_workers": {str(k): round(v["seconds"] + stratify_run["seconds"], 1)
                                           for k, v in runs.items()}}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
