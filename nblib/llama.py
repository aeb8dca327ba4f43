"""A Llama-style language model (lesson 07), readable end to end.

What changes from GPT-2 (lesson 06), one idea each:

- ``RMSNorm``: scale by the root mean square only; no mean subtraction, no bias.
- rotary position embeddings (``rope_tables``, ``apply_rope``): no position table is
  added to the tokens; queries and keys are *rotated* by an angle proportional to their
  position, so their dot product depends only on the distance between them.
- ``SwiGLU`` feed-forward: ``down(silu(gate(x)) * up(x))`` with a hidden size of about
  8/3 of the width, so it has as many weights as GPT-2's 4x GELU MLP.
- grouped-query attention: ``n_kv_heads`` key/value heads shared by ``n_head`` query
  heads (``n_kv_heads == n_head`` is multi-head, ``1`` is multi-query attention).
- no biases in any linear layer.

For inference, ``KVCache`` keeps every layer's keys and values so that generation runs
the model on one new token per step (``generate(..., use_cache=True)``). It lives in
``nblib.kvcache`` (``nblib.gpt.GPT`` uses it too) and is importable from here.

The forward pass takes the same keyword options as ``nblib.gpt.GPT``'s (lesson 08 on):
``attention_mask`` for left padding, ``positions``, ``return_hidden``, ``reduction``.

The module and parameter names are those of Hugging Face's ``LlamaForCausalLM``, so
``save_hf`` writes a directory (``config.json`` + ``model.safetensors``) that
``transformers.AutoModelForCausalLM.from_pretrained`` loads, and ``from_hf`` /
``load_hf`` read one back.

For the lesson's ablation the config can also switch each change back to its GPT-2
form (``pos_emb="learned"``, ``norm="layer"``, ``mlp="gelu"``); those variants train
and generate like the rest but have no Hugging Face Llama equivalent. With all three
switched (and tied embeddings) the model *is* lesson 06's ``nblib.gpt.GPT`` with
``bias=False``: ``from_gpt`` copies one into the other with identical logits.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nblib.hf_dir import check_special_tokens, read_hf_config, read_hf_weights, write_hf_dir
from nblib.kvcache import KVCache, causal_mask, new_cache
from nblib.lm import lm_loss, token_positions
from nblib import sample  # lesson 06's sampler: the generators here choose tokens with it

POS_EMBS = ("rope", "learned")
NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")


def swiglu_hidden(n_embd: int, multiple_of: int = 1) -> int:
    """SwiGLU's hidden size: 2/3 of GPT-2's 4*n_embd (three matrices instead of two, same
    weight count), rounded up to a multiple of ``multiple_of`` as Llama does for speed."""
    hidden = int(8 * n_embd / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    block_size: int = 256          # longest sequence; the RoPE tables and the KV cache are this long
    n_layer: int = 4
    n_head: int = 4                # query heads
    n_kv_heads: int | None = None  # key/value heads; None means n_head (plain multi-head attention)
    n_embd: int = 128
    ffn_hidden: int | None = None  # None means swiglu_hidden(n_embd) for SwiGLU, 4*n_embd for GELU
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False   # Llama keeps a separate output matrix; GPT-2 ties them
    # The ablation's switches; the defaults are the Llama choices.
    pos_emb: str = "rope"          # "rope" or "learned" (GPT-2's position table)
    norm: str = "rms"              # "rms" or "layer" (GPT-2's LayerNorm, here without its bias)
    mlp: str = "swiglu"            # "swiglu" or "gelu" (GPT-2's 4x MLP, without biases)
    bos_token_id: int | None = None  # start / end-of-text tokens, if the vocabulary has them;
    eos_token_id: int | None = None  # written to config.json so that Hugging Face assumes none of its own

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden(self.n_embd) if self.mlp == "swiglu" else 4 * self.n_embd
        for name, allowed in (("pos_emb", POS_EMBS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LlamaConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_heads={self.n_kv_heads}: "
                             "each key/value head serves the same number of query heads")
        if self.head_dim % 2:
            raise ValueError(f"head size n_embd/n_head={self.head_dim} must be even: RoPE rotates pairs")
        check_special_tokens(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_llama(self) -> bool:
        """True when every switch has its Llama value (the model can go to Hugging Face)."""
        return (self.pos_emb, self.norm, self.mlp) == ("rope", "rms", "swiglu")


# ---------------------------------------------------------------------------- pieces

class RMSNorm(nn.Module):
    """x / rms(x) * weight. LayerNorm without the mean subtraction and without the bias:
    cheaper, and in practice as good. Computed in float32 whatever the input dtype; the gain
    is applied after the cast back, as Hugging Face's Llama does. (``F.rms_norm`` is
    ``x * rsqrt(mean(x**2) + eps)`` in one call: fewer small ops than writing it out.)"""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, n_positions: int, theta: float = 10000.0,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) angle, each [n_positions, head_dim].

    Pair i of a head (dimensions i and i + head_dim/2) turns at frequency
    theta**(-2i/head_dim): the first pairs spin fast (fine position), the last ones slowly
    (coarse position). The angle at position m is m * frequency. Both halves of the
    table repeat the same angles because both members of a pair use them.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(n_positions, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)            # [n_positions, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)         # [n_positions, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + d/2]) of ``x`` [..., T, d] by its angle.

    A 2-D rotation by a: (a1, a2) -> (a1 cos a - a2 sin a, a2 cos a + a1 sin a).
    Written for all pairs at once: x * cos + rotate_half(x) * sin, with
    rotate_half(x) = (-x2, x1). ``cos``/``sin`` are [T, d] rows of ``rope_tables``.
    (Pairing i with i + d/2 rather than 2i with 2i+1 is Hugging Face's layout.)
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv_heads, T, d] -> [B, n_kv_heads * n_rep, T, d]: key/value head j serves
    query heads j*n_rep ... j*n_rep + n_rep - 1."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def kv_cache_bytes_per_token(n_layer: int, n_kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """Memory the KV cache needs per token: a key and a value vector per kv head per layer."""
    return 2 * n_layer * n_kv_heads * head_dim * bytes_per_value


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, optional RoPE and a KV cache."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_heads, self.head_dim = c.n_head, c.n_kv_heads, c.head_dim
        self.use_rope = c.pos_emb == "rope"
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, is_causal: bool = True):
        """``cos``/``sin``: [T, d], or [B, 1, T, d] when each row has its own positions.
        ``mask``/``is_causal``: which keys each query sees (``nblib.kvcache.causal_mask``);
        the default is plain causal attention, which is right without a cache."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:  # rotate queries and keys, never values
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # every key and value so far
        n_rep = self.n_head // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the gate decides, per hidden unit, how much of up(x) passes."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """GPT-2's feed-forward (up, GELU, down), here without biases: the ablation's baseline."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def make_norm(config: LlamaConfig) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)  # as GPTConfig(bias=False)


