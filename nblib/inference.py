"""Measuring inference (lesson 16): memory bandwidth, prefill and decode speed, the decode roofline.

A decode step of batch B reads every weight once and each row's KV cache once, and does
about 2 FLOPs per weight per row. Below a batch of a few hundred, reading dominates: the
step takes about (weight bytes + cache bytes) / bandwidth, whatever B is, so tokens/s
grows with B almost for free until the arithmetic catches up. ``memory_bandwidth``
measures the bandwidth a large read gets on this machine; ``decode_roofline`` turns it
into the tokens/s that reading alone allows; ``time_prefill`` and ``time_decode`` measure
what the engine (``nblib.engine``'s ``prefill`` and ``decode_step``) actually does.
"""
from __future__ import annotations

import time

import torch

from nblib import engine
from nblib.hardware import synchronize
from nblib.llama import kv_cache_bytes_per_token


def memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5, device="cpu") -> float:
    """Bytes/s of reading a ``nbytes`` float32 tensor once (a sum), the best of ``repeats``."""
    x = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers that a forward pass reads (a tied table once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.nelement() * t.element_size()
    return total


def cache_bytes_per_token(config, bytes_per_value: int = 4) -> int:
    """Lesson 07's ``kv_cache_bytes_per_token`` for a model's config (float32 by default, as the engine's cache)."""
    n_kv = getattr(config, "n_kv_heads", None) or config.n_head
    return kv_cache_bytes_per_token(config.n_layer, n_kv, config.n_embd // config.n_head, bytes_per_value)


def decode_roofline(weight_bytes: int, cache_bytes: int, bandwidth: float, batch: int = 1) -> float:
    """Tokens/s at batch ``batch`` if a decode step only had to read the weights once and every
    row's cache (``cache_bytes`` in all) at ``bandwidth`` bytes/s."""
    return batch * bandwidth / (weight_bytes + cache_bytes)


@torch.no_grad()
def time_prefill(model, batch: int, prompt_len: int, repeats: int = 3) -> float:
    """Seconds of the best of ``repeats`` prefills of ``batch`` random prompts of ``prompt_len`` tokens."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    best = float("inf")
    for _ in range(repeats):
        cache = engine.new_cache(model, batch, prompt_len)
        synchronize(device)
        t0 = time.perf_counter()
        engine.prefill(model, ids, None, cache)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def time_decode(model, batch: int, prompt_len: int, steps: int) -> float:
    """Seconds per decode step (the median of ``steps``) at ``batch`` rows after ``prompt_len`` tokens."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    cache = engine.new_cache(model, batch, prompt_len + steps + 1)
    token = engine.prefill(model, ids, None, cache).argmax(-1)
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        token = engine.decode_step(model, token, None, cache).argmax(-1)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
