"""Lesson 07's attention checks pass correct pieces and fail the likely mistakes with a message.

Correct answers are written here independently of the notebook and of nblib.llama.
"""
import math

import pytest
import torch

from nblib import llama
from nblib.checks import CheckFailed
from nblib.checks import llama as checks


# ---- RoPE ---------------------------------------------------------------------------
def tables(head_dim, n_positions, theta=10000.0):
    freq = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(n_positions).float()[:, None] * freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_rope_accepts_correct(capsys):
    checks.check_rope(tables, rotate)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("wrong_tables, wrong_rotate, match", [
    (lambda d, n, theta=1e4: tuple(t.flip(-1) for t in tables(d, n, theta)), rotate, r"\(cos\)"),  # frequencies reversed
    (lambda d, n, theta=1e4: tables(d, n, 10000.0), rotate, "theta=100"),                          # theta ignored
    (lambda d, n, theta=1e4: tables(d, n, theta)[::-1], rotate, r"\(cos\)"),                         # (sin, cos)
    (tables, lambda x, c, s: x * c + torch.cat([x[..., x.shape[-1] // 2:], -x[..., :x.shape[-1] // 2]], -1) * s,
     "apply_rope on shape"),                                                                         # rotated backwards
    (tables, lambda x, c, s: torch.stack([x[..., 0::2] * c[..., ::2] - x[..., 1::2] * s[..., ::2],
                                          x[..., 1::2] * c[..., ::2] + x[..., 0::2] * s[..., ::2]], -1).flatten(-2),
     "apply_rope on shape"),                                                                         # interleaved pairs
])
def test_rope_rejects_mistakes(wrong_tables, wrong_rotate, match):
    with pytest.raises(CheckFailed, match=match):
        checks.check_rope(wrong_tables, wrong_rotate)


def test_rope_refuses_nblib_own():
    with pytest.raises(CheckFailed, match="course's own implementation"):
        checks.check_rope(llama.rope_tables, rotate)


# ---- grouped-query attention --------------------------------------------------------
def gqa(q, k, v):
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    T, S = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def gqa_loop(q, k, v):
    """Each query head with its own kv head, each query over the keys up to its position: slow, plainly right."""
    n_rep = q.shape[1] // k.shape[1]
    T, S = q.shape[-2], k.shape[-2]
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        for i in range(T):
            seen = S - T + i + 1
            w = (q[:, h, i:i + 1] @ k[:, h // n_rep, :seen].transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            out[:, h, i] = (w @ v[:, h // n_rep, :seen])[:, 0]
    return out


@pytest.mark.parametrize("fn", [gqa, gqa_loop])
def test_gqa_accepts_correct(fn, capsys):
    checks.check_gqa_attention(fn)
    assert "passed" in capsys.readouterr().out


def tiled(q, k, v):  # kv heads in the order 0, 1, 0, 1 instead of 0, 0, 1, 1
    n_rep = q.shape[1] // k.shape[1]
    return gqa(q, k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1))


@pytest.mark.parametrize("wrong", [
    tiled,
    lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(   # mask from the top-left corner
        q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1),
        is_causal=True),
    lambda q, k, v: gqa(q * math.sqrt(q.shape[-1]), k, v),               # no 1/sqrt(d)
    lambda q, k, v: gqa(q, k, v).transpose(1, 2),                        # heads and time swapped
])
def test_gqa_rejects_mistakes(wrong):
    with pytest.raises(CheckFailed):
        checks.check_gqa_attention(wrong)


def test_gqa_message_says_what_and_where():
    with pytest.raises(CheckFailed, match=r"gqa_attention\(q \(2, 4, 2, 4\), k and v \(2, 2, 7, 4\)\): off by"):
        checks.check_gqa_attention(lambda q, k, v: gqa(q, k[:, :, -q.shape[2]:], v[:, :, -q.shape[2]:]))


def test_plugged_model_matches_nblib():
    hf, ours = checks._tiny_hf_llama(seed=1)
    idx = torch.randint(0, 37, (1, 20))
    with torch.no_grad():
        want = ours(idx)[0]
        got = checks.plug_attention(ours, checks.attention_class(rotate, gqa))(idx)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, hf(idx).logits.detach(), atol=1e-4, rtol=1e-4)


# ---- KV-cache update ----------------------------------------------------------------
def kv_update(cache_k, cache_v, pos, k, v):
    end = pos + k.shape[2]
    cache_k[:, :, pos:end], cache_v[:, :, pos:end] = k, v
    return cache_k[:, :, :end], cache_v[:, :, :end]


def test_kv_cache_accepts_correct(capsys):
    checks.check_kv_cache(kv_update)
    assert "passed" in capsys.readouterr().out


def cat_only(cache_k, cache_v, pos, k, v):  # returns the right tensors but never fills the cache
    return torch.cat([cache_k[:, :, :pos], k], 2), torch.cat([cache_v[:, :, :pos], v], 2)


@pytest.mark.parametrize("wrong, match", [
    (lambda ck, cv, pos, k, v: kv_update(ck, cv, 0, k, v), "pos=3"),                 # always slot 0
    (lambda ck, cv, pos, k, v: (kv_update(ck, cv, pos, k, v), ck, cv)[1:], "keys returned"),  # the whole cache
    (lambda ck, cv, pos, k, v: (k, v), "in place"),                                   # only the new ones, no cache
    (cat_only, "in place"),
    (lambda ck, cv, pos, k, v: kv_update(ck, cv, pos, k, k), "values"),               # keys as values
])
def test_kv_cache_rejects_mistakes(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        checks.check_kv_cache(wrong)


def test_kv_cache_refuses_the_course_reference():
    with pytest.raises(CheckFailed, match="course's own implementation"):
        checks.check_kv_cache(checks.reference_kv_cache_update)
