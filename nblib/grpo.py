"""GRPO (lesson 11): reinforcement learning with a verifiable reward, on ``nblib.engine`` and ``nblib.rl``.

One step:
1. **Groups.** ``prompts_per_step`` prompts, ``group_size`` replies to each, sampled by the
   policy at temperature 1 (``engine.generate(..., num_samples=G)``: rows i*G ... i*G+G-1
   are prompt i's group). We keep each token's log-prob under the policy that sampled it
   and under the frozen reference.
2. **Rewards.** ``reward_fn(i, completion)`` scores reply ``completion`` (token ids, the end
   token included when it wrote one) to prompt i: a program checks it (the answer is right
   or not), no reward model.
3. **Advantages.** Each reward minus its group's mean, over the group's std
   (``rl.group_advantages``); the group's mean replaces PPO's value model. A group whose
   rewards are all equal teaches nothing (all its advantages are 0).
4. **Update.** ``rl.grpo_loss``: the clipped ratio objective with the reply's advantage on
   each of its tokens, plus ``kl_coef`` times the k3 KL to the reference, averaged per
   reply, per token or by a constant; ``epochs`` passes in ``minibatches``, one
   ``nblib.train.Trainer`` step each (with one pass in one minibatch the ratio is 1 and the
   step is REINFORCE with the group's mean as baseline).

``health`` gives the signals to watch, ``pass_at_k`` the unbiased pass@k of a set of
samples (Chen et al. 2021): RL can only sharpen what the model can already sample.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn

from nblib import engine, rl, train
from nblib.progress import progress


@dataclass(frozen=True)
class GRPOConfig:
    prompts_per_step: int = 32
    group_size: int = 8            # replies per prompt (TRL's num_generations)
    max_new_tokens: int = 8
    clip: float = 0.2
    kl_coef: float = 0.0           # k3 KL to the reference in the loss (TRL's beta; 0 by default there too)
    scale_advantages: bool = True  # divide by the group's std (GRPO); False: only subtract the mean (Dr. GRPO)
    average: str = "sequence"      # rl.grpo_loss: "sequence" (GRPO), "token" (DAPO), "constant" (Dr. GRPO)
    epochs: int = 1                # passes over each step's groups
    minibatches: int = 1
    lr: float = 1e-3               # AdamW's learning rate, constant after the warmup
    warmup_steps: int = 0          # optimizer steps of linear warmup

    def train_config(self, steps: int) -> train.TrainConfig:
        """``steps`` steps of ``epochs x minibatches`` optimizer steps each (``nblib.train.rl_config``)."""
        return train.rl_config(steps * self.epochs * self.minibatches, self.lr, self.warmup_steps,
                               log_interval=10 ** 9)


@dataclass
class Groups:
    """One step's groups and everything the update needs, [N, T] aligned with ``ids`` (N = prompts x group_size)."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor            # reply tokens (the end token included)
    logprobs: torch.Tensor        # under the policy that sampled them
    ref_logprobs: torch.Tensor
    rewards: torch.Tensor         # [N]
    advantages: torch.Tensor      # [N]
    finished: torch.Tensor        # [N] the reply ended with the end token


@torch.no_grad()
def rollout(policy: nn.Module, ref: nn.Module, prompts: list[list[int]], reward_fn, cfg: GRPOConfig, end_id: int,
            pad_id: int, generator: torch.Generator | None = None) -> Groups:
    """Sample ``cfg.group_size`` replies to each prompt, reward them, and compute their advantages (steps 1-3)."""
    policy.eval()
    out = engine.generate(policy, prompts, cfg.max_new_tokens, num_samples=cfg.group_size, temperature=1.0,
                          stop_tokens=[end_id], pad_id=pad_id, generator=generator)
    if not out.completion_mask.any(dim=1).all():
        raise ValueError("a reply has no tokens: use max_new_tokens >= 1")
    _, logprobs = engine.sequence_logprobs(policy, out.ids, out.completion_mask, out.attention_mask)
    _, ref_logprobs = engine.sequence_logprobs(ref, out.ids, out.completion_mask, out.attention_mask)
    rewards = torch.tensor(score(reward_fn, out.completions(keep_stop=True), cfg.group_size), device=out.ids.device)
    advantages = rl.group_advantages(rewards, cfg.group_size, scale=cfg.scale_advantages)
    return Groups(out.ids, out.attention_mask, out.completion_mask, logprobs, ref_logprobs, rewards, advantages,
                  out.finished)


