"""Builders of Parquet files in the exact Magpie-Reasoning-V2 schema, clean or messy, small or of the
real size, for tests and benchmarks (no data is checked in).
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DIFFICULTIES = ["very easy", "easy", "medium", "hard", "very hard"]
QUALITIES = ["very poor", "poor", "average", "good", "excellent"]
CATEGORIES = ["Math", "Reasoning", "Coding & Debugging", "Information seeking", "Data analysis", "Planning"]

SCHEMA = pa.schema([
    ("uuid", pa.string()),
    ("instruction", pa.string()),
    ("response", pa.string()),
    ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
    ("gen_input_configs", pa.struct([("temperature", pa.float64()), ("top_p", pa.float64()),
                                     ("input_generator", pa.string()), ("seed", pa.int64()),
                                     ("pre_query_template", pa.string())])),
    ("gen_response_configs", pa.struct([("prompt", pa.string()), ("temperature", pa.float64()),
                                        ("top_p", pa.float64()), ("repetition_penalty", pa.float64()),
                                        ("max_tokens", pa.int64()), ("stop_tokens", pa.list_(pa.string())),
                                        ("output_generator", pa.string()), ("engine", pa.string())])),
    ("intent", pa.string()),
    ("knowledge", pa.string()),
    ("difficulty", pa.string()),
    ("difficulty_generator", pa.string()),
    ("input_quality", pa.string()),
    ("quality_explanation", pa.string()),
    ("quality_generator", pa.string()),
    ("task_category", pa.string()),
    ("other_task_category", pa.list_(pa.string())),
    ("task_category_generator", pa.string()),
    ("language", pa.string()),
])


def row(i: int, *, instruction: str | None = None, response: str | None = None, difficulty: str = "medium",
        input_quality: str = "excellent", task_category: str = "Math", uuid: str | None = None) -> dict:
    """One row with every Magpie column; text fields default to a clean, complete math example."""
    instruction = f"What is {i} + {i + 1}? Explain briefly." if instruction is None else instruction
    answer = f"The answer is $\\boxed{{{2 * i + 1}}}$."
    if response is None:
        response = f"<think>\nI add {i} and {i + 1}. Wait, let me check: {2 * i + 1}.\n</think>\n\n{answer}"
    return {
        "uuid": f"{i:08d}-0000-4000-8000-000000000000" if uuid is None else uuid,
        "instruction": instruction,
        "response": response,
        "conversations": [{"from": "human", "value": instruction}, {"from": "gpt", "value": response}],
        "gen_input_configs": {"temperature": 1.0, "top_p": 1.0, "input_generator": "meta-llama/Llama-3.3-70B-Instruct",
                              "seed": None, "pre_query_template": "<|begin_of_text|><|start_header_id|>user"},
        "gen_response_configs": {"prompt": instruction, "temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.0,
                                 "max_tokens": 32768, "stop_tokens": ["<｜end▁of▁sentence｜>"],
                                 "output_generator": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "engine": "vllm"},
        "intent": "The user wants to add two numbers.",
        "knowledge": "Integer addition.",
        "difficulty": difficulty,
        "difficulty_generator": "meta-llama/Meta-Llama-3-8B-Instruct",
        "input_quality": input_quality,
        "quality_explanation": "The query is clear and specific.",
        "quality_generator": "meta-llama/Meta-Llama-3-8B-Instruct",
        "task_category": task_category,
        "other_task_category": ["Reasoning"],
        "task_category_generator": "meta-llama/Meta-Llama-3-8B-Instruct",
        "language": "EN",
    }


def clean_rows(n: int, start: int = 0, seed: int = 0) -> list[dict]:
    """n clean Math/excellent rows, difficulties drawn unevenly (as in the real data)."""
    rng = random.Random(seed)
    return [row(i, difficulty=rng.choices(DIFFICULTIES, weights=[1, 3, 5, 3, 1])[0]) for i in range(start, start + n)]


# Each messy row and the funnel rule that must drop it.
def messy_rows(start: int = 100_000) -> list[tuple[dict, str]]:
    i = iter(range(start, start + 100))
    long_reasoning = "Wait, let me recompute this carefully. " * 400
    cases = [
        ({**row(next(i)), "instruction": None}, "null_field"),
        ({**row(next(i)), "response": None}, "null_field"),
        ({**row(next(i)), "difficulty": None}, "null_field"),
        ({**row(next(i)), "task_category": None}, "null_field"),
        (row(next(i), instruction="   "), "null_field"),
        (row(next(i), task_category="Coding & Debugging"), "task_category"),
        (row(next(i), task_category="Reasoning"), "task_category"),
        (row(next(i), input_quality="good"), "input_quality"),
        (row(next(i), input_quality="very poor"), "input_quality"),
        (row(next(i), response="<think>\nI add the numbers and get 7. The answer is 7."), "no_think_close"),
        (row(next(i), response="<think>a</think> b </think> c"), "multiple_think_close"),
        (row(next(i), response="<think>\n  \n</think>\n\nThe answer is 3."), "empty_reasoning"),
        (row(next(i), response="<think>\nI add 1 and 2.\n</think>\n\n   "), "empty_answer"),
        (row(next(i), response=f"<think>\n{long_reasoning}\n</think>\n\nThe answer is 3."), "too_long"),
    ]
    # A duplicate of the first clean row's instruction, differing only in case and whitespace.
    dup = row(next(i), instruction="  WHAT is 0 +   1? Explain briefly.")
    cases.append((dup, "duplicate_instruction"))
    # A leading <think> is optional: this row is clean.
    cases.append((row(next(i), response="I add 5 and 6.\n</think>\n\nThe answer is 11."), "kept"))
    return cases


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_shards(directory: Path, rows: list[dict], shards: int = 2, row_group_size: int | None = None) -> list[Path]:
    """Write rows as `train-0000K-of-0000N.parquet` shards, like the hub dataset."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(shards):
        path = directory / f"train-{k:05d}-of-{shards:05d}.parquet"
        pq.write_table(table(rows[k::shards]), path, row_group_size=row_group_size)
        paths.append(path)
    return paths
