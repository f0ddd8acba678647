"""Evaluation sets in one shape (id, problem, gold, level, numeric), read from each source's own
layout: GSM8K, MATH-500, and our held-out test split.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from stages.core.cli import StageError
from stages.scoring.grading import gsm8k_gold, last_boxed, plain_number

SCHEMA = pa.schema([("id", pa.string()), ("problem", pa.string()), ("gold", pa.string()),
                    ("level", pa.string()), ("subject", pa.string()), ("numeric", pa.bool_())])
ALL = "all"  # the level or subject of a set that has none


class EvalSetError(StageError):
    """An evaluation set cannot be read as its format says."""


def read_files(files: list[Path]) -> pa.Table:
    tables = []
    for file in files:
        try:
            tables.append(pajson.read_json(file) if file.suffix in (".jsonl", ".json") else pq.read_table(file))
        except (pa.ArrowInvalid, OSError) as e:
            raise EvalSetError(f"cannot read evaluation file {file}: {e}") from e
    return pa.concat_tables(tables, promote_options="permissive")


def _require(table: pa.Table, columns: tuple[str, ...], name: str, where: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise EvalSetError(f"evaluation set '{name}' ({where}) has no column(s) {missing}; columns there: "
                           f"{table.column_names}. Check eval_data.{name}.format and its source")


def numeric(golds: list[str]) -> list[bool]:
    """Which golds are plain numbers: grade compares a plain-number answer to those exactly, which also
    covers forms math-verify misreads (`58\\,500`)."""
    return [plain_number(gold) is not None for gold in golds]


def gsm8k(table: pa.Table, name: str, where: str) -> pa.Table:
    _require(table, ("question", "answer"), name, where)
    golds = [gsm8k_gold(a) for a in table["answer"].to_pylist()]
    return pa.table({"id": [f"{name}-{i:05d}" for i in range(table.num_rows)], "problem": table["question"],
                     "gold": golds, "level": [ALL] * table.num_rows, "subject": [ALL] * table.num_rows,
                     "numeric": numeric(golds)}, schema=SCHEMA)


def math500(table: pa.Table, name: str, where: str) -> pa.Table:
    _require(table, ("problem", "answer"), name, where)
    ids = (table["unique_id"].to_pylist() if "unique_id" in table.column_names
           else [f"{name}-{i:05d}" for i in range(table.num_rows)])
    levels = ([f"level {level}" for level in table["level"].to_pylist()] if "level" in table.column_names
              else [ALL] * table.num_rows)
    subjects = (table["subject"].to_pylist() if "subject" in table.column_names else [ALL] * table.num_rows)
    golds = [str(answer) for answer in table["answer"].to_pylist()]
    return pa.table({"id": ids, "problem": table["problem"], "gold": golds, "level": levels, "subject": subjects,
                     "numeric": numeric(golds)}, schema=SCHEMA)


READERS = {"gsm8k": gsm8k, "math500": math500}


def heldout(test_split: pa.Table) -> tuple[pa.Table, int]:
    """Our test split as an evaluation set: gold = the last \\boxed{} of the reference answer. Returns the
    set and how many rows had no extractable gold (they are left out)."""
    golds = [last_boxed(answer) for answer in test_split["answer"].to_pylist()]
    keep = [i for i, gold in enumerate(golds) if gold]
    table = pa.table({"id": test_split["id"].take(keep), "problem": test_split["instruction"].take(keep),
                      "gold": [golds[i] for i in keep], "level": test_split["difficulty"].take(keep),
                      "subject": [ALL] * len(keep), "numeric": numeric([golds[i] for i in keep])}, schema=SCHEMA)
    return table, test_split.num_rows - len(keep)
