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
ATOL32, RTOL32 = 1e-6, 1e-4  # float32 inputs, as in training


def _inputs(seed: int, *shapes, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype) for shape in shapes]


def _kind(dtype) -> str:
    """How a case's dtype reads in a message: float64 is the default and goes unsaid."""
    return "" if dtype == torch.float64 else f", {str(dtype).removeprefix('torch.')}"


def _copy(arg):
    if torch.is_tensor(arg):
        return arg.detach().clone()
    if isinstance(arg, dict):  # section 4's ``t``: the forward intermediates by name
        return {key: _copy(value) for key, value in arg.items()}
    return arg


def _changed(arg, copy) -> str:
    """What of ``copy`` (a tensor, or a dict of them) no longer equals ``arg``; "" if nothing."""
    if torch.is_tensor(arg):
        return "" if torch.equal(arg.detach(), copy) else f"its input of shape {tuple(arg.shape)}"
    if isinstance(arg, dict):
        return next((f"t[{key!r}]" for key in arg if _changed(arg[key], copy[key])), "")
    return ""


def _call(fn, name: str, *args):
    """Run the learner's function on copies, so it can neither see nor spoil our tensors' grads,
    then fail if it changed a copy: the lesson's functions change nothing in place."""
    copies = [_copy(a) for a in args]
    result = call_learner(name, fn, *copies)
    for number, (arg, copy) in enumerate(zip(args, copies), start=1):
        if what := _changed(arg, copy):
            raise CheckFailed(f"{name} changed {what} (argument {number}) in place, and the caller still needs it: "
                              "compute new tensors instead (x = x + ..., not x += ... or x.sub_(...))")
    return result


def _unpack(result, names: tuple[str, ...], fn_name: str):
    if len(names) == 1:
        return (result,)
    if not isinstance(result, (tuple, list)) or len(result) != len(names):
        raise CheckFailed(f"{fn_name} should return {len(names)} tensors ({', '.join(names)}), got {type(result).__name__}")
    return tuple(result)


def _same(got, expected) -> bool:
    return (torch.is_tensor(got) and got.shape == expected.shape
            and torch.allclose(got.double(), expected.double(), rtol=RTOL, atol=ATOL))


def _expect_grad(what: str, got, expected) -> None:
    """``expect_close`` at the tolerance of ``expected``'s dtype, ``got`` in that dtype too."""
    if torch.is_tensor(got) and got.dtype != expected.dtype:
        raise CheckFailed(f"{what} is {got.dtype} for {expected.dtype} inputs: keep the inputs' dtype (Python "
                          "numbers and the inputs themselves do; torch.tensor(...) or .double() make float64)")
    atol, rtol = (ATOL, RTOL) if expected.dtype == torch.float64 else (ATOL32, RTOL32)
    expect_close(what, got, expected, atol=atol, rtol=rtol)


OTHER_EPS = (1e-5, 0.0)  # what a function that ignores its eps argument uses instead


def _name_wrong_eps(what: str, got, eps: float, with_other_eps: dict) -> None:
    """Fail naming the slip if ``got`` is the gradient that another eps gives (``with_other_eps``: eps -> it)."""
    for wrong_eps, wrong in with_other_eps.items():
        if wrong_eps != eps and _same(got, wrong):
            raise CheckFailed(f"{what}: it is what eps={wrong_eps:g} gives, not eps={eps:g}: use the eps argument "
                              "your function is given")


def check_softmax_backward(softmax_backward) -> None:
    """Exercise: ``softmax_backward(probs, dprobs) -> dlogits`` for ``probs = softmax(logits, dim=1)``."""
    for seed, shape, dtype in ((0, (4, 5), torch.float64), (1, (7, 27), torch.float64), (2, (6, 11), torch.float32)):
        logits, dprobs = _inputs(seed, shape, shape, dtype=dtype)
        logits = (3 * logits).requires_grad_()
        probs = F.softmax(logits, dim=1)
        (probs * dprobs).sum().backward()
        got = _call(softmax_backward, "softmax_backward", probs.detach(), dprobs)
        _expect_grad(f"dlogits for logits of shape {shape}{_kind(dtype)}", got, logits.grad)
    passed("softmax backward")


