"""nblib.gpt against Hugging Face's GPT2LMHeadModel (randomly initialised, tiny, offline)."""
import json
import math

import pytest
import torch

from nblib.gpt import GPT, GPTConfig, from_hf_dir, hf_config_dict, load_hf_state_dict, save_hf_dir, to_hf_state_dict

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CFG = GPTConfig(vocab_size=97, block_size=24, n_layer=3, n_head=4, n_embd=32)


def hf_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(cfg))).eval()


def tokens(cfg=CFG, B=3, T=None, seed=1):
    return torch.randint(0, cfg.vocab_size, (B, T or cfg.block_size), generator=torch.Generator().manual_seed(seed))


def test_state_dict_names_are_hugging_faces():
    ours = GPT(CFG).state_dict()
    theirs = hf_model().state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        want = v.shape if not k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v.t().shape
        assert ours[k].shape == want, k


def test_hf_to_ours_logits_match():
    hf = hf_model()
    ours = load_hf_state_dict(GPT(CFG), hf.state_dict()).eval()
    idx = tokens()
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_ours_to_hf_logits_and_loss_match():
    torch.manual_seed(3)
    ours = GPT(CFG).eval()
    hf = hf_model(seed=4)
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    idx = tokens(seed=5)
    logits, loss = ours(idx, idx)
    out = hf(idx, labels=idx)  # HF shifts labels inside; compare its loss with ours on shifted targets
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
    _, shifted = ours(idx[:, :-1], idx[:, 1:])
    assert math.isclose(shifted.item(), out.loss.item(), abs_tol=1e-5)


