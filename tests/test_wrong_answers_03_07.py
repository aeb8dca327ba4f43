"""Wrong answers to lessons 03-07 that the hidden tests (or nothing) caught and the visible
checks let through: each is rejected by its check with a message naming the mistake, and the
instructor's own answers (run from the notebooks) still pass.

A wrong answer is the instructor's solution with one slip, so that the slip is all that differs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nblib import bpe
from nblib.checks import CheckFailed
from nblib.checks import attention as attention_checks
from nblib.checks import backprop as backprop_checks
from nblib.checks import gpt2 as gpt2_checks
from nblib.checks import llama as llama_checks
from nblib.checks import tokenizer as tokenizer_checks
from nblib.gpt import GPT, Block, lm_loss

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def instructor(lesson: str, exercise: str, names: tuple[str, ...], **context):
    """The instructor's answer to ``exercise``: its cell, without the check and the hidden tests
    (the tests call the checks themselves), run with the notebook's imports and ``context``."""
    path = next(NOTEBOOKS.glob(f"{lesson}_*.ipynb"))
    cells = ("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code")
    source = next(s for s in cells if s.startswith(f"# Exercise {exercise} ")).split("### BEGIN HIDDEN TESTS")[0]
    namespace = {"__name__": "__main__", "torch": torch, "nn": nn, "F": F, "math": math, **context}
    exec("\n".join(line for line in source.split("\n") if not line.startswith("checks.")), namespace)  # noqa: S102
    return tuple(namespace[name] for name in names)


def slip(name: str, check, message: str, *answer, marks=()):
    """A wrong answer (``answer``, what ``check`` is called with) and the message it must get."""
    return pytest.param(check, answer, message, id=name, marks=marks)


def right(name: str, check, *answer, marks=()):
    return pytest.param(check, answer, id=name, marks=marks)


try:
    import transformers  # noqa: F401 (lesson 06's forward is checked against Hugging Face's GPT-2)
    NEEDS_TRANSFORMERS = ()
except ImportError:
    NEEDS_TRANSFORMERS = pytest.mark.skip(reason="transformers is not installed")


# ---- 03: backprop by hand -------------------------------------------------------------------
(softmax_backward,) = instructor("03", "03.softmax_backward", ("softmax_backward",))
(label_smoothing_backward,) = instructor("03", "03.label_smoothing", ("label_smoothing_backward",))
(layernorm_backward,) = instructor("03", "03.layernorm", ("layernorm_backward",))
mlp_backward = instructor("03", "03.backward_mlp", ("linear_backward", "tanh_backward", "embedding_backward"))
(backward_loss,) = instructor("03", "03.backward_loss", ("backward_loss",))
(backward_batchnorm,) = instructor("03", "03.backward_batchnorm", ("backward_batchnorm",))
(batchnorm_backward,) = instructor("03", "03.batchnorm_compact", ("batchnorm_backward",))


def _softmax_without_the_max(x, dim):
    return x.exp() / x.exp().sum(dim, keepdim=True)  # exp(100) overflows float32


(smoothing_without_the_max,) = instructor("03", "03.label_smoothing", ("label_smoothing_backward",),
                                          F=SimpleNamespace(softmax=_softmax_without_the_max))


def linear_in_float64(dout, x, W):
    return tuple(g.double() for g in mlp_backward[0](dout, x, W))


def embedding_for_2d_ix(demb, ix, num_embeddings):
    """Right for the (n, block) indices of the lesson's batch, and for no other shape."""
    dC = torch.zeros(num_embeddings, demb.shape[-1], dtype=demb.dtype)
    for i in range(ix.shape[0]):
        for j in range(ix.shape[1]):
            dC[ix[i, j]] += demb[i, j]
    return dC


def _dlogits(through_max):
    """``backward_loss`` whose dlogits is dnorm_logits plus ``through_max(d, t)`` instead of the max path."""
    def wrong(t, Yb):
        d = backward_loss(t, Yb)
        return {**d, "logits": d["norm_logits"] + through_max(d, t)}
    return wrong


def _picked(t):
    return F.one_hot(t["logits"].max(1).indices, t["logits"].shape[1])


def loss_in_place(t, Yb):
    d = backward_loss(t, Yb)
    t["counts"].zero_()  # "not needed any more"
    return d