def check_label_smoothing_backward(label_smoothing_backward) -> None:
    """Exercise: ``label_smoothing_backward(logits, targets, smoothing) -> dlogits`` of the mean loss.

    The loss is ``F.cross_entropy(logits, targets, label_smoothing=smoothing)``: the target
    distribution puts ``1 - smoothing`` on the right class and spreads ``smoothing`` evenly
    over all classes.
    """
    cases = ((0, (4, 5), 0.1, 1.0, torch.float64), (1, (32, 27), 0.0, 1.0, torch.float64),
             (2, (9, 27), 0.3, 1.0, torch.float64),
             (3, (5, 7), 0.2, 100.0, torch.float32),  # exp overflows there: only a stable softmax survives
             (4, (1, 4), 1.0, 1.0, torch.float64))    # smoothing 1: a uniform target whatever the label; a batch of 1
    for seed, (n, v), smoothing, size, dtype in cases:
        (logits,) = _inputs(seed, (n, v), dtype=dtype)
        logits = (size * logits).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
        F.cross_entropy(logits, targets, label_smoothing=smoothing).backward()
        got = _call(label_smoothing_backward, "label_smoothing_backward", logits.detach(), targets, smoothing)
        kind = f"{_kind(dtype)} logits of size ~{size:g}" if size != 1 else _kind(dtype)
        _expect_grad(f"dlogits (batch {n}, {v} classes{kind}, smoothing={smoothing})", got, logits.grad)
    passed("cross-entropy with label smoothing, backward")


def _layernorm_grads(x, gamma, beta, dout, eps):
    x, gamma, beta = (p.detach().clone().requires_grad_() for p in (x, gamma, beta))
    (F.layer_norm(x, x.shape[-1:], gamma, beta, eps=eps) * dout).sum().backward()
    return x.grad, gamma.grad, beta.grad


def check_layernorm_backward(layernorm_backward) -> None:
    """Exercise: ``layernorm_backward(dout, x, gamma, eps) -> (dx, dgamma, dbeta)``.

    Forward: each row of ``x`` is normalized with its own mean and *biased* variance (divide
    by the number of features, as ``F.layer_norm`` does), then ``out = gamma * xhat + beta``.
    """
    names = ("dx", "dgamma", "dbeta")
    cases = ((0, (4, 6), 2.0, 1e-5, torch.float64), (1, (16, 32), 2.0, 1e-5, torch.float64),
             (2, (3, 8), 0.05, 0.1, torch.float64),  # rows of variance ~0.0025, where eps=0.1 counts
             (3, (1, 64), 3.0, 1e-5, torch.float32))
    for seed, (n, d), spread, eps, dtype in cases:
        x, gamma, beta, dout = _inputs(seed, (n, d), (d,), (d,), (n, d), dtype=dtype)
        x, gamma = spread * x + 1, 1 + 0.1 * gamma
        want = _layernorm_grads(x, gamma, beta, dout, eps)
        result = _call(layernorm_backward, "layernorm_backward", dout, x, gamma, eps)
        where = f"x of shape {(n, d)}{_kind(dtype)}, eps={eps:g}"
        got = _unpack(result, names, "layernorm_backward")
        with_other_eps = {e: _layernorm_grads(x, gamma, beta, dout, e)[0] for e in OTHER_EPS}
        _name_wrong_eps(f"dx ({where})", got[0], eps, with_other_eps)
        for name, have, expected in zip(names, got, want):
            _expect_grad(f"{name} ({where})", have, expected)
    passed("LayerNorm backward")


# ---------------------------------------------------------------------------------------
# The backward pass of section 4: the MLP with BatchNorm, one piece at a time.
# ``mlp_intermediates`` builds the forward pass of the lesson on small random float64
# tensors and lets autograd fill in the gradient of every intermediate; each check runs the
# learner's piece on the same tensors and compares name by name, in backward order, so the
# first wrong step is the one named.

LOSS_STEPS = ("logprobs", "lse", "counts_sum", "counts", "norm_logits", "logit_maxes", "logits")
BN_STEPS = ("bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff", "bnmeani", "hprebn")


