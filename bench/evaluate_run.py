"""Time the evaluate and report stages end to end, as `dvc repro` runs them, on a local model (e.g. the
1.5B-shaped random model: its responses never end by themselves, so every one runs the whole budget).

    python -m tests.random_model /tmp/r1 && python -m bench.evaluate_run /tmp/r1 --limit 16 --max-new-tokens 8192

Prints one JSON line: the GPU, the workload and the wall seconds of each stage. MATH-500 problems come from
tests/assets (the real set); the fine-tuned model is the base with a random rank-8 LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests.dvc_stages import project_pythonpath, stage_command

ROOT = Path(__file__).resolve().parents[1]


def make_project(workdir: Path, model_dir: str, limit: int, max_new_tokens: int, batch_size: str | int) -> None:
    from stages.data.eval_sets import math500, read_files
    from tests import magpie_data
    from tests.conftest import splits_table
    from tests.test_evaluate import make_adapter

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["name"] = model_dir
    raw["eval"].update(sets=["math500"], limit=limit, samples=1, max_new_tokens=max_new_tokens, batch_size=batch_size)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sets = workdir / "data" / "eval" / "sets"
    sets.mkdir(parents=True)
    table = math500(read_files([ROOT / "tests" / "assets" / "math500_test.jsonl"]), "math500", "tests/assets")
    pq.write_table(table, sets / "math500.parquet")
    (workdir / "data" / "splits").mkdir(parents=True)
    pq.write_table(splits_table(magpie_data.clean_rows(2)), workdir / "data" / "splits" / "test.parquet")
    make_adapter(model_dir, workdir / "models" / "adapter")


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    path = project_pythonpath()
    subprocess.run(command, cwd=cwd, check=True, env=os.environ | {"PYTHONPATH": path})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--limit", type=int, default=16, help="MATH-500 problems")
    parser.add_argument("--max-new-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", default="auto")
    args = parser.parse_args()
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_project(workdir, str(Path(args.model_dir).resolve()), args.limit, args.max_new_tokens, batch_size)
        evaluate_seconds = timed(stage_command("evaluate"), workdir)
        report_seconds = timed(stage_command("report"), workdir)
        generated = pq.read_table(workdir / "data" / "eval" / "samples.parquet",
                                  columns=["response_tokens"])["response_tokens"].to_pylist()
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "workload": {"set": "math500", "problems": args.limit, "models": 2, "max_new_tokens": args.max_new_tokens,
                     "batch_size": batch_size, "generated_tokens": sum(generated)},
        "evaluate_seconds": round(evaluate_seconds, 1), "report_seconds": round(report_seconds, 1),
        "generated_tokens_per_second": round(sum(generated) / evaluate_seconds, 1),
    }))


if __name__ == "__main__":
    main()
