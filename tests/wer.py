"""
Word error rate: word-level Levenshtein distance over the reference's length,
after lowercasing and dropping punctuation (so "Hello, world." == "hello world").
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return [w.strip("'") for w in _WORD.findall(text.lower()) if w.strip("'")]


def distance(reference: list[str], hypothesis: list[str]) -> int:
    """
    Substitutions + insertions + deletions turning C{reference} into
    C{hypothesis}.
    """
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp))
            )
        previous = current
    return previous[-1]


def wer(reference: str, hypothesis: str) -> float:
    """
    The word error rate of C{hypothesis} against C{reference} (0.0 is
    perfect; it can exceed 1.0 when the hypothesis adds words).
    """
    ref = words(reference)
    errors = distance(ref, words(hypothesis))
    return errors / len(ref) if ref else float(bool(errors))
