"""GPT-2, written once (lesson 06), with Hugging Face's parameter names.

The modules are named like ``transformers.GPT2LMHeadModel``'s (``transformer.wte``,
``transformer.h.0.attn.c_attn``, ``lm_head``, ...), so a state dict converts to and from
Hugging Face's with one change: GPT-2's original code (and HF's ``Conv1D``) stores the
weights of ``c_attn``, ``c_proj`` and ``c_fc`` as ``[in, out]``, while ``nn.Linear`` stores
``[out, in]``; those four are transposed on the way in and out.

What makes it GPT-2 rather than the lesson-05 GPT:

- pre-LayerNorm blocks and a final ``ln_f``;
- GELU with the tanh approximation (GPT-2's ``gelu_new``);
- learned position embeddings (``wpe``);
- weight tying: the output layer ``lm_head`` *is* the token embedding ``wte``;
- residual projections initialised with std ``0.02 / sqrt(2 * n_layer)``, so the sum of
  ``2 * n_layer`` residual branches keeps the stream's variance about the same at any depth.

The model follows the course's contract: ``model.config`` is a dataclass and
``model(idx, targets=None)`` returns ``(logits, loss)``. Later lessons add keyword options
that ``nblib.llama.Llama`` has too: left padding (``attention_mask``), explicit
``positions``, a ``KVCache`` (``nblib.kvcache``), the final hidden states for a value
head (``return_hidden``) and a per-token loss (``reduction="none"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from nblib.hf_dir import check_special_tokens, read_hf_config, read_hf_weights, write_hf_dir
from nblib.kvcache import KVCache, causal_mask
from nblib.lm import lm_loss, token_positions  # shared with nblib.llama; lesson 06 imports lm_loss from here


@dataclass
class GPTConfig:
    """GPT-2's hyper-parameters. The defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    block_size: int = 1024  # the longest context (HF: n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # HF has three (embd/attn/resid_pdrop); we use one for all
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has
    # The start / end-of-text token, if the vocabulary has one (GPT-2's: both 50256, <|endoftext|>).
    # Written to config.json so that Hugging Face does not assume GPT-2's.
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        check_special_tokens(self)


class CausalSelfAttention(nn.Module):
    """All heads at once: one matmul makes q, k, v (``c_attn``), one mixes the heads (``c_proj``)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_branch = True  # marks it for the scaled init
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_size]: each head attends on its own slice
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(head_size) + causal mask) v, fused by PyTorch
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = True,
               cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``forward`` for later lessons: ``mask`` says which keys each query sees (left
        padding; from ``nblib.kvcache.causal_mask``), ``cache`` holds earlier keys and values.
        With neither it computes exactly what ``forward`` does."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # every key and value so far
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Per-position feed-forward: widen 4x, tanh-GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_branch = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream is only ever added to."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # tokens talk to each other
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class GPT(nn.Module):
    """GPT-2 language model: ``forward(idx [B, T], targets=None) -> (logits [B, T, V], loss)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading a token in and writing it out use one matrix
        # (38.6M of GPT-2 small's 124M parameters, counted once).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_branch", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)  # 2 residual adds per block
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None, *,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                return_hidden: bool = False, reduction: str = "mean"):
        """Logits for every position; with ``targets``, also the mean cross-entropy.

        Target positions equal to -100 are ignored (PyTorch's and HF's convention), which
        later lessons use to mask prompts out of the loss. The options (lesson 08 on):

        - ``attention_mask`` [B, S] (True/1 = real token, False/0 = left padding; S = T, or
          ``cache.pos + T`` with a cache): padded keys are never attended to, and positions
          count real tokens only (``nblib.kvcache.positions_from_mask``).
        - ``positions`` [B, T] or [T]: the position of each token, instead.
        - ``cache``: a ``KVCache``; only the new tokens are run, attending to the cached ones.
        - ``return_hidden=True``: also return the final hidden states [B, T, n_embd] (after
          ``ln_f``), for a reward or value head: ``(logits, loss, hidden)``.
        - ``reduction="none"``: the loss per token [B, T] (0 where the target is -100).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size={self.config.block_size}; "
                             "crop it (nblib.sample.generate does)")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"{start + T} positions do not fit: the cache holds at most {cache.max_len}")
        pos = token_positions(self.config, idx, start, attention_mask, positions)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        if cache is None and attention_mask is None:
            for block in self.transformer.h:
                x = block(x)  # lesson 06's block: plain causal attention
        else:
            mask, is_causal = causal_mask(T, start, attention_mask, idx.device)
            for layer, block in enumerate(self.transformer.h):  # Block.forward, with a mask and a cache
                x = x + block.attn.attend(block.ln_1(x), mask, is_causal, cache, layer)
                x = x + block.mlp(block.ln_2(x))
            if cache is not None:
                cache.pos += T
        hidden = self.transformer.ln_f(x)
        logits = self.lm_head(hidden)
        loss = None if targets is None else lm_loss(logits, targets, reduction)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    # ---- sizes -----------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each counted once (the tied ``lm_head`` is ``wte``).

        ``exclude_embeddings`` leaves out the position embeddings and the token embedding,
        the "non-embedding" count N of the scaling-law papers.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) at ``seq_len`` (default: block_size),
        the Kaplan/PaLM estimate ``6N + 12 * n_layer * n_embd * T``.

        Each weight does one multiply-add per token in the forward pass (2 FLOPs) and two
        in the backward (4 FLOPs): 6 per weight. N is the non-embedding parameters plus
        ``lm_head`` (which is ``wte``); the position embedding is a lookup. N also counts
        the biases and LayerNorm gains, which do no matmul (0.8% of N at n_embd=128, 0.1%
        for GPT-2 small): the estimate is that much above the matmul FLOPs that
        ``torch.utils.flop_counter.FlopCounterMode`` counts (tests/test_gpt.py). Attention
        adds ``q @ k^T`` and ``att @ v`` over all T keys (the causal mask's zeros included,
        as the fused kernels compute them): 2 * 2 * T * n_embd per layer forward, times 3
        with the backward, i.e. 12 * n_layer * n_embd * T.
        """
        T = seq_len or self.config.block_size
        c = self.config
        matmul_params = self.num_params(exclude_embeddings=True) + self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_embd * T

    def summary(self) -> str:
        c = self.config
        return (f"GPT-2: {c.n_layer} layers, {c.n_head} heads, n_embd={c.n_embd}, block_size={c.block_size}, "
                f"vocab={c.vocab_size} | {self.num_params():,} parameters "
                f"({self.num_params(exclude_embeddings=True):,} non-embedding) | "
                f"{self.flops_per_token() / 1e6:,.1f} MFLOPs per token trained (6N + 12*L*d*T, T={c.block_size})")


