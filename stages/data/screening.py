"""The filter stage's work on one part of the input at a time: read it, apply the rules (Arrow's on whole
columns, then think tags, decontamination, the length check, the second-guess threshold) and count the exact
tokens they need. Parts are independent, so screened_parts runs them in worker processes (filter.workers),
each reading its own rows; this module, not the stage run as __main__, holds what the workers are given, so
spawned processes can import it.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core import cli, params
from stages.core.prompts import PromptTemplate, completion_text, prompt_text
from stages.data.contamination import ContaminationIndex
from stages.data.magpie import TEXT_COLUMNS, split_response
from stages.scoring.overthinking import per_1k, second_guess_counts

# Cuts before a single space between two non-space characters: regex pre-tokenizers (GPT-2's, Qwen's)
# start a new piece there whatever came before, so the text's tokens are its chunks' tokens.
SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")
# A space that is not such a cut (beside whitespace, or at either end), as an Arrow (RE2) regex;
# whitespace as Unicode and Python's str.isspace define it.
WHITESPACE = r"[\t-\r\x{1c}-\x{20}\x{85}\p{Z}]"
IRREGULAR_SPACE = rf"(?:^|{WHITESPACE}) | (?:{WHITESPACE}|$)"
BATCH_ROWS = 2048  # rows decoded at a time: memory stays flat
PART_ROWS = 8192  # rows of whole row groups that a worker reads and screens as one part
CHUNK_CACHE_SIZE = 4_000_000  # distinct chunks remembered (~400 MB); the cache restarts when full
JOINED_CHUNKS = 4096  # new chunks encoded together as one text


def splits_at_spaces(backend, extra_probes: Sequence[str] = ()) -> bool:
    """Whether this tokenizer encodes text cut at SPACE_CUT as the concatenation of the parts'
    encodings, the cut space leading the second part (true of GPT-2's and Qwen's pre-tokenizers)."""
    probes = [*extra_probes, "The answer is 42, so x = 3.5. Wait, let me re-check the sum of the terms: 12 + 30 = 42!",
              "so $\\frac{1}{2}$ and \\boxed{7}\n\nHmm... actually (a+b)^2 = a^2 + 2ab + b^2 holds, it 's 'true'.",
              "  two  spaces, a tab\t here,\n an indent and\u00a0non-breaking space; caf\u00e9 \u0301 accents "]
    for probe in probes:
        whole = backend.encode(probe, add_special_tokens=False).ids
        parts = SPACE_CUT.split(probe)
        pieces = [parts[0], *(" " + part for part in parts[1:])]
        if [i for e in backend.encode_batch(pieces, add_special_tokens=False) for i in e.ids] != whole:
            return False
    return True


DIGIT_PROBE = " x1 22a3, 456 $7$ 8.9 (10)^{23} \\frac{4}{5} 2024-12-06 v1.0 a_{12}=0.25"


def digits_apart(backend) -> bool:
    """Whether this tokenizer makes every ASCII digit a piece of its own (Qwen2's pre-tokenizer does; GPT-2's
    and Llama 3's, which keep runs of digits, do not). Then a digit is one token whichever it is, and a text's
    count does not change when its digits are written as 0."""
    if backend.pre_tokenizer is None:
        return False
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(DIGIT_PROBE)]
    if any(len(piece) > 1 and any(c.isascii() and c.isdigit() for c in piece) for piece in pieces):
        return False
    zeros = DIGIT_PROBE.translate(str.maketrans("123456789", "000000000"))
    return len(backend.encode(DIGIT_PROBE, add_special_tokens=False)) == len(backend.encode(zeros,
                                                                                            add_special_tokens=False))


def digits_as_zero(strings: pa.LargeStringArray) -> pa.LargeStringArray:
    """The strings with every ASCII digit written as 0 (single bytes in UTF-8, never inside another character)."""
    validity, offsets, data = strings.buffers()
    text = np.frombuffer(data, np.uint8).copy() if data is not None else np.zeros(0, np.uint8)
    text[(text >= ord("1")) & (text <= ord("9"))] = ord("0")
    return pa.LargeStringArray.from_buffers(len(strings), offsets, pa.py_buffer(text), validity, offset=strings.offset)


class TokenCounter:
    """Exact token counts of whole training examples (prompt + completion), as training will see them,
    and of their reasonings alone (for the second-guess rate).

    A reasoning is cut at SPACE_CUT into chunks of about a word, and each distinct chunk is tokenized
    once: reasoning text repeats its words, so this costs a fraction of encoding every text in full
    (bench/filter_speed.py). Texts whose every space is a cut are split and looked up in Arrow; the rest
    are split with SPACE_CUT. A completion is its reasoning with the opener joined to the first chunk
    and the think close, answer and end of sequence to the last (the joins hold no space, so they make or
    remove no cut): its count is the reasoning's with those end chunks exchanged, and its middle is never
    counted twice. A tokenizer for which the cut would change the tokens (see splits_at_spaces) gets every
    text encoded in full.
    """

    MARKS = ("\x00reasoning\x00", "\x00answer\x00")

    def __init__(self, tokenizer, directive: str):
        self.directive, self.eos_token = directive, tokenizer.eos_token  # the prompt as training renders it
        self.template = PromptTemplate.of(tokenizer, directive)
        # Kept only where the template cannot stand in: workers then need no transformers (seconds to import).
        self.tokenizer = None if self.template else tokenizer
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no per-token Python objects
        # prompts are counted by their chunks too: special tokens of the template must not change the cuts
        probe = self.template(PromptTemplate.PROBES[0]) if self.template else None
        self.by_chunks = splits_at_spaces(self.backend, [probe] if probe else [])
        # numbers are a long tail of distinct chunks: where digits are pieces of their own, 17 and 42 are one chunk
        self.digits_apart = self.by_chunks and digits_apart(self.backend)
        self.chunk_tokens: dict[str, int] = {}  # chunk -> tokens of " " + chunk

    def _encode(self, texts: list[str]) -> list[int]:
        return [len(e) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _encode_spaced(self, chunks: list[str]) -> list[int]:
        """Tokens of " " + chunk, for each chunk: JOINED_CHUNKS at a time as the words of one pre-tokenized
        text (the tokenizer normalizes and splits each word on its own, as it would the word alone), counted by
        each token's word. One encoding per thousands of chunks: the per-text overhead dominates a word."""
        counts = []
        groups = [[" " + chunk for chunk in chunks[k:k + JOINED_CHUNKS]] for k in range(0, len(chunks), JOINED_CHUNKS)]
        for group, encoding in zip(groups, self.backend.encode_batch(groups, is_pretokenized=True,
                                                                     add_special_tokens=False), strict=True):
            counts.extend(np.bincount(np.array(encoding.word_ids, np.int64), minlength=len(group)).tolist())
        return counts

    def _count_chunked(self, chunked: pa.ListArray, spaced_first: np.ndarray | None = None) -> np.ndarray:
        """Token counts of texts given as lists of chunks: the first as it is (after a space where spaced_first),
        each later one after a space."""
        flat = chunked.flatten()
        if self.digits_apart:
            flat = digits_as_zero(flat)
        encoded = pc.dictionary_encode(flat)
        distinct = encoded.dictionary.to_pylist()
        known = np.array(list(map(self.chunk_tokens.get, distinct, repeat(-1))), dtype=np.int64)  # one C-level pass
        missing = np.flatnonzero(known < 0)
        if len(self.chunk_tokens) + len(missing) > CHUNK_CACHE_SIZE:
            self.chunk_tokens.clear()
        new = [distinct[i] for i in missing]
        known[missing] = counts = self._encode_spaced(new)
        self.chunk_tokens.update(zip(new, counts, strict=True))
        tokens = known[encoded.indices.to_numpy()]
        starts = np.asarray(chunked.offsets)[:-1].astype(np.int64) - chunked.offsets[0].as_py()
        bare = starts if spaced_first is None else starts[~spaced_first]
        if len(bare):
            tokens[bare] = self._encode(flat.take(bare).to_pylist())
        return np.add.reduceat(tokens, starts)

    def _chunked(self, texts: list[str]) -> tuple[np.ndarray, pa.ListArray]:
        """(order, chunk lists): each text cut at SPACE_CUT, those of only lone spaces first (split in Arrow),
        then the rest (split with the regex); order[k] is the index in texts of list k."""
        array = pa.array(texts, pa.large_string())
        irregular = pc.match_substring_regex(array, IRREGULAR_SPACE).to_numpy(zero_copy_only=False)
        regular, others = np.flatnonzero(~irregular), np.flatnonzero(irregular)
        lists = [pc.split_pattern(array.take(regular), " ").cast(pa.list_(pa.large_string())),
                 pa.array([SPACE_CUT.split(texts[i]) for i in others], pa.list_(pa.large_string()))]
        return np.concatenate([regular, others]), pa.concat_arrays(lists)

    def count(self, texts: list[str]) -> list[int]:
        """Token count of each text, encoded on its own."""
        return self._count_with_ends(texts)[0].tolist()

    def _count_with_ends(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """Token counts of texts, with each text's number of chunks and its first and last chunks."""
        if not self.by_chunks or not texts:
            return np.array(self._encode(texts), dtype=np.int64), np.ones(len(texts), np.int64), [], []
        order, chunked = self._chunked(texts)
        counts, lengths = np.zeros(len(texts), np.int64), np.zeros(len(texts), np.int64)
        counts[order] = self._count_chunked(chunked)
        lengths[order] = pc.list_value_length(chunked).to_numpy()
        # offsets relative to the flattened chunks (flatten() drops what precedes a sliced array's first list)
        flat, offsets = chunked.flatten(), np.asarray(chunked.offsets).astype(np.int64) - chunked.offsets[0].as_py()
        firsts, lasts = [None] * len(texts), [None] * len(texts)
        for i, first, last in zip(order.tolist(), flat.take(offsets[:-1]).to_pylist(),
                                  flat.take(offsets[1:] - 1).to_pylist(), strict=True):
            firsts[i], lasts[i] = first, last
        return counts, lengths, firsts, lasts

    def __call__(self, instructions, reasonings, answers) -> tuple[list[int], list[int]]:
        """Token counts of each whole example (prompt + completion) and of each reasoning alone."""
        if not instructions:
            return [], []
        prompts = [self.template(problem) if self.template else prompt_text(self.tokenizer, problem,
                                                                             directive=self.directive)
                   for problem in instructions]
        if not self.by_chunks:
            prompt_tokens = np.array(self._encode(prompts), dtype=np.int64)
            completions = [completion_text(prompt, reasoning, answer, self.eos_token)
                           for prompt, reasoning, answer in zip(prompts, reasonings, answers, strict=True)]
            return (prompt_tokens + self._encode(completions)).tolist(), self._encode(list(reasonings))
        prompt_tokens = self._count_with_ends(prompts)[0]
        reasoning_tokens, lengths, firsts, lasts = self._count_with_ends(list(reasonings))
        # The chunks of each completion that differ from its reasoning's: the first (with the opener) and,
        # from the last chunk of the reasoning on, the think close, the answer's chunks and the end.
        tails, openers = [], []
        for prompt, first, last, length, answer in zip(prompts, firsts, lasts, lengths.tolist(), answers,
                                                       strict=True):
            opener, rest = completion_text(prompt, *self.MARKS, self.eos_token).split(self.MARKS[0])
            between, end = rest.split(self.MARKS[1])
            chunks = SPACE_CUT.split(answer)
            chunks[0] = (last if length > 1 else opener + first) + between + chunks[0]
            chunks[-1] += end
            tails.append(chunks)
            openers.append(opener)
        several = lengths > 1
        tail_tokens = self._count_chunked(pa.array(tails, pa.list_(pa.large_string())), spaced_first=several)
        completion_tokens = tail_tokens.copy()
        rows = np.flatnonzero(several)
        if len(rows):  # the reasoning's count, its last chunk's replaced by the tail, its first by the opener's
            completion_tokens[rows] += reasoning_tokens[rows] - self._encode([" " + lasts[i] for i in rows])
            opened = [i for i in rows if openers[i]]
            if opened:
                completion_tokens[opened] += (np.array(self._encode([openers[i] + firsts[i] for i in opened]))
                                              - self._encode([firsts[i] for i in opened]))
        return (prompt_tokens + completion_tokens).tolist(), reasoning_tokens.tolist()


class FilterError(cli.StageError):
    """The input cannot be filtered as asked."""


def arrow_rules(table: pa.Table, config: params.FilterParams, dropped: Counter) -> pa.Table:
    """The rules Arrow applies to whole columns at once (complete rows, category, quality, difficulty): cheap,
    and most rows go here. Each rule narrows a mask and the table is filtered once: the long texts are copied
    once, not once a rule."""
    columns = (config.id_column, *TEXT_COLUMNS)
    complete = functools.reduce(pc.and_, [pc.is_valid(table[c]) for c in columns])
    blank = pc.equal(pc.utf8_trim_whitespace(pc.cast(table["instruction"], pa.string())), "")
    keep = pc.and_(complete, pc.invert(pc.fill_null(blank, True)))
    passing = pc.sum(keep).as_py() or 0
    dropped["null_field"] += table.num_rows - passing
    for rule, allowed in (("task_category", config.task_categories),
                          ("input_quality", config.input_qualities),
                          ("difficulty", config.difficulties)):
        keep = pc.and_(keep, pc.fill_null(pc.is_in(pc.cast(table[rule], pa.string()), pa.array(allowed)), False))
        before, passing = passing, pc.sum(keep).as_py() or 0
        dropped[rule] += before - passing
    return table.filter(keep)


@dataclass(frozen=True)
class Part:
    """Whole row groups of one Parquet file, read and screened together by one process."""
    file: Path
    row_groups: tuple[int, ...]
    rows: int


def parts(file: Path, parquet: pq.ParquetFile) -> list[Part]:
    """The file's row groups in order, gathered into parts of at least PART_ROWS rows (the last may hold fewer)."""
    found, groups, count = [], [], 0
    for group in range(parquet.metadata.num_row_groups):
        groups.append(group)
        count += parquet.metadata.row_group(group).num_rows
        if count >= PART_ROWS:
            found.append(Part(file, tuple(groups), count))
            groups, count = [], 0
    if groups:
        found.append(Part(file, tuple(groups), count))
    return found


OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("reasoning", pa.string()),
                           ("answer", pa.string()), ("difficulty", pa.string())])


