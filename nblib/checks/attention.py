"""Checks for lesson 05 (attention and a first GPT).

Each check runs the learner's function on small random tensors and on a case small
enough to work out by hand, and compares with a reference: PyTorch's own
``torch.nn.functional.scaled_dot_product_attention`` or ``layer_norm``, or the hand
values. Tolerances, never exact float equality.

The lesson's exercises in the story are modules: ``check_head`` (one head, ``Head.forward``)
and ``check_multi_head`` (``CausalSelfAttention.forward``: split, attend, merge, project,
compared with ``nblib.gpt.CausalSelfAttention`` given the same weights). ``ReferenceHead`` and
``ReferenceCausalSelfAttention`` have the lesson's constructors and parameter names; the
notebook uses them through ``yours_or_ours`` until the learner's pass. ``check_causal_attention``
and ``check_split_merge_heads`` check the same ideas as plain functions.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nblib.checks import CheckFailed, call_learner, expect_close, expect_unchanged, passed


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
    got = call_learner("layer_norm", layer_norm, x, ones, zeros)
    _expect_tensor("layer_norm on [[1, 2, 3]]", got, (1, 3))
    # (The expected values come a few lines below the call: a traceback through it shows two lines each side.)
    # With the unbiased variance (divide by n-1, here 1) the row would be [-1, 0, 1] / sqrt(1 + eps).
    unbiased = (x - 2) / math.sqrt(1.0 + 1e-5)
    if torch.allclose(got, unbiased, atol=1e-4):
        raise CheckFailed("layer_norm: you used the unbiased variance (divide by n-1). LayerNorm divides "
                          "by n: x.var(-1, unbiased=False, keepdim=True), or ((x - mean)**2).mean(-1).")
    s = 1 / math.sqrt(2 / 3 + 1e-5)
    expect_close("layer_norm on [[1, 2, 3]] (mean 2, variance 2/3)", got, [[-s, 0.0, s]], atol=1e-5)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 16, generator=g) * 3 + 1
    weight, bias = torch.randn(16, generator=g), torch.randn(16, generator=g)
    got = call_learner("layer_norm", layer_norm, x, weight, bias)
    _expect_tensor("layer_norm on (4, 5, 16)", got, (4, 5, 16))
    expect_close("layer_norm vs F.layer_norm (with weight and bias)", got,
                 F.layer_norm(x, (16,), weight, bias, eps=1e-5), atol=1e-5, rtol=1e-4)

    # A large eps on rows of small spread, where it counts; x must come back as it was.
    x, weight, bias = torch.randn(3, 10, generator=g) * 0.3, torch.randn(10, generator=g), torch.randn(10, generator=g)
    saved = x.clone()
    got = call_learner("layer_norm with eps=0.5", layer_norm, x, weight, bias, 0.5)
    expect_unchanged("layer_norm", {"x": x}, {"x": saved})
    _expect_tensor("layer_norm with eps=0.5 on (3, 10)", got, (3, 10))
    if torch.allclose(got, F.layer_norm(x, (10,), weight, bias, eps=1e-5), atol=1e-5):
        raise CheckFailed("layer_norm with eps=0.5 gives what eps=1e-5 gives: use the eps argument it is given")
    expect_close("layer_norm with eps=0.5 vs F.layer_norm (is eps inside the square root?)", got,
                 F.layer_norm(x, (10,), weight, bias, eps=0.5), atol=1e-5, rtol=1e-4)
    # Constant rows have variance 0: eps keeps the result finite, and it is the bias.
    got = call_learner("layer_norm on constant rows", layer_norm, torch.full((2, 10), 3.0), weight, bias)
    expect_close("layer_norm on constant rows (variance 0: the result is the bias)", got, bias.expand(2, 10), atol=1e-5)
    # One float64 vector: the result keeps the dtype.
    x, weight, bias = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3))
    got = call_learner("layer_norm on a float64 vector", layer_norm, x, weight, bias)
    if torch.is_tensor(got) and got.dtype != torch.float64:
        raise CheckFailed(f"layer_norm on a float64 vector returned {got.dtype}: keep the input's dtype")
    expect_close("layer_norm on one float64 vector of 7", got, F.layer_norm(x, (7,), weight, bias, eps=1e-5),
                 atol=1e-10)
    passed("layer_norm (hand example, weight and bias, vs F.layer_norm)")


__all__ = ["check_causal_attention", "check_split_merge_heads", "check_layer_norm"]


# ---- lesson 05's exercises in the story: one head (a module), then all heads at once ----
class ReferenceHead(nn.Module):
    """One causal head, as the course computes it: PyTorch's fused attention on the head's
    own projections. Same constructor and parameter names as the lesson's ``Head``."""

    def __init__(self, n_embd, head_size, block_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size, dtype=torch.bool)))

    def forward(self, x):
        return F.scaled_dot_product_attention(self.query(x), self.key(x), self.value(x), is_causal=True)


