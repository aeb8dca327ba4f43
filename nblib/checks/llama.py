"""Checks for lesson 07's exercises: RoPE, grouped-query attention, the KV-cache update, RMSNorm, KV-cache memory.

``check_apply_rope`` and ``check_repeat_kv`` check the single functions (kept for their tests;
the lesson's exercises now use ``check_rope`` and ``check_gqa_attention``).
"""
from __future__ import annotations

import torch

from nblib import llama
from nblib.checks import CheckFailed, call_learner, expect_close, expect_equal, expect_unchanged, passed


def check_rms_norm(rms_norm) -> None:
    """``rms_norm(x, weight, eps) -> tensor``: x / sqrt(mean(x**2, last dim) + eps) * weight."""
    g = torch.Generator().manual_seed(7)
    for shape, eps in (((3, 8), 1e-5), ((2, 4, 6), 1e-6), ((1, 5), 0.5)):
        x = torch.randn(shape, generator=g) * 3 + 1  # a non-zero mean: RMSNorm must not subtract it
        weight = torch.randn(shape[-1], generator=g)
        ref = llama.RMSNorm(shape[-1], eps)
        with torch.no_grad():
            ref.weight.copy_(weight)
            expected = ref(x)
        got = call_learner("rms_norm", rms_norm, x, weight, eps)
        expect_close(f"rms_norm on shape {shape} with eps={eps}", got, expected, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 3, 8, generator=g, dtype=torch.float64) * 3 + 1
    saved, ref = x.clone(), llama.RMSNorm(8, 1e-6).double()
    got = call_learner("rms_norm on float64 input", rms_norm, x, ref.weight.detach().clone(), 1e-6)
    expect_unchanged("rms_norm", {"x": x}, {"x": saved}, "return a new tensor")
    if torch.is_tensor(got) and got.dtype != torch.float64:
        raise CheckFailed(f"rms_norm on float64 input and weight returned {got.dtype}: keep the input's dtype")
    expect_close("rms_norm on float64 input", got, ref(x), atol=1e-8)
    got = call_learner("rms_norm on zeros", rms_norm, torch.zeros(2, 8), torch.ones(8), 1e-5)
    expect_close("rms_norm on zeros (eps keeps the root above 0)", got, torch.zeros(2, 8), atol=1e-12)
    passed("rms_norm")


def check_apply_rope(apply_rope) -> None:
    """``apply_rope(x [..., T, d], cos [T, d], sin [T, d])``: rotate pairs (i, i + d/2)."""
    g = torch.Generator().manual_seed(11)
    for shape, theta in (((1, 1, 4, 2), 10000.0), ((2, 3, 7, 8), 10000.0), ((1, 2, 5, 16), 100.0)):
        T, d = shape[-2], shape[-1]
        x = torch.randn(shape, generator=g)
        cos, sin = llama.rope_tables(d, T, theta)
        got = call_learner("apply_rope", apply_rope, x, cos, sin)
        expect_close(f"apply_rope on shape {shape}", got, llama.apply_rope(x, cos, sin), atol=1e-5, rtol=1e-5)
        # a rotation keeps lengths: a quick hint when the formula is almost right
        expect_close(f"apply_rope keeps each vector's length (shape {shape})", torch.as_tensor(got).norm(dim=-1),
                     x.norm(dim=-1), atol=1e-4, rtol=1e-4)
    passed("apply_rope")


def check_repeat_kv(repeat_kv) -> None:
    """``repeat_kv(x [B, n_kv, T, d], n_rep) -> [B, n_kv * n_rep, T, d]``, kv head j serving
    query heads j*n_rep ... j*n_rep + n_rep - 1."""
    g = torch.Generator().manual_seed(3)
    for shape, n_rep in (((1, 2, 3, 4), 2), ((2, 1, 5, 2), 4), ((1, 3, 2, 2), 1)):
        x = torch.randn(shape, generator=g)
        got = call_learner("repeat_kv", repeat_kv, x, n_rep)
        expect_close(f"repeat_kv(x of shape {shape}, n_rep={n_rep})", got, llama.repeat_kv(x, n_rep), atol=0, rtol=0)
    passed("repeat_kv")


