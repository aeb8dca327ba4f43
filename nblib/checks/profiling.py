"""Checks for lesson 13's exercises: MFU, the activation-memory estimate, a bf16 training step."""
from __future__ import annotations

import copy
import numbers

import torch
import torch.nn as nn

from nblib import hardware, llama, profiling
from nblib.checks import CheckFailed, call_learner, expect_close, name_the_gap, passed
from nblib.train import TrainConfig, configure_optimizer

BF16_LOSS_TOL = 0.05     # bf16 losses after a few steps vs float32's


def _tiny(seed: int = 0, **sizes) -> llama.Llama:
    torch.manual_seed(seed)
    config = llama.LlamaConfig(**{**dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16), **sizes})
    return llama.Llama(config)


# (model sizes, step seconds, B, T, peak FLOP/s) for measured_mfu
MFU_CASES = (({}, 0.01, 4, 16, 1e12), (dict(n_layer=3, n_embd=32), 0.25, 2, 8, 5e10),
             (dict(block_size=64), 1.0, 8, 64, 2e9))


def _course_mfu(model, seconds: float, B: int, T: int, peak: float) -> float:
    """The expected answer, from nblib (kept out of the check's loop: a traceback shows the loop's lines)."""
    return hardware.mfu(model.flops_per_token(T), B * T / seconds, peak)


def check_mfu(measured_mfu) -> None:
    """``measured_mfu(model, step_seconds, batch_size, block_size, peak_flops) -> float``."""
    for sizes, seconds, B, T, peak in MFU_CASES:
        model = _tiny(**sizes)
        got = call_learner("measured_mfu", measured_mfu, model, seconds, B, T, peak)
        expect_close(f"measured_mfu(model {sizes or 'default'}, {seconds} s/step, B={B}, T={T}, peak={peak:g})",
                     got, _course_mfu(model, seconds, B, T, peak), atol=0, rtol=1e-6)
    passed("measured_mfu")


def _activation_terms(config: llama.LlamaConfig, B: int, T: int) -> dict[str, float]:
    """Bytes a count often leaves out (positive) or adds wrongly (negative), for ``name_the_gap``."""
    L, H, V, h = config.n_layer, config.n_head, config.vocab_size, config.ffn_hidden
    return {
        "attention's log-sum-exp: SDPA saves one float per head and position, 4 * B * n_head * T bytes per layer":
            4 * L * B * H * T,
        "the norms' rsqrt: each RMSNorm saves one float per position, 4 * B * T bytes for each of the "
        "2 * n_layer + 1 norms": 4 * (2 * L + 1) * B * T,
        "the int64 token ids and targets: the embedding saves the ids, cross-entropy the targets, "
        "8 bytes each, 2 * 8 * B * T bytes": 16 * B * T,
        "8 * B * T bytes: the targets (int64, saved by cross-entropy), or the ids and targets counted at "
        "4 bytes where int64 has 8": 8 * B * T,
        "the log-softmax cross-entropy saves, 4 * B * T * vocab_size bytes": 4 * B * T * V,
        "the RoPE cos and sin rows, 4 * 2 * T * head_dim bytes (saved once, shared by the layers)":
            8 * T * config.head_dim,
        "the RoPE cos and sin rows counted in every layer: they are one pair of tables, saved once":
            -8 * (L - 1) * T * config.head_dim,
        "one of the MLP's four B * T * ffn_hidden tensors (gate, up, silu(gate), their product) in each layer":
            4 * L * B * T * h,
    }


