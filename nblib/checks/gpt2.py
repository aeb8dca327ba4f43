"""Checks for lesson 06 (GPT-2): the block and the forward (against Hugging Face), parameter count,
learning-rate schedule, top-p filtering."""
from __future__ import annotations

import dataclasses

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
        got = call_learner(f"gpt2_num_params({cfg})", gpt2_num_params, cfg)
        if not isinstance(got, int):
            raise CheckFailed(f"gpt2_num_params({cfg}) should return an int, got {type(got).__name__}")
        with torch.device("meta"):  # shapes only, no memory: GPT-2 medium costs nothing
            want = GPT(cfg).num_params()
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
    cases += [(s, 10, 10, 0.5, 0.05) for s in (9, 10, 11)]  # no cosine left after the warmup: no division by 0
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
    # float64 logits with a token that top-k already removed: it stays out, the others are kept
    masked = torch.tensor([[2.0, 1.0, float("-inf"), 0.5]], dtype=torch.float64)
    out = _call_top_p(top_p_filter, masked, 0.99)
    if out.isnan().any() or out.isfinite().tolist() != [[True, True, False, True]]:
        raise CheckFailed(f"top_p_filter([[2, 1, -inf, 0.5]], 0.99): expected the three finite logits kept and the "
                          f"-inf left out, got {out.tolist()}")
    # ties: four equal logits (0.25 each) at p = 0.4 keep exactly two, the fewest whose mass reaches p
    ties = _call_top_p(top_p_filter, torch.zeros(1, 4), 0.4)
    if int(ties.isfinite().sum()) != 2:
        raise CheckFailed(f"top_p_filter(four equal logits, 0.4): kept {int(ties.isfinite().sum())} tokens, expected 2: "
                          "the nucleus is the smallest set whose mass reaches p (0.25 + 0.25 >= 0.4); among equal "
                          "logits the sort order decides which, not a comparison with the boundary's value")
    _check_top_p_large_vocab(top_p_filter)
    passed("top-p (nucleus) filtering")


def _call_top_p(top_p_filter, logits, p):
    given = logits.clone()
    out = call_learner(f"top_p_filter(logits, {p})", top_p_filter, given, p)
    if not torch.equal(given, logits):
        raise CheckFailed(f"top_p_filter(logits, {p}) changed the logits it was given: return a new tensor "
                          "(masked_fill, not masked_fill_)")
    if not torch.is_tensor(out) or out.shape != logits.shape:
        raise CheckFailed(f"top_p_filter(logits, {p}) should return a tensor of shape {tuple(logits.shape)}")
    if out.dtype != logits.dtype:
        raise CheckFailed(f"top_p_filter on {logits.dtype} logits returned {out.dtype}: keep the logits' dtype")
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


# ---- the block and the model, against Hugging Face's GPT2LMHeadModel ------------------
BLOCK_CONFIGS = [
    GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=4, n_embd=32),
    GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=8),
    GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=3, n_embd=12, bias=False),  # config.bias is read
]


def _hf_model(cfg: GPTConfig, seed: int):
    """A ``transformers.GPT2LMHeadModel`` with random weights (nothing downloaded), in eval mode."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover (transformers is in the dev extra)
        raise ImportError("this check compares with Hugging Face's GPT-2 and needs `transformers`") from err
    from nblib.gpt import hf_config_dict

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(cfg))).eval()
    with torch.no_grad():  # HF starts LayerNorms at 1 and biases at 0: make every weight count
        for name, p in hf.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                p.mul_(10.0)  # activations of order 1, where exact and tanh GELU differ by ~1e-4
    return hf


def _hf_block_state(hf) -> dict[str, torch.Tensor]:
    """Block 0 of ``hf`` under nblib's names and layout (``nn.Linear``: [out, in])."""
    out = {}
    for key, value in hf.transformer.h[0].state_dict().items():
        if key in ("attn.bias", "attn.masked_bias"):
            continue  # older transformers keep the causal mask here: a buffer, not a weight
        out[key] = value.t() if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else value
    return out


