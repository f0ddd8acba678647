"""filter: raw Magpie Parquet shards -> data/filtered.parquet of clean, complete math reasoning rows,
plus metrics/data.json with the funnel (rows in, rows dropped by each rule, rows out) and the kept rows'
second-guess markers per 1,000 reasoning tokens and share of boxed answers.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.core import cli, params
from stages.core.artifacts import atomic_file, write_json
from stages.core.base_model import load_tokenizer
from stages.data.contamination import ContaminationIndex
from stages.data.magpie import check_schema, instruction_key
from stages.data.screening import (
    OUTPUT_SCHEMA,
    FilterError,
    Screened,
    TokenCounter,
    parts,
    screened_parts,
    worker_count,
)
from stages.scoring.overthinking import BOXED

log = logging.getLogger("stages.filter")  # not __name__: `python -m` runs a stage as __main__

# Every rule in the order it is applied; a row is counted under the first rule it breaks.
RULES = ("null_field", "task_category", "input_quality", "difficulty", "no_think_close",
         "multiple_think_close", "no_think_open", "empty_reasoning", "empty_answer", "contaminated",
         "too_long", "too_many_second_guesses", "duplicate_instruction")


def keep_first(screened: Screened, config: params.FilterParams, seen: set[bytes], dropped: Counter,
               kept_rates: list[float]) -> pa.Table:
    """A screened batch without the instructions seen before (batches in file order, so an instruction keeps
    its first response under the threshold); `seen` carries instruction keys across batches."""
    dropped.update(screened.dropped)
    keep = []
    for i, instruction in enumerate(screened.kept["instruction"].to_pylist()):
        key = instruction_key(instruction)
        if config.deduplicate and key in seen:
            dropped["duplicate_instruction"] += 1
            continue
        seen.add(key)
        keep.append(i)
    if screened.rates is not None:
        kept_rates.extend(screened.rates[i] for i in keep)
    return screened.kept.take(pa.array(keep, pa.int64()))


def raw_files(raw: Path) -> list[Path]:
    if raw.is_file():
        return [raw]
    files = sorted(raw.rglob("*.parquet"))
    if not files:
        raise FilterError(f"filter: no *.parquet files in {raw} (did the fetch stage run?)")
    return files


def _open(file: Path, id_column: str) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as e:
        raise FilterError(f"filter: cannot read {file}: corrupt, empty or not Parquet ({e}); "
                          "re-run the fetch stage (dvc repro -f fetch) or remove the file") from e
    check_schema(parquet.schema_arrow, id_column, str(file))
    return parquet


def funnel_metrics(rows_in: int, dropped: Counter, difficulty_counts: Counter, second_guess_rates: list[float] | None,
                   boxed_answers: int) -> dict:
    """The funnel, plus the kept rows' second-guess rates (None without a tokenizer) and share of boxed answers."""
    rows_out = rows_in - sum(dropped.values())
    rates = np.asarray(second_guess_rates if second_guess_rates else [0.0])
    return {"rows_in": rows_in, "rows_out": rows_out,
            "dropped": {rule: dropped[rule] for rule in RULES},
            "difficulty": {d: difficulty_counts[d] for d in params.DIFFICULTIES if difficulty_counts[d]},
            "second_guesses_per_1k": None if second_guess_rates is None else {
                "mean": float(rates.mean()), **{f"p{q}": float(np.percentile(rates, q)) for q in (50, 90, 99)}},
            "boxed_answer_share": boxed_answers / rows_out if rows_out else 0.0}