# ---- Hugging Face interop ----------------------------------------------------------
# Weights that GPT-2/HF store as [in, out] (Conv1D) and nn.Linear stores as [out, in].
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers that older HF versions put in GPT-2's state dict (the causal mask).
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _is_conv1d(key: str) -> bool:
    return key.endswith(CONV1D_SUFFIXES)


def config_from_hf(hf: dict) -> GPTConfig:
    """A ``GPTConfig`` from a Hugging Face GPT-2 ``config.json`` (as a dict).

    Refuses settings this GPT does not implement, rather than computing something else.
    """
    unsupported = {
        "activation_function": ("gelu_new", hf.get("activation_function", "gelu_new")),
        "layer_norm_epsilon": (1e-5, hf.get("layer_norm_epsilon", 1e-5)),
        "scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": (False, hf.get("scale_attn_by_inverse_layer_idx", False)),
        "tie_word_embeddings": (True, hf.get("tie_word_embeddings", True)),
        "add_cross_attention": (False, hf.get("add_cross_attention", False)),
    }
    bad = {k: got for k, (want, got) in unsupported.items() if got != want}
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        bad["n_inner"] = n_inner
    if bad:
        raise ValueError(f"this GPT-2 config uses settings nblib.gpt does not implement: {bad}")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"],
                     dropout=max(hf.get(k, 0.0) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")), bias=True,
                     bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def hf_config_dict(config: GPTConfig) -> dict:
    """The Hugging Face ``GPT2Config`` keyword arguments for ``config`` (dropout included)."""
    if not config.bias:
        raise ValueError("Hugging Face's GPT-2 always has biases; this config has bias=False")
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=config.vocab_size,
                n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
                n_head=config.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                tie_word_embeddings=True, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF names and layouts, ready for ``GPT2LMHeadModel.load_state_dict``."""
    out = {}
    for key, value in model.state_dict().items():
        out[key] = value.t().contiguous() if _is_conv1d(key) else value.clone()
    return out


def load_hf_state_dict(model: GPT, hf_state: dict[str, torch.Tensor]) -> GPT:
    """Copy a Hugging Face GPT-2 state dict into ``model``, strictly.

    Accepts keys with or without the ``transformer.`` prefix (the hub's GPT-2 files have
    none) and with or without ``lm_head.weight`` (it is tied to ``wte``; HF often leaves it
    out). Every other missing or unexpected key is an error that names it, and so is a
    shape that does not match.
    """
    ours = model.state_dict()
    converted = {}
    for key, value in hf_state.items():
        if key.endswith(HF_MASK_BUFFERS):
            continue  # a causal-mask buffer, not a weight
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        converted[name] = value.t() if _is_conv1d(name) else value
    if "lm_head.weight" not in converted and "transformer.wte.weight" in converted:
        converted["lm_head.weight"] = converted["transformer.wte.weight"]
    missing = sorted(set(ours) - set(converted))
    unexpected = sorted(set(converted) - set(ours))
    if missing or unexpected:
        raise KeyError(f"state dict does not match GPT({model.config}): missing keys {missing}, "
                       f"unexpected keys {unexpected}")
    if not torch.equal(converted["lm_head.weight"], converted["transformer.wte.weight"]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight, but this GPT ties them")
    for key, value in converted.items():
        if value.shape != ours[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(ours[key].shape)} in the model")
    with torch.no_grad():
        for key, value in converted.items():
            ours[key].copy_(value)  # state_dict() tensors share storage with the parameters
    return model


def from_hf_dir(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A GPT from a local Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``).

    Such a folder comes from ``GPT2LMHeadModel.save_pretrained(path)`` or from
    downloading ``openai-community/gpt2`` from the hub when you have a network.
    """
    model = GPT(config_from_hf(read_hf_config(path)))
    return load_hf_state_dict(model, read_hf_weights(path)).to(device)


def save_hf_dir(model: GPT, path: str | Path) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder that ``GPT2LMHeadModel.from_pretrained`` reads."""
    state = to_hf_state_dict(model)
    state.pop("lm_head.weight")  # tied to wte; HF re-ties it on load
    return write_hf_dir(path, hf_config_dict(model.config), state)


# The names nblib.llama uses, so that later lessons load and save either family alike.
load_hf = from_hf_dir
save_hf = save_hf_dir
