"""Builders of evaluation files in the layouts the hub publishes: GSM8K (Parquet: question, answer
with '#### gold') and MATH-500 (JSON lines: problem, solution, answer, subject, level, unique_id).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

GSM8K = [("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?",
          "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"),
         ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
          "How much did she earn?", "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10"),
         ("A company paid 1,200 dollars a month for 12 months. How much did it pay?", "12*1200=14400\n#### 14,400")]
MATH500 = [("Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
            "\\left( 3, \\frac{\\pi}{2} \\right)", "Precalculus", 2),
           ("What is $\\frac{1}{2} + \\frac{1}{3}$?", "\\frac{5}{6}", "Prealgebra", 1),
           ("Find the smallest positive integer $n$ such that $n^2 > 50$.", "8", "Number Theory", 3)]


def write_gsm8k(directory: Path) -> Path:
    path = directory / "main" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"question": [q for q, _ in GSM8K], "answer": [a for _, a in GSM8K]}), path)
    return path


def write_math500(directory: Path) -> Path:
    path = directory / "test.jsonl"
    directory.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, (problem, answer, subject, level) in enumerate(MATH500):
            f.write(json.dumps({"problem": problem, "solution": f"... so $\\boxed{{{answer}}}$.", "answer": answer,
                                "subject": subject, "level": level, "unique_id": f"test/{subject}/{i}.json"}) + "\n")
    return path


def write_all(directory: Path) -> dict[str, Path]:
    """Both sets under directory; returns name -> the folder to use as its eval_data source."""
    return {"gsm8k": write_gsm8k(directory / "gsm8k").parents[1],
            "math500": write_math500(directory / "math500").parent}


def write_sets(out: Path, sources: Path) -> Path:
    """Both sets as fetch_eval leaves them (out/{name}.parquet, one shape), from files written under sources."""
    from stages.data.eval_sets import READERS, read_files

    out.mkdir(parents=True, exist_ok=True)
    for name, source in write_all(sources).items():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        pq.write_table(READERS[name](read_files(files), name, "fixture"), out / f"{name}.parquet")
    return out
