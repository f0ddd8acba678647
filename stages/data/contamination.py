"""Decontamination: which training instructions repeat an evaluation problem, verbatim after
normalization or through a long shared run of words (an n-gram).
"""

from __future__ import annotations

import re
import unicodedata

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


class ContaminationIndex:
    """Normalized evaluation problems and all their word n-grams, for membership tests."""

    def __init__(self, problems: list[str], ngram: int):
        self.ngram = ngram
        self.exact: set[tuple[str, ...]] = set()
        self.ngrams: set[tuple[str, ...]] = set()
        for problem in problems:
            tokens = words(problem)
            self.exact.add(tuple(tokens))
            self.ngrams.update(tuple(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1))

    def __len__(self) -> int:
        return len(self.exact)

    def contains(self, instruction: str) -> bool:
        tokens = words(instruction)
        if tuple(tokens) in self.exact:
            return True
        # the instruction's n-grams, made in C: the tuples of n staggered runs of its words
        return not self.ngrams.isdisjoint(zip(*(tokens[i:] for i in range(self.ngram)), strict=False))