def test_from_local_save_pretrained_dir(tmp_path):
    hf = hf_model(seed=7)
    hf.save_pretrained(tmp_path)
    ours = from_hf_dir(tmp_path).eval()
    assert ours.config == CFG
    idx = tokens(seed=8)
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_hub_style_keys_without_prefix_and_mask_buffers():
    """The hub's GPT-2 files name keys 'h.0.attn...' and (older ones) carry 'attn.bias' masks."""
    hf = hf_model(seed=9)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, CFG.block_size, CFG.block_size))
    ours = load_hf_state_dict(GPT(CFG), state).eval()
    idx = tokens(seed=10)
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_save_hf_dir_round_trip(tmp_path):
    torch.manual_seed(11)
    ours = GPT(CFG).eval()
    save_hf_dir(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = tokens(seed=12)
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_strict_loading_names_the_key():
    state = hf_model().state_dict()
    missing = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(KeyError, match=r"missing keys \['transformer.h.1.mlp.c_fc.bias'\]"):
        load_hf_state_dict(GPT(CFG), missing)
    extra = {**state, "transformer.h.9.ln_1.weight": torch.ones(CFG.n_embd)}
    with pytest.raises(KeyError, match=r"unexpected keys \['transformer.h.9.ln_1.weight'\]"):
        load_hf_state_dict(GPT(CFG), extra)
    with pytest.raises(ValueError, match="transformer.wpe.weight: shape"):
        load_hf_state_dict(GPT(GPTConfig(**{**CFG.__dict__, "block_size": 8})), state)


def test_unsupported_hf_config_is_refused(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function"):
        from_hf_dir(tmp_path)


def test_weight_tying_and_gpt2_small_size():
    model = GPT(CFG)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.device("meta"):
        small = GPT(GPTConfig())
    assert small.num_params() == 124_439_808  # GPT-2 small, the published count
    # 6N (N = non-embedding + lm_head) + 12 L d T
    n = small.num_params(exclude_embeddings=True) + 50257 * 768
    assert small.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024


def test_scaled_residual_init():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=8, n_head=4, n_embd=128)
    model = GPT(cfg)
    proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(fc - 0.02) < 0.001
    assert abs(proj - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.0005


def test_forward_contract_and_long_input():
    model = GPT(CFG)
    idx = tokens(B=2, T=5)
    logits, loss = model(idx)
    assert logits.shape == (2, 5, CFG.vocab_size) and loss is None
    _, loss = model(idx, idx)
    assert loss.dim() == 0
    targets = tokens(B=2, T=5, seed=99)
    assert abs(GPT(CFG)(idx, targets)[1].item() - math.log(CFG.vocab_size)) < 0.3  # near-uniform at init
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(B=1, T=CFG.block_size + 1))


def test_lesson_checks_accept_right_and_reject_wrong_answers():
    from nblib.checks import CheckFailed
    from nblib.checks import gpt2 as checks
    from nblib.sample import filter_logits
    from nblib.train import TrainConfig, lr_at

    def count(cfg):
        with torch.device("meta"):
            return GPT(cfg).num_params()

    checks.check_num_params(count)
    with pytest.raises(CheckFailed, match="tied"):
        checks.check_num_params(lambda cfg: count(cfg) + cfg.vocab_size * cfg.n_embd)
    schedule = lambda s, m, w, lr, mn: lr_at(s, TrainConfig(max_steps=m, warmup_steps=w, lr=lr, min_lr=mn))
    checks.check_lr_schedule(schedule)
    with pytest.raises(CheckFailed):
        checks.check_lr_schedule(lambda s, m, w, lr, mn: lr * min(1.0, (s + 1) / max(w, 1)))  # no decay
    checks.check_top_p(lambda logits, p: filter_logits(logits, top_p=p))
    with pytest.raises(CheckFailed):  # keeping tokens while the mass *including* them is < p drops one too many
        checks.check_top_p(lambda logits, p: logits.masked_fill(
            torch.zeros_like(logits, dtype=torch.bool).scatter(
                -1, logits.argsort(-1, descending=True),
                logits.sort(-1, descending=True).values.softmax(-1).cumsum(-1) > p), float("-inf")))


def top_p_from_the_top(logits, p):
    """Right in exact arithmetic: drop a token once the mass before it (descending) reaches p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= p
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def test_top_p_check_catches_a_float32_running_sum_at_p_one():
    from nblib.checks import CheckFailed
    from nblib.checks import gpt2 as checks

    # on 4 tokens it is right, on 50,257 its float32 sum reaches 1.0 early and drops the tail at p=1
    with pytest.raises(CheckFailed, match=r"p=1.0 on a 50,257-token vocabulary dropped [\d,]+ tokens"):
        checks.check_top_p(top_p_from_the_top)
    # the same idea with p=1 handled passes: float32 rounding elsewhere is tolerated
    checks.check_top_p(lambda logits, p: logits if p >= 1 else top_p_from_the_top(logits, p))
    with pytest.raises(CheckFailed, match="p=0.5 on a 50,257-token vocabulary: dropped 0 .* kept [1-9]"):
        checks.check_top_p(lambda logits, p: logits if p >= 1 else top_p_from_the_top(logits, p + 0.01))


def test_a_damaged_model_safetensors_is_named_and_explained(tmp_path):
    save_hf_dir(GPT(CFG), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{weights} is truncated: it has [\d,]+ bytes, its header announces"):
        from_hf_dir(tmp_path)
    weights.write_text('{"not": "weights"}')
    with pytest.raises(ValueError, match=rf"{weights} is not a safetensors file"):
        from_hf_dir(tmp_path)


def transformers_warnings():
    """Start collecting what transformers logs at WARNING and above; returns (records, stop)."""
    import logging

    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger, level = logging.getLogger("transformers"), transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # this module silences it at import
    logger.addHandler(handler)

    def stop():
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(level)
    return records, stop


@pytest.mark.parametrize("special", [dict(), dict(bos_token_id=96, eos_token_id=95)])
def test_save_hf_dir_writes_the_model_own_special_tokens(tmp_path, special):
    # 97 tokens: transformers used to fill in GPT-2's 50256 and warn at every load
    cfg = GPTConfig(**{**CFG.__dict__, **special})
    want = (special.get("bos_token_id"), special.get("eos_token_id"))
    save_hf_dir(GPT(cfg), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"]) == want  # null written out when there is none
    records, stop = transformers_warnings()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        stop()
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == want
    assert not [r.getMessage() for r in records if "token_id" in r.getMessage()]
    assert from_hf_dir(tmp_path).config == cfg  # and they come back


def test_special_token_ids_must_be_in_the_vocabulary():
    with pytest.raises(ValueError, match="eos_token_id=97 is not a token of a 97-token vocabulary"):
        GPTConfig(**{**CFG.__dict__, "eos_token_id": 97})


def test_write_hf_dir_insists_on_the_special_tokens(tmp_path):
    from nblib.hf_dir import write_hf_dir

    with pytest.raises(ValueError, match=r"config.json needs \['bos_token_id', 'eos_token_id'\]"):
        write_hf_dir(tmp_path, {"model_type": "gpt2", "vocab_size": 3}, {})


# ---------------------------------------------------------------- the contract later lessons use

def test_left_padding_equals_hf_with_mask_and_position_ids_and_each_row_alone():
    hf = hf_model(seed=13)
    ours = load_hf_state_dict(GPT(CFG), hf.state_dict()).eval()
    # rows of different lengths: 10, 4 and 7 real tokens, left-padded to 10
    idx = tokens(B=3, T=10, seed=14)
    padded, mask = idx.clone(), torch.ones(3, 10, dtype=torch.bool)
    for b, pad in enumerate((0, 6, 3)):
        padded[b, :pad], mask[b, :pad] = 0, False
    with torch.no_grad():
        logits, _, hidden = ours(padded, attention_mask=mask, return_hidden=True)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = hf(padded, attention_mask=mask.long(), position_ids=position_ids, output_hidden_states=True)
        for b, pad in enumerate((0, 6, 3)):
            alone, _ = ours(idx[b:b + 1, pad:])
            torch.testing.assert_close(logits[b:b + 1, pad:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[mask], out.logits[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[mask], out.hidden_states[-1][mask], atol=1e-5, rtol=0)  # after ln_f
    assert torch.isfinite(logits).all()  # padded positions too (they see only themselves)


def test_explicit_positions_equal_hf_position_ids():
    hf = hf_model(seed=15)
    ours = load_hf_state_dict(GPT(CFG), hf.state_dict()).eval()
    idx = tokens(B=2, T=8, seed=16)
    positions = torch.stack([torch.arange(8) + 5, torch.arange(8) * 2])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, positions=positions)[0], hf(idx, position_ids=positions).logits,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(idx, positions=torch.arange(8))[0], ours(idx)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="positions must lie in 0 ... block_size - 1 = 23"):
        ours(idx, positions=torch.arange(8) + 20)
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(idx, attention_mask=torch.ones(2, 9, dtype=torch.bool))


def test_return_hidden_and_per_token_loss():
    torch.manual_seed(17)
    model = GPT(CFG).eval()
    idx = tokens(B=2, T=9, seed=18)
    targets = tokens(B=2, T=9, seed=19)
    targets[0, :4] = -100  # a masked prompt
    logits, mean, hidden = model(idx, targets, return_hidden=True)
    assert hidden.shape == (2, 9, CFG.n_embd)
    torch.testing.assert_close(model.lm_head(hidden), logits, atol=0, rtol=0)
    _, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 9) and (per_token[0, :4] == 0).all() and (per_token[targets != -100] > 0).all()
    want = torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100], reduction="none")
    torch.testing.assert_close(per_token[targets != -100], want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(per_token.sum() / (targets != -100).sum(), mean, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        model(idx, targets, reduction="sum")


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_in_chunks_equals_one_full_pass(padded):
    from nblib.kvcache import KVCache

    torch.manual_seed(20)
    model = GPT(CFG).eval()
    idx = tokens(B=2, T=20, seed=21)
    mask = torch.ones(2, 20, dtype=torch.bool)
    if padded:
        mask[0, :5] = False
    kw = lambda end: dict(attention_mask=mask[:, :end]) if padded else {}
    cache = KVCache(model.config, batch_size=2, max_len=20)
    with torch.no_grad():
        full, _ = model(idx, **kw(20))
        parts = [model(idx[:, a:b], cache=cache, **kw(b))[0] for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    assert cache.pos == 20
    got = torch.cat(parts, dim=1)
    torch.testing.assert_close(got[mask], full[mask], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 20"):
        model(idx[:, :1], cache=cache)


def test_hf_load_and_save_have_the_llama_names(tmp_path):
    import nblib.gpt as gpt

    assert gpt.load_hf is gpt.from_hf_dir and gpt.save_hf is gpt.save_hf_dir
    torch.manual_seed(22)
    ours = GPT(CFG).eval()
    gpt.save_hf(ours, tmp_path)
    idx = tokens(seed=23)
    torch.testing.assert_close(gpt.load_hf(tmp_path)(idx)[0], ours(idx)[0], atol=0, rtol=0)


def counted_training_flops(model, B, T):
    """FLOPs that FlopCounterMode counts for one forward + backward of a [B, T] batch, per token.

    The math SDPA kernel is forced: PyTorch's fused CPU attention kernel has no FLOP formula
    registered and would count as 0; the math one is matmuls (bmm) that it counts.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops() / (B * T)


def test_num_params_and_flops_per_token_against_independent_counts():
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    blocks = sum(p.numel() for m in (model.transformer.h, model.transformer.ln_f) for p in m.parameters())
    assert model.num_params(exclude_embeddings=True) == blocks
    tables = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    assert model.num_params() == blocks + tables
    # biases and LayerNorm gains/biases: counted in 6N, but they do no matmul
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    for T in (64, 16):
        counted = counted_training_flops(model, 2, T)
        ours = model.flops_per_token(T)
        assert abs(ours - counted) / counted < 0.01, (T, ours, counted)  # 0.78% at T=64, 0.84% at T=16
        assert ours - counted == 6 * vectors  # and that is the whole difference