def check_kv_cache_bytes(kv_cache_bytes_per_token) -> None:
    """``kv_cache_bytes_per_token(n_layer, n_kv_heads, head_dim, bytes_per_value)``."""
    cases = ((1, 1, 1, 1), (2, 4, 8, 2), (32, 8, 128, 2), (32, 32, 128, 2), (12, 12, 64, 4))
    for args in cases:
        got = call_learner("kv_cache_bytes_per_token", kv_cache_bytes_per_token, *args)
        if not isinstance(got, int):
            raise CheckFailed(f"kv_cache_bytes_per_token{args} returned {type(got).__name__}: whole-number "
                              "arguments give a whole number of bytes, an int")
        expect_equal(f"kv_cache_bytes_per_token{args}", got, llama.kv_cache_bytes_per_token(*args))
    # and the formula agrees with a real cache's tensors
    config = llama.LlamaConfig(vocab_size=8, block_size=10, n_layer=3, n_head=4, n_kv_heads=2, n_embd=16)
    cache = llama.KVCache(config, batch_size=1, max_len=10)
    expect_equal("bytes of a real KVCache (3 layers, 2 kv heads, head_dim 4, float32, 10 tokens)",
                 10 * call_learner("kv_cache_bytes_per_token", kv_cache_bytes_per_token, 3, 2, 4, 4), cache.nbytes)
    passed("kv_cache_bytes_per_token")


# ---------------------------------------------------------------- the attention layer, piece by piece
# The learner writes RoPE (07.rope), grouped-query attention (07.gqa_attention) and the KV-cache
# update (07.kv_cache). Each is checked alone on small tensors, then plugged into a model through
# a subclass of ``nblib.llama.Attention`` whose forward calls it, and the model's logits are compared
# with a reference: ``transformers``' LlamaForCausalLM with the same weights, or the uncached pass.

