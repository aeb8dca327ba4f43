"""The names data set (lessons 01 and 03): words, the character vocabulary, a fixed split."""
from __future__ import annotations

import random

from nblib import data

BOUNDARY = "."  # marks both the start and the end of a name


def load_names() -> list[str]:
    """The 32,033 names of names.txt, lowercase, in file order."""
    return data.read_text("names").split()


def char_vocab(words: list[str]) -> tuple[dict[str, int], dict[int, str]]:
    """``stoi`` and ``itos`` with the boundary ``.`` at index 0 and letters sorted after it."""
    chars = sorted(set("".join(words)))
    stoi = {ch: i + 1 for i, ch in enumerate(chars)}
    stoi[BOUNDARY] = 0
    return stoi, {i: ch for ch, i in stoi.items()}


def split_names(words: list[str], seed: int = 42, fractions=(0.8, 0.1, 0.1)) -> tuple[list[str], list[str], list[str]]:
    """Shuffle with a fixed seed and cut into train/dev/test (80/10/10 by default).

    The same seed always gives the same split, so numbers from different lessons compare.
    """
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n1 = int(fractions[0] * len(shuffled))
    n2 = int((fractions[0] + fractions[1]) * len(shuffled))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]
