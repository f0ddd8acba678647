"""stratify: data/filtered.parquet -> data/splits/{train,val,test}.parquet, seeded, with the same
difficulty proportions in every split; metrics/splits.json counts rows per split and difficulty.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core import cli, params
from stages.core.artifacts import atomic_dir, write_json

log = logging.getLogger("stages.stratify")  # not __name__: `python -m` runs a stage as __main__
SPLITS = ("train", "val", "test")


class StratifyError(cli.StageError):
    """The filtered data cannot be split as asked."""


def stratum_sizes(n: int, config: params.StratifyParams) -> dict[str, int]:
    """Rows of one stratum per split: val and test rounded from their fractions, train the rest."""
    val = round(n * config.val_fraction)
    test = min(round(n * config.test_fraction), n - val)
    return {"train": n - val - test, "val": val, "test": test}


def split_indices(difficulty: list[str], ids: list[str], config: params.StratifyParams,
                  seed: int) -> dict[str, np.ndarray]:
    """Row indices of each split. Deterministic: rows are ordered by id, then shuffled per stratum."""
    rng = np.random.default_rng(seed)
    difficulty = np.asarray(difficulty, dtype=object)
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    chosen = {name: [] for name in SPLITS}
    for stratum in params.DIFFICULTIES:
        rows = order[difficulty[order] == stratum]
        rows = rows[rng.permutation(len(rows))]
        if config.max_per_difficulty is not None:
            rows = rows[: config.max_per_difficulty]
        start = 0
        for name, size in stratum_sizes(len(rows), config).items():
            chosen[name].append(rows[start:start + size])
            start += size
    return {name: np.sort(np.concatenate(parts)) for name, parts in chosen.items()}


def split_counts(splits: dict[str, pa.Table]) -> dict:
    counts = {}
    for name, table in splits.items():
        by_difficulty = pc.value_counts(table["difficulty"]).to_pylist()
        counts[name] = {"rows": table.num_rows,
                        "difficulty": {v["values"]: v["counts"] for v in by_difficulty}}
    return counts


def stratify(table: pa.Table, config: params.StratifyParams, seed: int) -> dict[str, pa.Table]:
    if table.num_rows == 0:
        raise StratifyError("stratify: the filtered data has no rows; check metrics/data.json for the funnel")
    indices = split_indices(table["difficulty"].to_pylist(), table["id"].to_pylist(), config, seed)
    return {name: table.take(pa.array(rows, type=pa.int64())) for name, rows in indices.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--filtered", type=Path, required=True, help="in: filter's kept rows")
    parser.add_argument("--out", type=Path, required=True,
                        help="out: train.parquet, val.parquet, test.parquet")
    parser.add_argument("--metrics", type=Path, required=True,
                        help="out: rows per split and difficulty")
    args = parser.parse_args(argv)

    config = params.load("stratify")
    seed = params.load_seed()
    try:
        table = pq.read_table(args.filtered)
    except (pa.ArrowInvalid, OSError) as e:
        raise StratifyError(f"stratify: cannot read {args.filtered} ({e}); re-run the filter stage") from e
    splits = stratify(table, config, seed)
    with atomic_dir(args.out) as tmp:
        for name, split in splits.items():
            pq.write_table(split, tmp / f"{name}.parquet")
    write_json(args.metrics, split_counts(splits))
    log.info("wrote %s", ", ".join(f"{name} {split.num_rows}" for name, split in splits.items()))


if __name__ == "__main__":
    cli.run(main)
