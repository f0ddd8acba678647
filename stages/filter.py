"""filter: raw Magpie Parquet shards -> data/filtered.parquet of clean, complete math reasoning rows,
plus metrics/data.json with the funnel (rows in, rows dropped by each rule, rows out) and the kept rows'
second-guess markers per 1,000 reasoning tokens and share of boxed answers.
"""

from __future__ import annotations

import argparse
import functools
import logging
import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.core import cli, params
from stages.core.artifacts import atomic_file, write_json
from stages.core.base_model import load_tokenizer
from stages.core.prompts import example_texts
from stages.data.contamination import ContaminationIndex
from stages.data.magpie import TEXT_COLUMNS, check_schema, instruction_key, split_response
from stages.scoring.overthinking import BOXED, per_1k, second_guess_counts

log = logging.getLogger("stages.filter")  # not __name__: `python -m` runs a stage as __main__

# Every rule in the order it is applied; a row is counted under the first rule it breaks.
RULES = ("null_field", "task_category", "input_quality", "difficulty", "no_think_close",
         "multiple_think_close", "no_think_open", "empty_reasoning", "empty_answer", "contaminated",
         "too_long", "too_many_second_guesses", "duplicate_instruction")
OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("reasoning", pa.string()),
                           ("answer", pa.string()), ("difficulty", pa.string())])
BATCH_ROWS = 2048


class FilterError(cli.StageError):
    """The input cannot be filtered as asked."""


# Cuts before a single space between two non-space characters: regex pre-tokenizers (GPT-2's, Qwen's)
# start a new piece there whatever came before, so the text's tokens are its chunks' tokens.
SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")
# A space that is not such a cut (beside whitespace, or at either end), as an Arrow (RE2) regex;
# whitespace as Unicode and Python's str.isspace define it.
WHITESPACE = r"[\t-\r\x{1c}-\x{20}\x{85}\p{Z}]"
IRREGULAR_SPACE = rf"(?:^|{WHITESPACE}) | (?:{WHITESPACE}|$)"
CHUNK_CACHE_SIZE = 4_000_000  # distinct chunks remembered (~400 MB); the cache restarts when full


def splits_at_spaces(backend) -> bool:
    """Whether this tokenizer encodes text cut at SPACE_CUT as the concatenation of the parts'
    encodings, the cut space leading the second part (true of GPT-2's and Qwen's pre-tokenizers)."""
    probes = ["The answer is 42, so x = 3.5. Wait, let me re-check the sum of the terms: 12 + 30 = 42!",
              "so $\\frac{1}{2}$ and \\boxed{7}\n\nHmm... actually (a+b)^2 = a^2 + 2ab + b^2 holds, it 's 'true'.",
              "  two  spaces, a tab\t here,\n an indent and\u00a0non-breaking space; caf\u00e9 \u0301 accents "]
    for probe in probes:
        whole = backend.encode(probe, add_special_tokens=False).ids
        parts = SPACE_CUT.split(probe)
        pieces = [parts[0], *(" " + part for part in parts[1:])]
        if [i for e in backend.encode_batch(pieces, add_special_tokens=False) for i in e.ids] != whole:
            return False
    return True