class ReferenceCausalSelfAttention(nn.Module):
    """All heads at once, as the course computes them; the lesson's ``CausalSelfAttention``
    (constructor, parameter names, ``keep_attention``) with nblib's forward."""

    def __init__(self, n_embd, n_head, block_size, dropout=0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.keep_attention, self.attention = False, None

    def attend(self, q, k, v):
        if self.keep_attention:
            T = q.shape[-2]
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
            att = (q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5).masked_fill(future, float("-inf")).softmax(-1)
            self.attention = att.detach()
            return self.attn_dropout(att) @ v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x):
        return self.resid_dropout(_multi_head(x, self.qkv.weight, self.proj, self.n_head, attend=self.attend))


def _multi_head(x, qkv_weight, proj, n_head, split="right", merge="right", project=True,
                attend=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)):
    """Multi-head causal attention with the learner's weights, right or with a named slip."""
    B, T, C = x.shape
    hs = C // n_head
    q, k, v = (x @ qkv_weight.T).split(C, dim=-1)
    if split == "right":
        q, k, v = (t.reshape(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))
    elif split == "plain view":
        q, k, v = (t.reshape(B, n_head, T, hs) for t in (q, k, v))
    elif split == "one head":
        q, k, v = (t[:, None] for t in (q, k, v))
    y = attend(q, k, v)
    y = y.transpose(1, 2).reshape(B, T, C) if merge == "right" or split == "one head" else y.reshape(B, T, C)
    return proj(y) if project else y


def _new_module(what, cls, *args):
    module = call_learner(what, cls, *args)
    if not isinstance(module, nn.Module):
        raise CheckFailed(f"{what}: expected an nn.Module, got {type(module).__name__}")
    return module


def _selector_head(Head, q, k, v):
    """A learner's ``Head`` whose projections pick q, k, v out of x = cat(q, k, v), and that x."""
    hs = q.shape[-1]
    head = _new_module(f"Head(n_embd={3 * hs}, head_size={hs}, block_size=8)", Head, 3 * hs, hs, 8)
    eye, zero = torch.eye(hs), torch.zeros(hs, hs)
    with torch.no_grad():
        for i, name in enumerate(("query", "key", "value")):
            getattr(head, name).weight.copy_(torch.cat([eye if j == i else zero for j in range(3)], dim=1))
    return head, torch.cat([q, k, v], dim=-1)


def _scale_slips(what, got, q, k, v, n_embd, reference) -> None:
    """Name a wrong scale of the scores, if ``got`` is what that scale gives."""
    hs = q.shape[-1]
    for scale, slip in ((1.0, "not scaled: divide q @ k^T by sqrt(head_size), the last size of k"),
                        (1 / hs, "divided by head_size; divide by its square root"),
                        (1 / n_embd, "divided by n_embd; divide by sqrt(head_size), the last size of k"),
                        (1 / math.sqrt(n_embd), "divided by sqrt(n_embd) (the width of x); divide by "
                                                "sqrt(head_size), the last size of k")):
        wrong = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if torch.allclose(got, wrong, atol=1e-5) and not torch.allclose(got, reference, atol=1e-5):
            raise CheckFailed(f"{what}: the scores are {slip} (got {got.flatten()[:4].tolist()}..., expected "
                              f"{reference.flatten()[:4].tolist()}...).")


