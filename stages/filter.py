"""filter: raw Magpie Parquet shards -> data/filtered.parquet of clean, complete math reasoning rows,
plus metrics/data.json with the funnel (rows in, rows dropped by each rule, rows out).
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from stages import cli, params
from stages.artifacts import atomic_file, write_json
from stages.base_model import load_tokenizer
from stages.contamination import ContaminationIndex
from stages.magpie import TEXT_COLUMNS, check_schema, instruction_key, split_response
from stages.prompts import example_texts

log = logging.getLogger("stages.filter")

# Every rule in the order it is applied; a row is counted under the first rule it breaks.
RULES = ("null_field", "task_category", "input_quality", "difficulty", "no_think_close",
         "multiple_think_close", "no_think_open", "empty_reasoning", "empty_answer", "contaminated",
         "too_long", "duplicate_instruction")
OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("reasoning", pa.string()),
                           ("answer", pa.string()), ("difficulty", pa.string())])
BATCH_ROWS = 2048


class FilterError(cli.StageError):
    """The input cannot be filtered as asked."""


def completion_head(text: str, limit: int) -> str | None:
    """The longest start of text, at most limit characters, that ends where a pre-tokenizer splits
    anyway: before a single space between two non-space characters. None if text is not longer."""
    if len(text) <= limit:
        return None
    cut = text.rfind(" ", 0, limit)
    while cut > 0 and (text[cut - 1].isspace() or text[cut + 1:cut + 2].isspace() or cut + 1 == len(text)):
        cut = text.rfind(" ", 0, cut)
    return text[:cut] if cut > 0 else None


def splits_at_spaces(backend) -> bool:
    """Whether this tokenizer encodes text cut at completion_head's points as the concatenation of
    both parts' encodings (true of regex pre-tokenizers such as GPT-2's and Qwen's)."""
    probes = ["The answer is 42, so x = 3.5. Wait, let me re-check the sum of the terms: 12 + 30 = 42!",
              "so $\\frac{1}{2}$ and \\boxed{7}\n\nHmm... actually (a+b)^2 = a^2 + 2ab + b^2 holds."]
    for probe in probes:
        whole = backend.encode(probe, add_special_tokens=False).ids
        for cut in range(1, len(probe) - 1):
            if probe[cut] == " " and not probe[cut - 1].isspace() and not probe[cut + 1].isspace():
                parts = [backend.encode(part, add_special_tokens=False).ids for part in (probe[:cut], probe[cut:])]
                if parts[0] + parts[1] != whole:
                    return False
    return True