class Block(nn.Module):
    """Pre-norm residual block, as in GPT-2: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config)
        mlp = SwiGLU if config.mlp == "swiglu" else GeluMLP
        self.mlp = mlp(config.n_embd, config.ffn_hidden)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None, is_causal=True):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------- the model

class Llama(nn.Module):
    """The model: embeddings, ``n_layer`` blocks, a final norm, the output head.

    ``forward(idx, targets=None, cache=None) -> (logits, loss)`` as every course model;
    with a ``KVCache`` it processes only the new tokens and attends to the cached ones.
    Keyword options as ``nblib.gpt.GPT.forward``'s (padding, positions, hidden states).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        c = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.n_embd),
            layers=nn.ModuleList(Block(c) for _ in range(c.n_layer)),
            norm=make_norm(c),
        ))
        if c.pos_emb == "learned":
            self.model["embed_positions"] = nn.Embedding(c.block_size, c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_theta)
        # Recomputed from the config, so not saved with the weights (persistent=False).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's trick: shrink the layers that write into the residual stream, so the
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied matrix counted once).

        ``exclude_embeddings`` leaves out the input tables, ``embed_tokens`` (with tied
        embeddings that is ``lm_head`` too, as in ``nblib.gpt.GPT``) and ``embed_positions``
        if there is one; an untied ``lm_head`` is a matmul and stays counted.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
            if "embed_positions" in self.model:
                n -= self.model.embed_positions.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) at ``seq_len`` (default: block_size):
        ``6N + 12 * n_layer * n_embd * T``, as ``nblib.gpt.GPT.flops_per_token``.

        N is every weight that multiplies activations once per token: the non-embedding
        parameters and ``lm_head`` (tied or not); the norm gains are counted in N though
        they do no matmul (a fraction 1/n_embd or so of N). Grouped-query attention
        shrinks k_proj and v_proj (fewer weights) but not the attention itself: every query
        head still scores T keys of head_dim, so q @ k^T and att @ v cost 2 * 2 * T * n_embd
        per layer forward, 12 * n_layer * n_embd * T with the backward.
        """
        T = seq_len or self.config.block_size
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_embeddings:
            n += self.lm_head.weight.numel()  # the tied table is also the output matmul
        return 6 * n + 12 * c.n_layer * c.n_embd * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None, *,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                return_hidden: bool = False, reduction: str = "mean"):
        """``(logits, loss)``, with the options of ``nblib.gpt.GPT.forward`` (see there):
        ``attention_mask`` [B, S] for left padding (RoPE then rotates each row by its own
        positions), ``positions``, ``return_hidden`` (after the final norm), ``reduction``."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        limit = self.config.block_size if cache is None else cache.max_len
        if start + T > limit:
            raise ValueError(f"{start + T} positions do not fit: the model (or cache) holds at most {limit}")
        pos = token_positions(self.config, idx, start, attention_mask, positions)
        x = self.model.embed_tokens(idx)
        if self.config.pos_emb == "learned":
            x = x + self.model.embed_positions(pos)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [T, d], or [B, T, d] per row
        if pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d]: the same angles for every head
        mask, is_causal = causal_mask(T, start, attention_mask, idx.device)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache, i, mask, is_causal)
        if cache is not None:
            cache.pos += T
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden)
        # targets of -100 are ignored, as in lesson 06 (later lessons mask prompts that way)
        loss = None if targets is None else lm_loss(logits, targets, reduction)
        return (logits, loss, hidden) if return_hidden else (logits, loss)