def _check_head(Head) -> None:
    """``Head(n_embd, head_size, block_size)``: ``forward(x)`` (B, T, n_embd) -> (B, T, head_size) is
    ``softmax(q k^T / sqrt(head_size), future masked) v`` of the head's own projections."""
    # 1. By hand: T=2, head_size=2, the projections set so that q, k, v are these (x = cat(q, k, v)).
    # Position 0 sees only itself: v[0]. Position 1's scores are q1.k0 = 0 and q1.k1 = 2, over sqrt(2).
    q = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    k = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    v = torch.tensor([[[10.0, 0.0], [0.0, 10.0]]])
    head, x = _selector_head(Head, q, k, v)
    head.eval()
    w0 = 1 / (1 + math.exp(math.sqrt(2)))  # position 1's weight on v[0]: e^0 / (e^0 + e^(2/sqrt(2)))
    expected = torch.tensor([[[10.0, 0.0], [10 * w0, 10 * (1 - w0)]]])
    what = "Head on the hand example (T=2, head_size=2)"
    got = call_learner(what, head, x)
    _expect_tensor(what, got, (1, 2, 2))
    got = got.detach()
    if not got[0, 0].isfinite().all() or torch.allclose(got[0, 1], v[0, 0], atol=1e-4):
        raise CheckFailed(f"{what}: the first position has nothing to attend to (its output is {got[0, 0].tolist()}) "
                          "and position 1 ignores itself: the mask must keep the diagonal, position t sees "
                          "positions 0..t (self.tril as it is, masking where it is False).")
    if abs(float(got[0, 0, 1])) > 1e-4:
        raise CheckFailed(f"{what}: position 0 attends to position 1, a future token (its output is "
                          f"{got[0, 0].tolist()}, expected [10, 0]). Set the scores above the diagonal to -inf "
                          "before the softmax.")
    _scale_slips(what, got, q, k, v, n_embd=6, reference=expected)
    expect_close(what, got, expected, atol=1e-5, rtol=1e-5)

    # 2. Random weights, a batch, T below block_size: against F.scaled_dot_product_attention.
    g = torch.Generator().manual_seed(5)
    head = _new_module("Head(n_embd=16, head_size=4, block_size=12)", Head, 16, 4, 12)
    head.eval()
    with torch.no_grad():
        for name in ("query", "key", "value"):
            getattr(head, name).weight.copy_(torch.randn(4, 16, generator=g) * 0.5)
    x = torch.randn(3, 7, 16, generator=g)
    with torch.no_grad():
        q, k, v = head.query(x), head.key(x), head.value(x)
    what = "Head with n_embd=16, head_size=4 on x of shape (3, 7, 16)"
    got = call_learner(what, head, x)
    _expect_tensor(what, got, (3, 7, 4))
    got = got.detach()
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    _scale_slips(what, got, q, k, v, n_embd=16, reference=reference)
    if torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5):
        raise CheckFailed(f"{what}: every position attends to the whole window, future included: mask the "
                          "scores above the diagonal with -inf before the softmax.")
    expect_close(f"{what} vs F.scaled_dot_product_attention(q, k, v, is_causal=True)", got, reference,
                 atol=1e-5, rtol=1e-4)

    # 3. The full window (T = block_size), and scores large enough to overflow an unstable softmax.
    with torch.no_grad():
        for name in ("query", "key"):
            getattr(head, name).weight.mul_(40)
    x = torch.randn(2, 12, 16, generator=g)
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(head.query(x), head.key(x), head.value(x), is_causal=True)
    what = "Head on a full window (T = block_size = 12) with very large scores"
    got = call_learner(what, head, x)
    _expect_tensor(what, got, (2, 12, 4))
    expect_close(f"{what} (is your softmax stable?)", got, reference, atol=1e-4, rtol=1e-4)

    # 4. One position, then a long window in float64, with the gradients.
    head = _new_module("Head(n_embd=8, head_size=4, block_size=4)", Head, 8, 4, 4).eval()
    x = torch.randn(2, 1, 8, generator=g)
    got = call_learner("Head with T=1", head, x)
    _expect_tensor("Head with T=1", got, (2, 1, 4))
    expect_close("Head with T=1 (the only position attends to itself: its value)", got, head.value(x), atol=1e-6)
    head = _new_module("Head(n_embd=16, head_size=8, block_size=150)", Head, 16, 8, 150)
    _check_float64_and_gradients(
        "Head(n_embd=16, head_size=8, block_size=150) in float64 on x (3, 150, 16)", head,
        torch.randn(3, 150, 16, generator=g, dtype=torch.float64),
        lambda x: F.scaled_dot_product_attention(head.query(x), head.key(x), head.value(x), is_causal=True),
        ("query", "key", "value"))
    passed("Head: one head of causal self-attention (hand example, scale, mask, batches, full window)")


