"""Simulated preferences (lessons 09-10): a hidden rater, and pairs of replies it labels with noise.

Real RLHF asks people which of two replies they prefer. A course on a CPU cannot, so a
program plays the rater, and the lessons say so everywhere: these labels are
**simulated, never human**.

- ``Rater``: the hidden "true" score of a reply, here a lexicon sentiment: +1 for each
  distinct kind word, -1 for each distinct grim one (``POSITIVE``, ``NEGATIVE``, words
  that are common in tinyshakespeare), -1 for every repetition of a word of either list
  (a reader finds "good good good" broken, not kind), and optionally a penalty for each
  word that does not exist (not in a vocabulary). The lessons show it to the learner, but never to the
  reward model or to DPO: they see only the labelled pairs.
- ``label_pairs``: for each prompt, every two of its K sampled replies whose true scores
  differ make a pair; which one is "chosen" is drawn with Bradley-Terry noise,
  P(a is chosen over b) = sigmoid((score_a - score_b) / noise), so a rater that is
  almost indifferent flips a coin, as people do. Ties carry no preference and are skipped.
- ``agreement``: the share of pairs whose chosen reply has the higher true score, the
  ceiling of any reward model trained on these labels.
- ``PairBatch`` / ``collate_pairs``: pairs as one right-padded batch, chosen rows first,
  with the mask of completion tokens (for DPO's log-probs) and the index of each row's
  last token (for the reward model's score).
- ``simulated_pairs``: lesson 09's whole recipe in one call (sample K replies per prompt,
  score them with the rater, label, shuffle, hold out), so that lesson 10 trains on the
  very pairs lesson 09 made; ``evaluate_policy`` and ``win_rate``: how both lessons measure
  a policy (true score, KL to the reference, win rate against it).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import torch

from nblib import chat, engine
from nblib.progress import progress

POSITIVE = frozenset(
    "good love true fair noble sweet honour heaven grace friends peace best gentle dear hope friend gracious joy "
    "comfort happy kind faith mercy worthy honest beauty loving virtue brave pleasure merry loves pretty glad "
    "blessed smile bless".split())
NEGATIVE = frozenset(
    "death blood fear dead die tears shame sorrow grief war grave hate false villain foul bloody woe traitor kill "
    "weep slain sin fool enemy hell sad curse poison murder despair vile evil cruel wretched plague cursed".split())


def words(text: str) -> list[str]:
    """The lower-case words of ``text`` (letters and apostrophes)."""
    return re.findall(r"[a-z']+", text.lower())


@dataclass(frozen=True)
class Rater:
    """The hidden true score of a reply: distinct kind words minus distinct grim words, minus
    ``repeat_penalty`` for every occurrence of a kind or grim word after its first, minus
    ``unknown_penalty`` for every word not in ``vocabulary`` (when one is given)."""

    positive: frozenset = POSITIVE
    negative: frozenset = NEGATIVE
    repeat_penalty: float = 1.0
    vocabulary: frozenset | None = field(default=None, repr=False)
    unknown_penalty: float = 0.0

    def repeats(self, text: str) -> int:
        """Occurrences of lexicon words after their first."""
        found = [w for w in words(text) if w in self.positive or w in self.negative]
        return len(found) - len(set(found))

    def __call__(self, text: str) -> float:
        ws = words(text)
        kinds = set(ws)
        score = float(len(kinds & self.positive) - len(kinds & self.negative))
        score -= self.repeat_penalty * self.repeats(text)
        if self.vocabulary is not None and self.unknown_penalty:
            score -= self.unknown_penalty * sum(w.strip("'") not in self.vocabulary for w in ws)
        return score

    def explain(self, text: str) -> str:
        """The score with its reasons, for a learner reading samples."""
        kinds = set(words(text))
        parts = [f"+{sorted(kinds & self.positive)}" if kinds & self.positive else "",
                 f"-{sorted(kinds & self.negative)}" if kinds & self.negative else "",
                 f"repeats {self.repeats(text)}" if self.repeat_penalty and self.repeats(text) else ""]
        if self.vocabulary is not None and self.unknown_penalty:
            unknown = [w for w in words(text) if w.strip("'") not in self.vocabulary]
            parts.append(f"unknown {unknown}" if unknown else "")
        return f"{self(text):+.1f} " + " ".join(p for p in parts if p)


def corpus_vocabulary(text: str, min_count: int = 2) -> frozenset:
    """The words that occur at least ``min_count`` times in ``text`` (for ``Rater.vocabulary``)."""
    counts: dict[str, int] = {}
    for w in words(text):
        w = w.strip("'")
        counts[w] = counts.get(w, 0) + 1
    return frozenset(w for w, c in counts.items() if c >= min_count)


@dataclass
class Pair:
    """One labelled comparison: a prompt, the chosen and the rejected completion (token ids, the
    end token included when the reply ended), and their true scores (hidden from the learners' models)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_score: float
    rejected_score: float


def label_pairs(prompts: list[list[int]], completions: list[list[list[int]]], scores: list[list[float]],
                rng: random.Random, noise: float = 0.5) -> list[Pair]:
    """Noisy Bradley-Terry labels for every pair of differently scored completions of each prompt.

    ``completions[i]`` are prompt i's K samples, ``scores[i]`` their true scores. ``noise`` is
    the rater's temperature: a score gap of ``noise`` is labelled right with probability
    sigmoid(1) = 0.73, a gap of 1 at noise 0.5 with sigmoid(2) = 0.88.
    """
    if not len(prompts) == len(completions) == len(scores):
        raise ValueError(f"one list of completions and of scores per prompt: got {len(prompts)} prompts, "
                         f"{len(completions)} completion lists, {len(scores)} score lists")
    if noise <= 0:
        raise ValueError(f"noise must be > 0 (a temperature), got {noise}")
    pairs = []
    for prompt, comps, sc in zip(prompts, completions, scores):
        for a in range(len(comps)):
            for b in range(a + 1, len(comps)):
                if sc[a] == sc[b]:
                    continue  # a tie says nothing about which is better
                p_a = 1 / (1 + math.exp(-(sc[a] - sc[b]) / noise))
                win, lose = (a, b) if rng.random() < p_a else (b, a)
                pairs.append(Pair(list(prompt), list(comps[win]), list(comps[lose]), sc[win], sc[lose]))
    return pairs


def agreement(pairs: list[Pair]) -> float:
    """The share of pairs whose chosen completion has the higher true score."""
    if not pairs:
        raise ValueError("no pairs")
    return sum(p.chosen_score > p.rejected_score for p in pairs) / len(pairs)


@dataclass
class PairBatch:
    """``2B`` right-padded rows, prompt + completion: rows ``0..B-1`` chosen, ``B..2B-1`` rejected."""

    ids: torch.Tensor         # [2B, T]
    completion_mask: torch.Tensor  # [2B, T] bool: the completion's tokens
    last: torch.Tensor        # [2B] index of each row's last real token

    def to(self, device) -> "PairBatch":
        return PairBatch(self.ids.to(device), self.completion_mask.to(device), self.last.to(device))

    @property
    def n_pairs(self) -> int:
        return self.ids.shape[0] // 2


def collate_pairs(pairs: list[Pair], pad_id: int) -> PairBatch:
    """Pairs as one ``PairBatch`` (chosen rows, then rejected rows), padded on the right."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    T = max(len(prompt) + len(comp) for prompt, comp in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    last = torch.empty(len(rows), dtype=torch.long)
    for r, (prompt, comp) in enumerate(rows):
        if not comp:
            raise ValueError(f"pair {r % len(pairs)} has an empty completion: nothing to compare")
        n = len(prompt) + len(comp)
        ids[r, :n] = torch.tensor(list(prompt) + list(comp))
        mask[r, len(prompt):n] = True
        last[r] = n - 1
    return PairBatch(ids, mask, last)


def by_truth(pairs: list[Pair]) -> list[Pair]:
    """Each pair turned so that the completion with the higher true score comes first (ties kept as they are)."""
    return [p if p.chosen_score >= p.rejected_score else Pair(p.prompt, p.rejected, p.chosen, p.rejected_score,
                                                              p.chosen_score) for p in pairs]


# ---------------------------------------------------------------------------- the data of lessons 09 and 10

def sample_groups(model, prompts: list[list[int]], k: int, max_new_tokens: int, end_id: int, pad_id: int,
                  generator: torch.Generator | None = None, batch_size: int = 64,
                  desc: str = "sampling") -> list[list[list[int]]]:
    """``k`` replies to each prompt at temperature 1, ``batch_size`` prompts per ``engine.generate`` call:
    ``groups[i]`` are ``prompts[i]``'s replies, each with its end token when it wrote one (the reward model
    judges a reply as the policy wrote it, ending included)."""
    groups = []
    for start in progress(range(0, len(prompts), batch_size), desc=desc):
        out = engine.generate(model, prompts[start:start + batch_size], max_new_tokens, num_samples=k,
                              temperature=1.0, stop_tokens=[end_id], pad_id=pad_id, generator=generator)
        rows = out.completions(keep_stop=True)
        groups += [rows[i:i + k] for i in range(0, len(rows), k)]
    return groups


@dataclass
class PreferenceData:
    """What ``simulated_pairs`` made, every step kept for the lessons to show."""

    prompts: list[list[int]]            # the prompt of each group
    groups: list[list[list[int]]]       # K replies per prompt (token ids, end token included)
    texts: list[list[str]]              # their texts (chat.reply_text)
    scores: list[list[float]]           # their true scores (the rater's)
    pairs: list[Pair]                   # every labelled pair, shuffled: the held-out ones first
    train: list[Pair]
    val: list[Pair]


def simulated_pairs(model, tokenizer, prompts: list[list[int]], rater, n_prompts: int, k: int = 4,
                    max_new_tokens: int = 60, noise: float = 0.5, heldout_fraction: float = 0.1,
                    batch_size: int = 64, seed: int = 0) -> PreferenceData:
    """Lesson 09's preference data: ``n_prompts`` prompts drawn from ``prompts`` with random.Random(seed),
    ``k`` replies each sampled with torch.Generator().manual_seed(seed), scored by ``rater``, labelled by
    ``label_pairs`` with random.Random(seed + 1), shuffled with random.Random(seed + 2), and the first
    max(4, ``heldout_fraction``) of them held out."""
    pick = random.Random(seed)
    chosen_prompts = [pick.choice(prompts) for _ in range(n_prompts)]
    groups = sample_groups(model, chosen_prompts, k, max_new_tokens, tokenizer.end_id, tokenizer.pad_id,
                           torch.Generator().manual_seed(seed), batch_size)
    texts = [[chat.reply_text(c, tokenizer) for c in g] for g in groups]
    scores = [[rater(x) for x in g] for g in texts]
    pairs = label_pairs(chosen_prompts, groups, scores, random.Random(seed + 1), noise=noise)
    if len(pairs) < 8:
        raise ValueError(f"only {len(pairs)} labelled pairs from {n_prompts} prompts x {k} replies: "
                         "sample more prompts (or replies per prompt)")
    random.Random(seed + 2).shuffle(pairs)
    n_heldout = max(4, int(len(pairs) * heldout_fraction))
    return PreferenceData(chosen_prompts, groups, texts, scores, pairs, pairs[n_heldout:], pairs[:n_heldout])


@torch.no_grad()
def evaluate_policy(model, ref, prompts: list[list[int]], rater, tokenizer, max_new_tokens: int = 48,
                    seed: int = 123, reward_model=None) -> dict:
    """One reply per prompt at temperature 1, drawn with torch.Generator().manual_seed(seed), so that two
    models draw on the same random numbers. Returns ``true`` (the rater's mean score), ``kl`` (nats per
    reply: sum over the reply of log pi - log ref, on the model's own samples, so its mean is the KL),
    ``length`` (reply tokens), ``texts``, ``scores``, and ``proxy`` (the reward model's mean score) when
    ``reward_model`` is given."""
    model.eval()
    out = engine.generate(model, prompts, max_new_tokens, temperature=1.0, stop_tokens=[tokenizer.end_id],
                          pad_id=tokenizer.pad_id, generator=torch.Generator().manual_seed(seed))
    texts = [chat.reply_text(c, tokenizer) for c in out.completions()]
    _, logprobs = engine.sequence_logprobs(model, out.ids, out.completion_mask, out.attention_mask)
    _, ref_logprobs = engine.sequence_logprobs(ref, out.ids, out.completion_mask, out.attention_mask)
    kl = torch.where(out.completion_mask, logprobs - ref_logprobs, 0).sum(1)
    scores = [rater(x) for x in texts]
    result = {"true": sum(scores) / len(scores), "kl": kl.mean().item(),
              "length": out.completion_mask.sum(1).float().mean().item(), "texts": texts, "scores": scores}
    if reward_model is not None:
        last = engine.last_token_index(out.completion_mask)
        result["proxy"] = reward_model.score(out.ids, last, out.attention_mask).mean().item()
    return result


def win_rate(scores: list[float], ref_scores: list[float]) -> tuple[float, int, int]:
    """(rate, wins, ties): each reply against the reference's reply to the same prompt, a tie counting 1/2."""
    if len(scores) != len(ref_scores) or not scores:
        raise ValueError(f"one reference score per score: got {len(scores)} and {len(ref_scores)}")
    wins = sum(a > b for a, b in zip(scores, ref_scores))
    ties = sum(a == b for a, b in zip(scores, ref_scores))
    return (wins + ties / 2) / len(scores), wins, ties
