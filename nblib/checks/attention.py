"""Checks for lesson 05 (attention and a first GPT).

Each check runs the learner's function on small random tensors and on a case small
enough to work out by hand, and compares with a reference: PyTorch's own
``torch.nn.functional.scaled_dot_product_attention`` or ``layer_norm``, or the hand
values. Tolerances, never exact float equality.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nblib.checks import CheckFailed, call_learner, expect_close, passed


def _expect_tensor(what: str, got, shape: tuple[int, ...]) -> None:
    if not torch.is_tensor(got):
        raise CheckFailed(f"{what}: expected a tensor of shape {shape}, got {type(got).__name__}")
    if tuple(got.shape) != tuple(shape):
        raise CheckFailed(f"{what}: expected shape {tuple(shape)}, got shape {tuple(got.shape)}")


def check_causal_attention(causal_attention) -> None:
    """``causal_attention(q, k, v)`` -> ``softmax(q k^T / sqrt(d) + causal mask) v``.

    q, k: (..., T, d); v: (..., T, dv); any leading batch (and head) dimensions.
    """
    # 1. A case worked out by hand: T=2, d=1. Position 0 sees only itself, so its output
    # is v[0]; position 1 weighs v[0] and v[1] by softmax([q1*k0, q1*k1] / sqrt(1)).
    q = torch.tensor([[1.0], [2.0]])
    k = torch.tensor([[0.0], [1.0]])
    v = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    w1 = 1 / (1 + math.exp(2.0))  # weight on v[0] for position 1: e^0 / (e^0 + e^2)
    expected = [[10.0, 0.0], [10.0 * w1, 10.0 * (1 - w1)]]
    got = call_learner("causal_attention on the hand example", causal_attention, q, k, v)
    _expect_tensor("causal_attention on the hand example", got, (2, 2))
    # A mask that also hides the diagonal leaves position 0 nothing to attend to (NaN after
    # a softmax over all -inf), and position 1 sees only position 0: output exactly v[0].
    if not got[0].isfinite().all() or torch.allclose(got[1], v[0], atol=1e-4):
        raise CheckFailed("causal_attention: the first position has nothing to attend to (its output is "
                          f"{got[0].tolist()}) and position 1 ignores itself: the mask must keep the diagonal, "
                          "position t sees positions 0..t. Use torch.tril(torch.ones(T, T)) as it is "
                          "(not diagonal=-1), and mask where it is 0.")
    if abs(float(got[0, 1])) > 1e-4:
        raise CheckFailed("causal_attention: position 0 attends to position 1 (a future token). "
                          "Mask the scores above the diagonal with -inf before the softmax.")
    expect_close("causal_attention on the hand example (T=2, d=1)", got, expected, atol=1e-5, rtol=1e-5)

    # 2. The scale: with d=4 the scores must be divided by sqrt(4) = 2.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, generator=g) * 3 for _ in range(3))
    reference = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    got = call_learner("causal_attention", causal_attention, q, k, v)
    _expect_tensor("causal_attention with d=4", got, (3, 4))
    unscaled = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=1.0)[0]
    if torch.allclose(got, unscaled, atol=1e-5) and not torch.allclose(got, reference, atol=1e-5):
        raise CheckFailed("causal_attention: the scores are not scaled. Divide q @ k^T by sqrt(d), "
                          "d = q.shape[-1], so that their variance stays near 1.")
    expect_close("causal_attention with d=4 vs F.scaled_dot_product_attention", got, reference, atol=1e-5, rtol=1e-4)

    # 3. Batches and heads in front, and a value width different from the key width.
    q = torch.randn(2, 3, 7, 8, generator=g)
    k = torch.randn(2, 3, 7, 8, generator=g)
    v = torch.randn(2, 3, 7, 5, generator=g)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = call_learner("causal_attention", causal_attention, q, k, v)
    _expect_tensor("causal_attention with (B=2, heads=3, T=7) inputs", got, (2, 3, 7, 5))
    expect_close("causal_attention with (B=2, heads=3, T=7) vs F.scaled_dot_product_attention",
                 got, reference, atol=1e-5, rtol=1e-4)

    # 4. Large scores must not overflow: softmax is shift-invariant, so a correct one is stable.
    got = call_learner("causal_attention", causal_attention, q * 100, k * 100, v)
    expect_close("causal_attention with very large scores (is your softmax stable?)",
                 got, F.scaled_dot_product_attention(q * 100, k * 100, v, is_causal=True), atol=1e-4, rtol=1e-4)
    passed("causal attention, one head (hand example, scale, batches, large scores)")


def check_split_merge_heads(split_heads, merge_heads) -> None:
    """``split_heads(x, n_head)``: (B, T, C) -> (B, n_head, T, C // n_head), head h holding
    channels ``h*hs:(h+1)*hs``; ``merge_heads`` is its inverse."""
    # A hand example where every channel's value is its own index, so we can read where it went.
    x = torch.arange(2 * 3 * 6, dtype=torch.float32).view(2, 3, 6)  # B=2, T=3, C=6
    heads = x.view(2, 3, 2, 3).transpose(1, 2)  # the right answer
    got = call_learner("split_heads", split_heads, x, 2)
    _expect_tensor("split_heads((2, 3, 6), n_head=2)", got, (2, 2, 3, 3))
    if torch.equal(got, x.view(2, 2, 3, 3)):
        raise CheckFailed("split_heads: a plain view of (B, T, C) as (B, n_head, T, hs) puts the channels of "
                          "several tokens into one head's row (head 1, time 0 holds 9, 10, 11 instead of token "
                          "0's channels 3, 4, 5). View as (B, T, n_head, hs), then transpose(1, 2).")
    # Head 1 at time 0 holds channels 3..5 of token 0 (values 3, 4, 5), and so on.
    expect_close("split_heads: x[b=0, head=1, t=0] (channels 3..5 of token 0)", got[0, 1, 0], [3.0, 4.0, 5.0])
    expect_close("split_heads: x[b=0, head=1, t=2] (channels 3..5 of token 2)", got[0, 1, 2], [15.0, 16.0, 17.0])
    expect_close("split_heads: x[b=1, head=0, t=0] (channels 0..2 of token 0, batch 1)", got[1, 0, 0], [18.0, 19.0, 20.0])
    expect_close("split_heads((2, 3, 6), n_head=2)", got, heads)
    # merge_heads on its own, fed the right heads (contiguous, as attention returns them),
    # so that a wrong split is never blamed on it.
    back = call_learner("merge_heads", merge_heads, heads.contiguous())
    _expect_tensor("merge_heads of (2, 2, 3, 3) heads", back, (2, 3, 6))
    if torch.equal(back, heads.reshape(2, 3, 6)):
        raise CheckFailed("merge_heads: a plain view of (B, n_head, T, hs) as (B, T, C) puts several tokens of one "
                          "head into one row. transpose(1, 2) back to (B, T, n_head, hs) first, then "
                          ".contiguous().view(B, T, C).")
    expect_close("merge_heads(heads) == x (token t is head 0's channels of t, then head 1's)", back, x)

    # Random sizes, against the reference layout used by every GPT implementation.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 12, generator=g)
    for n_head in (1, 3, 4):
        reference = x.view(3, 5, n_head, 12 // n_head).transpose(1, 2)
        got = call_learner("split_heads", split_heads, x, n_head)
        _expect_tensor(f"split_heads((3, 5, 12), n_head={n_head})", got, tuple(reference.shape))
        expect_close(f"split_heads with n_head={n_head}", got, reference)
        expect_close(f"merge_heads of {n_head} heads of shape (3, {n_head}, 5, {12 // n_head})",
                     call_learner("merge_heads", merge_heads, reference.contiguous()), x)

    # Together with attention they must make multi-head causal attention.
    q, k, v = (torch.randn(2, 6, 8, generator=g) for _ in range(3))
    heads = [call_learner("split_heads", split_heads, t, 2) for t in (q, k, v)]
    y = call_learner("merge_heads", merge_heads, F.scaled_dot_product_attention(*heads, is_causal=True))
    expected = torch.cat([F.scaled_dot_product_attention(q[..., s], k[..., s], v[..., s], is_causal=True)
                          for s in (slice(0, 4), slice(4, 8))], dim=-1)
    expect_close("two heads via split/merge vs two separate attention calls concatenated", y, expected,
                 atol=1e-5, rtol=1e-4)

    try:  # called directly, not through call_learner: an error is the right answer here
        split_heads(torch.zeros(1, 2, 10), 3)
    except (ValueError, RuntimeError, AssertionError):
        pass
    else:
        raise CheckFailed("split_heads(x with C=10, n_head=3) should raise an error: 10 channels "
                          "cannot be split evenly into 3 heads")
    passed("split_heads / merge_heads (layout, round trip, multi-head attention, bad sizes)")


def check_layer_norm(layer_norm) -> None:
    """``layer_norm(x, weight, bias, eps=1e-5)`` normalises the last dimension like ``nn.LayerNorm``."""
    # Hand example: [1, 2, 3] has mean 2 and (biased) variance 2/3.
    x = torch.tensor([[1.0, 2.0, 3.0]])
    ones, zeros = torch.ones(3), torch.zeros(3)
    s = 1 / math.sqrt(2 / 3 + 1e-5)
    got = call_learner("layer_norm", layer_norm, x, ones, zeros)
    _expect_tensor("layer_norm on [[1, 2, 3]]", got, (1, 3))
    unbiased = (x - 2) / math.sqrt(1.0 + 1e-5)
    if torch.allclose(got, unbiased, atol=1e-4):
        raise CheckFailed("layer_norm: you used the unbiased variance (divide by n-1). LayerNorm divides "
                          "by n: x.var(-1, unbiased=False, keepdim=True), or ((x - mean)**2).mean(-1).")
    expect_close("layer_norm on [[1, 2, 3]] (mean 2, variance 2/3)", got, [[-s, 0.0, s]], atol=1e-5)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 16, generator=g) * 3 + 1
    weight, bias = torch.randn(16, generator=g), torch.randn(16, generator=g)
    got = call_learner("layer_norm", layer_norm, x, weight, bias)
    _expect_tensor("layer_norm on (4, 5, 16)", got, (4, 5, 16))
    expect_close("layer_norm vs F.layer_norm (with weight and bias)", got,
                 F.layer_norm(x, (16,), weight, bias, eps=1e-5), atol=1e-5, rtol=1e-4)
    passed("layer_norm (hand example, weight and bias, vs F.layer_norm)")


__all__ = ["check_causal_attention", "check_split_merge_heads", "check_layer_norm"]
