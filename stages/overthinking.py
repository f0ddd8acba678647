"""Counting how a response reasons: second-guessing markers ("wait", "hmm", ...), loops (a long n-gram
repeated many times), and the form of the answer (boxed, LaTeX).
"""

from __future__ import annotations

import re
from collections import Counter

LATEX = re.compile(r"\$[^$]+\$|\\\(|\\\[|\\(?:frac|sqrt|cdot|times|boxed|left|right|sum|int|pi)\b")


def marker_pattern(markers: list[str]) -> re.Pattern:
    """One case-insensitive pattern for all markers, each matched at word boundaries; longer markers
    win, so "no, wait" counts once, not also as "wait"."""
    alternatives = sorted((re.escape(m) for m in markers), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def second_guesses(text: str, pattern: re.Pattern) -> int:
    return len(pattern.findall(text))


def loops(text: str, ngram: int, repeats: int) -> bool:
    """True if some run of `ngram` words occurs at least `repeats` times."""
    words = text.split()
    if len(words) < ngram * repeats:
        return False
    counts = Counter(tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1))
    return max(counts.values()) >= repeats


def uses_latex(text: str) -> bool:
    return bool(LATEX.search(text))
