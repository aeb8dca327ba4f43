"""The lesson 05 checks pass correct answers and fail wrong ones with a useful message.

Correct answers are written here independently of the notebook; each wrong answer is a
mistake a learner is likely to make (no mask, no scale, the wrong head layout, ...).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nblib.checks import CheckFailed
from nblib.checks import attention as checks


# ---- causal attention ---------------------------------------------------------------
def attention_by_hand(q, k, v):
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def attention_with_a_loop(q, k, v):
    """Each position t: a softmax over positions 0..t only. Slow but obviously right."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for t in range(q.shape[-2]):
        scores = (q[..., t : t + 1, :] @ k[..., : t + 1, :].transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out[..., t, :] = (scores.softmax(-1) @ v[..., : t + 1, :])[..., 0, :]
    return out


@pytest.mark.parametrize("fn", [attention_by_hand, attention_with_a_loop])
def test_causal_attention_accepts_correct(fn, capsys):
    checks.check_causal_attention(fn)
    assert "passed" in capsys.readouterr().out


def test_hand_example_matches_sdpa():
    """The check's hand-computed values agree with PyTorch itself (guards the check)."""
    q, k = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [1.0]])
    v = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    got = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    w1 = 1 / (1 + math.exp(2.0))
    torch.testing.assert_close(got, torch.tensor([[10.0, 0.0], [10 * w1, 10 * (1 - w1)]]))


def no_mask(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def no_scale(q, k, v):
    T = q.shape[-2]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    return (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1) @ v


def mask_with_zero(q, k, v):
    """A classic slip: zeroing the future scores instead of setting them to -inf."""
    T = q.shape[-2]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, 0.0).softmax(-1) @ v


def softmax_over_wrong_dim(q, k, v):
    T = q.shape[-2]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(scores.softmax(-2)) @ v


def only_2d(q, k, v):
    return attention_by_hand(q, k, v) if q.dim() == 2 else q.sum()


@pytest.mark.parametrize("fn, message", [
    (no_mask, "future token"),
    (no_scale, "not scaled"),
    (mask_with_zero, "future token"),
    (softmax_over_wrong_dim, "hand example"),
    (only_2d, "expected shape"),
])
def test_causal_attention_rejects_wrong(fn, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_causal_attention(fn)


def attention_hiding_the_diagonal(q, k, v, fill=float("-inf")):
    """Wrong: position t sees only 0..t-1, so position 0 sees nothing (all -inf: NaN)."""
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1)
    return scores.masked_fill(~mask, fill).softmax(dim=-1) @ v


@pytest.mark.parametrize("fill", [float("-inf"), -1e9])  # NaN at position 0, or a uniform row there
def test_a_mask_that_hides_the_diagonal_is_named(fill):
    with pytest.raises(CheckFailed, match="the first position has nothing to attend to .* the mask must keep "
                                          "the diagonal, position t sees positions 0..t"):
        checks.check_causal_attention(lambda q, k, v: attention_hiding_the_diagonal(q, k, v, fill))


def test_crash_becomes_a_clear_failure():
    def crashes(q, k, v):
        return q @ v  # shapes do not line up in general
    with pytest.raises(CheckFailed, match="raised RuntimeError"):
        checks.check_causal_attention(crashes)


def test_not_implemented_passes_through():
    def stub(q, k, v):
        raise NotImplementedError("write it")
    with pytest.raises(NotImplementedError):
        checks.check_causal_attention(stub)


# ---- split and merge heads ----------------------------------------------------------
def split_heads(x, n_head):
    B, T, C = x.shape
    if C % n_head:
        raise ValueError(f"C={C} is not divisible by n_head={n_head}")
    return x.reshape(B, T, n_head, C // n_head).permute(0, 2, 1, 3)


def merge_heads(x):
    B, H, T, hs = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, T, H * hs)


def test_split_merge_accepts_correct(capsys):
    checks.check_split_merge_heads(split_heads, merge_heads)
    assert "passed" in capsys.readouterr().out


def split_interleaved(x, n_head):
    """Wrong layout: head h gets channels h, h + n_head, ... (a reshape in the wrong order)."""
    B, T, C = x.shape
    if C % n_head:
        raise ValueError("bad size")
    return x.reshape(B, T, C // n_head, n_head).permute(0, 3, 1, 2)


def merge_interleaved(x):
    B, H, T, hs = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, T, H * hs)