def compact_in_place(dhpreact, bnraw, bnvar_inv, bngain):
    """The right values, but the caller's dhpreact is centred in place on the way."""
    n = dhpreact.shape[0]
    dbngain, dbnbias = (bnraw * dhpreact).sum(0, keepdim=True), dhpreact.sum(0, keepdim=True)
    dhpreact -= dhpreact.mean(0, keepdim=True)
    dhpreact -= bnraw * dbngain / (n - 1)
    return bngain * bnvar_inv * dhpreact, dbngain, dbnbias


SLIPS = [
    slip("03.softmax_backward: float64 for float32", backprop_checks.check_softmax_backward,
         r"dlogits for logits of shape \(6, 11\), float32 is torch.float64 for torch.float32 inputs",
         lambda probs, dprobs: softmax_backward(probs, dprobs).double()),
    slip("03.softmax_backward: changes dprobs", backprop_checks.check_softmax_backward,
         r"changed its input of shape \(4, 5\) \(argument 2\) in place",
         lambda probs, dprobs: softmax_backward(probs, dprobs.sub_(1))),
    slip("03.label_smoothing: softmax without the max", backprop_checks.check_label_smoothing_backward,
         r"dlogits \(batch 5, 7 classes, float32 logits of size ~100, smoothing=0.2\): contains NaN",
         smoothing_without_the_max),
    slip("03.layernorm: hard-coded eps", backprop_checks.check_layernorm_backward,
         r"dx \(x of shape \(3, 8\), eps=0.1\): it is what eps=1e-05 gives, not eps=0.1",
         lambda dout, x, gamma, eps: layernorm_backward(dout, x, gamma, 1e-5)),
    slip("03.layernorm: float64 for float32", backprop_checks.check_layernorm_backward,
         r"dx \(x of shape \(1, 64\), float32, eps=1e-05\) is torch.float64",
         lambda *a: tuple(g.double() for g in layernorm_backward(*a))),
    slip("03.backward_mlp: float64 for float32", backprop_checks.check_backward_mlp,
         r"linear_backward: dx \(x \(1, 5\), W \(5, 1\), float32\) is torch.float64",
         (linear_in_float64, *mlp_backward[1:])),
    slip("03.backward_mlp: 2-D indices only", backprop_checks.check_backward_mlp,
         r"embedding_backward: your function raised IndexError.*inputs: \(5, 4\), \(5,\), 27",
         (*mlp_backward[:2], embedding_for_2d_ix)),
    slip("03.backward_loss: wrong sign on the max path", backprop_checks.check_backward_loss,
         r"dlogits \(.*gradient through the max is not 0\): the path through the max has the wrong sign",
         _dlogits(lambda d, t: -_picked(t) * d["logit_maxes"])),
    slip("03.backward_loss: max path to every logit", backprop_checks.check_backward_loss,
         "dlogit_maxes is added to every logit of its row", _dlogits(lambda d, t: d["logit_maxes"])),
    slip("03.backward_loss: no max path", backprop_checks.check_backward_loss,
         "the path through the max is missing", _dlogits(lambda d, t: 0)),
    slip("03.backward_loss: changes t", backprop_checks.check_backward_loss,
         r"changed t\['counts'\] \(argument 1\) in place", loss_in_place),
    slip("03.backward_batchnorm: hard-coded eps", backprop_checks.check_backward_batchnorm,
         r"dbnvar \(.*eps=0.25\): it is what eps=1e-05 gives, not eps=0.25: use the eps argument",
         lambda t, dhpreact, eps: backward_batchnorm(t, dhpreact, 1e-5)),
    slip("03.backward_batchnorm: no eps", backprop_checks.check_backward_batchnorm, "it is what eps=0 gives",
         lambda t, dhpreact, eps: backward_batchnorm(t, dhpreact, 0.0)),
    slip("03.batchnorm_compact: float64 for float32", backprop_checks.check_batchnorm_compact,
         r"dhprebn \(.*float32\) is torch.float64 for torch.float32 inputs: keep the inputs' dtype",
         lambda *a: tuple(x.double() for x in batchnorm_backward(*a))),
    slip("03.batchnorm_compact: changes dhpreact", backprop_checks.check_batchnorm_compact,
         r"changed its input of shape \(8, 6\) \(argument 1\) in place", compact_in_place),
]
RIGHT = [
    right("03.softmax_backward", backprop_checks.check_softmax_backward, softmax_backward),
    right("03.label_smoothing", backprop_checks.check_label_smoothing_backward, label_smoothing_backward),
    right("03.layernorm", backprop_checks.check_layernorm_backward, layernorm_backward),
    right("03.backward_mlp", backprop_checks.check_backward_mlp, mlp_backward),
    right("03.backward_loss", backprop_checks.check_backward_loss, backward_loss),
    right("03.backward_batchnorm", backprop_checks.check_backward_batchnorm, backward_batchnorm),
    right("03.batchnorm_compact", backprop_checks.check_batchnorm_compact, batchnorm_backward),
    # nblib's own, wrapped (the checks refuse nblib's functions passed as they are)
    right("03.backward_loss (nblib's)", backprop_checks.check_backward_loss,
          lambda t, Yb: backprop_checks.ours_backward_loss(t, Yb)),
    right("03.backward_batchnorm (nblib's)", backprop_checks.check_backward_batchnorm,
          lambda *a: backprop_checks.ours_backward_batchnorm(*a)),
]


