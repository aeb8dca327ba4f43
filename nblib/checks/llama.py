"""Checks for lesson 07's exercises: RMSNorm, RoPE, grouped-query attention, KV-cache memory."""
from __future__ import annotations

import torch

from nblib import llama
from nblib.checks import call_learner, expect_close, expect_equal, passed


def check_rms_norm(rms_norm) -> None:
    """``rms_norm(x, weight, eps) -> tensor``: x / sqrt(mean(x**2, last dim) + eps) * weight."""
    g = torch.Generator().manual_seed(7)
    for shape, eps in (((3, 8), 1e-5), ((2, 4, 6), 1e-6), ((1, 5), 0.5)):
        x = torch.randn(shape, generator=g) * 3 + 1  # a non-zero mean: RMSNorm must not subtract it
        weight = torch.randn(shape[-1], generator=g)
        ref = llama.RMSNorm(shape[-1], eps)
        with torch.no_grad():
            ref.weight.copy_(weight)
            expected = ref(x)
        got = call_learner("rms_norm", rms_norm, x, weight, eps)
        expect_close(f"rms_norm on shape {shape} with eps={eps}", got, expected, atol=1e-5, rtol=1e-5)
    passed("rms_norm")


def check_apply_rope(apply_rope) -> None:
    """``apply_rope(x [..., T, d], cos [T, d], sin [T, d])``: rotate pairs (i, i + d/2)."""
    g = torch.Generator().manual_seed(11)
    for shape, theta in (((1, 1, 4, 2), 10000.0), ((2, 3, 7, 8), 10000.0), ((1, 2, 5, 16), 100.0)):
        T, d = shape[-2], shape[-1]
        x = torch.randn(shape, generator=g)
        cos, sin = llama.rope_tables(d, T, theta)
        got = call_learner("apply_rope", apply_rope, x, cos, sin)
        expect_close(f"apply_rope on shape {shape}", got, llama.apply_rope(x, cos, sin), atol=1e-5, rtol=1e-5)
        # a rotation keeps lengths: a quick hint when the formula is almost right
        expect_close(f"apply_rope keeps each vector's length (shape {shape})", torch.as_tensor(got).norm(dim=-1),
                     x.norm(dim=-1), atol=1e-4, rtol=1e-4)
    passed("apply_rope")


def check_repeat_kv(repeat_kv) -> None:
    """``repeat_kv(x [B, n_kv, T, d], n_rep) -> [B, n_kv * n_rep, T, d]``, kv head j serving
    query heads j*n_rep ... j*n_rep + n_rep - 1."""
    g = torch.Generator().manual_seed(3)
    for shape, n_rep in (((1, 2, 3, 4), 2), ((2, 1, 5, 2), 4), ((1, 3, 2, 2), 1)):
        x = torch.randn(shape, generator=g)
        got = call_learner("repeat_kv", repeat_kv, x, n_rep)
        expect_close(f"repeat_kv(x of shape {shape}, n_rep={n_rep})", got, llama.repeat_kv(x, n_rep), atol=0, rtol=0)
    passed("repeat_kv")


def check_kv_cache_bytes(kv_cache_bytes_per_token) -> None:
    """``kv_cache_bytes_per_token(n_layer, n_kv_heads, head_dim, bytes_per_value)``."""
    cases = ((1, 1, 1, 1), (2, 4, 8, 2), (32, 8, 128, 2), (32, 32, 128, 2), (12, 12, 64, 4))
    for args in cases:
        got = call_learner("kv_cache_bytes_per_token", kv_cache_bytes_per_token, *args)
        expect_equal(f"kv_cache_bytes_per_token{args}", got, llama.kv_cache_bytes_per_token(*args))
    # and the formula agrees with a real cache's tensors
    config = llama.LlamaConfig(vocab_size=8, block_size=10, n_layer=3, n_head=4, n_kv_heads=2, n_embd=16)
    cache = llama.KVCache(config, batch_size=1, max_len=10)
    expect_equal("bytes of a real KVCache (3 layers, 2 kv heads, head_dim 4, float32, 10 tokens)",
                 10 * call_learner("kv_cache_bytes_per_token", kv_cache_bytes_per_token, 3, 2, 4, 4), cache.nbytes)
    passed("kv_cache_bytes_per_token")
