"""Checks of lesson 16's exercises: the paged cache's slot arithmetic (16.token_slots), int8
weight quantization (16.quantize_int8) and speculative sampling's accept rule (16.accept_draft),
each against nblib's own and with the usual mistakes named."""
from __future__ import annotations

import torch

from nblib import paged, quant, speculative
from nblib.checks import CheckFailed, call_learner, course_functions_refused, passed

# ---------------------------------------------------------------------------- 16.token_slots

SLOT_CASES = [  # (table, page_size, start, end)
    ([0], 4, 0, 3),
    ([3, 0, 5], 4, 0, 12),
    ([3, 0, 5], 4, 5, 10),
    ([7, 2], 16, 14, 20),
    ([1, 6, 4, 2], 3, 2, 11),
    ([9], 8, 8 - 1, 8),
    ([2, 5], 4, 3, 3),  # nothing: an empty tensor
]


def _slot_variants():
    def no_table(table, ps, start, end):
        t = torch.arange(start, end)
        return (t // ps) * ps + t % ps

    def no_page_size(table, ps, start, end):
        t = torch.arange(start, end)
        return torch.tensor(table)[t // ps] + t % ps

    def end_included(table, ps, start, end):
        t = torch.arange(start, min(end + 1, len(table) * ps))
        return torch.tensor(table)[t // ps] * ps + t % ps

    return {"the request's pages were ignored (token t's page is table[t // page_size], not t // page_size)": no_table,
            "a page number was used as a slot (multiply it by page_size)": no_page_size,
            "the token `end` was included (start ... end - 1, as range does)": end_included}


def check_token_slots(token_slots) -> None:
    """``token_slots(table, page_size, start, end)`` must equal ``nblib.paged.token_slots``."""
    for table, ps, start, end in SLOT_CASES:
        what = f"token_slots(table={table}, page_size={ps}, start={start}, end={end})"
        with course_functions_refused("token_slots", paged, "token_slots", write_from="integer division and %"):
            got = call_learner(what, token_slots, list(table), ps, start, end)
        try:
            got = torch.as_tensor(got, dtype=torch.long).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise CheckFailed(f"{what}: expected a LongTensor of slots, got {got!r}") from None
        want = paged.token_slots(table, ps, start, end)
        if got.tolist() != want.tolist():
            named = [name for name, fn in _slot_variants().items()
                     if _same(lambda: fn(table, ps, start, end), got)]
            hint = f" ({named[0]})" if named else ""
            raise CheckFailed(f"{what}: expected {want.tolist()}, got {got.tolist()}{hint}")
    passed("token_slots")


def _same(make, got) -> bool:
    try:
        return torch.as_tensor(make()).tolist() == got.tolist()
    except (IndexError, RuntimeError):
        return False


# ---------------------------------------------------------------------------- 16.quantize_int8

def _weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    w[2] = 0.0  # a row of zeros: its scale must not be 0 (0 / 0 is NaN)
    w[4, 3] = 40.0  # one outlier sets its row's scale, and only its row's
    return [w, torch.randn(3, 7, generator=g) * 0.02, torch.randn(1, 5, generator=g)]


def _quant_variants():
    def per_tensor(w):
        scale = w.abs().max() / 127
        return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale.expand(w.shape[0]).clone()

    def truncated(w):
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        return (w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    def by_128(w):
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 128
        return torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8), scale

    return {"one scale for the whole tensor (one per output row: amax over dim=1)": per_tensor,
            "the values were truncated towards 0 by .to(torch.int8) (round them first)": truncated,
            "the scale divides by 128 (the largest must map to 127, and -127 ... 127 keeps it symmetric)": by_128}


def check_quantize_int8(quantize_int8) -> None:
    """``quantize_int8(w) -> (q, scale)``: int8 [out, in] and float [out] equal to ``nblib.quant``'s."""
    for w in _weights():
        what = f"quantize_int8 on a {list(w.shape)} weight"
        saved = w.clone()
        with course_functions_refused("quantize_int8", quant, "quantize_int8",
                                      write_from="amax, round and clamp"):
            got = call_learner(what, quantize_int8, w)
        if not torch.equal(w, saved):
            raise CheckFailed(f"{what}: the weight was changed in place; compute new tensors instead")
        if not (isinstance(got, tuple) and len(got) == 2 and all(torch.is_tensor(t) for t in got)):
            raise CheckFailed(f"{what}: expected a tuple (q, scale) of two tensors, got {type(got).__name__}")
        q, scale = got
        want_q, want_scale = quant.quantize_int8(w)
        if q.dtype != torch.int8:
            raise CheckFailed(f"{what}: q must be torch.int8 (1 byte a weight), got {q.dtype}")
        if tuple(scale.shape) != (w.shape[0],) or not scale.is_floating_point():
            raise CheckFailed(f"{what}: scale must be a float tensor of shape [{w.shape[0]}] (one per output row), "
                              f"got {scale.dtype} {list(scale.shape)}")
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise CheckFailed(f"{what}: every scale must be > 0 and finite (a row of zeros too: clamp the "
                              f"row's max, e.g. to 1e-12), got {scale.tolist()}")
        rows_of_zeros = w.abs().amax(dim=1) == 0
        close = torch.allclose(scale[~rows_of_zeros], want_scale[~rows_of_zeros], rtol=1e-5, atol=0)
        if not close or not torch.equal(q, want_q):
            named = [name for name, fn in _quant_variants().items()
                     if torch.equal(fn(w)[0], q) and torch.allclose(fn(w)[1].float(), scale.float(), rtol=1e-5)]
            err = (quant.dequantize(q, scale) - w).abs().max()
            hint = f" ({named[0]})" if named else ""
            raise CheckFailed(f"{what}: expected q {want_q[0, :5].tolist()}..., scale {want_scale[:3].tolist()}...; "
                              f"got q {q[0, :5].tolist()}..., scale {scale[:3].tolist()}... (largest error "
                              f"{float(err):.3g}){hint}")
    passed("quantize_int8")


# ---------------------------------------------------------------------------- 16.accept_draft

# chi-square critical value at p = 0.001 for 4 cells (3 degrees of freedom)
CHI2_CRIT_3 = 16.27
DRAWS = 4000


def _dists():
    """A target p (at the drafted position and after) and a draft q that disagree."""
    p = torch.tensor([[0.50, 0.30, 0.15, 0.05], [0.10, 0.20, 0.30, 0.40]], dtype=torch.float64)
    q = torch.tensor([[0.10, 0.20, 0.30, 0.40]], dtype=torch.float64)
    return p, q


def _chi_square(counts, probs) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _accept_variants():
    def always(p, q, drafted, generator=None):
        return [*drafted, int(torch.multinomial(p[len(drafted)], 1, generator=generator))]

    def resample_from_p(p, q, drafted, generator=None):
        for i, x in enumerate(drafted):
            if float(torch.rand((), generator=generator, dtype=torch.float64)) * q[i, x] >= p[i, x]:
                return [*drafted[:i], int(torch.multinomial(p[i], 1, generator=generator))]
        return [*drafted, int(torch.multinomial(p[len(drafted)], 1, generator=generator))]

    return {"every drafted token was kept (keep it with probability min(1, p(x) / q(x)))": always,
            "a rejected token was replaced by a draw from p (draw from max(0, p - q), normalised)": resample_from_p}


def _first_tokens(accept, what, learner: bool = True) -> torch.Tensor:
    """How often each token came first in 4,000 seeded calls of ``accept`` on one draft drawn from q."""
    p, q = _dists()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, dtype=torch.float64)
    for _ in range(DRAWS):
        x = int(torch.multinomial(q[0], 1, generator=g))
        out = call_learner(what, accept, p, q, [x], g) if learner else accept(p, q, [x], g)
        if not isinstance(out, (list, tuple)) or not 1 <= len(out) <= 2 or not all(isinstance(t, int) for t in out):
            raise CheckFailed(f"{what}: expected a list of 1 or 2 ints (the kept drafts, then one token), got {out!r}")
        if len(out) == 2 and out[0] != x:
            raise CheckFailed(f"{what}: returned {out}: two tokens mean the draft {x} was kept, so it must come first")
        counts[out[0]] += 1
    return counts


def check_accept_draft(accept_draft) -> None:
    """``accept_draft(p, q, drafted, generator) -> list[int]``: greedy cases exact, and the first
    token of 4,000 seeded draws distributed as the target p (a chi-square test at p = 0.001)."""
    one_hot = lambda i: torch.nn.functional.one_hot(torch.tensor(i), 3).double()  # noqa: E731
    p = torch.stack([one_hot(1), one_hot(0), one_hot(2)])
    for q_tokens, drafted, want in (([1, 0], [1, 0], [1, 0, 2]), ([1, 2], [1, 2], [1, 0]), ([0, 0], [0, 0], [1])):
        what = f"accept_draft with one-hot (greedy) p = argmax [1, 0, 2] and drafts {drafted}"
        with course_functions_refused("accept_draft", speculative, "accept_draft", "speculative_generate",
                                      write_from="torch.rand, clamp and torch.multinomial"):
            got = call_learner(what, accept_draft, p, torch.stack([one_hot(i) for i in q_tokens]), list(drafted),
                               torch.Generator().manual_seed(0))
        if not isinstance(got, (list, tuple)) or not all(isinstance(t, int) for t in got):
            raise CheckFailed(f"{what}: expected a list of Python ints like {want}, got {got!r} (use int(...))")
        if list(got) != want:
            q = torch.stack([one_hot(i) for i in q_tokens])
            named = [name for name, fn in _accept_variants().items()
                     if fn(p, q, list(drafted), torch.Generator().manual_seed(0)) == list(got)]
            hint = f" ({named[0]})" if named else ""
            raise CheckFailed(f"{what}: expected {want} (keep a draft while it is the target's choice, then the "
                              f"target's own token), got {got!r}{hint}")
    what = "accept_draft on one draft drawn from q, 4,000 times"
    with course_functions_refused("accept_draft", speculative, "accept_draft", "speculative_generate",
                                  write_from="torch.rand, clamp and torch.multinomial"):
        counts = _first_tokens(accept_draft, what)
    target = _dists()[0][0]
    stat = _chi_square(counts, target)
    if stat > CHI2_CRIT_3:
        named = [name for name, fn in _accept_variants().items()
                 if torch.allclose(_first_tokens(fn, name, learner=False) / DRAWS, counts / DRAWS, atol=0.03)]
        hint = f" ({named[0]})" if named else ""
        raise CheckFailed(f"{what}: the first token's frequencies {[round(c, 3) for c in (counts / DRAWS).tolist()]} "
                          f"are not the target's {target.tolist()} (chi-square {stat:.1f} > {CHI2_CRIT_3}){hint}")
    passed("accept_draft")
