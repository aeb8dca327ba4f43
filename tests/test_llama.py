"""nblib.llama against references: transformers' LlamaForCausalLM (random tiny configs),
its rotary embedding, lesson 06's GPT, the uncached generator, and hand-made cases."""
import json
import math

import pytest
import torch

from nblib import checkpoint, gpt, llama, sample, train
from nblib.checks import CheckFailed
from nblib.checks import llama as checks

transformers = pytest.importorskip("transformers")


def tiny_hf(n_kv_heads=2, tie=False, seed=0, rope_theta=500.0, vocab=61):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=48, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # the init leaves norm gains at 1; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_config(**kw):
    base = dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_kv_heads=2, n_embd=32)
    base.update(kw)
    return llama.LlamaConfig(**base)


# ---------------------------------------------------------------- reference equivalence

@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_logits_equal_transformers(n_kv_heads):
    hf = tiny_hf(n_kv_heads)
    ours = llama.from_hf(hf).eval()
    assert ours.config.n_kv_heads == n_kv_heads and ours.config.rope_theta == 500.0
    idx = torch.randint(0, 61, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_loss_equals_transformers():
    hf = tiny_hf()
    ours = llama.from_hf(hf).eval()
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_loss = hf(idx, labels=idx).loss  # HF shifts the labels itself
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - hf_loss.item()) < 1e-5


def test_rope_matches_transformers_rotary_embedding():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    hf = tiny_hf(rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(hf.config)
    head_dim, T = 8, 48
    x = torch.randn(2, 4, T, head_dim)
    positions = torch.arange(T)[None]
    hf_cos, hf_sin = rotary(x, positions)
    cos, sin = llama.rope_tables(head_dim, T, theta=10000.0)
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-6, rtol=0)
    q_hf, k_hf = apply_rotary_pos_emb(x, x.flip(1), hf_cos, hf_sin)
    torch.testing.assert_close(llama.apply_rope(x, cos, sin), q_hf, atol=1e-6, rtol=0)
    torch.testing.assert_close(llama.apply_rope(x.flip(1), cos, sin), k_hf, atol=1e-6, rtol=0)


def test_rope_by_hand_and_relative_positions():
    # head_dim 2: one pair, rotated by position * theta**0 = position radians
    cos, sin = llama.rope_tables(2, 4)
    x = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    expected = torch.tensor([[math.cos(m), math.sin(m)] for m in range(4)])
    torch.testing.assert_close(llama.apply_rope(x, cos, sin), expected, atol=1e-6, rtol=0)
    # q at m and k at n: the score depends on m - n only, and lengths do not change
    d, n_pos = 16, 40
    cos, sin = llama.rope_tables(d, n_pos)
    q, k = torch.randn(d), torch.randn(d)
    rq = llama.apply_rope(q.expand(n_pos, d), cos, sin)
    rk = llama.apply_rope(k.expand(n_pos, d), cos, sin)
    scores = rq @ rk.T  # scores[m, n]
    for offset in (0, 3, 17):
        diag = torch.diagonal(scores, offset=-offset)  # all pairs with m - n = offset
        torch.testing.assert_close(diag, diag[0].expand_as(diag), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(n_pos), atol=1e-5, rtol=1e-5)


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    ref = LlamaRMSNorm(12, eps=1e-6)
    ours = llama.RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    x = torch.randn(3, 5, 12) * 4 + 2
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)
    manual = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * ours.weight
    torch.testing.assert_close(ours(x), manual, atol=1e-5, rtol=1e-5)


def test_gpt_corner_equals_lesson_06_gpt():
    torch.manual_seed(0)
    g = gpt.GPT(gpt.GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=24, bias=False)).eval()
    with torch.no_grad():
        for name, p in g.named_parameters():
            if "ln" in name:
                p.uniform_(0.5, 1.5)
    ours = llama.from_gpt(g).eval()
    assert ours.num_params() == g.num_params()
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], g(idx)[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="bias"):
        llama.from_gpt(gpt.GPT(gpt.GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=2, n_embd=8)))