# ---- 04: the tokenizer ----------------------------------------------------------------------
(get_stats,) = instructor("04", "04.get_stats", ("get_stats",))
(merge,) = instructor("04", "04.merge", ("merge",))
(encode_chunk,) = instructor("04", "04.encode_chunk", ("encode_chunk",), merge=merge)


def encode_in_dict_order(chunk_bytes, merges):
    """Right only when the dict happens to be in the order the merges were learned."""
    ids = list(chunk_bytes)
    for pair, new_id in merges.items():
        ids = bpe.merge(ids, pair, new_id)
    return ids


def encode_popping(chunk_bytes, merges):
    ids = encode_chunk(chunk_bytes, merges)
    merges.popitem()
    return ids


def stats_emptying(ids):
    stats = {}
    while len(ids) >= 2:
        pair = (ids.pop(0), ids[0])  # the caller's list is emptied on the way
        stats[pair] = stats.get(pair, 0) + 1
    return stats


def merge_as_text(ids, pair, new_id):
    """Merging the ids written out as text, where "11,2" holds "1,2"."""
    text = ",".join(map(str, ids)).replace(f"{pair[0]},{pair[1]}", str(new_id))
    return [int(i) for i in text.split(",") if i]


SLIPS += [
    slip("04.get_stats: empties ids", tokenizer_checks.check_get_stats, "changed the list it was given",
         stats_emptying),
    slip("04.merge: ids as text", tokenizer_checks.check_merge,
         r"merge\(\[11, 2, 1, 21\], \(1, 2\), 256\): expected \[11, 2, 1, 21\], got \[1256, 2561\]", merge_as_text),
    slip("04.merge: a tuple", tokenizer_checks.check_merge, "should return a list, got tuple",
         lambda ids, pair, new_id: tuple(bpe.merge(ids, pair, new_id))),
    slip("04.encode_chunk: merges in dict order", tokenizer_checks.check_encode,
         "the merges were applied in the dict's order", encode_in_dict_order),
    slip("04.encode_chunk: a tuple", tokenizer_checks.check_encode, "expected the list",
         lambda chunk, merges: tuple(encode_chunk(chunk, merges))),
    slip("04.encode_chunk: changes merges", tokenizer_checks.check_encode, "changed the merges dict", encode_popping),
]
RIGHT += [right("04.get_stats", tokenizer_checks.check_get_stats, get_stats),
          right("04.merge", tokenizer_checks.check_merge, merge),
          right("04.encode_chunk", tokenizer_checks.check_encode, encode_chunk)]


# ---- 05: attention ------------------------------------------------------------------------
(Head,) = instructor("05", "05.head", ("Head",))
(layer_norm,) = instructor("05", "05.layer_norm", ("layer_norm",))
(CausalSelfAttention,) = instructor("05", "05.multi_head", ("CausalSelfAttention",))


class DetachedHead(Head):
    def forward(self, x):
        return super().forward(x).detach()


class Float32Head(Head):
    def forward(self, x):
        return super().forward(x).float()