# ---------------------------------------------------------------------------- vocabulary padding

def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``. GPU matmul kernels tile in 64s
    and 128s; a ragged dimension (65, or GPT-2's 50257) leaves tiles part-empty and may pick a
    slower kernel. The extra tokens never occur in the data; training pushes their logits down."""
    return multiple * math.ceil(vocab_size / multiple)


def resize_vocab(model: Llama, vocab_size: int) -> Llama:
    """A copy of ``model`` with ``vocab_size`` rows in its embedding and output matrices: the
    first rows keep their weights, new ones are initialised as in a fresh model. Padding (more
    rows) and unpadding (fewer: the padding tokens can then never be sampled, and the model
    exports with its tokenizer's vocabulary) are this one function."""
    new = Llama(dataclasses.replace(model.config, vocab_size=vocab_size)).to(next(model.parameters()).device)
    old = model.state_dict()
    with torch.no_grad():
        for name, value in new.state_dict().items():
            rows = min(value.shape[0], old[name].shape[0])
            value[:rows].copy_(old[name][:rows])  # whole tensors, or the first rows of the vocabulary ones
    return new


# ---------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(model: Llama, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``idx`` [B, T] (or [T]) by ``max_new_tokens`` tokens; returns [B, T + max_new_tokens].

    Without the cache this is lesson 06's ``nblib.sample.generate``: every step runs the
    whole sequence again. With it: one *prefill* pass over the prompt fills the cache,
    then each *decode* step runs the model on the one newest token. Both choose tokens
    with ``nblib.sample.sample_next_token`` (temperature 0 is greedy; else one random number
    per row per step from ``generator``), so a seed gives the same tokens either way.
    ``nblib.engine`` (lesson 08) is this loop for prompts of different lengths, as
    ``prefill`` and ``decode_step`` calls. Any model of the course contract runs here.
    """
    if not use_cache:
        return sample.generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=generator)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sample.check_temperature(temperature)  # before the prefill pass, not after it
    if idx.dim() == 1:  # one sequence [T], as nblib.sample.generate accepts
        return generate(model, idx[None], max_new_tokens, True, temperature, top_k, top_p, generator)[0]
    if idx.shape[1] == 0:
        raise ValueError("generate with a cache needs a prompt of at least one token")
    total = idx.shape[1] + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens is "
                         f"more than block_size={model.config.block_size}, the longest the cache holds")
    was_training = model.training
    model.eval()
    cache = new_cache(model, idx.shape[0], max_len=total)
    out = [idx]
    try:
        logits, _ = model(idx, cache=cache)  # prefill: the whole prompt at once
        for step in range(max_new_tokens):
            nxt = sample.sample_next_token(logits[:, -1, :], temperature=temperature, top_k=top_k,
                                           top_p=top_p, generator=generator)
            out.append(nxt.to(idx.device))
            if step + 1 < max_new_tokens:
                logits, _ = model(nxt, cache=cache)  # decode: one token, attending to the cache
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)


def from_gpt(gpt) -> Llama:
    """Lesson 06's ``nblib.gpt.GPT`` (``bias=False``) as the GPT-2 corner of this model.

    The same weights under other names: ``c_attn`` is q, k and v stacked, ``c_fc`` is
    ``up_proj``, ``wpe`` is ``embed_positions``. It shows that the ablation's variants
    differ from lesson 06's GPT only in what they switch.
    """
    g = gpt.config
    if g.bias:
        raise ValueError("from_gpt needs a GPT without biases (GPTConfig(bias=False)): this model has none")
    config = LlamaConfig(vocab_size=g.vocab_size, block_size=g.block_size, n_layer=g.n_layer, n_head=g.n_head,
                         n_embd=g.n_embd, tie_embeddings=True, pos_emb="learned", norm="layer", mlp="gelu",
                         bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id)
    src = gpt.state_dict()
    state = {"model.embed_tokens.weight": src["transformer.wte.weight"],
             "model.embed_positions.weight": src["transformer.wpe.weight"],
             "model.norm.weight": src["transformer.ln_f.weight"]}
    for i in range(g.n_layer):
        h, o = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = src[h + "attn.c_attn.weight"].chunk(3, dim=0)  # nn.Linear: [3*n_embd, n_embd]
        state.update({o + "self_attn.q_proj.weight": q, o + "self_attn.k_proj.weight": k,
                      o + "self_attn.v_proj.weight": v, o + "self_attn.o_proj.weight": src[h + "attn.c_proj.weight"],
                      o + "input_layernorm.weight": src[h + "ln_1.weight"],
                      o + "post_attention_layernorm.weight": src[h + "ln_2.weight"],
                      o + "mlp.up_proj.weight": src[h + "mlp.c_fc.weight"],
                      o + "mlp.down_proj.weight": src[h + "mlp.c_proj.weight"]})
    return _load_weights(Llama(config), {k: v.clone() for k, v in state.items()})


# ---------------------------------------------------------------------------- Hugging Face

def hf_config_dict(config: LlamaConfig) -> dict:
    """The ``config.json`` of a Hugging Face ``LlamaForCausalLM`` with this architecture."""
    if not config.is_llama:
        raise ValueError(f"only the Llama architecture can be exported; this config has pos_emb="
                         f"{config.pos_emb!r}, norm={config.norm!r}, mlp={config.mlp!r}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters; older versions read rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


def config_from_hf(hf: dict) -> LlamaConfig:
    """Our config from a Hugging Face Llama ``config.json`` (as a dict); refuses what we don't build."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"expected a Llama config (model_type 'llama'), got model_type={hf.get('model_type')!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not implemented here; only plain RoPE")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{key}=True: this Llama has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r}: SwiGLU here uses silu")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads={n_embd // n_head}")
    return LlamaConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=n_head, n_kv_heads=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
        ffn_hidden=hf["intermediate_size"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
    )


def _load_weights(model: Llama, state: dict[str, torch.Tensor]) -> Llama:
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def from_hf(hf_model) -> Llama:
    """Our ``Llama`` with the weights of a ``transformers`` ``LlamaForCausalLM`` (copied)."""
    config = config_from_hf(hf_model.config.to_dict())
    state = {k: v.detach().clone().float() for k, v in hf_model.state_dict().items()}
    return _load_weights(Llama(config), state)


def save_hf(model: Llama, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face model directory: ``config.json`` + ``model.safetensors``.

    No ``transformers`` needed: the format is a JSON file and a safetensors file whose
    tensor names are the module names, which we chose to be Hugging Face's.
    """
    state = {k: v.float() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # safetensors stores a tensor once; HF re-ties it
    return write_hf_dir(directory, hf_config_dict(model.config), state)


def load_hf(directory: str | Path) -> Llama:
    """Read a Hugging Face Llama directory (``config.json`` + ``model.safetensors``) into our model."""
    model = Llama(config_from_hf(read_hf_config(directory)))
    return _load_weights(model, read_hf_weights(directory))