@dataclass
class Screened:
    """The rows of one part that passed every rule but deduplication, and what the rules dropped."""
    rows_in: int
    dropped: Counter
    kept: pa.Table  # OUTPUT_SCHEMA: Arrow, so it travels from a worker as buffers, not as Python strings
    rates: list[float] | None  # each row's second-guess markers per 1k reasoning tokens (None: no tokenizer)


def read_part(part: Part, config: params.FilterParams, dropped: Counter) -> pa.Table | None:
    """The part's rows that pass the Arrow rules, decoded BATCH_ROWS at a time (None: it has no rows)."""
    passed = []
    try:
        batches = pq.ParquetFile(part.file).iter_batches(batch_size=BATCH_ROWS, row_groups=list(part.row_groups),
                                                         columns=[config.id_column, *TEXT_COLUMNS])
        for batch in batches:
            passed.append(arrow_rules(pa.Table.from_batches([batch]), config, dropped))
    except (pa.ArrowInvalid, OSError) as e:
        raise FilterError(f"filter: {part.file} is corrupt ({e}); re-run the fetch stage") from e
    return pa.concat_tables(passed) if passed else None


@dataclass
class Parsed:
    """A part's rows that passed every rule before the length check, their texts split, and the drops so far."""
    rows_in: int
    dropped: Counter
    columns: tuple[list, ...]  # ids, instructions, reasonings, answers, difficulties