def _check_float64_and_gradients(what: str, module, x, reference, layers) -> None:
    """``module`` in float64 on float64 ``x``: x left as it was, a float64 result equal to
    ``reference(x)``, and gradients reaching the weight of each of ``layers``."""
    module.double().eval()
    saved = x.clone()
    got = call_learner(what, module, x)
    expect_unchanged(f"{what}: forward", {"x": x}, {"x": saved})
    with torch.no_grad():
        want = reference(x)
    _expect_tensor(what, got, tuple(want.shape))
    if got.dtype != torch.float64:
        raise CheckFailed(f"{what}: expected a float64 result, got {got.dtype}: create every tensor you need with "
                          "the input's dtype and device (torch.ones(..., dtype=x.dtype), or use the buffers given)")
    expect_close(what, got, want, atol=1e-9, rtol=1e-7)
    if not got.requires_grad:
        raise CheckFailed(f"{what}: the result is cut off from the weights (a .detach(), .data or torch.no_grad() "
                          "in forward), so training would not change them")
    got.pow(2).sum().backward()
    for name in layers:
        grad = getattr(module, name).weight.grad
        if grad is None or not grad.abs().sum() > 0:
            raise CheckFailed(f"{what}: no gradient reached {name}.weight: is it used, and is the result not detached?")


def _check_multi_head(CausalSelfAttention) -> None:
    """``CausalSelfAttention(n_embd, n_head, block_size)``: split q, k, v into heads, attend, merge the
    heads back and project; the same function as ``nblib.gpt.CausalSelfAttention`` with its weights."""
    g = torch.Generator().manual_seed(11)
    for n_embd, n_head, T in ((12, 3, 5), (12, 1, 8), (16, 4, 3)):
        what = f"CausalSelfAttention(n_embd={n_embd}, n_head={n_head}, block_size=8)"
        attn = _new_module(what, CausalSelfAttention, n_embd, n_head, 8)
        attn.eval()
        with torch.no_grad():  # random weights and biases, so that a missing projection shows
            attn.qkv.weight.copy_(torch.randn(3 * n_embd, n_embd, generator=g) * 0.5)
            attn.proj.weight.copy_(torch.randn(n_embd, n_embd, generator=g) * 0.3)
            attn.proj.bias.copy_(torch.randn(n_embd, generator=g))
        ours = _course_attention(attn, n_head, n_embd)
        x = torch.randn(2, T, n_embd, generator=g)
        got = call_learner(f"{what} on x of shape (2, {T}, {n_embd})", attn, x)
        _expect_tensor(f"{what} on x of shape (2, {T}, {n_embd})", got, (2, T, n_embd))
        with torch.no_grad():
            reference = ours(x)
            slips = [(dict(project=False), "the output projection is missing: return self.proj(y) (through "
                                           "self.resid_dropout), y the merged heads")]
            if n_head > 1:
                slips += [
                    (dict(split="plain view"), "the heads are split with a plain view of (B, T, C) as (B, n_head, "
                                               "T, hs), which puts the channels of several tokens into one head's "
                                               "row. View as (B, T, n_head, hs), then transpose(1, 2)"),
                    (dict(merge="plain view"), "the heads are merged with a plain view of (B, n_head, T, hs) as "
                                               "(B, T, C), which puts several tokens of one head into one row. "
                                               "transpose(1, 2) back to (B, T, n_head, hs) first, then reshape"),
                    (dict(split="plain view", merge="plain view"),
                     "the heads are split and merged with plain views, without the transposes: split (B, T, C) -> "
                     "(B, T, n_head, hs) -> transpose(1, 2), and merge the other way round"),
                    (dict(split="one head"), f"it attends with one head of width {n_embd} instead of {n_head} "
                                             f"heads of width {n_embd // n_head}: split q, k and v into heads"),
                ]
            for slip, message in slips:
                wrong = _multi_head(x, attn.qkv.weight, attn.proj, n_head, **slip)
                if torch.allclose(got, wrong, atol=1e-5) and not torch.allclose(got, reference, atol=1e-5):
                    raise CheckFailed(f"{what}: {message}.")
        expect_close(f"{what} vs nblib.gpt.CausalSelfAttention with the same weights", got, reference,
                     atol=1e-5, rtol=1e-4)

    # keep_attention: the weights are kept when forward goes through self.attend.
    attn.keep_attention = True
    what = f"{what} with keep_attention = True"
    got = call_learner(what, attn, x)
    expect_close(what, got, reference, atol=1e-5, rtol=1e-4)
    kept = getattr(attn, "attention", None)
    if not torch.is_tensor(kept) or tuple(kept.shape) != (2, n_head, T, T):
        raise CheckFailed(f"{what}: expected the weights of shape (2, {n_head}, {T}, {T}) in self.attention, got "
                          f"{tuple(kept.shape) if torch.is_tensor(kept) else kept!r}: attend with "
                          "y = self.attend(q, k, v), which keeps them")
    what = "CausalSelfAttention(n_embd=15, n_head=5, block_size=8)"
    attn = _new_module(what, CausalSelfAttention, 15, 5, 8)
    _check_float64_and_gradients(f"{what} in float64 on x (1, 7, 15)", attn,
                                 torch.randn(1, 7, 15, generator=g, dtype=torch.float64),
                                 _course_attention(attn, 5, 15).double(), ("qkv", "proj"))
    _check_multi_head_dropout(CausalSelfAttention, g)
    passed("CausalSelfAttention: split into heads, attend, merge, project (1, 3 and 4 heads, vs nblib.gpt's)")


