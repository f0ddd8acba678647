"""The row-by-row rules of the filter stage and the exact token counts they need, for one batch at a time:
think tags, decontamination, the length check, the second-guess threshold. Batches are independent, so
screened_batches runs them in worker processes (filter.workers); this module, not the stage run as __main__,
holds what the workers are given, so spawned processes can import it.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.core import params
from stages.core.prompts import PromptTemplate, completion_text, prompt_text
from stages.data.contamination import ContaminationIndex
from stages.data.magpie import split_response
from stages.scoring.overthinking import per_1k, second_guess_counts

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
        self.by_chunks = splits_at_spaces(self.backend)
        self.chunk_tokens: dict[str, int] = {}  # chunk -> tokens of " " + chunk

    def _encode(self, texts: list[str]) -> list[int]:
        return [len(e) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _count_chunked(self, chunked: pa.ListArray, spaced_first: np.ndarray | None = None) -> np.ndarray:
        """Token counts of texts given as lists of chunks: the first as it is (after a space where spaced_first),
        each later one after a space."""
        flat = chunked.flatten()
        encoded = pc.dictionary_encode(flat)
        distinct = encoded.dictionary.to_pylist()
        new = [chunk for chunk in distinct if chunk not in self.chunk_tokens]
        if len(self.chunk_tokens) + len(new) > CHUNK_CACHE_SIZE:
            self.chunk_tokens.clear()
            new = distinct
        self.chunk_tokens.update(zip(new, self._encode([" " + chunk for chunk in new]), strict=True))
        tokens = np.array([self.chunk_tokens[chunk] for chunk in distinct], dtype=np.int64)[encoded.indices.to_numpy()]
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
        prompt_tokens = np.array(self._encode(prompts), dtype=np.int64)
        if not self.by_chunks:
            completions = [completion_text(prompt, reasoning, answer, self.eos_token)
                           for prompt, reasoning, answer in zip(prompts, reasonings, answers, strict=True)]
            return (prompt_tokens + self._encode(completions)).tolist(), self._encode(list(reasonings))
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


@dataclass
class Screened:
    """The rows of one batch that passed every rule but deduplication, and what the row-by-row rules dropped."""
    dropped: Counter
    columns: tuple[list, ...]  # ids, instructions, reasonings, answers, difficulties
    rates: list[float] | None  # each row's second-guess markers per 1k reasoning tokens (None: no tokenizer)


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
    # counts them, in the length check's pass: the completions are counted from them.
    example_tokens, reasoning_tokens = count_tokens(instructions, reasonings, answers) if count_tokens else (None, None)
    fits = [i for i in range(len(ids)) if example_tokens is None or example_tokens[i] <= max_tokens]
    dropped["too_long"] += len(ids) - len(fits)
    rates = None if reasoning_tokens is None else per_1k(second_guess_counts([reasonings[i] for i in fits]),
                                                         [reasoning_tokens[i] for i in fits])
    threshold = config.max_second_guesses_per_1k
    keep = [k for k in range(len(fits)) if threshold is None or rates[k] <= threshold]
    dropped["too_many_second_guesses"] += len(fits) - len(keep)
    return Screened(dropped, tuple([column[fits[k]] for k in keep] for column in
                                            (ids, instructions, reasonings, answers, difficulties)),
                    None if rates is None else [float(rates[k]) for k in keep])


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