class TokenCounter:
    """Exact token counts of whole training examples (prompt + completion), as training will see them.

    An example of at most max_tokens bytes fits for sure (a byte-level token covers at least one byte):
    it is not tokenized and its byte count stands in. A longer completion is cut at SPACE_CUT into
    chunks of about a word, and each distinct chunk is tokenized once: reasoning text repeats its
    words, so this costs a fraction of encoding every text in full (bench/filter_speed.py). Texts whose
    every space is a cut are split and looked up in Arrow; the rest are split with SPACE_CUT. A
    tokenizer for which the cut would change the tokens (see splits_at_spaces) gets every text
    encoded in full.
    """

    def __init__(self, tokenizer, directive: str):
        self.tokenizer, self.directive = tokenizer, directive  # the prompt as training renders it
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no per-token Python objects
        self.by_chunks = splits_at_spaces(self.backend)
        self.chunk_tokens: dict[str, int] = {}  # chunk -> tokens of " " + chunk

    def _encode(self, texts: list[str]) -> list[int]:
        return [len(e) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _count_chunked(self, chunked: pa.ListArray) -> np.ndarray:
        """Token counts of texts given as lists of chunks: the first as it is, each later one after a space."""
        flat = chunked.flatten()
        encoded = pc.dictionary_encode(flat)
        distinct = encoded.dictionary.to_pylist()
        new = [chunk for chunk in distinct if chunk not in self.chunk_tokens]
        if len(self.chunk_tokens) + len(new) > CHUNK_CACHE_SIZE:
            self.chunk_tokens.clear()
            new = distinct
        self.chunk_tokens.update(zip(new, self._encode([" " + chunk for chunk in new]), strict=True))
        tokens = np.array([self.chunk_tokens[chunk] for chunk in distinct], dtype=np.int64)[encoded.indices.to_numpy()]
        starts = np.concatenate([[0], np.cumsum(pc.list_value_length(chunked))[:-1]]).astype(np.int64)
        tokens[starts] = self._encode(flat.take(starts).to_pylist())
        return np.add.reduceat(tokens, starts)

    def count(self, texts: list[str]) -> list[int]:
        """Token count of each text, encoded on its own."""
        if not self.by_chunks or not texts:
            return self._encode(texts)
        array = pa.array(texts, pa.large_string())
        irregular = pc.match_substring_regex(array, IRREGULAR_SPACE).to_numpy(zero_copy_only=False)
        counts = np.zeros(len(texts), dtype=np.int64)
        regular = np.flatnonzero(~irregular)
        if len(regular):
            counts[regular] = self._count_chunked(pc.split_pattern(array.take(regular), " "))
        others = np.flatnonzero(irregular)
        if len(others):
            chunked = pa.array([SPACE_CUT.split(texts[i]) for i in others], pa.list_(pa.large_string()))
            counts[others] = self._count_chunked(chunked)
        return counts.tolist()

    def __call__(self, instructions, reasonings, answers, max_tokens: int, also: Sequence[str] = ()) -> list[int]:
        """Token count of each whole example, then of each text in `also`, encoded on its own in the same pass
        as the completions: texts made of their words (their reasonings) add little (bench/filter_speed.py)."""
        pairs = [example_texts(self.tokenizer, *row, directive=self.directive)
                 for row in zip(instructions, reasonings, answers, strict=True)]
        counts = [len(prompt.encode()) + len(completion.encode()) for prompt, completion in pairs]
        long = [i for i, n in enumerate(counts) if n > max_tokens]
        prompts = self._encode([pairs[i][0] for i in long])
        completions = self.count([pairs[i][1] for i in long] + list(also))
        for i, prompt_tokens, completion_tokens in zip(long, prompts, completions[:len(long)], strict=True):
            counts[i] = prompt_tokens + completion_tokens
        return counts + completions[len(long):]


def _drop(table: pa.Table, keep, rule: str, dropped: Counter) -> pa.Table:
    kept = table.filter(keep)
    dropped[rule] += table.num_rows - kept.num_rows
    return kept


@dataclass
class Screened:
    """The rows of one batch that passed every rule but deduplication, and what the row-by-row rules dropped."""
    dropped: Counter
    columns: tuple[list, ...]  # ids, instructions, reasonings, answers, difficulties
    rates: list[float] | None  # each row's second-guess markers per 1k reasoning tokens (None: no tokenizer)


def arrow_rules(table: pa.Table, config: params.FilterParams, dropped: Counter) -> pa.Table:
    """The rules Arrow applies to whole columns at once (complete rows, category, quality, difficulty): cheap,
    and most rows go here, so they run where the rows are read and only the rest travel to a worker."""
    columns = (config.id_column, *TEXT_COLUMNS)
    complete = functools.reduce(pc.and_, [pc.is_valid(table[c]) for c in columns])
    blank = pc.equal(pc.utf8_trim_whitespace(pc.cast(table["instruction"], pa.string())), "")
    table = _drop(table, pc.and_(complete, pc.invert(pc.fill_null(blank, True))), "null_field", dropped)
    for rule, allowed in (("task_category", config.task_categories),
                          ("input_quality", config.input_qualities),
                          ("difficulty", config.difficulties)):
        table = _drop(table, pc.is_in(pc.cast(table[rule], pa.string()), pa.array(allowed)), rule, dropped)
    return table


def screen_batch(table: pa.Table, config: params.FilterParams, max_tokens: int, count_tokens: TokenCounter | None,
                 contamination: ContaminationIndex | None = None) -> Screened:
    """Apply the row-by-row rules (all but deduplication) to rows that passed arrow_rules: they depend on no
    other batch, so batches are screened in any order, by any process."""
    dropped, id_column = Counter(), config.id_column
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

    # Reasoning tokens, for the second-guess rate, are counted exactly with the base model's tokenizer, as evaluation
    # counts them, in the length check's pass: they share its chunks, which costs less than a pass of their own.
    n_tokens = count_tokens(instructions, reasonings, answers, max_tokens, also=reasonings) if count_tokens else None
    fits = [i for i in range(len(ids)) if n_tokens is None or n_tokens[i] <= max_tokens]
    dropped["too_long"] += len(ids) - len(fits)
    rates = None if n_tokens is None else per_1k(second_guess_counts([reasonings[i] for i in fits]),
                                                 [n_tokens[len(ids) + i] for i in fits])
    threshold = config.max_second_guesses_per_1k
    keep = [k for k in range(len(fits)) if threshold is None or rates[k] <= threshold]
    dropped["too_many_second_guesses"] += len(fits) - len(keep)
    return Screened(dropped, tuple([column[fits[k]] for k in keep] for column in
                                            (ids, instructions, reasonings, answers, difficulties)),
                    None if rates is None else [float(rates[k]) for k in keep])


def keep_first(screened: Screened, config: params.FilterParams, seen: set[bytes], dropped: Counter,
               kept_rates: list[float]) -> pa.Table:
    """A screened batch without the instructions seen before (batches in file order, so an instruction keeps
    its first response under the threshold); `seen` carries instruction keys across batches."""
    dropped.update(screened.dropped)
    keep = []
    for i, instruction in enumerate(screened.columns[1]):
        key = instruction_key(instruction)
        if config.deduplicate and key in seen:
            dropped["duplicate_instruction"] += 1
            continue
        seen.add(key)
        keep.append(i)
    if screened.rates is not None:
        kept_rates.extend(screened.rates[i] for i in keep)
    return pa.table([[column[i] for i in keep] for column in screened.columns], schema=OUTPUT_SCHEMA)


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


def read_batches(parquets: list[tuple[Path, pq.ParquetFile]], id_column: str) -> Iterator[pa.Table]:
    """Stream the needed columns of every file in small batches, so memory stays flat."""
    total = sum(p.metadata.num_rows for _, p in parquets)
    with tqdm(total=total, unit="rows", desc="filter", mininterval=2) as progress:
        for file, parquet in parquets:
            try:
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[id_column, *TEXT_COLUMNS]):
                    progress.update(batch.num_rows)
                    yield pa.Table.from_batches([batch])
            except (pa.ArrowInvalid, OSError) as e:
                raise FilterError(f"filter: {file} is corrupt ({e}); re-run the fetch stage") from e


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