def split_by_view_only(x, n_head):
    """Wrong: a view to (B, n_head, T, hs) without the transpose scrambles tokens and channels."""
    B, T, C = x.shape
    if C % n_head:
        raise ValueError("bad size")
    return x.reshape(B, n_head, T, C // n_head)


def merge_by_view_only(x):
    B, H, T, hs = x.shape
    return x.reshape(B, T, H * hs)


def split_silently_truncates(x, n_head):
    B, T, C = x.shape
    hs = C // n_head
    return x[..., : hs * n_head].reshape(B, T, n_head, hs).transpose(1, 2)


@pytest.mark.parametrize("split, merge, message", [
    (split_interleaved, merge_interleaved, "split_heads: x\\[b=0, head=1, t=0\\]"),
    (split_by_view_only, merge_by_view_only, "split_heads"),
    (split_heads, lambda x: x.sum(1), "expected shape"),  # "merging" by summing the heads
    (split_silently_truncates, merge_heads, "should raise an error"),
])
def test_split_merge_rejects_wrong(split, merge, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_split_merge_heads(split, merge)


def merge_without_contiguous(x):
    B, H, T, hs = x.shape
    return x.transpose(1, 2).view(B, T, H * hs)  # attention's output is contiguous: this view fails


def test_a_wrong_split_is_blamed_not_a_correct_merge():
    with pytest.raises(CheckFailed) as err:
        checks.check_split_merge_heads(split_by_view_only, merge_heads)
    assert str(err.value).startswith("split_heads: a plain view") and "merge_heads" not in str(err.value)


@pytest.mark.parametrize("merge", [merge_by_view_only, merge_interleaved, merge_without_contiguous])
def test_a_wrong_merge_is_blamed_not_a_correct_split(merge):
    with pytest.raises(CheckFailed) as err:
        checks.check_split_merge_heads(split_heads, merge)
    assert str(err.value).startswith("merge_heads") and "split_heads" not in str(err.value)


# ---- layer norm ---------------------------------------------------------------------
def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_layer_norm_accepts_correct(capsys):
    checks.check_layer_norm(layer_norm)
    assert "passed" in capsys.readouterr().out


def test_layer_norm_reference_agrees_with_torch():
    x = torch.randn(3, 7, 10)
    w, b = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (10,), w, b, eps=1e-5), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fn, message", [
    (lambda x, w, b, eps=1e-5: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) * w + b,
     "unbiased variance"),
    (lambda x, w, b, eps=1e-5: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps),
     "with weight and bias"),
    (lambda x, w, b, eps=1e-5: (x - x.mean(0, keepdim=True)) / torch.sqrt(x.var(0, keepdim=True, unbiased=False) + eps) * w + b,
     "variance 2/3"),
])
def test_layer_norm_rejects_wrong(fn, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_layer_norm(fn)


# ---- one head as a module, and the multi-head block (the exercises in the story) -----
import torch.nn as nn  # noqa: E402


def make_head(attend):
    """A Head class (the lesson's constructor) whose forward runs ``attend(q, k, v, tril)``."""
    class Head(checks.ReferenceHead):   # the lesson's constructor and parameter names
        def forward(self, x):
            T = x.shape[1]
            return attend(self.query(x), self.key(x), self.value(x), self.tril[:T, :T])
    Head.__module__ = "__main__"
    return Head


def head_right(q, k, v, tril):
    scores = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])
    return scores.masked_fill(~tril, float("-inf")).softmax(-1) @ v


def head_loop(q, k, v, tril):
    return attention_with_a_loop(q, k, v)


@pytest.mark.parametrize("attend", [head_right, head_loop])
def test_head_accepts_correct(attend, capsys):
    rng_before = torch.get_rng_state()
    checks.check_head(make_head(attend))
    assert "passed" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), rng_before), "the check must leave the global random stream as it was"


def head_scaled_by(scale):
    def attend(q, k, v, tril):
        scores = (q @ k.transpose(-2, -1)) * scale(q)
        return scores.masked_fill(~tril, float("-inf")).softmax(-1) @ v
    return attend


