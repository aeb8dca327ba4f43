"""A language model with a scalar head: the reward model of lesson 09 (and PPO's value model).

``ScalarHead(lm)`` keeps the language model's trunk and adds one linear layer that maps
the last hidden state at every position to a single number:

- as a **reward model**, the number at a reply's last token is its score (``score``),
  trained on preference pairs with the Bradley-Terry loss (``loss_fn``): the chosen reply
  should score higher than the rejected one;
- as a **value model** (PPO), the number at each position estimates the return from there
  on (``forward``).

The head starts at zero, so every reply scores 0 at first and the Bradley-Terry loss
starts at exactly ln 2. ``train_reward_model`` is lesson 09's recipe: every weight of a
copy of the language model trained with ``nblib.train`` on random pairs.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from nblib import prefs, rl, train


class ScalarHead(nn.Module):
    """``lm``'s trunk plus a linear head: one number per position."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        weight = next(lm.parameters())
        self.head = nn.Linear(lm.config.n_embd, 1, device=weight.device, dtype=weight.dtype)  # where the trunk is
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.lm.config

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, T] ids -> [N, T] numbers (the head on each position's last hidden state)."""
        _, _, hidden = self.lm(ids, attention_mask=attention_mask, return_hidden=True)
        return self.head(hidden).squeeze(-1)

    def score(self, ids: torch.Tensor, last: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N]: the number at position ``last[n]`` of row n (a reply's last token)."""
        return self(ids, attention_mask).gather(1, last[:, None]).squeeze(1)


def loss_fn(model: ScalarHead, batch: prefs.PairBatch, bradley_terry=rl.bradley_terry_loss):
    """The Bradley-Terry loss on a ``PairBatch`` for ``nblib.train``: ``(loss, metrics)``.

    ``bradley_terry(r_chosen, r_rejected)`` (as ``rl.bradley_terry_loss``) may be a learner's that returns
    the loss alone: the metrics (pair accuracy, margin) are then ``rl.bradley_terry_loss``'s."""
    batch = batch.to(next(model.parameters()).device)
    scores = model.score(batch.ids, batch.last)
    B = batch.n_pairs
    out = bradley_terry(scores[:B], scores[B:])
    if torch.is_tensor(out):  # the loss alone: the training curves still need the accuracy
        out = out, rl.bradley_terry_loss(scores[:B].detach(), scores[B:].detach())[1]
    return out


@torch.no_grad()
def pair_accuracy(model: ScalarHead, pairs: list[prefs.Pair], pad_id: int, batch_size: int = 256) -> float:
    """The share of ``pairs`` whose chosen completion the model scores higher (ties count as wrong)."""
    model.eval()
    right = 0
    for start in range(0, len(pairs), batch_size):
        batch = prefs.collate_pairs(pairs[start:start + batch_size], pad_id).to(next(model.parameters()).device)
        scores = model.score(batch.ids, batch.last)
        B = batch.n_pairs
        right += int((scores[:B] > scores[B:]).sum())
    return right / len(pairs)


@torch.no_grad()
def score_texts(model: ScalarHead, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                batch_size: int = 256) -> torch.Tensor:
    """[N] reward-model scores of prompt + completion rows (for rollouts and evals)."""
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) + list(c) for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        last = torch.tensor([len(r) - 1 for r in rows])
        device = next(model.parameters()).device
        out.append(model.score(ids.to(device), last.to(device)).cpu())
    return torch.cat(out)


def pair_batches(train_pairs: list[prefs.Pair], val_pairs: list[prefs.Pair], batch_size: int, pad_id: int):
    """A ``get_batch(split, generator)`` for ``nblib.train``: ``batch_size`` random pairs of the split
    ("train", or any other split name for the held-out pairs), as one ``prefs.PairBatch``."""
    def get_batch(split: str, generator: torch.Generator | None = None) -> prefs.PairBatch:
        source = train_pairs if split == "train" else val_pairs
        picks = torch.randint(0, len(source), (batch_size,), generator=generator).tolist()
        return prefs.collate_pairs([source[i] for i in picks], pad_id)
    return get_batch


@dataclass(frozen=True)
class RewardConfig:
    """Lesson 09's reward-model recipe."""

    steps: int = 300
    batch_size: int = 32      # pairs per step
    lr: float = 1e-3

    def train_config(self, seed: int = 0) -> train.TrainConfig:
        """Post-training's schedule (``nblib.train.finetune_config``: 5% warmup, cosine to lr/10, no weight decay)."""
        return train.finetune_config(self.steps, self.lr, self.batch_size, seed)


def train_reward_model(lm: nn.Module, train_pairs: list[prefs.Pair], val_pairs: list[prefs.Pair], pad_id: int,
                       cfg: RewardConfig = RewardConfig(), seed: int = 0, show_progress: bool = True,
                       bradley_terry=rl.bradley_terry_loss) -> tuple[ScalarHead, train.History]:
    """A ``ScalarHead`` on a copy of ``lm``, trained with the Bradley-Terry loss (``bradley_terry``: nblib's,
    or a learner's) by ``cfg``'s recipe; returns (the model in eval mode, its History)."""
    model = ScalarHead(copy.deepcopy(lm))
    history = train.train(model, None, None, cfg.train_config(seed),
                          get_batch=pair_batches(train_pairs, val_pairs, cfg.batch_size, pad_id),
                          loss_fn=functools.partial(loss_fn, bradley_terry=bradley_terry),
                          show_progress=show_progress)
    return model.eval(), history