def filter_files(files: list[Path], out: Path, config: params.FilterParams, max_tokens: int,
                 load_counter: Callable[[], TokenCounter | None], contamination: ContaminationIndex | None = None,
                 workers: int | str = 1) -> dict:
    """Stream `files` through the rules into `out` (atomically), parts screened by `workers` processes
    (filter.workers: a number, or 'auto': see worker_count);
    return the funnel metrics. load_counter gives the token counter (None: no length check), called once the
    workers have started. The output does not depend on the number of processes."""
    dropped, difficulty_counts, seen, rows_in, rates, boxed, counted = Counter(), Counter(), set(), 0, [], 0, False
    parquets = [(file, _open(file, config.id_column)) for file in files]
    total = sum(p.metadata.num_rows for _, p in parquets)
    if total == 0:
        raise FilterError(f"filter: the {len(files)} Parquet file(s) read ({files[0]}, ...) hold no rows; check "
                          "data.source in params.yaml and run the fetch stage again (dvc repro fetch)")
    todo = [part for file, parquet in parquets for part in parts(file, parquet)]
    processes = min(worker_count(workers, total), len(todo))  # a worker costs a start: none without a part for it
    log.info("%d rows in %d file(s), %d part(s) screened in %d process(es)", total, len(files), len(todo), processes)
    with (atomic_file(out) as tmp, pq.ParquetWriter(tmp, OUTPUT_SCHEMA) as writer,
          tqdm(total=total, unit="rows", desc="filter", mininterval=2) as progress):
        for screened in screened_parts(todo, processes, load_counter, config, max_tokens, contamination):
            progress.update(screened.rows_in)
            rows_in += screened.rows_in
            counted = screened.rates is not None
            kept = keep_first(screened, config, seen, dropped, rates)
            difficulty_counts.update(kept["difficulty"].to_pylist())
            boxed += pc.sum(pc.match_substring_regex(kept["answer"], BOXED.pattern)).as_py() or 0
            if kept.num_rows:
                writer.write_table(kept)
        funnel = funnel_metrics(rows_in, dropped, difficulty_counts, rates if counted else None, boxed)
        if funnel["rows_out"] == 0:
            raise FilterError("filter: no row passed the filter; funnel: "
                              + ", ".join(f"{k}={v}" for k, v in funnel["dropped"].items() if v)
                              + f" of {rows_in} rows in. Check the filter section of params.yaml.")
    return funnel


def contamination_index(eval_sets: Path, ngram: int) -> ContaminationIndex:
    """Every problem of the evaluation sets (fetch_eval's output) that training must not see."""
    files = sorted(eval_sets.glob("*.parquet")) if eval_sets.is_dir() else []
    if not files:
        raise FilterError(f"filter: filter.decontaminate is on but {eval_sets} holds no evaluation sets; run "
                          "the fetch_eval stage first (dvc repro fetch_eval) or set filter.decontaminate: false")
    problems = [p for file in files for p in pq.read_table(file, columns=["problem"])["problem"].to_pylist()]
    return ContaminationIndex(problems, ngram)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw", type=Path, required=True,
                        help="in: fetch's Parquet shards (a file or a folder)")
    parser.add_argument("--eval-sets", type=Path, required=True,
                        help="in: fetch_eval's sets, for decontamination")
    parser.add_argument("--out", type=Path, required=True,
                        help="out: the kept rows (id, instruction, reasoning, answer, difficulty)")
    parser.add_argument("--metrics", type=Path, required=True,
                        help="out: the funnel (rows in, dropped by rule, rows out) and the kept rows' measures")
    args = parser.parse_args(argv)

    config = params.load("filter")
    model = params.load("model")
    contamination = contamination_index(args.eval_sets, config.contamination_ngram) if config.decontaminate else None

    def load_counter() -> TokenCounter | None:  # seconds (transformers): the workers start reading meanwhile
        return TokenCounter(load_tokenizer(model), model.directive) if config.check_length else None

    funnel = filter_files(raw_files(args.raw), args.out, config, model.max_seq_length, load_counter, contamination,
                          config.workers)
    write_json(args.metrics, funnel)
    log.info("kept %d of %d rows -> %s", funnel["rows_out"], funnel["rows_in"], args.out)


if __name__ == "__main__":
    cli.run(main)