def mlp_intermediates(seed: int, n: int = 8, block: int = 3, n_embd: int = 4, n_hidden: int = 6,
                      vocab: int = 7, eps: float = 1e-5, sum_offset: float = 0.0):
    """The lesson's forward pass on random float64 inputs: ``(t, grads, Yb, Xb)``.

    ``t`` maps every intermediate's name (and the parameters') to a detached tensor,
    ``grads`` maps the same names to autograd's gradient of the loss. ``sum_offset`` is a
    constant added to ``counts_sum``: every local derivative stays the same, but the gradient
    through the max is no longer 0 (with ``sum_offset=0`` the softmax ignores the max).
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    Xb = torch.randint(0, vocab, (n, block), generator=g)
    Yb = torch.randint(0, vocab, (n,), generator=g)
    C, W1 = r(vocab, n_embd), r(block * n_embd, n_hidden) / (block * n_embd) ** 0.5
    bngain, bnbias = 1 + 0.1 * r(1, n_hidden), 0.1 * r(1, n_hidden)
    W2, b2 = r(n_hidden, vocab), 0.1 * r(vocab)
    params = dict(C=C, W1=W1, bngain=bngain, bnbias=bnbias, W2=W2, b2=b2)
    for p in params.values():
        p.requires_grad_()
    t = dict(params)
    t["emb"] = C[Xb]
    t["embcat"] = t["emb"].view(n, -1)
    t["hprebn"] = t["embcat"] @ W1
    t["bnmeani"] = 1 / n * t["hprebn"].sum(0, keepdim=True)
    t["bndiff"] = t["hprebn"] - t["bnmeani"]
    t["bndiff2"] = t["bndiff"] ** 2
    t["bnvar"] = 1 / (n - 1) * t["bndiff2"].sum(0, keepdim=True)
    t["bnvar_inv"] = (t["bnvar"] + eps) ** -0.5
    t["bnraw"] = t["bndiff"] * t["bnvar_inv"]
    t["hpreact"] = bngain * t["bnraw"] + bnbias
    t["h"] = torch.tanh(t["hpreact"])
    t["logits"] = t["h"] @ W2 + b2
    t["logit_maxes"] = t["logits"].max(1, keepdim=True).values
    t["norm_logits"] = t["logits"] - t["logit_maxes"]
    t["counts"] = t["norm_logits"].exp()
    t["counts_sum"] = t["counts"].sum(1, keepdim=True) + sum_offset
    t["lse"] = t["counts_sum"].log()
    t["logprobs"] = t["norm_logits"] - t["lse"]
    loss = -t["logprobs"][range(n), Yb].mean()
    for name, x in t.items():
        if name not in params:
            x.retain_grad()
    loss.backward()
    grads = {name: x.grad for name, x in t.items()}
    return {name: x.detach() for name, x in t.items()}, grads, Yb, Xb


def _expect_grads(fn_name: str, result, names, grads, where: str) -> None:
    if not isinstance(result, dict):
        raise CheckFailed(f"{fn_name} should return a dict name -> gradient (keys {', '.join(names)}), "
                          f"got {type(result).__name__}")
    for name in names:
        if name not in result:
            raise CheckFailed(f"{fn_name}: the returned dict has no gradient for {name!r} (keys: {sorted(result)})")
        _expect_grad(f"d{name} ({where})", result[name], grads[name])


def check_backward_loss(backward_loss) -> None:
    """Exercise: ``backward_loss(t, Yb) -> {name: gradient}`` from ``logprobs`` back to ``logits``.

    ``t`` holds the forward intermediates of section 4 (``t["logits"]``, ``t["logprobs"]``, ...);
    the answer has the gradient of the loss with respect to each name in ``LOSS_STEPS``.
    """
    for seed, n, vocab in ((0, 8, 7), (1, 32, 27)):
        t, grads, Yb, _ = mlp_intermediates(seed, n=n, vocab=vocab)
        result = _call(backward_loss, "backward_loss", t, Yb)
        _expect_grads("backward_loss", result, LOSS_STEPS, grads, f"batch {n}, {vocab} classes")
    # Above, the true gradient through the max is 0, so a wrong max path cannot show. With a
    # constant added to counts_sum (the same local derivatives) it is not 0.
    t, grads, Yb, _ = mlp_intermediates(2, n=6, vocab=5, sum_offset=0.5)
    result = _call(backward_loss, "backward_loss", t, Yb)
    where = "t['counts_sum'] with 0.5 added, so that the gradient through the max is not 0"
    _expect_grads("backward_loss", result, LOSS_STEPS[:-1], grads, where)
    _max_path_slips(result, t, grads, where)
    _expect_grads("backward_loss", result, LOSS_STEPS[-1:], grads, where)
    passed("cross-entropy backward, step by step")


def _max_path_slips(result, t, grads, where: str) -> None:
    """Name a wrong path through ``logit_maxes = logits.max(1)``, if dlogits is what it gives."""
    direct, through_max = grads["norm_logits"], grads["logit_maxes"]
    picked = F.one_hot(t["logits"].max(1).indices, t["logits"].shape[1])
    right = ("only the logit each row's max picked gets dlogit_maxes, added to its dnorm_logits "
             "(a one-hot of the argmax times dlogit_maxes)")
    slips = ((direct, f"the path through the max is missing; {right}"),
             (direct - picked * through_max, f"the path through the max has the wrong sign (dlogit_maxes already "
                                             f"holds the minus of norm_logits = logits - logit_maxes); {right}"),
             (direct + through_max, f"dlogit_maxes is added to every logit of its row; {right}"))
    got = result.get("logits") if isinstance(result, dict) else None
    for wrong, message in slips:
        if _same(got, wrong):
            raise CheckFailed(f"dlogits ({where}): {message}")


def check_backward_mlp(fns) -> None:
    """Exercise: ``(linear_backward, tanh_backward, embedding_backward)``, one layer each.

    ``linear_backward(dout, x, W) -> (dx, dW, db)`` for ``out = x @ W + b``;
    ``tanh_backward(dout, out) -> dpre`` for ``out = tanh(pre)``;
    ``embedding_backward(demb, ix, num_embeddings) -> dC`` for ``emb = C[ix]``.
    """
    linear_backward, tanh_backward, embedding_backward = fns
    for seed, (n, d_in, d_out), dtype in ((0, (5, 4, 3), torch.float64), (1, (32, 30, 27), torch.float64),
                                          (6, (1, 5, 1), torch.float32)):
        x, W, b, dout = _inputs(seed, (n, d_in), (d_in, d_out), (d_out,), (n, d_out), dtype=dtype)
        x, W, b = x.requires_grad_(), W.requires_grad_(), b.requires_grad_()
        ((x @ W + b) * dout).sum().backward()
        result = _call(linear_backward, "linear_backward", dout, x.detach(), W.detach())
        for name, got, expected in zip(("dx", "dW", "db"), _unpack(result, ("dx", "dW", "db"), "linear_backward"),
                                       (x.grad, W.grad, b.grad)):
            _expect_grad(f"linear_backward: {name} (x {(n, d_in)}, W {(d_in, d_out)}{_kind(dtype)})", got, expected)
    for seed, shape in ((2, (4, 6)), (3, (32, 64))):
        pre, dout = _inputs(seed, shape, shape)
        pre = (2 * pre).requires_grad_()
        out = torch.tanh(pre)
        (out * dout).sum().backward()
        got = _call(tanh_backward, "tanh_backward", dout, out.detach())
        _expect_grad(f"tanh_backward: dpre (shape {shape})", got, pre.grad)
    for seed, ix_shape, vocab, d in ((4, (6, 3), 5, 2), (5, (32, 3), 27, 10), (6, (5,), 27, 4)):
        (C,) = _inputs(seed, (vocab, d))
        ix = torch.randint(0, vocab, ix_shape, generator=torch.Generator().manual_seed(seed))
        ix.view(-1)[:3] = 1  # a row used several times: its gradients must add up
        C.requires_grad_()
        (demb,) = _inputs(seed + 100, (*ix_shape, d))
        (C[ix] * demb).sum().backward()
        got = _call(embedding_backward, "embedding_backward", demb, ix, vocab)
        _expect_grad(f"embedding_backward: dC (ix {ix_shape}, table {(vocab, d)}, row 1 used 3+ times)", got, C.grad)
    passed("linear, tanh and embedding backward")


def check_backward_batchnorm(backward_batchnorm) -> None:
    """Exercise: ``backward_batchnorm(t, dhpreact, eps) -> {name: gradient}`` for every name in ``BN_STEPS``.

    ``t`` holds section 4's BatchNorm intermediates (``hprebn``, ``bnmeani``, ``bndiff``,
    ``bndiff2``, ``bnvar``, ``bnvar_inv``, ``bnraw``, ``bngain``); the variance is the
    unbiased one (divided by n - 1).
    """
    for seed, n, hidden, eps in ((0, 8, 6, 1e-5), (1, 32, 20, 1e-5), (4, 5, 7, 0.25)):
        t, grads, _, _ = mlp_intermediates(seed, n=n, n_hidden=hidden, eps=eps)
        result = _call(backward_batchnorm, "backward_batchnorm", t, grads["hpreact"], eps)
        where = f"batch {n}, {hidden} hidden units, eps={eps:g}"
        got = result.get("bnvar") if isinstance(result, dict) else None  # an eps of its own shows in dbnvar
        _name_wrong_eps(f"dbnvar ({where})", got, eps,
                        {e: ours_backward_batchnorm(t, grads["hpreact"], e)["bnvar"] for e in OTHER_EPS})
        _expect_grads("backward_batchnorm", result, BN_STEPS, grads, where)
    passed("BatchNorm backward, step by step")


def check_batchnorm_compact(batchnorm_backward) -> None:
    """Exercise: ``batchnorm_backward(dhpreact, bnraw, bnvar_inv, bngain) -> (dhprebn, dbngain, dbnbias)``.

    In closed form, without the intermediate steps; BatchNorm in training mode with the
    unbiased variance. ``dbngain`` and ``dbnbias`` keep the shape ``(1, hidden)``.
    """
    names = ("dhprebn", "dbngain", "dbnbias")
    for seed, n, hidden, dtype in ((2, 8, 6, torch.float64), (3, 64, 20, torch.float64), (5, 2, 4, torch.float32)):
        t, grads, _, _ = mlp_intermediates(seed, n=n, n_hidden=hidden)
        inputs = (grads["hpreact"], t["bnraw"], t["bnvar_inv"], t["bngain"])
        result = _call(batchnorm_backward, "batchnorm_backward", *(x.to(dtype) for x in inputs))
        for name, got, key in zip(names, _unpack(result, names, "batchnorm_backward"), ("hprebn", "bngain", "bnbias")):
            _expect_grad(f"batchnorm_backward: {name} (batch {n}, {hidden} hidden units{_kind(dtype)})", got,
                         grads[key].to(dtype))
    passed("BatchNorm backward in closed form")


# The course's own pieces, for the cells after the exercises while the learner's do not pass
# yet (``nblib.checks.yours_or_ours``). The step-by-step ones ask autograd.

def ours_backward_loss(t, Yb):
    logits = t["logits"].detach().clone().requires_grad_()
    s = {"logits": logits}
    s["logit_maxes"] = logits.max(1, keepdim=True).values
    s["norm_logits"] = logits - s["logit_maxes"]
    s["counts"] = s["norm_logits"].exp()
    # whatever t's counts_sum holds beyond the sum of its counts is a constant (``sum_offset``)
    offset = (t["counts_sum"] - t["counts"].sum(1, keepdim=True)).detach()
    s["counts_sum"] = s["counts"].sum(1, keepdim=True) + offset
    s["lse"] = s["counts_sum"].log()
    s["logprobs"] = s["norm_logits"] - s["lse"]
    for x in list(s.values())[1:]:
        x.retain_grad()
    (-s["logprobs"][range(len(Yb)), Yb].mean()).backward()
    return {name: x.grad for name, x in s.items()}


def ours_backward_batchnorm(t, dhpreact, eps):
    hprebn = t["hprebn"].detach().clone().requires_grad_()
    bngain = t["bngain"].detach().clone().requires_grad_()
    bnbias = torch.zeros_like(bngain, requires_grad=True)
    n = hprebn.shape[0]
    s = {"hprebn": hprebn, "bngain": bngain, "bnbias": bnbias}
    s["bnmeani"] = 1 / n * hprebn.sum(0, keepdim=True)
    s["bndiff"] = hprebn - s["bnmeani"]
    s["bndiff2"] = s["bndiff"] ** 2
    s["bnvar"] = 1 / (n - 1) * s["bndiff2"].sum(0, keepdim=True)
    s["bnvar_inv"] = (s["bnvar"] + eps) ** -0.5
    s["bnraw"] = s["bndiff"] * s["bnvar_inv"]
    for name in BN_STEPS[2:-1]:
        s[name].retain_grad()
    ((bngain * s["bnraw"] + bnbias) * dhpreact).sum().backward()
    return {name: s[name].grad for name in BN_STEPS}


def ours_linear_backward(dout, x, W):
    return dout @ W.T, x.T @ dout, dout.sum(0)


def ours_tanh_backward(dout, out):
    return (1 - out**2) * dout


def ours_embedding_backward(demb, ix, num_embeddings):
    return torch.zeros(num_embeddings, demb.shape[-1], dtype=demb.dtype).index_add_(
        0, ix.reshape(-1), demb.reshape(-1, demb.shape[-1]))


def ours_batchnorm_backward(dhpreact, bnraw, bnvar_inv, bngain):
    n = dhpreact.shape[0]
    dhprebn = bngain * bnvar_inv / n * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
    return dhprebn, (bnraw * dhpreact).sum(0, keepdim=True), dhpreact.sum(0, keepdim=True)