def layer_norm_in_place(x, weight, bias, eps=1e-5):
    x -= x.mean(-1, keepdim=True)  # the right values (a shift changes nothing), but the caller's x is changed
    return layer_norm(x, weight, bias, eps)


class AttentionWithoutDropout(CausalSelfAttention):
    def __init__(self, *args):
        super().__init__(*args)
        self.resid_dropout = nn.Identity()  # forward's self.resid_dropout(...) drops nothing


SLIPS += [
    slip("05.head: detached", attention_checks.check_head, "in float64 .*: the result is cut off from the weights",
         DetachedHead),
    slip("05.head: float32 for float64", attention_checks.check_head,
         "in float64 .*: expected a float64 result, got torch.float32", Float32Head),
    slip("05.layer_norm: eps ignored", attention_checks.check_layer_norm,
         "layer_norm with eps=0.5 gives what eps=1e-5 gives: use the eps argument",
         lambda x, weight, bias, eps=1e-5: layer_norm(x, weight, bias)),
    slip("05.layer_norm: changes x", attention_checks.check_layer_norm, "layer_norm changed its input x in place",
         layer_norm_in_place),
    slip("05.multi_head: no dropout", attention_checks.check_multi_head,
         r"dropout=0.5\) in training mode: the output is not dropped out", AttentionWithoutDropout),
]
RIGHT += [right("05.head", attention_checks.check_head, Head),
          right("05.layer_norm", attention_checks.check_layer_norm, layer_norm),
          right("05.multi_head", attention_checks.check_multi_head, CausalSelfAttention)]


# ---- 06: GPT-2 --------------------------------------------------------------------------------
(GPT2,) = instructor("06", "06.forward", ("GPT2",), GPT2Block=Block, GPT=GPT, lm_loss=lm_loss)
(lr_schedule,) = instructor("06", "06.lr_schedule", ("lr_schedule",))
(top_p_filter,) = instructor("06", "06.top_p_filter", ("top_p_filter",))


class GPT2WithoutDropout(GPT2):
    def __init__(self, config):
        super().__init__(config)
        self.transformer.drop = nn.Identity()


