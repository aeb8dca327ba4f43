"""Checks for lesson 03 (backprop by hand, tensors): a learner's backward pieces against autograd.

Each check builds small random float64 inputs, runs the learner's backward function, asks
``torch.autograd`` for the true gradients of the same computation, and on a mismatch names
the tensor, the worst index and how far off it is (``nblib.checks.expect_close``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nblib.checks import CheckFailed, call_learner, expect_close, passed

ATOL, RTOL = 1e-8, 1e-6  # float64 inputs: a correct formula lands within ~1e-15


def _inputs(seed: int, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes]


def _call(fn, name: str, *args):
    """Run the learner's function on copies, so it can neither see nor spoil our tensors' grads."""
    return call_learner(name, fn, *(a.detach().clone() if torch.is_tensor(a) else a for a in args))


def _unpack(result, names: tuple[str, ...], fn_name: str):
    if len(names) == 1:
        return (result,)
    if not isinstance(result, (tuple, list)) or len(result) != len(names):
        raise CheckFailed(f"{fn_name} should return {len(names)} tensors ({', '.join(names)}), got {type(result).__name__}")
    return tuple(result)


def check_softmax_backward(softmax_backward) -> None:
    """Exercise: ``softmax_backward(probs, dprobs) -> dlogits`` for ``probs = softmax(logits, dim=1)``."""
    for seed, shape in ((0, (4, 5)), (1, (7, 27))):
        logits, dprobs = _inputs(seed, shape, shape)
        logits = (3 * logits).requires_grad_()
        probs = F.softmax(logits, dim=1)
        (probs * dprobs).sum().backward()
        got = _call(softmax_backward, "softmax_backward", probs.detach(), dprobs)
        expect_close(f"dlogits for logits of shape {shape}", got, logits.grad, atol=ATOL, rtol=RTOL)
    passed("softmax backward")


def check_label_smoothing_backward(label_smoothing_backward) -> None:
    """Exercise: ``label_smoothing_backward(logits, targets, smoothing) -> dlogits`` of the mean loss.

    The loss is ``F.cross_entropy(logits, targets, label_smoothing=smoothing)``: the target
    distribution puts ``1 - smoothing`` on the right class and spreads ``smoothing`` evenly
    over all classes.
    """
    for seed, (n, v), smoothing in ((0, (4, 5), 0.1), (1, (32, 27), 0.0), (2, (9, 27), 0.3)):
        (logits,) = _inputs(seed, (n, v))
        targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
        logits.requires_grad_()
        F.cross_entropy(logits, targets, label_smoothing=smoothing).backward()
        got = _call(label_smoothing_backward, "label_smoothing_backward", logits.detach(), targets, smoothing)
        expect_close(f"dlogits (batch {n}, {v} classes, smoothing={smoothing})", got, logits.grad, atol=ATOL, rtol=RTOL)
    passed("cross-entropy with label smoothing, backward")


def check_layernorm_backward(layernorm_backward) -> None:
    """Exercise: ``layernorm_backward(dout, x, gamma, eps) -> (dx, dgamma, dbeta)``.

    Forward: each row of ``x`` is normalized with its own mean and *biased* variance (divide
    by the number of features, as ``F.layer_norm`` does), then ``out = gamma * xhat + beta``.
    """
    names = ("dx", "dgamma", "dbeta")
    for seed, (n, d) in ((0, (4, 6)), (1, (16, 32))):
        x, gamma, beta, dout = _inputs(seed, (n, d), (d,), (d,), (n, d))
        x = (2 * x + 1).requires_grad_()
        gamma, beta = (1 + 0.1 * gamma).requires_grad_(), beta.requires_grad_()
        out = F.layer_norm(x, (d,), gamma, beta, eps=1e-5)
        (out * dout).sum().backward()
        result = _call(layernorm_backward, "layernorm_backward", dout, x.detach(), gamma.detach(), 1e-5)
        for name, got, expected in zip(names, _unpack(result, names, "layernorm_backward"), (x.grad, gamma.grad, beta.grad)):
            expect_close(f"{name} (x of shape {(n, d)})", got, expected, atol=ATOL, rtol=RTOL)
    passed("LayerNorm backward")