def _load_strict(what: str, module, state: dict[str, torch.Tensor]) -> None:
    theirs = module.state_dict()
    missing, unexpected = sorted(set(state) - set(theirs)), sorted(set(theirs) - set(state))
    if missing or unexpected:
        raise CheckFailed(f"{what}: parameter names differ from Hugging Face's: missing {missing}, "
                          f"unexpected {unexpected}. Keep the __init__ you were given.")
    for key, value in state.items():
        if theirs[key].shape != value.shape:
            raise CheckFailed(f"{what}: {key} has shape {tuple(theirs[key].shape)}, expected {tuple(value.shape)}")
    module.load_state_dict(state, strict=True)


def check_block(block_class) -> None:
    """``block_class(config)``: a GPT-2 block whose ``forward(x [B, T, C]) -> [B, T, C]`` matches
    nblib's (and so Hugging Face's) block 0 of a random ``GPT2LMHeadModel``."""
    from nblib.gpt import Block

    for i, cfg in enumerate(BLOCK_CONFIGS):
        ours = Block(cfg).eval()
        if cfg.bias:
            state = _hf_block_state(_hf_model(cfg, seed=10 + i))
        else:  # Hugging Face's GPT-2 always has biases: nblib's block (equal to it with them), perturbed weights
            torch.manual_seed(10 + i)
            state = {name: t + 0.1 * torch.randn_like(t) for name, t in Block(cfg).state_dict().items()}
        ours.load_state_dict(state)
        block = call_learner(f"{getattr(block_class, '__name__', 'block_class')}({cfg})", block_class, cfg)
        _load_strict(f"{block_class.__name__}({cfg})", block, state)
        block.eval()
        x = torch.randn(2, 7, cfg.n_embd, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            want = ours(x)
            got = call_learner(f"block.forward(x {tuple(x.shape)})", block, x.clone())
        if not torch.is_tensor(got) or got.shape != x.shape:
            raise CheckFailed(f"block(x) with x of shape {tuple(x.shape)} should return a tensor of the same shape, "
                              f"got {tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
        with torch.no_grad():
            no_residual = want - x
            if (got - no_residual).abs().max() < 1e-4:
                raise CheckFailed("block(x) returned only the two branches' sum: add them to x (the residual stream)")
        expect_close(f"block(x) with n_head={cfg.n_head}, n_embd={cfg.n_embd}, bias={cfg.bias} (against GPT-2's block)",
                     got, want, atol=1e-5, rtol=1e-4)
    passed("GPT-2 block (pre-LayerNorm, causal attention, tanh-GELU MLP, two residual adds)")


def check_gpt2_forward(model_class) -> None:
    """``model_class(config)``: GPT-2 whose ``forward(idx, targets=None) -> (logits, loss)`` gives
    Hugging Face's ``GPT2LMHeadModel`` logits (to 1e-5) once its weights are copied in.

    The model is run with nblib's ``Block`` in place of the learner's (``block_class``), so
    this checks the forward alone; ``check_block`` checks the block.
    """
    from nblib.gpt import Block, lm_loss, load_hf_state_dict

    cfg = GPTConfig(vocab_size=60, block_size=12, n_layer=2, n_head=2, n_embd=16)
    if not isinstance(model_class, type):  # a function that builds the model: run it as it is
        call_learner(f"{getattr(model_class, '__name__', 'model')}({cfg})", model_class, cfg)
        raise CheckFailed(f"check_gpt2_forward expects your model class (GPT2), got {model_class!r}")

    class WithCourseBlocks(model_class):
        block_class = Block

    WithCourseBlocks.__module__ = model_class.__module__  # the learner's class still (call_learner refuses nblib's)
    hf = _hf_model(cfg, seed=3)
    model = call_learner(f"{model_class.__name__}({cfg})", WithCourseBlocks, cfg)
    if getattr(model, "lm_head", None) is None or model.lm_head.weight is not model.transformer.wte.weight:
        raise CheckFailed("lm_head.weight must be transformer.wte.weight itself (weight tying); keep the given __init__")
    try:
        load_hf_state_dict(model, hf.state_dict())
    except (KeyError, ValueError) as err:
        raise CheckFailed(f"{model_class.__name__}: Hugging Face's weights do not load: {err}. "
                          "Keep the __init__ you were given.") from err
    model.eval()
    gen = torch.Generator().manual_seed(5)
    for T in (cfg.block_size, 5):
        idx = torch.randint(0, cfg.vocab_size, (3, T), generator=gen)
        with torch.no_grad():
            out = call_learner(f"model(idx {tuple(idx.shape)})", model, idx)
            want = hf(idx).logits
        if not isinstance(out, tuple) or len(out) != 2:
            raise CheckFailed(f"model(idx) should return (logits, loss), got {type(out).__name__}")
        logits, loss = out
        if loss is not None:
            raise CheckFailed(f"model(idx) without targets should return loss None, got {loss!r}")
        if not torch.is_tensor(logits) or logits.shape != want.shape:
            raise CheckFailed(f"logits for idx of shape {tuple(idx.shape)}: expected shape {tuple(want.shape)}, "
                              f"got {tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__}")
        expect_close(f"logits for idx {tuple(idx.shape)} (against Hugging Face's GPT2LMHeadModel)",
                     logits, want, atol=1e-5, rtol=1e-4)
    targets = torch.randint(0, cfg.vocab_size, idx.shape, generator=gen)
    with torch.no_grad():
        _, loss = call_learner("model(idx, targets)", model, idx, targets)
    if loss is None:
        raise CheckFailed("model(idx, targets) returned loss None: compute the loss when targets are given")
    expect_close("loss of model(idx, targets)", loss, lm_loss(want, targets), atol=1e-5, rtol=1e-4)
    with torch.random.fork_rng(devices=[]):  # the notebook's random stream stays as it was
        _check_forward_dropout(model_class.__name__, WithCourseBlocks, dataclasses.replace(cfg, dropout=0.5))
    passed("GPT-2 forward (embeddings, blocks, ln_f, tied lm_head) == Hugging Face's logits")


def _seeded_logits(model, idx):
    """The logits of ``model(idx)`` after seeding the global random stream (dropout's masks)."""
    torch.manual_seed(1234)
    with torch.no_grad():
        return model(idx)[0]


def _check_forward_dropout(name: str, model_class, cfg: GPTConfig) -> None:
    """In training mode with dropout, nblib's GPT with the same weights and seed draws the same masks."""
    from nblib.gpt import GPT

    what = f"{name}({cfg}) in training mode"
    model = call_learner(what, model_class, cfg).train()
    torch.manual_seed(7)
    ours = GPT(cfg).train()
    try:
        model.load_state_dict(ours.state_dict())
    except RuntimeError as err:
        raise CheckFailed(f"{what}: nblib's GPT weights do not load: {err}. Keep the __init__ you were given.") from err
    idx = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    got = _seeded_logits(lambda i: call_learner(f"model(idx {tuple(idx.shape)}) {what}", model, i), idx)
    if not torch.is_tensor(got):
        raise CheckFailed(f"model(idx) {what}: expected logits, got {type(got).__name__}")
    ours.transformer.drop.p = 0.0  # draws nothing: the blocks get the masks a model without it gets
    if torch.allclose(got, _seeded_logits(ours, idx), atol=1e-5):
        raise CheckFailed(f"{what}: the embeddings are not dropped out. Pass their sum through "
                          "self.transformer.drop before the blocks (with dropout 0, as above, it changes nothing; "
                          "in training it does)")
    ours.transformer.drop.p = cfg.dropout
    expect_close(f"logits {what} vs nblib's GPT with the same weights and random seed", got,
                 _seeded_logits(ours, idx), atol=1e-5, rtol=1e-4)
