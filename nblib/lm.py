"""What every language model here shares (06 on): the loss and the positions of new tokens.

``nblib.gpt.GPT`` (lesson 06) and ``nblib.llama.Llama`` (lesson 07) follow one contract:
the same targets (-100 = no loss there), the same ``reduction`` and the same padding options
(``attention_mask``, ``positions``, a ``KVCache``). The two pieces of that contract that
are not attention live here, so that neither model family imports the other.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from nblib.kvcache import positions_from_mask


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, T, V] against ``targets`` [B, T], ignoring targets of -100.

    ``reduction="mean"``: the mean over the targets that are not -100 (a scalar);
    ``"none"``: one loss per token [B, T], 0 where the target is -100 (for masked sums).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none' (per token), got {reduction!r}")
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)
    return loss if reduction == "mean" else loss.view(targets.shape)


def token_positions(config, idx: torch.Tensor, start: int, attention_mask: torch.Tensor | None,
                    positions: torch.Tensor | None) -> torch.Tensor:
    """Positions of the new tokens: given, counted from the mask, or start ... start + T - 1."""
    B, T = idx.shape
    if positions is not None:
        if positions.shape not in ((B, T), (T,)):
            raise ValueError(f"positions must be [B, T] = {[B, T]} or [T], got {list(positions.shape)}")
        if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < config.block_size:
            raise ValueError(f"positions must lie in 0 ... block_size - 1 = {config.block_size - 1}, "
                             f"got {int(positions.min())} ... {int(positions.max())}")
        return positions
    if attention_mask is None:
        return torch.arange(start, start + T, device=idx.device)  # [T], the same for every row
    if attention_mask.shape != (B, start + T):
        raise ValueError(f"attention_mask must be [B, cache.pos + T] = {[B, start + T]} (every token so far), "
                         f"got {list(attention_mask.shape)}")
    return positions_from_mask(attention_mask)[:, start:]