@pytest.mark.parametrize("attend, message", [
    (lambda q, k, v, tril: (q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])).softmax(-1) @ v, "future token"),
    (head_scaled_by(lambda q: 1.0), "not scaled"),
    (head_scaled_by(lambda q: 1 / q.shape[-1]), "divided by head_size"),
    (lambda q, k, v, tril: head_right(q, k, v, torch.ones_like(tril).tril(-1)), "mask must keep the diagonal"),
    (lambda q, k, v, tril: (q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])).masked_fill(~tril, 0.0).softmax(-1) @ v,
     "future token"),
    (lambda q, k, v, tril: head_right(q, k, v, tril)[:, :1], "expected shape"),
    (lambda q, k, v, tril: torch.nan_to_num(
        (q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])).masked_fill(~tril, float("-inf")).softmax(-2)) @ v,
     "hand example"),
])
def test_head_rejects_wrong(attend, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_head(make_head(attend))


def test_head_scaled_by_sqrt_n_embd_is_named():
    """The scale read from the input's width (a global n_embd) instead of the head's."""
    class Head(make_head(head_right)):
        def forward(self, x):
            T = x.shape[1]
            scores = self.query(x) @ self.key(x).transpose(-2, -1) / math.sqrt(x.shape[-1])
            return scores.masked_fill(~self.tril[:T, :T], float("-inf")).softmax(-1) @ self.value(x)
    with pytest.raises(CheckFailed, match="sqrt\\(n_embd\\)|not scaled|hand example"):
        checks.check_head(Head)


def test_head_not_implemented_passes_through():
    def stub(q, k, v, tril):
        raise NotImplementedError("write it")
    with pytest.raises(NotImplementedError):
        checks.check_head(make_head(stub))


def make_attention(split, merge, project=True, use_attend=True):
    class CausalSelfAttention(nn.Module):
        def __init__(self, n_embd, n_head, block_size, dropout=0.0):
            super().__init__()
            self.n_head = n_head
            self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
            self.proj = nn.Linear(n_embd, n_embd)
            self.dropout, self.resid_dropout = dropout, nn.Dropout(dropout)
            self.keep_attention, self.attention = False, None

        def attend(self, q, k, v):
            if self.keep_attention:
                T = q.shape[-2]
                w = head_right(q, k, torch.eye(T).expand(*q.shape[:-1], T), torch.ones(T, T, dtype=torch.bool).tril())
                self.attention = w
                return w @ v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(x).split(C, dim=-1)
            q, k, v = (split(t, self.n_head) for t in (q, k, v))
            y = self.attend(q, k, v) if use_attend else F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = merge(y)
            return self.resid_dropout(self.proj(y)) if project else y
    CausalSelfAttention.__module__ = "__main__"
    return CausalSelfAttention


def test_multi_head_accepts_correct(capsys):
    rng_before = torch.get_rng_state()
    checks.check_multi_head(make_attention(split_heads, merge_heads))
    assert "passed" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_reference_modules_pass_their_own_checks_through_a_subclass():
    """The references used by yours_or_ours compute what the checks expect."""
    class Head(checks.ReferenceHead):
        pass

    class CausalSelfAttention(checks.ReferenceCausalSelfAttention):
        pass
    Head.__module__ = CausalSelfAttention.__module__ = "__main__"
    checks.check_head(Head)
    checks.check_multi_head(CausalSelfAttention)


@pytest.mark.parametrize("split, merge, kwargs, message", [
    (split_heads, merge_heads, dict(project=False), "output projection is missing"),
    (split_by_view_only, merge_heads, {}, "split with a plain view"),
    (split_heads, merge_by_view_only, {}, "merged with a plain view"),
    (split_by_view_only, merge_by_view_only, {}, "split and merged with plain views"),
    (lambda x, n: x[:, None], lambda y: y[:, 0], {}, "one head of width 12 instead of 3 heads"),
    (split_interleaved, merge_interleaved, {}, "vs nblib.gpt.CausalSelfAttention"),
    (split_heads, merge_heads, dict(use_attend=False), "attend with y = self.attend"),
    (split_heads, lambda y: y.sum(1), {}, "raised RuntimeError"),  # "merging" by summing the heads
])
def test_multi_head_rejects_wrong(split, merge, kwargs, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_multi_head(make_attention(split, merge, **kwargs))