def reference_gqa_attention(q, k, v):
    """Causal grouped-query attention of the T newest queries over all S keys/values so far.

    q [B, n_head, T, d]; k, v [B, n_kv_heads, S, d] with S >= T. The queries are the last T
    positions: query i sits at position S - T + i and sees keys 0 ... S - T + i.
    Returns [B, n_head, T, d]. (The course's version, used when the learner's does not pass.)
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = llama.repeat_kv(k, n_rep), llama.repeat_kv(v, n_rep)
    T, S = q.shape[-2], k.shape[-2]
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)


def reference_kv_cache_update(cache_k, cache_v, pos, k, v):
    """Write k, v [B, n_kv, T, d] into slots pos ... pos + T - 1 of the preallocated
    cache_k, cache_v [B, n_kv, max_len, d] (in place); return every key and value so far,
    [B, n_kv, pos + T, d] each. (The course's version, used when the learner's does not pass.)"""
    end = pos + k.shape[2]
    if end > cache_k.shape[2]:
        raise ValueError(f"{end} positions do not fit in a cache of {cache_k.shape[2]}")
    cache_k[:, :, pos:end] = k
    cache_v[:, :, pos:end] = v
    return cache_k[:, :, :end], cache_v[:, :, :end]


def attention_class(apply_rope, gqa_attention, kv_cache_update=None):
    """A subclass of ``nblib.llama.Attention`` whose forward is built from the three pieces.

    (Padding masks, lesson 08, are not handled: the model's ``mask`` argument is ignored.)
    """

    class PluggedAttention(llama.Attention):
        def forward(self, x, cos, sin, cache=None, layer=0, mask=None, is_causal=True):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if self.use_rope:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                k, v = kv_cache_update(cache.k[layer], cache.v[layer], cache.pos, k, v)
            y = gqa_attention(q, k, v)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    return PluggedAttention


def plug_attention(model, attention_cls):
    """Swap every layer's attention of an ``nblib.llama.Llama`` for ``attention_cls`` (weights kept)."""
    for block in model.model.layers:
        block.self_attn.__class__ = attention_cls
    return model


def _run_model(what, model, *args, **kwargs):
    """The model's logits; a crash inside the learner's code becomes a readable CheckFailed."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)[0]
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CheckFailed(f"{what}: the model with your function inside raised {type(err).__name__}: {err}") from err


def _tiny_hf_llama(seed: int = 0, n_head: int = 4, n_kv_heads: int = 2):
    """A random tiny ``transformers`` LlamaForCausalLM (norm gains randomised) and our copy of it."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=n_head, num_key_value_heads=n_kv_heads,
                                   max_position_embeddings=32, rms_norm_eps=1e-6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf, llama.from_hf(hf).eval()


def check_rope(rope_tables, apply_rope) -> None:
    """``rope_tables(head_dim, n_positions, theta) -> (cos, sin)`` [n_positions, head_dim] and
    ``apply_rope(x [..., T, d], cos, sin)``: against nblib's, and the relative-position property."""
    for head_dim, n_pos, theta in ((2, 4, 10000.0), (8, 7, 10000.0), (16, 5, 100.0)):
        got = call_learner(f"rope_tables({head_dim}, {n_pos}, {theta})", rope_tables, head_dim, n_pos, theta)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckFailed(f"rope_tables({head_dim}, {n_pos}, {theta}): expected a pair (cos, sin), got {type(got).__name__}")
        want_cos, want_sin = llama.rope_tables(head_dim, n_pos, theta)
        _expect_float32_tables(f"rope_tables({head_dim}, {n_pos}, {theta})", got)
        expect_close(f"rope_tables({head_dim}, {n_pos}, theta={theta})[0] (cos)", got[0], want_cos, atol=1e-5, rtol=1e-5)
        expect_close(f"rope_tables({head_dim}, {n_pos}, theta={theta})[1] (sin)", got[1], want_sin, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(11)
    for shape, theta in (((1, 1, 4, 2), 10000.0), ((2, 3, 7, 8), 10000.0), ((1, 2, 5, 16), 100.0)):
        T, d = shape[-2], shape[-1]
        x = torch.randn(shape, generator=g)
        cos, sin = llama.rope_tables(d, T, theta)   # nblib's tables: apply_rope is checked on its own
        saved = x.clone()
        got = call_learner("apply_rope", apply_rope, x, cos, sin)
        expect_unchanged(f"apply_rope on shape {shape}", {"x": x}, {"x": saved}, "return a new tensor")
        expect_close(f"apply_rope on shape {shape}", got, llama.apply_rope(x, cos, sin), atol=1e-5, rtol=1e-5)
    # tables of one row per sequence, [B, 1, T, d] (left padding, lesson 08), broadcast over the heads
    x = torch.randn(2, 4, 6, 8, generator=g)
    cos, sin = llama.rope_tables(8, 6)
    per_row = (cos.expand(2, 1, 6, 8), sin.expand(2, 1, 6, 8))
    got = call_learner("apply_rope with [2, 1, 6, 8] tables", apply_rope, x, *per_row)
    expect_close("apply_rope on x [2, 4, 6, 8] with tables [2, 1, 6, 8] (one per sequence, broadcast over the heads)",
                 got, llama.apply_rope(x, cos, sin), atol=1e-5, rtol=1e-5)
    got = call_learner("rope_tables(8, 6) (theta left at its default)", rope_tables, 8, 6)
    expect_close("rope_tables(8, 6)[0] with theta left at its default (10000)", got[0], cos, atol=1e-5, rtol=1e-5)
    # what RoPE is for: with your tables and rotation, q.k depends only on the distance
    d, n_pos = 8, 12
    cos, sin = call_learner("rope_tables(8, 12)", rope_tables, d, n_pos, 10000.0)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    rq = call_learner("apply_rope on q at every position", apply_rope, q.expand(n_pos, d), cos, sin)
    rk = call_learner("apply_rope on k at every position", apply_rope, k.expand(n_pos, d), cos, sin)
    scores = rq @ rk.T
    for distance in (0, 1, 5):
        diag = torch.diagonal(scores, offset=-distance)
        expect_close(f"q.k after RoPE at distance {distance}, at every pair of positions", diag,
                     diag[0].expand_as(diag), atol=1e-4, rtol=1e-4)
    passed("rope_tables and apply_rope")


def _expect_float32_tables(what: str, tables) -> None:
    """The tables multiply float32 queries and keys: float64 ones would make them float64 (or fail)."""
    for name, table in zip(("cos", "sin"), tables):
        if torch.is_tensor(table) and table.dtype != torch.float32:
            raise CheckFailed(f"{what}: the {name} table is {table.dtype}; the model's q and k are float32, so make the "
                              "tables float32 too (torch.arange(..., dtype=torch.float32) for the positions and the "
                              "frequencies)")


def check_gqa_attention(gqa_attention) -> None:
    """``gqa_attention(q [B, n_head, T, d], k, v [B, n_kv_heads, S, d]) -> [B, n_head, T, d]``,
    causal, the T queries being the last T of the S positions; then inside a tiny Llama
    against ``transformers``' LlamaForCausalLM."""
    g = torch.Generator().manual_seed(5)
    cases = (  # B, n_head, n_kv_heads, T, S, d
        (1, 4, 2, 5, 5, 8),     # grouped-query, no cache
        (2, 4, 4, 3, 3, 4),     # plain multi-head
        (1, 6, 1, 4, 4, 4),     # multi-query: one kv head for all
        (2, 4, 2, 2, 7, 4),     # two new queries over 7 keys (a KV cache holds 5 older ones)
        (1, 4, 2, 1, 6, 8),     # one new token, as in decoding
    )
    for B, H, H_kv, T, S, d in cases:
        q = torch.randn(B, H, T, d, generator=g)
        k, v = torch.randn(B, H_kv, S, d, generator=g), torch.randn(B, H_kv, S, d, generator=g)
        what = f"gqa_attention(q {tuple(q.shape)}, k and v {tuple(k.shape)})"
        got = call_learner(what, gqa_attention, q, k, v)
        expect_close(what, got, reference_gqa_attention(q, k, v), atol=1e-5, rtol=1e-4)
    q, k, v = (t.double() for t in (30 * q, k, v))  # float64, and scores large enough to overflow exp
    what = "gqa_attention in float64 with large scores"
    got = call_learner(what, gqa_attention, q, k, v)
    if torch.is_tensor(got) and got.dtype != torch.float64:
        raise CheckFailed(f"{what}: expected a float64 result, got {got.dtype}: keep the inputs' dtype")
    expect_close(what, got, reference_gqa_attention(q, k, v), atol=1e-8, rtol=1e-7)
    try:
        hf, ours = _tiny_hf_llama(seed=0)
    except ImportError:
        print("(transformers is not installed: the comparison with LlamaForCausalLM is skipped)")
    else:
        model = plug_attention(ours, attention_class(llama.apply_rope, gqa_attention))
        idx = torch.randint(0, 37, (2, 24), generator=g)
        with torch.no_grad():
            want = hf(idx).logits
        got = _run_model("a tiny Llama (4 query heads, 2 kv heads) with your gqa_attention", model, idx)
        expect_close("logits of a tiny Llama with your gqa_attention vs transformers' LlamaForCausalLM",
                     got, want, atol=1e-4, rtol=1e-4)
    passed("gqa_attention")


def check_kv_cache(kv_cache_update) -> None:
    """``kv_cache_update(cache_k, cache_v, pos, k, v) -> (keys, values) so far``, writing in place;
    then a tiny Llama with it: pieces with the cache == one pass without, and the same greedy tokens."""
    g = torch.Generator().manual_seed(9)
    B, H_kv, max_len, d = 2, 2, 8, 4
    cache_k, cache_v = torch.zeros(B, H_kv, max_len, d), torch.zeros(B, H_kv, max_len, d)
    all_k, all_v = torch.randn(B, H_kv, max_len, d, generator=g), torch.randn(B, H_kv, max_len, d, generator=g)
    pos = 0
    for T in (3, 1, 2):   # a prompt of 3, then one token, then two
        end = pos + T
        what = f"kv_cache_update(cache of {max_len} slots, pos={pos}, k and v of {T} new tokens)"
        got = call_learner(what, kv_cache_update, cache_k, cache_v, pos, all_k[:, :, pos:end], all_v[:, :, pos:end])
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckFailed(f"{what}: expected a pair (keys, values), got {type(got).__name__}")
        expect_close(f"{what}: the keys returned (every slot so far)", got[0], all_k[:, :, :end])
        expect_close(f"{what}: the values returned (every slot so far)", got[1], all_v[:, :, :end])
        expect_close(f"{what}: cache_k afterwards (slots {pos}..{end - 1} written in place, the rest untouched)",
                     cache_k, torch.cat([all_k[:, :, :end], torch.zeros(B, H_kv, max_len - end, d)], dim=2))
        expect_close(f"{what}: cache_v afterwards", cache_v,
                     torch.cat([all_v[:, :, :end], torch.zeros(B, H_kv, max_len - end, d)], dim=2))
        pos = end
    # a float64 cache of one kv head (multi-query), every slot filled in one go (a prefill of the whole cache)
    ck, cv = torch.zeros(1, 1, 5, 3, dtype=torch.float64), torch.zeros(1, 1, 5, 3, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    what = "kv_cache_update(a float64 cache of 1 kv head and 5 slots, pos=0, k and v of all 5 tokens)"
    got = call_learner(what, kv_cache_update, ck, cv, 0, k, v)
    if not (isinstance(got, (tuple, list)) and len(got) == 2) or got[0].dtype != torch.float64:
        raise CheckFailed(f"{what}: expected a pair of float64 tensors (the cache's dtype), got "
                          f"{[getattr(t, 'dtype', type(t).__name__) for t in got] if isinstance(got, (tuple, list)) else got}")
    expect_close(f"{what}: the keys returned", got[0], k, atol=0, rtol=0)
    expect_close(f"{what}: the values returned", got[1], v, atol=0, rtol=0)
    expect_close(f"{what}: cache_k afterwards (every slot written)", ck, k, atol=0, rtol=0)
    # in a model: the sequence in pieces with the cache gives the logits of one full pass
    torch.manual_seed(2)
    config = llama.LlamaConfig(vocab_size=29, block_size=24, n_layer=2, n_head=4, n_kv_heads=2, n_embd=32)
    model = llama.Llama(config).eval()
    plug_attention(model, attention_class(llama.apply_rope, reference_gqa_attention, kv_cache_update))
    seq = torch.randint(0, config.vocab_size, (2, 14), generator=g)
    full = _run_model("a tiny Llama without a cache", model, seq)
    cache = llama.KVCache(config, batch_size=2, max_len=14)
    pieces = [_run_model(f"a tiny Llama with your kv_cache_update, tokens {a}..{b - 1}", model, seq[:, a:b], cache=cache)
              for a, b in ((0, 6), (6, 7), (7, 8), (8, 14))]
    expect_close("logits of a tiny Llama fed 6 + 1 + 1 + 6 tokens with your cache vs one pass without",
                 torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)
    prompt = seq[:1, :5]
    try:
        with_cache = llama.generate(model, prompt, 10, use_cache=True, temperature=0)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CheckFailed(f"greedy generation with your kv_cache_update raised {type(err).__name__}: {err}") from err
    without = llama.generate(model, prompt, 10, use_cache=False, temperature=0)
    expect_equal("greedy tokens with your cache (10 new tokens)", with_cache[0].tolist(), without[0].tolist())
    passed("kv_cache_update")