def _course_attention(attn, n_head: int, n_embd: int):
    """``nblib.gpt.CausalSelfAttention`` with the weights of the learner's ``attn``, in eval mode."""
    from nblib.gpt import CausalSelfAttention as NblibAttention, GPTConfig

    ours = NblibAttention(GPTConfig(vocab_size=1, block_size=8, n_layer=1, n_head=n_head, n_embd=n_embd)).eval()
    with torch.no_grad():
        ours.c_attn.weight.copy_(attn.qkv.weight)
        ours.c_attn.bias.zero_()
        ours.c_proj.load_state_dict(attn.proj.state_dict())
    return ours


def _seeded(fn):
    """``fn()`` after seeding the global random stream: dropout draws the same masks each time."""
    torch.manual_seed(1234)
    return fn()


def _check_multi_head_dropout(CausalSelfAttention, g) -> None:
    """With dropout 0.5 in training mode: the course's module, seeded alike, draws the same masks."""
    what = "CausalSelfAttention(n_embd=12, n_head=3, block_size=8, dropout=0.5) in training mode"
    attn = _new_module(what, CausalSelfAttention, 12, 3, 8, 0.5).train()
    ours = ReferenceCausalSelfAttention(12, 3, 8, dropout=0.5).train()
    with torch.no_grad():
        ours.qkv.weight.copy_(torch.randn(36, 12, generator=g) * 0.5)
        ours.proj.weight.copy_(torch.randn(12, 12, generator=g) * 0.3)
        ours.proj.bias.copy_(torch.randn(12, generator=g))
        attn.qkv.weight.copy_(ours.qkv.weight)
        attn.proj.load_state_dict(ours.proj.state_dict())
    x = torch.randn(2, 5, 12, generator=g)
    got = _seeded(lambda: call_learner(f"{what} on x of shape (2, 5, 12)", attn, x))
    _expect_tensor(f"{what} on x of shape (2, 5, 12)", got, (2, 5, 12))
    got = got.detach()
    with torch.no_grad():
        merged = lambda: _multi_head(x, ours.qkv.weight, ours.proj, 3, project=False, attend=ours.attend)  # noqa: E731
        slips = ((lambda: ours.proj(merged()), "the output is not dropped out: return "
                                               "self.resid_dropout(self.proj(y)). (With dropout 0, as everywhere "
                                               "above, that changes nothing; in training it does)"),
                 (lambda: ours.proj(ours.resid_dropout(merged())), "the dropout comes before the output projection: "
                                                                   "drop out the projected output, "
                                                                   "self.resid_dropout(self.proj(y))"))
        for wrong, message in slips:
            if torch.allclose(got, _seeded(wrong), atol=1e-5):
                raise CheckFailed(f"{what}: {message}.")
        want = _seeded(lambda: ours(x))
    expect_close(f"{what} vs the course's module with the same weights and random seed", got, want,
                 atol=1e-5, rtol=1e-4)


def check_head(Head) -> None:
    """``Head(n_embd, head_size, block_size)``: ``forward(x)`` (B, T, n_embd) -> (B, T, head_size) is
    ``softmax(q k^T / sqrt(head_size), future masked) v`` of the head's own projections.

    The modules the check builds draw their initial weights from a forked random stream: the
    notebook's own stream is the same after the check as before it."""
    with torch.random.fork_rng(devices=[]):
        _check_head(Head)


def check_multi_head(CausalSelfAttention) -> None:
    """``CausalSelfAttention(n_embd, n_head, block_size)``: split q, k, v into heads, attend, merge the
    heads back and project; the same function as ``nblib.gpt.CausalSelfAttention`` with its weights.
    (The notebook's random stream is left as it was, as in ``check_head``.)"""
    with torch.random.fork_rng(devices=[]):
        _check_multi_head(CausalSelfAttention)


__all__ += ["ReferenceHead", "ReferenceCausalSelfAttention", "check_head", "check_multi_head"]
