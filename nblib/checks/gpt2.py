"""Checks for lesson 06 (GPT-2): parameter count, learning-rate schedule, top-p filtering."""
from __future__ import annotations

import torch

from nblib.checks import CheckFailed, call_learner, expect_close, expect_equal, passed
from nblib.gpt import GPT, GPTConfig
from nblib.train import TrainConfig, lr_at

CONFIGS = [
    GPTConfig(),  # GPT-2 small: 124,439,808
    GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # GPT-2 medium
    GPTConfig(vocab_size=100, block_size=16, n_layer=3, n_head=2, n_embd=8),
    GPTConfig(vocab_size=50257, block_size=64, n_layer=4, n_head=4, n_embd=64, bias=False),
]


def check_num_params(gpt2_num_params) -> None:
    """``gpt2_num_params(config) -> int``: GPT-2's parameter count from its config, by formula."""
    for cfg in CONFIGS:
        with torch.device("meta"):  # shapes only, no memory: GPT-2 medium costs nothing
            want = GPT(cfg).num_params()
        got = call_learner(f"gpt2_num_params({cfg})", gpt2_num_params, cfg)
        if not isinstance(got, int):
            raise CheckFailed(f"gpt2_num_params({cfg}) should return an int, got {type(got).__name__}")
        if got == want + cfg.vocab_size * cfg.n_embd:
            raise CheckFailed(f"{cfg}: you counted lm_head separately; it is tied to wte (counted once)")
        expect_equal(f"gpt2_num_params({cfg})", got, want)
    passed("GPT-2 parameter count")


def _lr_reference(step, max_steps, warmup_steps, lr, min_lr):
    """nblib.train's schedule, the one the course trains with."""
    return lr_at(step, TrainConfig(max_steps=max_steps, warmup_steps=warmup_steps, lr=lr, min_lr=min_lr))


def check_lr_schedule(lr_schedule) -> None:
    """``lr_schedule(step, max_steps, warmup_steps, lr, min_lr) -> float``: warmup, then cosine."""
    cases = [(s, 100, 10, 6e-4, 6e-5) for s in (0, 4, 9, 10, 30, 55, 99, 100, 150)]
    cases += [(s, 20, 0, 1.0, 0.0) for s in (0, 5, 10, 20)]
    for args in cases:
        got = call_learner(f"lr_schedule{args}", lr_schedule, *args)
        expect_close(f"lr_schedule{args}", float(got), _lr_reference(*args), atol=1e-12, rtol=1e-6)
    passed("warmup + cosine learning-rate schedule")


def check_top_p(top_p_filter) -> None:
    """``top_p_filter(logits [B, V], p) -> logits`` with tokens outside the nucleus set to -inf."""
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.1, 0.2, 0.3, 0.4]])
    logits = probs.log()
    # hand-worked nuclei: the smallest set of most likely tokens with mass >= p
    # (no p sits exactly on a cumulative sum, where float rounding would decide)
    cases = {0.45: [[1, 0, 0, 0], [0, 0, 1, 1]], 0.6: [[1, 0, 1, 0], [0, 0, 1, 1]],
             0.75: [[1, 0, 1, 0], [0, 1, 1, 1]], 0.81: [[1, 0, 1, 1], [0, 1, 1, 1]],
             1e-9: [[1, 0, 0, 0], [0, 0, 0, 1]], 1.0: [[1, 1, 1, 1], [1, 1, 1, 1]]}
    for p, keep in cases.items():
        out = _call_top_p(top_p_filter, logits, p)
        got = out.isfinite().int().tolist()
        if got != keep:
            raise CheckFailed(f"top_p_filter with p={p}: kept {got} (1 = kept), expected {keep} for "
                              f"probabilities {probs.tolist()}")
        kept = torch.tensor(keep).bool()
        expect_close(f"top_p_filter(p={p}) kept logits", out[kept], logits[kept], atol=1e-6)
    _check_top_p_large_vocab(top_p_filter)
    passed("top-p (nucleus) filtering")


def _call_top_p(top_p_filter, logits, p):
    out = call_learner(f"top_p_filter(logits, {p})", top_p_filter, logits.clone(), p)
    if not torch.is_tensor(out) or out.shape != logits.shape:
        raise CheckFailed(f"top_p_filter(logits, {p}) should return a tensor of shape {tuple(logits.shape)}")
    return out


def _check_top_p_large_vocab(top_p_filter) -> None:
    """GPT-2's 50,257 tokens, where float32 rounding matters.

    A token belongs to the nucleus when the mass of the tokens more likely than it is < p
    (computed here in float64). Tokens within ``slack`` of that boundary may go either way,
    since float32 sums in another order land a little differently; away from it, the
    answer is exact. At p = 1 every token is in (each has some probability), and that is
    where a float32 running sum from the most likely token fails: it reaches 1.0
    thousands of tokens before the end.
    """
    slack = 1e-4  # float32 sums over 50k tokens are off by ~3e-6 here
    logits = torch.randn(2, 50257, generator=torch.Generator().manual_seed(0)) * 3
    sorted_probs, order = logits.double().softmax(dim=-1).sort(dim=-1, descending=True)
    mass_before = torch.empty_like(sorted_probs).scatter(-1, order, sorted_probs.cumsum(-1) - sorted_probs)
    for p in (0.5, 0.9, 0.99, 1.0):
        out = _call_top_p(top_p_filter, logits, p)
        kept = out.isfinite()
        if p == 1.0 and not kept.all():
            raise CheckFailed(
                f"top_p_filter with p=1.0 on a 50,257-token vocabulary dropped {int((~kept).sum()):,} tokens; "
                "p=1 must keep every token. A float32 cumulative sum from the most likely token reaches 1.0 "
                "long before the last tokens. Sum from the least likely token instead (sort ascending, drop a "
                "token while the cumulative sum up to it is <= 1 - p, always keep the last), or return the "
                "logits unchanged when p >= 1.")
        wrongly_dropped = (~kept & (mass_before < p - slack)).sum().item()
        wrongly_kept = (kept & (mass_before >= p + slack)).sum().item()
        if wrongly_dropped or wrongly_kept:
            size = (mass_before < p).sum(-1).tolist()
            raise CheckFailed(f"top_p_filter with p={p} on a 50,257-token vocabulary: dropped {wrongly_dropped} "
                              f"tokens of the nucleus and kept {wrongly_kept} outside it (the nuclei of the two "
                              f"rows have {size} tokens)")
        expect_close(f"top_p_filter(p={p}) kept logits (50,257 tokens)", out[kept], logits[kept], atol=1e-6)
