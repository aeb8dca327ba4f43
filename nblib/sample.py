"""Sampling from a language model: temperature, top-k, top-p, seeded (lesson 06).

``sample_next_token`` is the one sampler of the course: lesson 07's KV-cache generator,
``nblib.engine`` (08 on) and ``nblib.pretrain`` draw their tokens with it, so one seed
gives the same tokens through any of them.

Works with any model that follows the course contract: ``model.config.block_size`` and
``model(idx) -> (logits, loss)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.nn import functional as F

# where random numbers come from: the global RNG (None), one generator, or one per row
Generators = torch.Generator | Sequence[torch.Generator] | None


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` with every token outside the top-k / top-p set set to -inf.

    - top-k keeps the ``k`` largest logits (ties at the k-th value are all kept).
    - top-p (nucleus) keeps the smallest set of most likely tokens whose probabilities
      add up to at least ``p``; the most likely token is always kept, so a tiny ``p``
      is greedy decoding, and ``p = 1`` keeps every token (an exact no-op).
    Both together: top-k first, then top-p among what is left.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p == 1.0:
            return logits  # the nucleus is the whole vocabulary
        # Sort ascending and sum from the least likely token up: a token is dropped when it
        # and everything less likely hold at most 1 - p of the mass. (Equivalent to "the
        # tokens before it in descending order already reach p", but a float32 running sum
        # from the top reaches 1.0 thousands of tokens early on a 50k vocabulary; summing
        # the small ones first keeps the tail exact. It is also how transformers does it.)
        sorted_logits, order = torch.sort(logits, dim=-1)
        tail_mass = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = tail_mass <= 1 - top_p
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_temperature(temperature: float) -> None:
    """Refuse a temperature that is not a finite number >= 0 (NaN would fail deep inside
    torch, and inf would quietly turn every distribution uniform)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy, 1 samples the model's "
                         f"own probabilities), got {temperature}")


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The logits whose softmax is the distribution a token is drawn from: ``logits / temperature``
    (in float32), then top-k / top-p filtered (``-inf`` outside). For a temperature above 0;
    temperature 0 is greedy and has no distribution to draw from."""
    check_temperature(temperature)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy decoding (argmax): there is no distribution to sample from")
    return filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: Generators = None) -> torch.Tensor:
    """One token per row of ``logits`` [B, vocab] -> LongTensor [B, 1].

    ``temperature`` divides the logits (below 1: sharper, above 1: flatter); 0 means
    greedy (argmax, no random number used). Otherwise each row draws one uniform number
    ``u`` (``uniforms``) and takes the token where the cumulative probability of the
    filtered distribution passes ``u`` (``inverse_cdf``). ``generator``: None (the global
    RNG, so ``torch.manual_seed`` decides), one ``torch.Generator`` for all rows, or a list
    of one per row (a row's tokens then depend on its own generator only). Every generator
    of the course (lessons 06, 07, 08 on, ``nblib.pretrain``) picks its tokens here, one
    draw per row per step, so one seed gives the same tokens whichever of them runs.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    check_temperature(temperature)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    u = uniforms(generator, logits.size(0), logits.device)
    return inverse_cdf(sampling_logits(logits, temperature, top_k, top_p), u)[:, None]


def inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [N, V]: the inverse CDF of ``softmax(logits)`` at ``u`` [N].

    The first token whose cumulative probability exceeds u (scaled by the total, which is
    1 up to rounding); a token of probability 0 (a logit of -inf) is never the first to
    exceed it. The sum runs in float64, so the last tokens of a 50k vocabulary keep their share.
    """
    cdf = F.softmax(logits, dim=-1).double().cumsum(dim=-1)
    total = cdf[:, -1]
    if bool(total.isnan().any()):  # torch.multinomial would raise too; argmax would hide it
        raise ValueError("the logits hold NaN (or +inf): the model has diverged; check its loss and weights")
    below = cdf <= (u.double() * total)[:, None]
    return below.sum(dim=-1).clamp(max=logits.size(-1) - 1)


def uniforms(generator: Generators, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[rows] uniform numbers in [0, 1), float64, on ``device``: one step's draw (``sample_next_token``).

    A generator draws on its own device (the numbers are then moved), and None draws from
    the global CPU RNG, so a seed gives the same numbers whatever device the model is on.
    Drawn one step at a time, a loop that stops early and one that goes on share their first tokens.
    """
    if generator is None:
        u = torch.rand(rows, dtype=torch.float64)
    elif isinstance(generator, torch.Generator):
        u = torch.rand(rows, generator=generator, dtype=torch.float64, device=generator.device)
    else:
        check_generators(generator, rows)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device).to(device)
                       for g in generator])
    return u.to(device)


def check_generators(generator: Generators, rows: int, what: str = "rows") -> None:
    """Refuse a list of generators that is not one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    n = len(generator)
    if n != rows or not all(isinstance(g, torch.Generator) for g in generator):
        raise ValueError(f"{n} generators for {rows} {what}: pass one torch.Generator per row, a single "
                         "generator, or None")


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: Generators = None,
             start_token: int | None = None) -> torch.Tensor:
    """Extend ``idx`` [B, T] (or [T]) by ``max_new_tokens`` sampled tokens; returns [B, T + new].

    - The model only ever sees the last ``model.config.block_size`` tokens, so a prompt
      longer than the context is cropped, not an error (the returned sequence keeps it whole).
    - An empty prompt (T = 0) starts from ``start_token`` (default: the config's
      ``bos_token_id`` if it has one, else the last token of the vocabulary, which is
      GPT-2's ``<|endoftext|>``); the start token is not part of the result.
    This is the plain O(T^2)-per-token loop; lesson 07 adds a KV cache.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_temperature(temperature)  # now, not after a first forward pass
    squeeze = idx.dim() == 1
    if squeeze:
        idx = idx[None]
    if idx.dim() != 2:
        raise ValueError(f"idx must be [batch, time] or [time], got shape {tuple(idx.shape)}")
    idx = idx.long()
    prompt_len = idx.size(1)
    if prompt_len == 0:
        if start_token is None:
            start_token = getattr(model.config, "bos_token_id", None)
        if start_token is None:
            start_token = model.config.vocab_size - 1
        idx = torch.full((idx.size(0), 1), start_token, dtype=torch.long, device=idx.device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = idx[:, -model.config.block_size:]
            logits, _ = model(context)
            next_id = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_id.to(idx.device)], dim=1)
    finally:
        model.train(was_training)
    if prompt_len == 0:
        idx = idx[:, 1:]  # drop the start token
    return idx[0] if squeeze else idx
