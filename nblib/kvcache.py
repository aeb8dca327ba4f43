"""The KV cache and the attention masks that both model families share (07 on).

Lesson 07 wrote the cache for Llama; ``nblib.gpt.GPT`` uses the same one, so that
``nblib.engine.generate`` runs either family. Lesson 08 on batches prompts of different
lengths: they are *left*-padded (every row's last prompt token is in the same column, so
one decode step serves all rows), and an ``attention_mask`` [B, S] (True = real token,
False = padding) keeps the padding out of attention and out of the position count.
``new_cache(model, rows, max_len)`` makes a cache in the model's dtype, on its device.
"""
from __future__ import annotations

import torch


class KVCache:
    """Every layer's keys and values for the tokens seen so far, preallocated.

    ``k`` and ``v`` are [n_layer, B, n_kv_heads, max_len, head_dim]; ``pos`` is how many
    slots are filled (the same for every row: with left padding a row's first slots may
    hold padding, which the attention mask hides). The model writes a layer's new
    keys/values with ``update`` and moves ``pos`` on once all layers have seen the new tokens.
    A batch of fewer rows than the cache holds fills its first rows (``repeat_rows``), and
    ``reset`` empties the cache for the next prompts without allocating anything.
    ``config`` needs ``n_layer``, ``n_head``, ``n_embd``, ``block_size`` and, for grouped-query
    attention, ``n_kv_heads`` (a config without it has one key/value head per query head).
    """

    def __init__(self, config, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        max_len = config.block_size if max_len is None else max_len
        if max_len > config.block_size:
            raise ValueError(f"max_len={max_len} is longer than the model's block_size={config.block_size}")
        n_kv_heads = getattr(config, "n_kv_heads", None) or config.n_head
        shape = (config.n_layer, batch_size, n_kv_heads, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v [b, n_kv_heads, T, d] in rows 0 ... b - 1 (b <= batch_size);
        return those rows' keys/values so far."""
        b, end = k.shape[0], self.pos + k.shape[2]
        if b > self.batch_size:
            raise ValueError(f"{b} rows do not fit a cache of {self.batch_size}: make one with more rows "
                             "(nblib.kvcache.new_cache)")
        self.k[layer, :b, :, self.pos:end] = k
        self.v[layer, :b, :, self.pos:end] = v
        return self.k[layer, :b, :, :end], self.v[layer, :b, :, :end]

    def repeat_rows(self, n: int) -> "KVCache":
        """The first ``batch_size / n`` rows, each ``n`` times: row i becomes rows i*n ... i*n + n - 1.

        Sampling n completions of a prompt prefills each prompt once, into the cache's first
        rows, then copies its keys and values, instead of running the same prompt n times.
        The copies are written into the cache's own memory, so a cache the caller made (and
        may reuse) stays the one in use.
        """
        if self.batch_size % n:
            raise ValueError(f"a cache of {self.batch_size} rows cannot hold {n} copies of each prompt: "
                             f"make it with (number of prompts) x {n} rows")
        filled = self.pos
        self.k[:, :, :, :filled] = self.k[:, :self.batch_size // n, :, :filled].repeat_interleave(n, dim=1)
        self.v[:, :, :, :filled] = self.v[:, :self.batch_size // n, :, :filled].repeat_interleave(n, dim=1)
        return self

    def reset(self) -> "KVCache":
        """Empty the cache for new prompts (the memory stays allocated; old slots are overwritten)."""
        self.pos = 0
        return self

    @property
    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() + self.v.nelement() * self.v.element_size()


def new_cache(model, batch_size: int, max_len: int | None = None) -> KVCache:
    """An empty ``KVCache`` for ``model`` (either family): ``batch_size`` rows of ``max_len``
    positions (default: the model's context), on the model's device, in its dtype."""
    param = next(model.parameters())
    return KVCache(model.config, batch_size, max_len=max_len, device=param.device, dtype=param.dtype)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position [B, S] counted over real tokens only: 0 for a row's first real token.

    Left padding shifts a row's prompt to the right; its first real token must still be
    position 0, or the same prompt would mean something else padded than alone. Padding
    gets position 0 too (clamped), which matters nowhere: nothing attends to it.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_mask(T: int, start: int = 0, key_mask: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for ``F.scaled_dot_product_attention`` with ``T`` new queries.

    The queries sit in slots ``start ... start + T - 1`` (``start`` = tokens already in the
    cache) and see every key slot up to their own. ``key_mask`` [B, start + T] (True = a real
    token) also hides padded keys; the result is then a boolean [B, 1, T, start + T]. A
    padded query would see no key at all (and softmax over nothing is NaN), so every
    query sees at least its own slot; what a padded position computes is never used.
    """
    if key_mask is None:
        if start == 0:
            return None, True  # plain causal attention, PyTorch's fused kernel
        if T == 1:
            return None, False  # one new token sees every cached key
        return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start), False
    S = start + T
    if key_mask.shape[-1] != S:
        raise ValueError(f"attention_mask covers {key_mask.shape[-1]} tokens, but the keys are {S} "
                         f"({start} in the cache + {T} new): pass the mask of every token so far")
    key_slot = torch.arange(S, device=key_mask.device)
    query_slot = torch.arange(start, S, device=key_mask.device)[:, None]
    allowed = (key_slot <= query_slot) & key_mask.bool()[:, None, :]  # [B, T, S]
    allowed = allowed | (key_slot == query_slot)  # its own slot, so no row is empty
    return allowed[:, None], False
