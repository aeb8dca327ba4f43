"""Checks for lesson 12's exercises: the FLOP count, the IsoFLOP minimum, the power-law fit."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nblib import llama
from nblib.checks import CheckFailed, call_learner, expect_close, name_the_gap, passed


def measured_flops_per_token(config: llama.LlamaConfig, seq_len: int, batch_size: int = 2) -> float:
    """Training FLOPs per token as PyTorch's ``FlopCounterMode`` counts them: one forward
    and backward of a real model. Attention runs on the "math" backend, so its two
    matmuls appear as ``bmm`` and are counted (the fused CPU kernel has no FLOP formula)."""
    torch.manual_seed(0)
    model = llama.Llama(config)
    idx = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops() / (batch_size * seq_len)


def _as_pair(what: str, result) -> tuple[float, float]:
    try:
        first, second = result
        return float(first), float(second)
    except (TypeError, ValueError) as err:
        raise CheckFailed(f"{what}: expected a pair of numbers, got {result!r}") from err


def _familiar_terms(config: llama.LlamaConfig, seq_len: int) -> dict[str, float]:
    """Terms a FLOP count often leaves out (positive) or adds wrongly (negative), for ``name_the_gap``."""
    L, d, V = config.n_layer, config.n_embd, config.vocab_size
    return {"the attention term 12 * n_layer * n_embd * seq_len": 12 * L * d * seq_len,
            "the output head's 6 * n_embd * vocab_size": 6 * d * V,
            "the RMSNorm gains' 6 * (2 * n_layer + 1) * n_embd (gains multiply nothing: leave them out)":
                -6 * (2 * L + 1) * d,
            "the embedding table's 6 * vocab_size * n_embd: the embedding is a lookup, not a matmul, so it "
            "costs no FLOPs (the output head, the same size, does: count it once)": -6 * V * d}


def check_flops_per_token(train_flops_per_token) -> None:
    """``train_flops_per_token(config, seq_len)``: 6 x (matmul weights) + 12 * n_layer * n_embd * seq_len,
    equal to what ``FlopCounterMode`` measures on a forward and backward pass."""
    cases = (
        (llama.LlamaConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64), 32),
        (llama.LlamaConfig(vocab_size=65, block_size=64, n_layer=3, n_head=4, n_embd=96), 16),
        (llama.LlamaConfig(vocab_size=100, block_size=48, n_layer=1, n_head=4, n_kv_heads=2, n_embd=32), 48),
        # one kv head, and an MLP width of its own (not the default from n_embd): read config.ffn_hidden
        (llama.LlamaConfig(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_kv_heads=1, n_embd=32,
                           ffn_hidden=72), 9),
    )
    for config, seq_len in cases:
        what = (f"train_flops_per_token(n_layer={config.n_layer}, n_embd={config.n_embd}, n_head={config.n_head}, "
                f"n_kv_heads={config.n_kv_heads}, ffn_hidden={config.ffn_hidden}, vocab={config.vocab_size}, "
                f"seq_len={seq_len})")
        got = call_learner(what, train_flops_per_token, config, seq_len)
        expected = measured_flops_per_token(config, seq_len)
        gap = name_the_gap(expected - got, _familiar_terms(config, seq_len)) if isinstance(got, numbers.Real) else ""
        expect_close(f"{what} against FlopCounterMode{gap}", got, expected, atol=0.5, rtol=1e-9)
    passed("train_flops_per_token")


def check_isoflop_minimum(isoflop_minimum) -> None:
    """``isoflop_minimum(params, losses) -> (n_opt, loss_opt)``: the vertex of the parabola
    fitted to loss against ln N."""
    rng = np.random.default_rng(3)
    for x_opt, curvature, floor, noise in ((math.log(1e5), 0.08, 1.9, 0.0), (math.log(3e4), 0.2, 2.3, 0.0),
                                           (math.log(2e5), 0.1, 1.7, 0.01)):
        x = x_opt + np.array([-1.5, -0.9, -0.2, 0.4, 1.3])
        y = floor + curvature * (x - x_opt) ** 2 + noise * rng.standard_normal(len(x))
        order = rng.permutation(len(x))  # runs do not come sorted
        params, losses = np.exp(x)[order].tolist(), y[order].tolist()
        a, b, c = np.polyfit(x, y, 2)
        expected_n, expected_loss = math.exp(-b / (2 * a)), c - b * b / (4 * a)
        what = f"isoflop_minimum on 5 runs around N={math.exp(x_opt):.3g}" + (" with noise" if noise else "")
        n_opt, loss_opt = _as_pair(what, call_learner(what, isoflop_minimum, params, losses))
        expect_close(f"{what}: N_opt", n_opt, expected_n, atol=0, rtol=1e-4)
        expect_close(f"{what}: the loss at N_opt", loss_opt, expected_loss, atol=1e-6, rtol=1e-6)
    params, losses = [2e3, 8e3, 3.2e4], [3.1, 2.8, 2.95]
    a, b, c = np.polyfit(np.log(params), losses, 2)
    what = "isoflop_minimum on 3 runs (the fewest a parabola needs: it goes through them exactly)"
    n_opt, _ = _as_pair(what, call_learner(what, isoflop_minimum, params, losses))
    expect_close(f"{what}: N_opt", n_opt, math.exp(-b / (2 * a)), atol=0, rtol=1e-6)
    x = np.log(1e5) + np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    what = "isoflop_minimum on a hill (losses highest in the middle: the sizes do not bracket a minimum)"
    try:
        result = isoflop_minimum(np.exp(x).tolist(), (2.0 - 0.1 * (x - x.mean()) ** 2).tolist())
    except ValueError:
        pass
    else:
        raise CheckFailed(f"{what}: expected a ValueError, got {result!r}")
    passed("isoflop_minimum")


def check_fit_power_law(fit_power_law) -> None:
    """``fit_power_law(x, y) -> (k, a)`` for ``y = k * x^a``, by least squares in log-log."""
    rng = np.random.default_rng(5)
    for k, a, noise in ((2.0, 0.5, 0.0), (0.3, -0.12, 0.0), (1e-3, 0.7, 0.05), (4e5, 0.0, 0.0)):
        x = np.logspace(10, 14, 6)
        y = k * x ** a * np.exp(noise * rng.standard_normal(len(x)))
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        what = f"fit_power_law on y = {k:g} * x^{a:g}" + (" with noise" if noise else "")
        got_k, got_a = _as_pair(what, call_learner(what, fit_power_law, x.tolist(), y.tolist()))
        expect_close(f"{what}: the exponent a", got_a, slope, atol=1e-6, rtol=1e-6)
        expect_close(f"{what}: the factor k", got_k, math.exp(intercept), atol=0, rtol=1e-4)
    passed("fit_power_law")