def test_swiglu_matches_gelu_mlp_in_parameters():
    for d in (96, 192, 768):
        cfg_s = tiny_config(n_embd=d, n_head=4, n_kv_heads=4, mlp="swiglu")
        cfg_g = tiny_config(n_embd=d, n_head=4, n_kv_heads=4, mlp="gelu")
        n_s = sum(p.numel() for p in llama.SwiGLU(d, cfg_s.ffn_hidden).parameters())
        n_g = sum(p.numel() for p in llama.GeluMLP(d, cfg_g.ffn_hidden).parameters())
        assert abs(n_s - n_g) <= 3 * d  # equal up to the rounding of 8/3 * d
    assert llama.swiglu_hidden(4096, multiple_of=256) == 11008  # Llama 2 7B's


# ---------------------------------------------------------------- KV cache and generation

@pytest.mark.parametrize("kw", [dict(n_kv_heads=4), dict(n_kv_heads=2), dict(n_kv_heads=1),
                                dict(pos_emb="learned", norm="layer", mlp="gelu", n_kv_heads=4)])
def test_cached_generation_equals_uncached(kw):
    torch.manual_seed(0)
    model = llama.Llama(tiny_config(**kw))
    prompt = torch.randint(0, 37, (2, 5))
    slow = llama.generate(model, prompt, 40, use_cache=False, temperature=0)
    fast = llama.generate(model, prompt, 40, use_cache=True, temperature=0)
    assert torch.equal(slow, fast)
    assert torch.equal(slow, sample.generate(model, prompt, 40, temperature=0))
    # sampling too, with the same seeded generator
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = llama.generate(model, prompt, 30, use_cache=False, temperature=1.0, top_k=10, generator=g1)
    b = llama.generate(model, prompt, 30, use_cache=True, temperature=1.0, top_k=10, generator=g2)
    assert torch.equal(a, b)


def test_cached_logits_equal_full_forward_in_any_chunks():
    torch.manual_seed(0)
    model = llama.Llama(tiny_config()).eval()
    idx = torch.randint(0, 37, (2, 30))
    cache = llama.KVCache(model.config, batch_size=2)
    with torch.no_grad():
        full, _ = model(idx)
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 11), (11, 12), (12, 20), (20, 30))]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_bad_prompts_are_clear_errors():
    model = llama.Llama(tiny_config(block_size=16))
    with pytest.raises(ValueError, match="block_size"):
        llama.generate(model, torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="at least one token"):
        llama.generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    cache = llama.KVCache(model.config, 1, max_len=4)
    with pytest.raises(ValueError, match="at most 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer"):
        llama.KVCache(model.config, 1, max_len=17)


def test_kv_cache_memory_formula():
    # Llama 3 8B: 32 layers, 8 kv heads of 128, bf16 -> 128 KiB per token
    assert llama.kv_cache_bytes_per_token(32, 8, 128, 2) == 131072
    cfg = tiny_config(n_layer=3, n_head=6, n_kv_heads=2, n_embd=48)
    cache = llama.KVCache(cfg, batch_size=2, max_len=10)
    assert cache.nbytes == 2 * 10 * llama.kv_cache_bytes_per_token(3, 2, 8, 4)


# ---------------------------------------------------------------- export / import