class TokenCounter:
    """Token counts of whole training examples (prompt + completion), as training will see them,
    exact wherever they decide whether an example fits in max_tokens.

    An example of at most max_tokens bytes fits for sure (a byte-level token covers at least one byte):
    it is not tokenized and its byte count stands in. Once the typical characters per token are known,
    a long completion's head, cut where the tokenizer splits anyway, is tokenized first; if the prompt
    and that head already exceed max_tokens, their count (a lower bound) stands in and the rest of the
    text is never tokenized. Everything else is counted exactly.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no per-token Python objects
        self.heads_are_prefixes = splits_at_spaces(self.backend)
        self.chars = self.tokens = 0  # of completions counted in full so far

    def _encode(self, texts: list[str]) -> list[int]:
        return [len(e) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, instructions, reasonings, answers, max_tokens: int) -> list[int]:
        pairs = [example_texts(self.tokenizer, *row) for row in zip(instructions, reasonings, answers, strict=True)]
        counts = [len(prompt.encode()) + len(completion.encode()) for prompt, completion in pairs]
        long = [i for i, n in enumerate(counts) if n > max_tokens]
        prompt_tokens = dict(zip(long, self._encode([pairs[i][0] for i in long]), strict=True))
        undecided = set(long)
        if self.heads_are_prefixes and self.tokens:
            limit = int(1.1 * max_tokens * self.chars / self.tokens)
            heads = {i: head for i in long if (head := completion_head(pairs[i][1], limit))}
            for i, head_tokens in zip(heads, self._encode(list(heads.values())), strict=True):
                if prompt_tokens[i] + head_tokens > max_tokens:
                    counts[i] = prompt_tokens[i] + head_tokens
                    undecided.discard(i)
        rest = sorted(undecided)
        for i, completion_tokens in zip(rest, self._encode([pairs[i][1] for i in rest]), strict=True):
            counts[i] = prompt_tokens[i] + completion_tokens
            self.chars += len(pairs[i][1])
            self.tokens += completion_tokens
        return counts


def _drop(table: pa.Table, keep, rule: str, dropped: Counter) -> pa.Table:
    kept = table.filter(keep)
    dropped[rule] += table.num_rows - kept.num_rows
    return kept


def filter_batch(table: pa.Table, config: params.FilterParams, max_tokens: int, seen: set[bytes],
                 dropped: Counter, count_tokens: TokenCounter | None,
                 contamination: ContaminationIndex | None = None) -> pa.Table:
    """Apply every rule to one batch of raw rows; `seen` carries instruction keys across batches."""
    id_column = config.id_column
    columns = (id_column, *TEXT_COLUMNS)
    complete = functools.reduce(pc.and_, [pc.is_valid(table[c]) for c in columns])
    blank = pc.equal(pc.utf8_trim_whitespace(pc.cast(table["instruction"], pa.string())), "")
    table = _drop(table, pc.and_(complete, pc.invert(pc.fill_null(blank, True))), "null_field", dropped)
    for rule, allowed in (("task_category", config.task_categories),
                          ("input_quality", config.input_qualities),
                          ("difficulty", config.difficulties)):
        table = _drop(table, pc.is_in(pc.cast(table[rule], pa.string()), pa.array(allowed)), rule, dropped)

    ids, instructions, reasonings, answers, difficulties = [], [], [], [], []
    for row_id, instruction, response, difficulty in zip(
            pc.cast(table[id_column], pa.string()).to_pylist(), table["instruction"].to_pylist(),
            table["response"].to_pylist(), pc.cast(table["difficulty"], pa.string()).to_pylist(), strict=True):
        parsed = split_response(response, config.require_think_open)
        if isinstance(parsed, str):
            dropped[parsed] += 1
            continue
        if contamination is not None and contamination.contains(instruction):
            dropped["contaminated"] += 1
            continue
        ids.append(row_id)
        instructions.append(instruction)
        reasonings.append(parsed[0])
        answers.append(parsed[1])
        difficulties.append(difficulty)

    n_tokens = count_tokens(instructions, reasonings, answers, max_tokens) if count_tokens else [0] * len(ids)
    keep = []
    for i, (instruction, length) in enumerate(zip(instructions, n_tokens, strict=True)):
        if length > max_tokens:
            dropped["too_long"] += 1
            continue
        key = instruction_key(instruction)
        if config.deduplicate and key in seen:
            dropped["duplicate_instruction"] += 1
            continue
        seen.add(key)
        keep.append(i)
    return pa.table([[column[i] for i in keep] for column in
                     (ids, instructions, reasonings, answers, difficulties)], schema=OUTPUT_SCHEMA)


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


def read_batches(files: list[Path], id_column: str) -> Iterator[pa.Table]:
    """Stream the needed columns of every file in small batches, so memory stays flat."""
    parquets = [(file, _open(file, id_column)) for file in files]
    total = sum(p.metadata.num_rows for _, p in parquets)
    with tqdm(total=total, unit="rows", desc="filter", mininterval=2) as progress:
        for file, parquet in parquets:
            try:
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[id_column, *TEXT_COLUMNS]):
                    progress.update(batch.num_rows)
                    yield pa.Table.from_batches([batch])
            except (pa.ArrowInvalid, OSError) as e:
                raise FilterError(f"filter: {file} is corrupt ({e}); re-run the fetch stage") from e


def funnel_metrics(rows_in: int, dropped: Counter, difficulty_counts: Counter) -> dict:
    return {"rows_in": rows_in, "rows_out": rows_in - sum(dropped.values()),
            "dropped": {rule: dropped[rule] for rule in RULES},
            "difficulty": {d: difficulty_counts[d] for d in params.DIFFICULTIES if difficulty_counts[d]}}


def filter_files(files: list[Path], out: Path, config: params.FilterParams, max_tokens: int,
                 count_tokens: TokenCounter | None, contamination: ContaminationIndex | None = None) -> dict:
    """Stream `files` through the rules into `out` (atomically); return the funnel metrics."""
    dropped, difficulty_counts, seen, rows_in = Counter(), Counter(), set(), 0
    with atomic_file(out) as tmp, pq.ParquetWriter(tmp, OUTPUT_SCHEMA) as writer:
        for batch in read_batches(files, config.id_column):
            rows_in += batch.num_rows
            kept = filter_batch(batch, config, max_tokens, seen, dropped, count_tokens, contamination)
            difficulty_counts.update(kept["difficulty"].to_pylist())
            if kept.num_rows:
                writer.write_table(kept)
        funnel = funnel_metrics(rows_in, dropped, difficulty_counts)
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--eval-sets", type=Path, default=Path("data/eval/sets"))
    parser.add_argument("--out", type=Path, default=Path("data/filtered.parquet"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/data.json"))
    args = parser.parse_args(argv)

    config = params.load("filter")
    model = params.load("model")
    count_tokens = TokenCounter(load_tokenizer(model)) if config.check_length else None
    contamination = contamination_index(args.eval_sets, config.contamination_ngram) if config.decontaminate else None
    funnel = filter_files(raw_files(args.raw), args.out, config, model.max_seq_length, count_tokens, contamination)
    write_json(args.metrics, funnel)
    log.info("kept %d of %d rows -> %s", funnel["rows_out"], funnel["rows_in"], args.out)


if __name__ == "__main__":
    cli.run(main)