def worker_count(workers: int | str) -> int:
    """filter.workers as a number of processes: 'auto' is every core this process may run on."""
    return len(os.sched_getaffinity(0)) if workers == "auto" else workers


_WORKER: dict = {}  # a screening process's arguments to screen_batch, set once as it starts


def _start_worker(*args) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism: no thread pool in each
    _WORKER["args"] = args


def _screen_in_worker(table: pa.Table) -> Screened:
    return screen_batch(table, *_WORKER["args"])


def screened_batches(batches: Iterator[pa.Table], processes: int, *args) -> Iterator[Screened]:
    """screen_batch(batch, *args) of every batch, in order: in this process, or by `processes` worker processes
    with at most two batches each in flight, so memory stays flat however large the input."""
    if processes == 1:
        yield from (screen_batch(batch, *args) for batch in batches)
        return
    context = multiprocessing.get_context("spawn")  # no fork: the tokenizer's and Arrow's threads do not survive it
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker, initargs=args) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(_screen_in_worker, batch))
            if len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def filter_files(files: list[Path], out: Path, config: params.FilterParams, max_tokens: int,
                 count_tokens: TokenCounter | None, contamination: ContaminationIndex | None = None,
                 processes: int = 1) -> dict:
    """Stream `files` through the rules into `out` (atomically), batches screened by `processes` processes;
    return the funnel metrics. The output does not depend on the number of processes."""
    dropped, difficulty_counts, seen, rows_in, rates, boxed = Counter(), Counter(), set(), 0, [], 0
    assert count_tokens is not None or config.max_second_guesses_per_1k is None, "params require check_length"
    parquets = [(file, _open(file, config.id_column)) for file in files]
    total = sum(p.metadata.num_rows for _, p in parquets)
    if total == 0:
        raise FilterError(f"filter: the {len(files)} Parquet file(s) read ({files[0]}, ...) hold no rows; check "
                          "data.source in params.yaml and run the fetch stage again (dvc repro fetch)")
    processes = min(processes, -(-total // BATCH_ROWS))  # a worker costs a start: none without a batch for it
    log.info("%d rows in %d file(s), screened in %d process(es)", total, len(files), processes)
    batches = read_batches(parquets, config.id_column)
    with atomic_file(out) as tmp, pq.ParquetWriter(tmp, OUTPUT_SCHEMA) as writer:
        def passed_arrow_rules() -> Iterator[pa.Table]:
            nonlocal rows_in
            for batch in batches:
                rows_in += batch.num_rows
                yield arrow_rules(batch, config, dropped)

        for screened in screened_batches(passed_arrow_rules(), processes, config, max_tokens, count_tokens,
                                         contamination):
            kept = keep_first(screened, config, seen, dropped, rates)
            difficulty_counts.update(kept["difficulty"].to_pylist())
            boxed += pc.sum(pc.match_substring_regex(kept["answer"], BOXED.pattern)).as_py() or 0
            if kept.num_rows:
                writer.write_table(kept)
        funnel = funnel_metrics(rows_in, dropped, difficulty_counts, rates if count_tokens else None, boxed)
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
    count_tokens = TokenCounter(load_tokenizer(model), model.directive) if config.check_length else None
    contamination = contamination_index(args.eval_sets, config.contamination_ngram) if config.decontaminate else None
    processes = worker_count(config.workers)
    funnel = filter_files(raw_files(args.raw), args.out, config, model.max_seq_length, count_tokens, contamination,
                          processes)
    write_json(args.metrics, funnel)
    log.info("kept %d of %d rows -> %s", funnel["rows_out"], funnel["rows_in"], args.out)


if __name__ == "__main__":
    cli.run(main)
