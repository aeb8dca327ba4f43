"""Checks for lesson 01's exercises (bigram and trigram counting models).

The expected values come from small reference computations written with plain Python
dictionaries, deliberately unlike the tensor code the lesson asks for.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from nblib.checks import CheckFailed, call_learner, expect_close, passed
from nblib.names import BOUNDARY, char_vocab

TINY_COUNTS = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0], [5.0, 4.0, 1.0]])


def check_smoothed_probs(smoothed_probs) -> None:
    """``smoothed_probs(counts, alpha)``: add ``alpha`` to every count, normalise each row."""
    for alpha in (1.0, 0.5, 0.0):
        got = call_learner(f"smoothed_probs(counts, alpha={alpha})", smoothed_probs, TINY_COUNTS.clone(), alpha)
        expected = [[(c + alpha) / (sum(row) + alpha * len(row)) for c in row] for row in TINY_COUNTS.tolist()]
        expect_close(f"smoothed_probs(counts, alpha={alpha})", got, expected, atol=1e-6)
    got = call_learner("smoothed_probs(counts, 1.0)", smoothed_probs, TINY_COUNTS.clone(), 1.0)
    if not torch.is_tensor(got):
        raise CheckFailed(f"smoothed_probs should return a tensor, got {type(got).__name__}")
    passed("smoothed_probs")


def _reference_ngram_nll(train_words, eval_words, n: int, alpha: float) -> float:
    stoi, _ = char_vocab(train_words)
    vocab = len(stoi)

    def grams(words):
        for w in words:
            chs = [BOUNDARY] * (n - 1) + list(w) + [BOUNDARY]
            for i in range(len(chs) - n + 1):
                yield tuple(chs[i : i + n])

    counts = Counter(grams(train_words))
    context_totals = Counter()
    for gram, c in counts.items():
        context_totals[gram[:-1]] += c
    nll = [
        -math.log((counts[g] + alpha) / (context_totals[g[:-1]] + alpha * vocab))
        for g in grams(eval_words)
    ]
    return sum(nll) / len(nll)


def check_trigram_nll(trigram_nll) -> None:
    """``trigram_nll(train_words, eval_words, alpha)``: average NLL of a smoothed trigram model.

    Names are padded with two boundary dots in front and one behind (``..emma.``), the
    vocabulary is ``nblib.names.char_vocab(train_words)``.
    """
    train = ["ab", "ba", "abba", "b", "aab"]
    for eval_words, alpha in ((["ab"], 1.0), (["ba", "bab"], 1.0), (train, 0.1)):
        got = call_learner(f"trigram_nll(train, {eval_words}, alpha={alpha})", trigram_nll, train, eval_words, alpha)
        expected = _reference_ngram_nll(train, eval_words, 3, alpha)
        expect_close(f"trigram_nll(train, {eval_words}, alpha={alpha})", float(got), expected, atol=1e-5)
    passed("trigram_nll")