def parse_part(part: Part, config: params.FilterParams, contamination: ContaminationIndex | None) -> Parsed:
    """Read a part and apply the rules that need no tokenizer: Arrow's, the think tags, decontamination."""
    dropped = Counter()
    table = read_part(part, config, dropped)
    columns = ([], [], [], [], [])
    if table is None:
        return Parsed(part.rows, dropped, columns)
    ids, instructions, reasonings, answers, difficulties = columns
    for row_id, instruction, response, difficulty in zip(
            pc.cast(table[config.id_column], pa.string()).to_pylist(), table["instruction"].to_pylist(),
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
    return Parsed(part.rows, dropped, columns)


def count_part(parsed: Parsed, config: params.FilterParams, max_tokens: int,
               count_tokens: TokenCounter | None) -> Screened:
    """The length check and the second-guess threshold on a parsed part."""
    dropped, (ids, instructions, reasonings, answers, difficulties) = parsed.dropped, parsed.columns
    # Reasoning tokens, for the second-guess rate, are counted exactly with the base model's tokenizer, as evaluation
    # counts them, in the length check's pass: the completions are counted from them.
    example_tokens, reasoning_tokens = count_tokens(instructions, reasonings, answers) if count_tokens else (None, None)
    fits = [i for i in range(len(ids)) if example_tokens is None or example_tokens[i] <= max_tokens]
    dropped["too_long"] += len(ids) - len(fits)
    rates = None if reasoning_tokens is None else per_1k(second_guess_counts([reasonings[i] for i in fits]),
                                                         [reasoning_tokens[i] for i in fits])
    threshold = config.max_second_guesses_per_1k
    keep = [k for k in range(len(fits)) if threshold is None or rates[k] <= threshold]
    dropped["too_many_second_guesses"] += len(fits) - len(keep)
    kept = pa.table([[column[fits[k]] for k in keep] for column in (ids, instructions, reasonings, answers,
                                                                     difficulties)], schema=OUTPUT_SCHEMA)
    return Screened(parsed.rows_in, dropped, kept, None if rates is None else [float(rates[k]) for k in keep])


def screen_part(part: Part, config: params.FilterParams, max_tokens: int, count_tokens: TokenCounter | None,
                contamination: ContaminationIndex | None = None) -> Screened:
    """Read a part and apply every rule but deduplication: they depend on no other part, so parts are
    screened in any order, by any process."""
    return count_part(parse_part(part, config, contamination), config, max_tokens, count_tokens)


def worker_count(workers: int | str, rows: int) -> int:
    """filter.workers as a number of processes for `rows` rows: 'auto' is every core this process may run on,
    but at most one per PART_ROWS rows, since a worker's start (~1.5 s of a core) costs as much as screening
    thousands of rows: a small input is screened in this process."""
    if workers != "auto":
        return workers
    return max(1, min(cli.usable_cpus(), rows // PART_ROWS))


_WORKER: dict = {}  # a screening process's arguments, set once as it starts, and its token counter


def _start_worker(counters, *args) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism: no thread pool in each
    _WORKER.update(counters=counters, args=args)


def _counter() -> TokenCounter | None:
    """This worker's token counter: the main process sends one to each worker once it has loaded the tokenizer
    (or the error that stopped it), and a worker takes it when it first needs it."""
    if "counter" not in _WORKER:
        _WORKER["counter"] = _WORKER["counters"].get()
    if isinstance(_WORKER["counter"], BaseException):
        raise _WORKER["counter"]
    return _WORKER["counter"]


def _screen_in_worker(part: Part) -> Screened:
    config, max_tokens, contamination = _WORKER["args"]
    parsed = parse_part(part, config, contamination)  # needs no tokenizer: runs while the main process loads it
    return count_part(parsed, config, max_tokens, _counter())


def screened_parts(todo: list[Part], processes: int, load_counter: Callable[[], TokenCounter | None],
                   config: params.FilterParams, max_tokens: int,
                   contamination: ContaminationIndex | None = None) -> Iterator[Screened]:
    """screen_part of every part, in order: in this process, or by `processes` worker processes (each reads
    its own parts) with at most two parts each in flight, so memory stays flat however large the input.
    load_counter gives the token counter (None: no length check); loading the tokenizer takes seconds, so
    the workers start first and read their first parts meanwhile."""
    if processes == 1:
        count_tokens = load_counter()
        yield from (screen_part(part, config, max_tokens, count_tokens, contamination) for part in todo)
        return
    context = multiprocessing.get_context("spawn")  # no fork: the tokenizer's and Arrow's threads do not survive it
    counters = context.Queue()
    counters.cancel_join_thread()  # a copy no worker took (it had no part) must not hold up this process's exit
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                             initargs=(counters, config, max_tokens, contamination)) as pool:
        pending = deque(pool.submit(_screen_in_worker, part) for part in todo[:2 * processes])
        try:
            count_tokens = load_counter()
        except BaseException as e:
            for _ in range(processes):  # workers waiting for a counter get the error instead, and stop
                counters.put(FilterError(f"filter: stopped, as the main process failed: {e}"))
            pool.shutdown(cancel_futures=True)
            raise
        for _ in range(processes):
            counters.put(count_tokens)
        for part in todo[2 * processes:]:
            yield pending.popleft().result()
            pending.append(pool.submit(_screen_in_worker, part))
        while pending:
            yield pending.popleft().result()