def score(reward_fn, completions: list[list[int]], group_size: int) -> list[float]:
    """``reward_fn(row // group_size, completion)`` of every reply, each a finite float, or a ValueError
    that names the first bad reply: one nan reward would turn every weight to nan in one update."""
    rewards = []
    for row, completion in enumerate(completions):
        r = reward_fn(row // group_size, completion)
        try:
            rewards.append(float(r))
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"reward_fn returned {r!r} for prompt {row // group_size}, reply {completion}: it must "
                             "return a number for every reply (e.g. 1.0 or 0.0)") from None
    bad = [row for row, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        first = bad[0]
        raise ValueError(f"reward_fn returned {rewards[first]} for {len(bad)} of {len(rewards)} replies (first: prompt "
                         f"{first // group_size}, reply {completions[first]}); return a finite float for every reply "
                         "(e.g. 1.0 right, 0.0 wrong)")
    return rewards


def make_loss_fn(cfg: GRPOConfig):
    """GRPO's ``loss_fn(policy, groups_minibatch) -> (loss, metrics)`` for ``nblib.train.Trainer.step``."""
    def grpo_batch_loss(policy: nn.Module, groups: Groups):
        _, logprobs = engine.sequence_logprobs(policy, groups.ids, groups.mask, groups.attention_mask)
        return rl.grpo_loss(logprobs, groups.logprobs, groups.ref_logprobs, groups.advantages, groups.mask,
                            cfg.clip, cfg.kl_coef, cfg.average, max_tokens=cfg.max_new_tokens)
    return grpo_batch_loss


def update(trainer, groups: Groups, cfg: GRPOConfig, generator: torch.Generator | None = None) -> list[dict]:
    """``cfg.epochs`` passes over ``groups`` in ``cfg.minibatches`` shuffled minibatches, one trainer step each."""
    return train.minibatch_steps(trainer, groups, make_loss_fn(cfg), cfg.epochs, cfg.minibatches, generator)


def step(trainer, ref: nn.Module, prompts: list[list[int]], reward_fn, cfg: GRPOConfig, end_id: int, pad_id: int,
         generator: torch.Generator | None = None) -> tuple[Groups, list[dict]]:
    """One GRPO step on ``trainer.model``: its groups (``rollout``), then its update; returns (the groups,
    one ``trainer.step`` result per optimizer step). ``run``'s default ``step``."""
    groups = rollout(trainer.model, ref, prompts, reward_fn, cfg, end_id, pad_id, generator)
    return groups, update(trainer, groups, cfg, generator)


@torch.no_grad()
def health(groups: Groups, group_size: int) -> dict[str, float]:
    """The signals to watch: mean reward, share of groups whose rewards are all equal (no signal),
    KL to the reference (k3, mean per reply token), reply length, share of replies that ended."""
    kl = rl.kl_estimate(groups.logprobs, groups.ref_logprobs, "k3", mask=groups.mask)
    return {"reward": groups.rewards.mean().item(),
            "all_equal": rl.all_equal_groups(groups.rewards, group_size).float().mean().item(),
            "kl": rl.masked_mean(kl, groups.mask).item(),
            "length": groups.mask.sum(1).float().mean().item(),
            "ended": groups.finished.float().mean().item()}


def run(policy: nn.Module, ref: nn.Module, draw, cfg: GRPOConfig, steps: int, end_id: int, pad_id: int,
        seed: int = 0, evaluate=None, eval_every: int = 0,
        desc: str = "GRPO", step=step) -> tuple[nn.Module, list[dict]]:
    """GRPO on a copy of ``policy``: ``steps`` steps, each on ``draw(rng, n)`` -> (``n`` prompts, their
    ``reward_fn``), drawn with random.Random(seed); one AdamW (``cfg.lr`` after a linear warmup of
    ``cfg.warmup_steps`` optimizer steps, then constant; gradient clipping 1). Adam's first steps move every
    weight by about ``lr`` whatever the gradient's size: the warmup keeps them from throwing the policy
    far from where it started.

    Returns (the trained policy in eval mode, one dict per step: ``health`` before the update, the
    update's mean ``clip_fraction``, and every ``eval_every`` steps, from step 0, ``evaluate(model)``'s
    entries for the model the step starts from: evaluate the returned policy for the end of the run).
    ``step(trainer, ref, prompts, reward_fn, cfg, end_id, pad_id, generator) -> (groups, results)`` takes
    each step (lesson 11's exercise 11.grpo_step); ``clip_fraction`` is logged when its results have one.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(policy)
    trainer = train.Trainer(model, cfg.train_config(steps))
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    log = []
    for i in progress(range(steps), desc=desc):
        prompts, reward_fn = draw(rng, cfg.prompts_per_step)
        evaluated = evaluate(model.eval()) if evaluate is not None and eval_every and i % eval_every == 0 else {}
        groups, results = step(trainer, ref, prompts, reward_fn, cfg, end_id, pad_id, generator)
        signals = {**health(groups, cfg.group_size), **evaluated}   # evaluated: the model this step started from
        if all("clip_fraction" in r for r in results):
            signals["clip_fraction"] = torch.stack([r["clip_fraction"] for r in results]).mean().item()
        log.append(signals)
    return model.eval(), log


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of a problem with ``c`` right answers among ``n`` samples: the chance that
    at least one of ``k`` of them, drawn without replacement, is right: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