def lr_dividing_by_zero(step, max_steps, warmup_steps, lr, min_lr):
    """Right while some steps are left after the warmup."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    done = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * done)) * (lr - min_lr)


def top_p_in_place(logits, p):
    return logits.copy_(top_p_filter(logits, p))


SLIPS += [
    slip("06.forward: no dropout", gpt2_checks.check_gpt2_forward,
         "in training mode: the embeddings are not dropped out", GPT2WithoutDropout, marks=NEEDS_TRANSFORMERS),
    slip("06.lr_schedule: warmup as long as training", gpt2_checks.check_lr_schedule,
         r"lr_schedule\(10, 10, 10, 0.5, 0.05\): your function raised ZeroDivisionError", lr_dividing_by_zero),
    slip("06.top_p_filter: changes logits", gpt2_checks.check_top_p,
         "changed the logits it was given: return a new tensor", top_p_in_place),
    slip("06.top_p_filter: float32 for float64", gpt2_checks.check_top_p,
         "top_p_filter on torch.float64 logits returned torch.float32",
         lambda logits, p: top_p_filter(logits, p).float()),
]
RIGHT += [right("06.forward", gpt2_checks.check_gpt2_forward, GPT2, marks=NEEDS_TRANSFORMERS),
          right("06.lr_schedule", gpt2_checks.check_lr_schedule, lr_schedule),
          right("06.top_p_filter", gpt2_checks.check_top_p, top_p_filter)]


# ---- 07: Llama ------------------------------------------------------------------------------
rope_tables, apply_rope = instructor("07", "07.rope", ("rope_tables", "apply_rope"))
(gqa_attention,) = instructor("07", "07.gqa_attention", ("gqa_attention",))
(rms_norm,) = instructor("07", "07.rms_norm", ("rms_norm",))
(kv_cache_bytes_per_token,) = instructor("07", "07.kv_cache_bytes", ("kv_cache_bytes_per_token",))


def rotate_in_place(x, cos, sin):
    out = apply_rope(x, cos, sin)
    x.copy_(out)
    return out


def rms_norm_in_place(x, weight, eps):
    return x.mul_(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight


SLIPS += [
    slip("07.rope: float64 tables", llama_checks.check_rope,
         r"the cos table is torch.float64; the model's q and k are float32, so make the tables float32",
         lambda d, n, theta=10000.0: tuple(t.double() for t in rope_tables(d, n, theta)), apply_rope),
    slip("07.rope: another default theta", llama_checks.check_rope, "theta left at its default",
         lambda d, n, theta=500.0: rope_tables(d, n, theta), apply_rope),
    slip("07.rope: changes x", llama_checks.check_rope, "apply_rope on shape .* changed its input x in place",
         rope_tables, rotate_in_place),
    slip("07.gqa_attention: float32 for float64", llama_checks.check_gqa_attention,
         "gqa_attention in float64 with large scores: expected a float64 result, got torch.float32",
         lambda q, k, v: gqa_attention(q.float(), k.float(), v.float())),
    slip("07.rms_norm: float32 for float64", llama_checks.check_rms_norm,
         "returned torch.float32: keep the input's dtype", lambda x, w, eps: rms_norm(x.float(), w.float(), eps)),
    slip("07.rms_norm: changes x", llama_checks.check_rms_norm, "changed its input x in place", rms_norm_in_place),
    slip("07.kv_cache_bytes: a float", llama_checks.check_kv_cache_bytes, "returned float",
         lambda *a: float(kv_cache_bytes_per_token(*a))),
]
RIGHT += [right("07.rope", llama_checks.check_rope, rope_tables, apply_rope),
          right("07.gqa_attention", llama_checks.check_gqa_attention, gqa_attention),
          right("07.rms_norm", llama_checks.check_rms_norm, rms_norm),
          right("07.kv_cache_bytes", llama_checks.check_kv_cache_bytes, kv_cache_bytes_per_token)]


@pytest.mark.parametrize("check, answer, message", SLIPS)
def test_wrong_answer_fails_its_check_naming_the_mistake(check, answer, message):
    with pytest.raises(CheckFailed, match=message):
        check(*answer)


@pytest.mark.parametrize("check, answer", RIGHT)
def test_course_answer_passes_its_check(check, answer, capsys):
    check(*answer)
    assert "passed" in capsys.readouterr().out


# ---- cases the hidden tests had and the visible checks did not ------------------------------
(bytes_to_unicode,) = instructor("04", "04.bytes_to_unicode", ("bytes_to_unicode",))
(kv_cache_update,) = instructor("07", "07.kv_cache", ("kv_cache_update",))
_GROWING = []


def bytes_to_unicode_with_a_global():
    """The right table, built into a list that lives between calls (the second call's is another table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    _GROWING.extend(printable)
    chars = list(_GROWING)
    n = 0
    for b in range(256):
        if b not in _GROWING:
            _GROWING.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(_GROWING, map(chr, chars)))


def top_p_keeping_ties(logits, p):
    """The nucleus boundary found, then every logit at least as large as the boundary's kept: ties all go in."""
    kept = top_p_filter(logits, p)
    boundary = kept.masked_fill(~kept.isfinite(), float("inf")).min(dim=-1, keepdim=True).values
    return logits.masked_fill(logits < boundary, float("-inf"))


class BlockWithBiasesAlways(Block):
    """GPT-2's block that ignores config.bias."""

    def __init__(self, config):
        super().__init__(dataclasses.replace(config, bias=True))


SLIPS += [
    slip("04.bytes_to_unicode: state between calls", tokenizer_checks.check_bytes_to_unicode,
         "gave another table the second time", bytes_to_unicode_with_a_global),
    slip("06.top_p_filter: ties by value", gpt2_checks.check_top_p, r"four equal logits, 0.4\): kept 4 tokens, expected 2",
         top_p_keeping_ties),
    slip("06.block: biases whatever the config", gpt2_checks.check_block, "bias", BlockWithBiasesAlways,
         marks=NEEDS_TRANSFORMERS),
    slip("07.kv_cache: float32 for a float64 cache", llama_checks.check_kv_cache, "expected a pair of float64 tensors",
         lambda ck, cv, pos, k, v: tuple(t.float() for t in kv_cache_update(ck, cv, pos, k, v))),
]
RIGHT += [right("04.bytes_to_unicode", tokenizer_checks.check_bytes_to_unicode, bytes_to_unicode),
          right("07.kv_cache", llama_checks.check_kv_cache, kv_cache_update)]
