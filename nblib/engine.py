"""Batched generation with log-probabilities, for both model families (lessons 08-11).

Post-training samples completions from a model and then scores them: SFT looks at
them, PPO and GRPO learn from their log-probabilities, DPO compares sequences. This
module does both halves once:

- ``generate(model, prompts, max_new_tokens, ...) -> Rollout``: many prompts at once,
  left-padded, with a KV cache, ``num_samples`` completions per prompt, stop tokens, and
  the log-probability of every sampled token under the distribution it was drawn from.
- ``sequence_logprobs(model, ids, mask)``: the log-probability of given tokens under the
  model (temperature 1), differentiable: the building block of DPO, PPO and GRPO losses.

**Step by step.** ``generate`` is a loop over three calls that a later lesson can drive
itself (batching requests as they come, speculative decoding, a quantized model):

- ``new_cache(model, rows, max_len)``: an empty ``KVCache`` in the model's dtype and device
  (``cache.reset()`` empties it again for the next prompts, without allocating);
- ``prefill(model, ids, attention_mask, cache) -> logits [B, V]``: run the prompts once,
  filling the cache; the logits that choose each row's first new token;
- ``decode_step(model, tokens, attention_mask, cache) -> logits [B, V]``: run one new token
  per row, attending to the cache; the logits that choose the next one.

Tokens are chosen by lesson 06's ``nblib.sample.sample_next_token``, as everywhere else.

**Left padding.** Prompts of different lengths are padded on the left, so that every
row's last prompt token is in column P - 1 and one decode step serves all rows. The
``attention_mask`` hides the padding from attention and from the position count
(``nblib.kvcache``): a padded row computes what the prompt alone would, up to float
rounding.

**Random numbers.** Each step draws one uniform number per row and takes the inverse CDF
of the sampling distribution there (``nblib.sample.sample_next_token``). The numbers come
from ``generator``: a list of one ``torch.Generator`` per row (row r draws one number per
step from its own, so a row's tokens depend on nothing else in the batch: run alone with a
generator seeded alike, a prompt gives the same tokens), or one generator (each step draws
all rows' numbers from it), or None (the global RNG, so ``torch.manual_seed`` decides).
One prompt with one generator gives the tokens that ``nblib.sample.generate`` and
``nblib.llama.generate`` give for the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from nblib import sample
from nblib.kvcache import KVCache, new_cache


@dataclass
class Rollout:
    """Prompts and their completions, one row per sample, rows grouped by prompt.

    Rows ``i * num_samples ... (i + 1) * num_samples - 1`` are prompt i's samples. Columns
    ``0 ... P - 1`` hold the left-padded prompts, the rest the generated tokens.
    """

    ids: torch.Tensor  # [N, P + T] prompts (left-padded), then generated tokens; pad_id elsewhere
    attention_mask: torch.Tensor  # [N, P + T] bool: real tokens (prompt and generated, the stop token too)
    completion_mask: torch.Tensor  # [N, P + T] bool: generated tokens, the stop token included, nothing after
    logprobs: torch.Tensor  # [N, P + T] float: log-prob of each generated token where it was drawn, 0 elsewhere
    finished: torch.Tensor  # [N] bool: the row produced a stop token
    prompt_len: int  # P

    def completions(self, keep_stop: bool = False) -> list[list[int]]:
        """The generated ids of each row, without the stop token (with it when ``keep_stop``)."""
        rows = completion_tokens(self.ids, self.completion_mask)
        if keep_stop:
            return rows
        return [tokens[:-1] if done else tokens for tokens, done in zip(rows, self.finished.tolist())]


def completion_tokens(ids: torch.Tensor, completion_mask: torch.Tensor) -> list[list[int]]:
    """Each row's ids where ``completion_mask`` is True (a reply as the policy wrote it, stop token included)."""
    return [[t for t, m in zip(row, mask) if m] for row, mask in zip(ids.tolist(), completion_mask.tolist())]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[N]: the column of each row's last True (a row must have one); of a ``completion_mask``, each reply's end."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, cols, -1).max(dim=1).values


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """log p(token) under the distribution ``generate`` samples from: ``logits`` [..., V]
    divided by ``temperature`` and filtered (``nblib.sample.sampling_logits``).

    Temperature 0 (greedy) has no such distribution; its tokens get their log-prob
    under the model's own, unfiltered softmax (temperature 1).
    """
    if temperature == 0:
        logits = logits.float()
    else:
        logits = sample.sampling_logits(logits, temperature, top_k, top_p)
    return logits.log_softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` [B, P]: each prompt right-aligned in P = the longest length."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, P - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, P - len(prompt):] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            cache: KVCache | None = None) -> torch.Tensor:
    """Run the prompts ``ids`` [B, P] (left-padded: ``attention_mask`` [B, P], True = real
    token) and return the logits [B, V] of their last position, which choose the first new token.

    With a ``cache`` the prompts' keys and values are stored after what it holds (empty for
    new prompts), in its first B rows. Without one this is a plain forward pass: the
    reference ``generate(use_cache=False)`` runs at every step.
    """
    return model(ids, cache=cache, attention_mask=attention_mask)[0][:, -1]


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """Run one new token per row, ``tokens`` [B], attending to the ``cache``; its logits [B, V].

    ``attention_mask`` [B, cache.pos + 1] covers every token so far, the new one included
    (None: no padding anywhere). The cache then holds the new tokens too.
    """
    if tokens.dim() != 1:
        raise ValueError(f"decode_step takes one token per row, tokens [B]; got shape {tuple(tokens.shape)}")
    return model(tokens[:, None], cache=cache, attention_mask=attention_mask)[0][:, -1]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: int | Iterable[int] | None = None, pad_id: int = 0,
             generator: sample.Generators = None,
             use_cache: bool = True, cache: KVCache | None = None) -> Rollout:
    """Sample ``num_samples`` completions of up to ``max_new_tokens`` tokens for every prompt.

    - ``prompts``: token-id lists (or 1-D tensors), each at least one token long.
    - ``temperature`` 0 is greedy; else tokens are drawn from ``softmax(logits / temperature)``
      restricted to the top-k / top-p set, and ``Rollout.logprobs`` are log-probs under that
      distribution (greedy: under the model's unfiltered softmax; see ``token_logprobs``).
    - ``stop_tokens``: a row that produces one is finished: the stop token is kept (in both
      masks), everything after it is ``pad_id`` with masks False and log-prob 0. Generation
      ends when every row has finished, so the rollout may be shorter than ``max_new_tokens``.
    - ``generator``: one per row, one for all, or None; see the module docstring.
    - ``cache``: a ``KVCache`` of your own (``new_cache(model, len(prompts) * num_samples,
      max_len)``, empty: ``cache.reset()`` it between calls) to use instead of a new one.
    - ``use_cache=False`` runs the whole sequence at every step (slow; a reference).
    The model runs in eval mode (its mode is restored after) and without gradients. The
    prompt plus ``max_new_tokens`` must fit the model's context: the cache holds that many
    positions, and cropping would change what the model sees.
    """
    prompts = [p.tolist() if torch.is_tensor(p) else list(p) for p in prompts]
    _check_arguments(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p, pad_id, generator)
    stop = torch.tensor(sorted(_stop_set(stop_tokens)), dtype=torch.long)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    N, total = B * num_samples, P + max_new_tokens
    if use_cache:
        cache = new_cache(model, N, total) if cache is None else _checked_cache(cache, model, N, total)
    elif cache is not None:
        raise ValueError("use_cache=False runs the whole sequence at every step: pass no cache, or use_cache=True")
    # the whole rollout, filled column by column; columns past the end are cut off at the end
    ids = torch.cat([ids, torch.full((B, max_new_tokens), pad_id, device=device)], dim=1).repeat_interleave(num_samples, 0)
    mask = torch.cat([mask, torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    mask = mask.repeat_interleave(num_samples, 0)
    logprobs = torch.zeros(N, total, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    stop = stop.to(device)
    was_training = model.training
    model.eval()
    try:
        # each distinct prompt once (into the cache's first rows), then copied num_samples times
        logits = prefill(model, ids[::num_samples, :P], mask[::num_samples, :P], cache)
        logits = logits.repeat_interleave(num_samples, 0)
        if cache is not None:
            cache.repeat_rows(num_samples)
        end = P
        for t in range(max_new_tokens):
            token = sample.sample_next_token(logits, temperature, top_k, top_p, generator)[:, 0]
            alive = ~finished
            ids[:, P + t] = torch.where(alive, token, pad_id)
            mask[:, P + t] = alive
            logprobs[:, P + t] = torch.where(alive, token_logprobs(logits, token, temperature, top_k, top_p), 0.0)
            end = P + t + 1
            if len(stop):
                finished = finished | (alive & torch.isin(token, stop))
                if bool(finished.all()):  # one sync per step, only when there are stop tokens
                    break
            if t + 1 == max_new_tokens:
                break
            if cache is not None:  # decode: the newest token only, attending to the cache
                logits = decode_step(model, ids[:, end - 1], mask[:, :end], cache)
            else:  # the reference: the whole sequence again
                logits = prefill(model, ids[:, :end], mask[:, :end])
    finally:
        model.train(was_training)
    completion = mask.clone()
    completion[:, :P] = False
    return Rollout(ids=ids[:, :end], attention_mask=mask[:, :end], completion_mask=completion[:, :end],
                   logprobs=logprobs[:, :end], finished=finished, prompt_len=P)


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed [N], per_token [N, T])``: log p(ids[:, t] | ids[:, :t]) under ``model`` (temperature 1).

    ``per_token[:, t]`` is that log-prob where ``mask[:, t]`` is True and 0 elsewhere;
    ``summed`` adds them up per row. Position 0 has nothing before it, so no prediction:
    ``mask[:, 0]`` is ignored (0 there). ``attention_mask`` [N, T] (True = real token) for
    left-padded rows, as ``Rollout.attention_mask``. It runs the model in its current mode
    and keeps gradients: call ``model.eval()`` and ``torch.no_grad()`` for a frozen
    reference model.
    """
    N, T = ids.shape
    if mask.shape != ids.shape:
        raise ValueError(f"mask must have the shape of ids {list(ids.shape)}, got {list(mask.shape)}")
    if T < 2:
        zeros = torch.zeros(N, T, device=ids.device)
        return zeros.sum(-1), zeros
    # logits at t predict token t + 1: run all but the last token, score ids[:, 1:]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
    inputs_mask = None if attention_mask is None else attention_mask[:, :-1]
    _, loss = model(ids[:, :-1], targets, attention_mask=inputs_mask, reduction="none")
    per_token = torch.cat([torch.zeros_like(loss[:, :1]), -loss], dim=1)
    return per_token.sum(-1), per_token


# ---- helpers -----------------------------------------------------------------------

def _checked_cache(cache: KVCache, model, rows: int, positions: int) -> KVCache:
    """The caller's cache, if it fits this call: ``rows`` rows of at least ``positions``, empty,
    where the model computes."""
    param = next(model.parameters())
    if (cache.k.device, cache.k.dtype) != (param.device, param.dtype):
        raise ValueError(f"the cache is {cache.k.dtype} on {cache.k.device}, the model {param.dtype} on "
                         f"{param.device}: make the cache with engine.new_cache(model, ...)")
    if cache.batch_size != rows or cache.max_len < positions:
        raise ValueError(f"the cache holds {cache.batch_size} rows x {cache.max_len} positions; this call needs "
                         f"{rows} rows (prompts x num_samples) x {positions} positions (longest prompt + "
                         f"max_new_tokens): make one with engine.new_cache(model, {rows}, {positions})")
    if cache.pos != 0:
        raise ValueError(f"the cache already holds {cache.pos} positions of earlier prompts: call cache.reset() "
                         "before reusing it")
    return cache


def _stop_set(stop_tokens) -> set[int]:
    if stop_tokens is None:
        return set()
    if isinstance(stop_tokens, int):
        return {stop_tokens}
    return {int(t) for t in stop_tokens}


def _check_arguments(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p, pad_id,
                     generator) -> None:
    """Refuse bad arguments before any forward pass, saying what to do instead."""
    sample.check_temperature(temperature)
    if temperature > 0:
        sample.filter_logits(torch.zeros(1, 2), top_k, top_p)  # raises on a bad top_k / top_p
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    sample.check_generators(generator, len(prompts) * num_samples, "rows (prompts x num_samples)")
    vocab, block_size = model.config.vocab_size, model.config.block_size
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: start it with a token, e.g. the model's bos/eos token")
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt {i} has token ids outside the vocabulary 0 ... {vocab - 1}")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id={pad_id} is not a token of the {vocab}-token vocabulary (the model reads it, "
                         "masked); use any valid id, e.g. 0 or the eos token")
    P = max(len(p) for p in prompts)
    if P > block_size:
        raise ValueError(f"the longest prompt has {P} tokens, more than the model's context of {block_size}; "
                         f"crop prompts to their last {block_size} - max_new_tokens tokens")
    if P + max_new_tokens > block_size:
        raise ValueError(f"the longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{P + max_new_tokens} is more than the model's context of {block_size}: ask for "
                         f"at most {block_size - P} new tokens, or crop the prompts")