def check_activation_bytes(estimate) -> None:
    """``estimate(config, B, T) -> bytes``: exactly the lesson's count, checked against what autograd saves."""
    cases = ((dict(n_layer=3, n_head=4, n_embd=32, vocab_size=65), 2, 12), (dict(), 1, 8), (dict(), 4, 16),
             (dict(n_embd=24, n_head=3, block_size=32), 3, 32))
    for sizes, B, T in cases:
        model = _tiny(**sizes)
        g = torch.Generator().manual_seed(B * 100 + T)
        x = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
        measured = profiling.saved_activation_bytes(model, x, torch.roll(x, -1, dims=1))  # ids and targets: two tensors
        expected = profiling.activation_bytes(model.config, B, T)  # the lesson's count: measured less a 0-d float32
        what = f"activation_bytes for {sizes or 'the default tiny config'}, B={B}, T={T}"
        got = call_learner(what, estimate, model.config, B, T)
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            raise CheckFailed(f"{what}: expected a number of bytes (an int), got {got!r}")
        if got not in (expected, measured):  # exact: every value autograd saves, to the byte
            gap = name_the_gap(expected - got, _activation_terms(model.config, B, T))
            raise CheckFailed(f"{what}: expected {expected} bytes, got {got} (off by {got - expected:+g}){gap}. "
                              f"(Torch saves {measured} bytes: {measured - expected} more for the 0-d float32 "
                              "the loss keeps, which the lesson's count leaves out; both are accepted)")
    passed("activation_bytes")


def _linear_outputs(model: nn.Module) -> tuple[list, list]:
    """Register hooks that record each nn.Linear's output dtype; returns (dtypes, handles)."""
    dtypes = []
    handles = [m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
               for m in model.modules() if isinstance(m, nn.Linear)]
    return dtypes, handles


def check_bf16_step(bf16_step, n_steps: int = 4) -> None:
    """``bf16_step(model, optimizer, x, y) -> loss``: one optimizer step, matmuls in bfloat16.

    It runs, every nn.Linear produced bfloat16, the weights stayed float32 (autocast, not
    ``model.bfloat16()``), and the losses track a float32 run within ``BF16_LOSS_TOL``."""
    if not hardware.cpu_info().has_bf16 and not torch.cuda.is_available():
        print("(this CPU has no AVX-512 BF16: bf16_step is checked for running and for the loss only)")
    model = _tiny(seed=3)
    reference = copy.deepcopy(model)
    cfg = TrainConfig(lr=3e-3)
    opt, ref_opt = configure_optimizer(model, cfg), configure_optimizer(reference, cfg)
    g = torch.Generator().manual_seed(5)
    for i in range(n_steps):
        x = torch.randint(0, 32, (4, 16), generator=g)
        y = torch.roll(x, -1, dims=1)
        dtypes, handles = _linear_outputs(model)
        try:
            loss = call_learner("bf16_step", bf16_step, model, opt, x, y)
        finally:
            for h in handles:
                h.remove()
        ref_loss = profiling.training_step(reference, ref_opt, x, y, "cpu", "float32")
        if not dtypes:
            raise CheckFailed("bf16_step: no nn.Linear ran: did it call model(x, y)?")
        if any(d != torch.bfloat16 for d in dtypes):
            raise CheckFailed(f"bf16_step: the linear layers produced {sorted(set(map(str, dtypes)))}, expected "
                              "torch.bfloat16: is the forward pass inside torch.autocast(..., dtype=torch.bfloat16)?")
        wrong = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
        if wrong:
            raise CheckFailed(f"bf16_step: parameters {wrong[:3]} are no longer float32: autocast keeps the "
                              "weights in float32 and casts copies; do not convert the model")
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise CheckFailed(f"bf16_step returned {type(loss).__name__}: return the loss as a 0-d tensor, "
                              "detached (loss.detach()), not a float or a tuple")
        if loss.requires_grad:
            raise CheckFailed("bf16_step returned a loss that still requires grad: it holds the whole graph (every "
                              "saved activation) until it is freed; return loss.detach()")
        expect_close(f"bf16_step's loss at step {i} (float32 run's loss as expected)", float(loss),
                     float(ref_loss), atol=BF16_LOSS_TOL, rtol=0)
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()):
            raise CheckFailed("bf16_step: gradients are still there after the step: zero them "
                              "(optimizer.zero_grad) so the next step does not add to them")
    moved = sum((p - q).abs().sum().item() for p, q in zip(model.parameters(), _tiny(seed=3).parameters()))
    if moved == 0:
        raise CheckFailed("bf16_step: the weights did not change: is optimizer.step() missing?")
    passed("bf16_step")
