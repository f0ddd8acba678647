"""What we rely on in the Magpie-Reasoning schema: the columns, their types, and how a response
splits into reasoning and answer.
"""

from __future__ import annotations

import hashlib
import unicodedata

import pyarrow as pa

from stages.core.cli import StageError
from stages.core.prompts import THINK_CLOSE, THINK_OPEN

TEXT_COLUMNS = ("instruction", "response", "difficulty", "input_quality", "task_category")


class SchemaError(StageError):
    """A Parquet file lacks a column we need, or holds it with the wrong type."""


def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def check_schema(schema: pa.Schema, id_column: str, file: str) -> None:
    """Raise SchemaError naming the file and column if a needed column is missing or not text."""
    for column in (id_column, *TEXT_COLUMNS):
        if column not in schema.names:
            hint = " (set filter.id_column to the id column's name)" if column == id_column else ""
            raise SchemaError(f"filter: column '{column}' missing in {file}{hint}; "
                              f"columns there: {', '.join(schema.names)}")
        dtype = schema.field(column).type
        allowed_id = column == id_column and pa.types.is_integer(dtype)
        if not (_is_text(dtype) or allowed_id):
            raise SchemaError(f"filter: column '{column}' in {file} has type {dtype}, expected string "
                              "(is this the Magpie schema?)")


def split_response(response: str, require_think_open: bool) -> tuple[str, str] | str:
    """(reasoning, answer) of a complete `<think>…</think>answer` response, else the rule it breaks."""
    closes = response.count(THINK_CLOSE)
    if closes == 0:
        return "no_think_close"
    if closes > 1:
        return "multiple_think_close"
    reasoning, answer = response.split(THINK_CLOSE)
    reasoning = reasoning.strip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):].strip()
    elif require_think_open:
        return "no_think_open"
    answer = answer.strip()
    if not reasoning:
        return "empty_reasoning"
    if not answer:
        return "empty_answer"
    return reasoning, answer


def instruction_key(instruction: str) -> bytes:
    """A short digest of the normalized instruction (Unicode NFKC, case and whitespace folded)."""
    normalized = " ".join(unicodedata.normalize("NFKC", instruction).casefold().split())
    return hashlib.blake2b(normalized.encode(), digest_size=12).digest()
