"""PPO for a language model (lesson 09), every piece written out, on ``nblib.engine`` and ``nblib.rl``.

One iteration:
1. **Rollout.** The policy samples a completion for each prompt (``nblib.engine.generate``,
   stop at ``<|end|>``). We keep each token's log-prob under the policy, under the frozen
   reference (the SFT model), and the value model's estimate before each token.
2. **Rewards.** Each generated token t gets -kl_coef * (log pi(t) - log ref(t)) (the k1 KL
   estimate: a price for every nat the policy moves away from the reference), and the last
   token also gets the reward model's score of the whole reply.
3. **Advantages.** GAE over the completion tokens (``rl.gae``), whitened over the batch.
4. **Updates.** ``epochs`` passes over the rollouts in ``minibatches``: the clipped policy
   loss (``rl.ppo_policy_loss``) plus ``vf_coef`` times the clipped value loss
   (``rl.value_loss``), one ``nblib.train.Trainer`` step each.

``run`` is the whole loop, with the health signals recorded at every iteration.

The policy and the value model are two separate networks in one module (``ActorCritic``),
so that one optimizer, schedule and clipping serve both (the value model starts as the
reward model, as in lm-human-preferences). Log-probs are taken at temperature 1: PPO's ratio
must compare the distribution the tokens were sampled from.
"""
from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass

import torch
import torch.nn as nn

from nblib import engine, rl, train
from nblib.engine import last_token_index  # a reply's last token, where its score goes; also ppo.last_token_index
from nblib.progress import progress


@dataclass(frozen=True)
class PPOConfig:
    prompts_per_iter: int = 64    # rollouts per iteration (one completion per prompt)
    max_new_tokens: int = 48
    temperature: float = 1.0
    kl_coef: float = 0.1          # price per nat of KL to the reference, on every token
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2             # policy ratio clipping
    value_clip: float = 0.2
    vf_coef: float = 0.1
    epochs: int = 4
    minibatches: int = 2
    whiten_advantages: bool = True
    no_end_penalty: float | None = None  # replace the score of a reply that never ended (None: keep it)
    lr: float = 3e-4              # AdamW's constant learning rate, for the policy and the value model

    def train_config(self, iters: int) -> train.TrainConfig:
        """``iters`` iterations of ``epochs x minibatches`` optimizer steps (``nblib.train.rl_config``)."""
        return train.rl_config(iters * self.epochs * self.minibatches, self.lr, log_interval=50)


class ActorCritic(nn.Module):
    """The policy (a language model) and the value model (``nblib.reward.ScalarHead``), trained together."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


@dataclass
class Experience:
    """One iteration's rollouts and everything the updates need, [N, T] aligned with ``ids``."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor            # completion tokens (the end token included)
    logprobs: torch.Tensor        # under the policy that sampled them
    ref_logprobs: torch.Tensor
    values: torch.Tensor          # value before each token
    rewards: torch.Tensor         # per token: the KL price, plus the score on the last token
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor          # [N] the reward model's score of each reply
    finished: torch.Tensor        # [N] the reply ended with <|end|>


def token_values(value_model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, T]: the value model's estimate *before* each token (its output at the previous position)."""
    v = value_model(ids, attention_mask)
    return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)