@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_identical_logits(tmp_path, tie):
    torch.manual_seed(3)
    model = llama.Llama(tiny_config(tie_embeddings=tie, rope_theta=2000.0, norm_eps=1e-6)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    llama.save_hf(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == 2
    idx = torch.randint(0, 37, (2, 64))
    with torch.no_grad():
        ours = model(idx)[0]
        torch.testing.assert_close(hf(idx).logits, ours, atol=1e-5, rtol=0)
        back = llama.load_hf(tmp_path).eval()
        torch.testing.assert_close(back(idx)[0], ours, atol=0, rtol=0)
    assert back.config == model.config


def test_hf_save_pretrained_directory_loads(tmp_path):
    hf = tiny_hf(tie=True)
    hf.save_pretrained(tmp_path)
    ours = llama.load_hf(tmp_path).eval()
    idx = torch.randint(0, 61, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_export_refuses_what_is_not_llama(tmp_path):
    with pytest.raises(ValueError, match="only the Llama architecture"):
        llama.save_hf(llama.Llama(tiny_config(pos_emb="learned")), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type"):
        llama.load_hf(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        tiny_config(n_head=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="pos_emb"):
        tiny_config(pos_emb="alibi")
    with pytest.raises(ValueError, match="even"):
        tiny_config(n_embd=12, n_head=4)
    assert tiny_config(n_kv_heads=None).n_kv_heads == 4


# ---------------------------------------------------------------- lesson 06's loop and checkpoints

def test_trains_with_lesson_06_loop_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    data = torch.arange(2000) % 11  # a periodic stream: easy to learn
    model = llama.Llama(tiny_config(vocab_size=11, block_size=16))
    cfg = train.TrainConfig(max_steps=30, batch_size=4, lr=1e-2, warmup_steps=5, eval_interval=15,
                            eval_batches=2, checkpoint_path=str(tmp_path / "ck.safetensors"))
    history = train.train(model, data[:1800], data[1800:], cfg, show_progress=False)
    assert history.val[-1] < 0.5 * history.val[0]
    loaded = checkpoint.load_model(tmp_path / "ck.safetensors").eval()
    assert isinstance(loaded, llama.Llama) and loaded.config == model.config
    idx = data[:16][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], atol=0, rtol=0)
    other = llama.Llama(tiny_config(vocab_size=11, block_size=16, n_kv_heads=1))
    with pytest.raises(checkpoint.ConfigMismatchError, match="n_kv_heads"):
        checkpoint.load_checkpoint(tmp_path / "ck.safetensors", other)


# ---------------------------------------------------------------- exercise checks

def test_checks_accept_the_reference_and_reject_mistakes():
    checks.check_rms_norm(lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w)
    with pytest.raises(CheckFailed):  # LayerNorm is not RMSNorm
        checks.check_rms_norm(lambda x, w, eps: torch.nn.functional.layer_norm(x, x.shape[-1:], w, None, eps))
    # wrapped: a check refuses nblib's own functions passed as they are (the learner must write theirs)
    checks.check_apply_rope(lambda x, cos, sin: llama.apply_rope(x, cos, sin))
    with pytest.raises(CheckFailed):  # interleaved pairs (2i, 2i+1): another layout
        def interleaved(x, cos, sin):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            c, s = cos[..., : x.shape[-1] // 2], sin[..., : x.shape[-1] // 2]
            return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
        checks.check_apply_rope(interleaved)
    checks.check_repeat_kv(lambda x, n_rep: llama.repeat_kv(x, n_rep))
    with pytest.raises(CheckFailed):  # tiling (0, 1, 0, 1) instead of (0, 0, 1, 1)
        checks.check_repeat_kv(lambda x, n: x.repeat(1, n, 1, 1))
    checks.check_kv_cache_bytes(lambda *args: llama.kv_cache_bytes_per_token(*args))
    with pytest.raises(CheckFailed):  # forgot the values
        checks.check_kv_cache_bytes(lambda L, h, d, b: L * h * d * b)


def test_generate_accepts_one_sequence_and_rejects_negative_lengths():
    torch.manual_seed(0)
    model = llama.Llama(tiny_config())
    prompt = torch.randint(0, 37, (6,))
    out = llama.generate(model, prompt, 5, temperature=0)
    assert out.shape == (11,) and torch.equal(out, llama.generate(model, prompt, 5, use_cache=False, temperature=0))
    with pytest.raises(ValueError, match=">= 0"):
        llama.generate(model, prompt[None], -1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_rejects_a_temperature_that_is_not_a_finite_number(use_cache):
    model = llama.Llama(tiny_config())
    for temperature in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            llama.generate(model, torch.zeros(1, 3, dtype=torch.long), 2, use_cache=use_cache, temperature=temperature)


@pytest.mark.parametrize("special", [dict(), dict(bos_token_id=0, eos_token_id=36)])
def test_export_writes_the_model_own_special_tokens(tmp_path, special):
    model = llama.Llama(tiny_config(**special))
    llama.save_hf(model, tmp_path)
    want = (special.get("bos_token_id"), special.get("eos_token_id"))
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"]) == want  # null written out when there is none
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == want
    assert llama.load_hf(tmp_path).config == model.config
    with pytest.raises(ValueError, match="bos_token_id=37 is not a token of a 37-token vocabulary"):
        tiny_config(bos_token_id=37)


# ---------------------------------------------------------------- the contract later lessons use

def padded_batch(idx, pads):
    """``idx`` [B, T] with the first pads[b] tokens of row b replaced by left padding (0)."""
    padded, mask = idx.clone(), torch.ones_like(idx, dtype=torch.bool)
    for b, pad in enumerate(pads):
        padded[b, :pad], mask[b, :pad] = 0, False
    return padded, mask


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_left_padding_equals_transformers_and_each_row_alone(n_kv_heads):
    hf = tiny_hf(n_kv_heads, seed=4)
    ours = llama.from_hf(hf).eval()
    idx = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(5))
    pads = (0, 7, 3)
    padded, mask = padded_batch(idx, pads)
    with torch.no_grad():
        logits, _, hidden = ours(padded, attention_mask=mask, return_hidden=True)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = hf(padded, attention_mask=mask.long(), position_ids=position_ids, output_hidden_states=True)
        for b, pad in enumerate(pads):  # RoPE rotates each row by its own positions
            torch.testing.assert_close(logits[b:b + 1, pad:], ours(idx[b:b + 1, pad:])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[mask], out.logits[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[mask], out.hidden_states[-1][mask], atol=1e-5, rtol=0)  # after the norm
    assert torch.isfinite(logits).all()


def test_explicit_positions_equal_transformers_position_ids():
    hf = tiny_hf(seed=6)
    ours = llama.from_hf(hf).eval()
    idx = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(7))
    positions = torch.stack([torch.arange(9) + 30, torch.arange(9) * 3])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, positions=positions)[0], hf(idx, position_ids=positions).logits,
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positions must lie in 0 ... block_size - 1 = 47"):
        ours(idx, positions=torch.arange(9) + 40)


@pytest.mark.parametrize("kw", [dict(), dict(pos_emb="learned", norm="layer", mlp="gelu", tie_embeddings=True)])
def test_padding_and_cache_with_either_position_scheme(kw):
    torch.manual_seed(8)
    model = llama.Llama(tiny_config(**kw)).eval()
    idx = torch.randint(0, 37, (2, 20), generator=torch.Generator().manual_seed(9))
    padded, mask = padded_batch(idx, (6, 0))
    cache = llama.KVCache(model.config, batch_size=2, max_len=20)
    with torch.no_grad():
        full, _ = model(padded, attention_mask=mask)
        parts = [model(padded[:, a:b], cache=cache, attention_mask=mask[:, :b])[0]
                 for a, b in ((0, 9), (9, 10), (10, 20))]
        alone, _ = model(idx[:1, 6:])
    torch.testing.assert_close(torch.cat(parts, dim=1)[mask], full[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:1, 6:], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, cache.pos \+ T\] = \[2, 1\]"):
        model(padded[:, :1], cache=llama.KVCache(model.config, 2), attention_mask=mask[:, :19])


def test_per_token_loss_and_hidden_states():
    torch.manual_seed(10)
    model = llama.Llama(tiny_config()).eval()
    idx = torch.randint(0, 37, (2, 8))
    targets = torch.randint(0, 37, (2, 8))
    targets[1, 5:] = -100
    logits, mean, hidden = model(idx, targets, return_hidden=True)
    torch.testing.assert_close(model.lm_head(hidden), logits, atol=0, rtol=0)
    _, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 8) and (per_token[1, 5:] == 0).all()
    torch.testing.assert_close(per_token.sum() / 13, mean, atol=1e-6, rtol=1e-6)


def counted_training_flops(model, B, T):
    """FlopCounterMode's count for one forward + backward of a [B, T] batch, per token (with the
    math SDPA kernel: the fused CPU kernel has no FLOP formula registered and counts 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops() / (B * T)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True, n_kv_heads=1),
                                dict(pos_emb="learned", norm="layer", mlp="gelu", tie_embeddings=True)])
def test_num_params_and_flops_per_token_against_independent_counts(kw):
    torch.manual_seed(0)
    model = llama.Llama(tiny_config(vocab_size=256, block_size=64, n_embd=128, n_head=4, **kw))
    body = sum(p.numel() for m in (model.model.layers, model.model.norm) for p in m.parameters())
    head = 0 if model.config.tie_embeddings else model.lm_head.weight.numel()
    assert model.num_params(exclude_embeddings=True) == body + head
    tables = sum(p.numel() for m in model.model.values() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    assert model.num_params() == body + head + tables
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # gains: in 6N, no matmul
    for T in (64, 16):
        counted = counted_training_flops(model, 2, T)
        ours = model.flops_per_token(T)
        assert abs(ours - counted) / counted < 0.01, (T, ours, counted)
        assert ours - counted == 6 * norms
