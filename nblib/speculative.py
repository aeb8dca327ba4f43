"""Speculative decoding (lesson 16): a small draft model guesses, the target checks k guesses at once.

Decoding one token reads every weight of the model once: at batch 1 the time goes to
moving weights, not to arithmetic, so running the target on k + 1 tokens costs about what
running it on one does. A cheap draft model proposes k tokens; the target scores them all
in one forward pass; an accept/reject rule keeps a prefix of them and adds one token of
its own. The rule (Leviathan et al. 2023; Chen et al. 2023) makes the output *exactly* a
sample of the target: each drafted token x is kept with probability min(1, p(x) / q(x))
(p the target's distribution, q the draft's); at the first rejection a token is drawn from
the residual max(0, p - q), normalised; when all k are kept, one more comes from the
target's next distribution. Greedy decoding is the case of one-hot p and q: a drafted
token is kept when it is the target's argmax, and the output is the target's greedy output.

``accept_draft`` is the rule; ``speculative_generate`` the loop, with a KV cache per model
that rolls back (``cache.pos``) past rejected tokens, so nothing accepted is computed twice.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from nblib import engine, sample
from nblib.kvcache import new_cache


def distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None) -> torch.Tensor:
    """The probabilities [..., V] that ``sample.sample_next_token`` draws from; one-hot on the
    argmax for temperature 0 (greedy)."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float64)
    return F.softmax(sample.sampling_logits(logits.float(), temperature, top_k, top_p), dim=-1).double()


def accept_draft(p: torch.Tensor, q: torch.Tensor, drafted: Sequence[int],
                 generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling's rule: the tokens to append, 1 to k + 1 of them.

    ``p`` [k + 1, V]: the target's distribution at each drafted position and one past the last;
    ``q`` [k, V]: the draft's distribution each drafted token was drawn from; ``drafted`` [k].
    Token i is kept with probability min(1, p[i, x] / q[i, x]); at the first rejection the
    last token comes from normalised max(0, p[i] - q[i]) instead; all kept: from p[k].
    """
    for i, x in enumerate(drafted):
        if float(torch.rand((), generator=generator, dtype=torch.float64)) * q[i, x] < p[i, x]:
            continue  # kept: u < p/q happens with probability min(1, p/q)
        residual = (p[i] - q[i]).clamp(min=0)
        return [*drafted[:i], int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    return [*drafted, int(torch.multinomial(p[len(drafted)], 1, generator=generator))]


def _feed(model, cache, tokens: list[int]) -> torch.Tensor:
    """Run the tokens the cache does not hold yet; the logits [n, V] of each of them."""
    device = cache.k.device
    return model(torch.tensor([tokens[cache.pos:]], device=device), cache=cache)[0][0]


@torch.no_grad()
def speculative_generate(target, draft, prompt: Sequence[int], max_new_tokens: int, lookahead: int = 4,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None,
                         stop_tokens: int | Iterable[int] | None = None, accept=accept_draft) -> tuple[list[int], dict]:
    """Up to ``max_new_tokens`` tokens after ``prompt``, distributed as the target's own samples
    (greedy at temperature 0: the target's greedy tokens); ``draft`` proposes ``lookahead`` at a time.

    Returns ``(new tokens, stats)``: ``stats`` counts target passes ("rounds"), tokens drafted and
    drafted tokens accepted (``acceptance`` = accepted / drafted). ``accept``: the rule
    (lesson 16 plugs in the learner's ``accept_draft``).
    """
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) is not the target's "
                         f"({target.config.vocab_size}): both must read and write the same token ids")
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, got {lookahead}")
    seq, start = [int(t) for t in prompt], len(prompt)
    total = start + max_new_tokens
    if not seq or total > min(target.config.block_size, draft.config.block_size):
        raise ValueError(f"the prompt ({start} tokens, at least 1) + max_new_tokens ({max_new_tokens}) must fit "
                         f"both models' context ({min(target.config.block_size, draft.config.block_size)})")
    stop = engine._stop_set(stop_tokens)
    target_cache, draft_cache = new_cache(target, 1, total), new_cache(draft, 1, total)
    stats = Counter()
    was = target.training, draft.training
    target.eval(), draft.eval()
    try:
        while len(seq) < total:
            k = min(lookahead, total - len(seq) - 1)  # never past the end: every cache slot is a real token
            drafted, qs = [], []
            for i in range(k):
                q = distribution(_feed(draft, draft_cache, seq + drafted)[-1], temperature, top_k, top_p)
                drafted.append(int(torch.multinomial(q, 1, generator=generator)))
                qs.append(q)
            p = distribution(_feed(target, target_cache, seq + drafted)[-(k + 1):], temperature, top_k, top_p)
            new = accept(p, torch.stack(qs) if qs else p[:0], drafted, generator)
            stats.update(rounds=1, drafted=k, accepted=len(new) - 1)
            ended = next((j for j, t in enumerate(new) if t in stop), None)
            seq += new if ended is None else new[:ended + 1]
            # the caches keep only tokens of seq; the newest token is fed at the next round
            target_cache.pos = min(target_cache.pos, len(seq) - 1)
            draft_cache.pos = min(draft_cache.pos, len(seq) - 1)
            if ended is not None:
                break
    finally:
        target.train(was[0]), draft.train(was[1])
    stats = dict(stats)
    stats["acceptance"] = stats.get("accepted", 0) / max(stats.get("drafted", 0), 1)
    return seq[start:], stats