def checked_scores(scores, n: int) -> torch.Tensor:
    """``score_fn``'s scores as float [n], refusing any other shape and nan or inf (a diverged reward model)."""
    if not torch.is_tensor(scores) or scores.shape != (n,):
        shape = list(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ValueError(f"score_fn must return one score per reply, [{n}], got {shape}")
    rl.check_finite(scores, "score_fn's scores (the reward model's)", "retrain the reward model (lower its "
                    "learning rate) or check score_fn: one nan score reaches every weight in one update")
    return scores.float()


def kl_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> torch.Tensor:
    """[N, T] per-token rewards: -kl_coef * (logprobs - ref_logprobs) on every reply token (``mask``), plus
    each reply's score [N] on its last token; 0 outside the mask (lesson 09's exercise 09.kl_rewards)."""
    rewards = -kl_coef * rl.kl_estimate(logprobs, ref_logprobs, "k1", mask=mask)
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    last = last_token_index(mask)
    rewards[torch.arange(len(last)), last] += scores
    return rewards


@torch.no_grad()
def rollout(ac: ActorCritic, ref: nn.Module, score_fn, prompts: list[list[int]], cfg: PPOConfig, end_id: int,
            pad_id: int, generator: torch.Generator | None = None, kl_rewards_fn=kl_rewards,
            gae_fn=rl.gae, whiten_fn=rl.masked_whiten) -> Experience:
    """Sample, score and price one batch of completions (steps 1-3 above).

    ``score_fn(ids, attention_mask, last) -> [N]`` scores whole sequences (the reward model).
    ``kl_rewards_fn`` (as ``kl_rewards``), ``gae_fn`` (as ``rl.gae``) and ``whiten_fn`` (as
    ``rl.masked_whiten``) may be a learner's.
    """
    ac.eval()
    out = engine.generate(ac.policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature,
                          stop_tokens=[end_id], pad_id=pad_id, generator=generator)
    ids, attn, mask = out.ids, out.attention_mask, out.completion_mask
    empty = ~mask.any(dim=1)
    if empty.any():  # cannot happen with max_new_tokens >= 1; a clear error beats a silent nan
        raise ValueError("a rollout produced no completion token: use max_new_tokens >= 1")
    _, logprobs = engine.sequence_logprobs(ac.policy, ids, mask, attn)
    _, ref_logprobs = engine.sequence_logprobs(ref, ids, mask, attn)
    values = token_values(ac.value, ids, attn)
    scores = checked_scores(score_fn(ids, attn, last_token_index(mask)), len(ids))
    if cfg.no_end_penalty is not None:
        scores = torch.where(out.finished, scores, torch.full_like(scores, cfg.no_end_penalty))
    rewards = kl_rewards_fn(logprobs, ref_logprobs, scores, mask, cfg.kl_coef)
    advantages, returns = gae_fn(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten_fn(advantages, mask)
    return Experience(ids, attn, mask, logprobs, ref_logprobs, values, rewards, advantages, returns, scores,
                      out.finished)


def ppo_loss(ac: ActorCritic, exp: Experience, cfg: PPOConfig):
    """PPO's loss on one minibatch: the clipped policy loss on the (already whitened) advantages plus
    ``cfg.vf_coef`` times the clipped value loss; returns (loss, metrics) (lesson 09's exercise 09.ppo_loss)."""
    _, logprobs = engine.sequence_logprobs(ac.policy, exp.ids, exp.mask, exp.attention_mask)
    policy = rl.ppo_policy_loss(logprobs, exp.logprobs, exp.advantages, exp.mask, cfg.clip)
    values = token_values(ac.value, exp.ids, exp.attention_mask)
    value = rl.value_loss(values, exp.values, exp.returns, exp.mask, cfg.value_clip)
    return policy[0] + cfg.vf_coef * value[0], _loss_metrics(policy, value)


def _loss_metrics(policy, value) -> dict:
    """(policy loss, its metrics) and (value loss, its metrics) as one dict of detached tensors."""
    (pg_loss, pg_metrics), (v_loss, v_metrics) = policy, value
    return {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), **pg_metrics, **v_metrics}


@torch.no_grad()
def update_metrics(logprobs: torch.Tensor, values: torch.Tensor, exp: Experience, cfg: PPOConfig) -> dict:
    """``ppo_loss``'s metrics (policy and value loss, clip fraction, approx KL, ...) from a minibatch's
    log-probs and values: for a learner's loss, whichever way it computed its loss."""
    return _loss_metrics(rl.ppo_policy_loss(logprobs, exp.logprobs, exp.advantages, exp.mask, cfg.clip),
                         rl.value_loss(values, exp.values, exp.returns, exp.mask, cfg.value_clip))


def make_loss_fn(cfg: PPOConfig, loss=ppo_loss):
    """PPO's ``loss_fn(ac, experience_minibatch) -> (loss, metrics)`` for ``nblib.train.Trainer.step``;
    ``loss(ac, exp, cfg)`` (as ``ppo_loss``) may be a learner's."""
    return functools.partial(loss, cfg=cfg)


def update(trainer, exp: Experience, cfg: PPOConfig, generator: torch.Generator | None = None,
           loss=ppo_loss) -> list[dict]:
    """``cfg.epochs`` passes over ``exp`` in ``cfg.minibatches`` shuffled minibatches, one trainer step each."""
    return train.minibatch_steps(trainer, exp, make_loss_fn(cfg, loss), cfg.epochs, cfg.minibatches, generator)


@torch.no_grad()
def health(exp: Experience, ac: ActorCritic | None = None) -> dict[str, float]:
    """The signals to watch: mean score, KL to the reference (nats per reply), reply length,
    share of replies that ended, explained variance of the values (before the update)."""
    kl_per_reply = (rl.kl_estimate(exp.logprobs, exp.ref_logprobs, "k1", mask=exp.mask)
                    .where(exp.mask, torch.zeros(())).sum(1))
    return {"score": exp.scores.mean().item(), "kl": kl_per_reply.mean().item(),
            "length": exp.mask.sum(1).float().mean().item(), "ended": exp.finished.float().mean().item(),
            "explained_variance": float(rl.explained_variance(exp.values, exp.returns, exp.mask))}


@torch.no_grad()
def mean_entropy(model: nn.Module, exp: Experience) -> float:
    """The policy's mean next-token entropy over the reply tokens (the logits at t - 1 drew token t)."""
    logits, _ = model(exp.ids[:, :-1], attention_mask=exp.attention_mask[:, :-1])
    return rl.entropy_from_logits(logits, exp.mask[:, 1:]).item()


def run(policy: nn.Module, reward_model: nn.Module, ref: nn.Module, prompts: list[list[int]], cfg: PPOConfig,
        iters: int, end_id: int, pad_id: int, seed: int = 0, extra=None, desc: str = "PPO",
        kl_rewards_fn=kl_rewards, gae_fn=rl.gae, loss=ppo_loss, update_fn=update,
        whiten_fn=rl.masked_whiten) -> tuple[nn.Module, list[dict]]:
    """PPO from copies of ``policy`` and ``reward_model`` (the value model starts as the reward model,
    which also scores the replies): ``iters`` iterations of ``cfg.prompts_per_iter`` prompts drawn with
    random.Random(seed), one AdamW (constant ``cfg.lr``, gradient clipping 1) for policy and value model.

    Returns (the trained policy in eval mode, one dict per iteration): ``health`` before the update,
    ``extra(exp)``'s entries (e.g. a true score), ``entropy``, and the update's mean ``clip_fraction``,
    ``approx_kl`` and ``value_loss``. ``kl_rewards_fn``, ``gae_fn``, ``whiten_fn`` (for ``rollout``), ``loss`` and ``update_fn``
    (``update(trainer, exp, cfg, generator, loss)``) are nblib's unless a learner's are passed (lesson 09).
    """
    torch.manual_seed(seed)
    ac = ActorCritic(copy.deepcopy(policy), copy.deepcopy(reward_model))
    trainer = train.Trainer(ac, cfg.train_config(iters))
    generator, draw = torch.Generator().manual_seed(seed), random.Random(seed)

    def score_fn(ids, attention_mask, last):
        return reward_model.score(ids, last, attention_mask)

    log = []
    for _ in progress(range(iters), desc=desc):
        exp = rollout(ac, ref, score_fn, [draw.choice(prompts) for _ in range(cfg.prompts_per_iter)], cfg, end_id,
                      pad_id, generator, kl_rewards_fn, gae_fn, whiten_fn)
        signals = health(exp)
        signals.update(extra(exp) if extra is not None else {})
        signals["entropy"] = mean_entropy(ac.policy, exp)
        results = update_fn(trainer, exp, cfg, generator, loss)
        for name in ("clip_fraction", "approx_kl", "value_loss"):
            signals[name] = torch.stack([r[name] for r in results]).mean().item()
        log.append(signals)
    return ac.policy.eval(), log
