"""Direct preference optimisation (lesson 10), on ``nblib.engine`` and ``nblib.rl``.

DPO learns from the same preference pairs as the reward model of lesson 09, without a
reward model and without sampling: the policy's own log-probs, relative to a frozen
reference (the SFT model), are the reward (``rl.dpo_loss``).

- ``completion_logprobs``: log pi(completion | prompt) of every row of a ``prefs.PairBatch``,
  summed over the completion's tokens (the end token included).
- ``reference_logprobs``: the same under the frozen reference, computed once per pair
  before training (it never changes, so running it at every step would be wasted work).
- ``DPOBatch`` / ``collate``: pairs as one padded batch that carries its reference log-probs.
- ``DPOConfig``: beta and the training recipe; ``cfg.train_config(steps)`` is its ``TrainConfig``.
- ``make_loss_fn(cfg)``: the ``loss_fn`` for ``nblib.train`` (``Trainer.step`` or ``train(get_batch=...)``).
- ``implicit_reward_accuracy``: the share of held-out pairs whose chosen completion has the
  higher implicit reward beta * (log pi - log ref).

Rows are padded on the right, after their tokens: with causal attention no real token
sees the padding, so no attention mask is needed, and the mask of completion tokens
leaves the padding out of the sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from nblib import engine, prefs, rl, train


@dataclass(frozen=True)
class DPOConfig:
    """DPO's hyper-parameters: every DPO function that needs beta takes this."""

    beta: float = 0.1        # the KL price of the objective, and the scale of the implicit reward
    batch_size: int = 32     # pairs per step
    lr: float = 3e-4

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (e.g. 0.1), got {self.beta}")

    def train_config(self, steps: int, seed: int = 0) -> train.TrainConfig:
        """``steps`` steps of post-training's schedule (``nblib.train.finetune_config``), as the reward model's."""
        return train.finetune_config(steps, self.lr, self.batch_size, seed)


def completion_logprobs(model: nn.Module, batch: prefs.PairBatch, reply_logprobs=None) -> torch.Tensor:
    """[2B]: each row's log-prob of its completion tokens, summed (with gradient, in the model's mode).

    ``reply_logprobs(logits, ids, completion_mask) -> [2B]``, if given, sums them from the logits of one
    forward over the rows (lesson 10 passes the learner's); by default ``engine.sequence_logprobs`` does.
    """
    if batch.ids.shape[0] == 0:
        raise ValueError("an empty PairBatch: nothing to compute log-probs of")
    if reply_logprobs is not None:
        logits, _ = model(batch.ids)
        return reply_logprobs(logits, batch.ids, batch.completion_mask)
    summed, _ = engine.sequence_logprobs(model, batch.ids, batch.completion_mask)
    return summed


@torch.no_grad()
def reference_logprobs(ref: nn.Module, pairs: list[prefs.Pair], pad_id: int, batch_size: int = 64,
                       logprobs_fn=completion_logprobs) -> torch.Tensor:
    """[N, 2]: log ref(chosen) and log ref(rejected) of each pair, summed over the completion tokens.

    The frozen reference, run once in eval mode without gradients (its mode is restored after).
    Index it like the pairs: ``ref_logprobs[i]`` belongs to ``pairs[i]`` (see ``collate``).
    Any model's pair log-probs are computed the same way (``implicit_rewards`` uses it too), by
    ``logprobs_fn(model, pair_batch)`` (default ``completion_logprobs``; lesson 10 passes its pick).
    """
    if not pairs:
        raise ValueError("reference_logprobs needs at least one pair")
    was_training = ref.training
    ref.eval()
    device = next(ref.parameters()).device
    out = []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = prefs.collate_pairs(pairs[start:start + batch_size], pad_id).to(device)
            logprobs = logprobs_fn(ref, batch).float().cpu()
            B = batch.n_pairs
            out.append(torch.stack([logprobs[:B], logprobs[B:]], dim=1))
    finally:
        ref.train(was_training)
    return torch.cat(out)


@dataclass
class DPOBatch:
    """A ``PairBatch`` and its reference log-probs [2B], aligned with its rows (chosen rows, then rejected)."""

    pairs: prefs.PairBatch
    ref_logprobs: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.pairs.n_pairs


def collate(pairs: list[prefs.Pair], ref_logprobs: torch.Tensor, pad_id: int) -> DPOBatch:
    """``pairs`` and their rows of ``reference_logprobs`` ([N, 2]) as one ``DPOBatch``."""
    if not pairs:
        raise ValueError("collate needs at least one pair")
    if not torch.is_tensor(ref_logprobs) or tuple(ref_logprobs.shape) != (len(pairs), 2):
        shape = list(ref_logprobs.shape) if torch.is_tensor(ref_logprobs) else type(ref_logprobs).__name__
        raise ValueError(f"ref_logprobs must be [{len(pairs)}, 2] (chosen, rejected) for {len(pairs)} pairs, "
                         f"got {shape}: pass reference_logprobs(...)[picks] with the pairs' indices")
    rl.check_finite(ref_logprobs, "ref_logprobs", "recompute them with reference_logprobs(ref, pairs, ...) of a "
                    "reference model whose weights are finite")
    return DPOBatch(prefs.collate_pairs(pairs, pad_id), torch.cat([ref_logprobs[:, 0], ref_logprobs[:, 1]]))


def make_loss_fn(cfg: DPOConfig):
    """DPO's ``loss_fn(model, batch: DPOBatch) -> (loss, metrics)`` for ``nblib.train``, metrics from ``rl.dpo_loss``."""
    def dpo_batch_loss(model: nn.Module, batch: DPOBatch):
        logprobs = completion_logprobs(model, batch.pairs)
        ref = batch.ref_logprobs.to(logprobs.device)
        B = batch.n_pairs
        return rl.dpo_loss(logprobs[:B], logprobs[B:], ref[:B], ref[B:], cfg.beta)
    return dpo_batch_loss


@torch.no_grad()
def implicit_rewards(model: nn.Module, pairs: list[prefs.Pair], ref_logprobs: torch.Tensor, cfg: DPOConfig,
                     pad_id: int, batch_size: int = 64, logprobs_fn=completion_logprobs) -> torch.Tensor:
    """[N, 2]: beta * (log pi - log ref) of each pair's chosen and rejected completion (model in eval mode),
    log pi by ``logprobs_fn`` (as in ``reference_logprobs``)."""
    if not pairs:
        raise ValueError("no pairs to measure")
    if len(ref_logprobs) != len(pairs):
        raise ValueError(f"{len(ref_logprobs)} rows of reference log-probs for {len(pairs)} pairs: pass "
                         "reference_logprobs(ref, pairs, ...) of these very pairs")
    return cfg.beta * (reference_logprobs(model, pairs, pad_id, batch_size, logprobs_fn) - ref_logprobs)


def implicit_reward_accuracy(model: nn.Module, pairs: list[prefs.Pair], ref_logprobs: torch.Tensor, cfg: DPOConfig,
                             pad_id: int, batch_size: int = 64, logprobs_fn=completion_logprobs) -> float:
    """The share of ``pairs`` whose chosen completion has the higher implicit reward (ties count as wrong,
    so the reference itself scores 0, as ``reward.pair_accuracy`` counts an untrained reward model)."""
    rewards = implicit_rewards(model, pairs, ref_logprobs, cfg, pad_id, batch_size, logprobs_fn)
    return (rewards[:, 0] > rewards[:, 1]).float().mean().item()
