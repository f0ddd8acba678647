import random
from collections import Counter

import pyarrow as pa
import pytest

from stages.core import params
from stages.filter import OUTPUT_SCHEMA
from stages.stratify import SPLITS, StratifyError, split_counts, stratify

CONFIG = params.StratifyParams(train_fraction=0.8, val_fraction=0.1, test_fraction=0.1)


def filtered(n: int, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    difficulty = rng.choices(params.DIFFICULTIES, weights=[1, 4, 6, 3, 1], k=n)
    return pa.table({"id": [f"id-{i:05d}" for i in range(n)], "instruction": [f"q{i}" for i in range(n)],
                     "reasoning": ["r"] * n, "answer": ["a"] * n, "difficulty": difficulty},
                    schema=OUTPUT_SCHEMA)


def test_every_split_keeps_difficulty_proportions_within_one_row_per_stratum():
    table = filtered(1003)
    splits = stratify(table, CONFIG, seed=1)
    totals = Counter(table["difficulty"].to_pylist())
    fractions = {"train": CONFIG.train_fraction, "val": CONFIG.val_fraction, "test": CONFIG.test_fraction}
    for name, split in splits.items():
        counts = Counter(split["difficulty"].to_pylist())
        for difficulty, total in totals.items():
            assert abs(counts[difficulty] - fractions[name] * total) <= 1, (name, difficulty)


def test_no_row_is_in_two_splits_and_none_is_lost():
    table = filtered(500)
    ids = [i for split in stratify(table, CONFIG, seed=1).values() for i in split["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == table.num_rows


def test_split_is_deterministic_and_independent_of_input_order():
    table = filtered(400)
    shuffled = table.take(pa.array(random.Random(5).sample(range(400), 400)))
    first, second = stratify(table, CONFIG, seed=7), stratify(shuffled, CONFIG, seed=7)
    for name in SPLITS:
        assert sorted(first[name]["id"].to_pylist()) == sorted(second[name]["id"].to_pylist())


def test_another_seed_gives_another_split():
    table = filtered(400)
    assert stratify(table, CONFIG, seed=1)["test"]["id"] != stratify(table, CONFIG, seed=2)["test"]["id"]


def test_balancing_caps_rows_per_difficulty():
    config = params.StratifyParams(train_fraction=0.8, val_fraction=0.1, test_fraction=0.1, max_per_difficulty=50)
    splits = stratify(filtered(1000), config, seed=1)
    per_difficulty = Counter(d for split in splits.values() for d in split["difficulty"].to_pylist())
    assert max(per_difficulty.values()) == 50
    assert per_difficulty["very easy"] <= 50


def test_counts_report_rows_per_split_and_difficulty():
    counts = split_counts(stratify(filtered(300), CONFIG, seed=1))
    assert sum(c["rows"] for c in counts.values()) == 300
    assert all(sum(c["difficulty"].values()) == c["rows"] for c in counts.values())


def test_empty_input_is_an_error():
    with pytest.raises(StratifyError, match="no rows"):
        stratify(filtered(0), CONFIG, seed=1)


def test_a_zero_fraction_gives_an_empty_split_of_the_same_columns_that_training_reads():
    """stratify.val_fraction: 0 leaves val.parquet empty with the filter's schema: the split the train stage's
    no-validation test (tests/test_train.py, val rows []) trains with."""
    from tests.conftest import splits_table

    splits = stratify(filtered(100), params.StratifyParams(train_fraction=0.9, val_fraction=0, test_fraction=0.1),
                      seed=1)
    assert splits["val"].num_rows == 0 and splits["val"].schema == OUTPUT_SCHEMA == splits_table([]).schema
    assert splits["train"].num_rows + splits["test"].num_rows == 100
