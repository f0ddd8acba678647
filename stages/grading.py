"""Grading a response against a gold answer: the answer after `</think>`, its last `\\boxed{}` first,
then math-verify's own extraction as a fallback; numeric golds (GSM8K) compared as numbers.
"""

from __future__ import annotations

import re

from stages.prompts import THINK_CLOSE

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def split_reasoning(response: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a generated response; answer is None when `</think>` never came."""
    if THINK_CLOSE not in response:
        return response, None
    reasoning, _, answer = response.rpartition(THINK_CLOSE)
    return reasoning, answer


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    starts = [m.end() for m in BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _as_number(text: str) -> float | None:
    matches = NUMBER.findall(text.replace("\\!", "").replace("{,}", ","))
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def gsm8k_gold(answer: str) -> str:
    """GSM8K's gold is the text after `####`, with thousands separators dropped."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def grade(gold: str, answer: str | None, numeric: bool) -> tuple[bool, str | None]:
    """(correct, extracted answer) of one response's answer part against the gold answer."""
    if not answer:
        return False, None
    boxed = last_boxed(answer)
    if numeric:
        value, expected = _as_number(boxed if boxed is not None else answer), _as_number(gold)
        if value is not None and expected is not None:
            return abs(value - expected) <= 1e-6 * max(1.0, abs(expected)), boxed or str(value)
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$")
    predicted = parse(f"$\\boxed{{{boxed}}}$" if boxed is not None else answer)
    extracted = boxed if boxed is not None else (str(predicted[-1]) if predicted else None)
    return bool(gold_parsed and predicted and verify(gold_parsed, predicted)), extracted
