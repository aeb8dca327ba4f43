"""The math of preference learning and RL for language models (lessons 09-11).

Lesson 09 trains a reward model (``bradley_terry_loss``) and fine-tunes against it with
PPO (``gae``, ``ppo_policy_loss``, ``value_loss``, a per-token ``kl_estimate`` penalty);
lesson 10 skips the reward model with ``dpo_loss``; lesson 11 drops the value function
with GRPO (``group_advantages``, ``grpo_loss``). Sampling and log-probabilities live in ``nblib.engine``;
this module holds only the formulas, as pure tensor functions.

Conventions:

- Per-token tensors are [N, T], aligned with token positions as ``nblib.engine`` returns
  them: column t of ``Rollout.logprobs`` (or of ``sequence_logprobs(...)[1]``) is the
  log-prob of token t. One row is one sampled completion (with its prompt before it).
- ``mask`` [N, T] is a bool tensor, True on the completion tokens that count
  (``Rollout.completion_mask``). Everything outside the mask has no effect at all, on the
  values and on the gradients: it may hold garbage, even nan or inf. So the masked
  entries are *selected* with ``torch.where``, never multiplied by the mask (nan * 0 is
  nan), and selected *before* any exp or square (else the backward pass of the exp
  multiplies the zero gradient by an inf: nan again).
- Means over the mask are token-level: every masked token of the batch weighs the same,
  so a long completion counts more than a short one (``masked_mean``).
- Losses return a 0-d tensor; those with diagnostics return ``(loss, metrics)``, metrics
  being a dict of 0-d detached tensors: reading a number back (``.item()``) waits for the
  GPU, so the training loop does it only every few steps. A loss refuses an empty mask
  (there is nothing to learn from); that check is the one number a loss reads back.
- Sequence-level tensors (a completion's reward, DPO's summed log-probs) are [N].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- masks and means


def _check_mask(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Refuse a mask that is not bool, and per-token tensors whose shape is not the mask's."""
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        got = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True on the completion tokens that count), got {got}: "
                         "pass mask.bool(), or e.g. rollout.completion_mask")
    for name, x in tensors.items():
        if not torch.is_tensor(x) or x.shape != mask.shape:
            shape = list(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} has shape {shape} but mask has {list(mask.shape)}: per-token tensors "
                             "are [N, T], one column per token position, like the mask")


def _count(mask: torch.Tensor, what: str) -> torch.Tensor:
    """The number of masked tokens (a tensor), refusing 0: a mean over nothing is nan."""
    n = mask.sum()
    if n == 0:
        raise ValueError(f"no token in the mask: {what} has nothing to average over. Is every completion "
                         "empty, or the mask of the prompts passed instead of the completions'?")
    return n


def check_finite(x: torch.Tensor, name: str, fix: str, mask: torch.Tensor | None = None) -> None:
    """Refuse nan and inf in ``x`` (where ``mask`` is True: outside it anything goes, it is padding).

    One nan reward or score spreads through the advantages into every weight in one update;
    the error says where the first one is, how many there are, and ``fix``, what to do."""
    bad = ~torch.isfinite(x) if mask is None else mask & ~torch.isfinite(x)
    if bad.any():
        first = bad.nonzero()[0].tolist()
        counted = x.numel() if mask is None else int(mask.sum())
        raise ValueError(f"{name} hold {x[tuple(first)].item()} at {first} ({int(bad.sum())} of {counted}): {fix}")


def _float(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 sums and exps lose too much; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x[mask]) / count(mask): the mean of the masked entries, every one weighing the same.

    With ``dim``, the mean along that dimension (e.g. ``dim=1``: one mean per row); a slice
    with no masked entry gives 0 there. Without, the mean over the whole tensor, and an
    empty mask raises.
    """
    _check_mask(mask, x=x)
    total = torch.where(mask, x, 0).sum(dim)
    if dim is None:
        return total / _count(mask, "masked_mean")
    return total / mask.sum(dim).clamp(min=1)


def _masked_moments(x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population variance) of the masked entries of ``x`` (already 0 outside the mask)."""
    mean = x.sum() / n
    var = torch.where(mask, (x - mean) ** 2, 0).sum() / n
    return mean, var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; 0 outside the mask.

    mean and var (population: divided by the count, not count - 1) are over every masked
    entry of the batch. ``shift_mean=False`` adds the mean back: only the scale changes
    (used for rewards, whose sign means something). PPO whitens its advantages per batch,
    which keeps the step size the same whatever the scale of the rewards.
    """
    _check_mask(mask, x=x)
    n = _count(mask, "masked_whiten")
    x = torch.where(mask, _float(x), 0)
    mean, var = _masked_moments(x, mask, n)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(mask, white, 0)


# ---------------------------------------------------------------------------- KL to the reference


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the log-probs of tokens sampled from pi.

    With log_ratio = logprobs - ref_logprobs = log pi(x) - log ref(x), x ~ pi
    (Schulman, "Approximating KL divergence", 2020):

    - ``k1`` = log_ratio: unbiased (E_pi[k1] = KL), but noisy and negative for many tokens.
      PPO's per-token penalty (``reward - beta * k1``) uses it.
    - ``k2`` = log_ratio**2 / 2: biased, always >= 0; its expectation agrees with KL only
      to second order in the log-ratio, so it approximates KL for close distributions.
    - ``k3`` = exp(-log_ratio) - 1 + log_ratio: unbiased too (E_pi[ref/pi] = 1), always >= 0
      (e^-u >= 1 - u) and of lower variance. GRPO's KL term uses it.

    Returns [N, T] like its inputs. Pass ``mask`` when the values outside it may be
    garbage: they are then 0, and nothing (not even a nan) reaches the gradient.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {list(logprobs.shape)} and ref_logprobs {list(ref_logprobs.shape)} must have "
                         "the same shape: the log-probs of the same tokens under the policy and the reference")
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        _check_mask(mask, logprobs=logprobs)
        log_ratio = torch.where(mask, log_ratio, 0)  # before the exp: see the module docstring
    if kind == "k1":
        k = log_ratio
    elif kind == "k2":
        k = log_ratio ** 2 / 2
    elif kind == "k3":
        k = torch.expm1(-log_ratio) + log_ratio  # expm1(u) = e^u - 1, exact for small u
    else:
        raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")
    return k if mask is None else torch.where(mask, k, 0)


# ---------------------------------------------------------------------------- PPO


def _check_rewards_and_values(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
    check_finite(rewards, "rewards", "every reward inside the mask must be a finite number (is the reward model's "
                 "score nan, or a reward function's?)", mask)
    check_finite(values, "values", "the value model diverged: lower its learning rate, or clip its loss", mask)


@torch.no_grad()
def gae_reference(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, by its definition: one row, one token at a time.

    For each row, over its masked positions t (the completion, each token one step),
    from the last one backward, with V(after the last token) = 0 (the episode ends there)::

        delta_t = r_t + gamma * V(t+1) - V(t)          the one-step TD error
        A_t     = delta_t + gamma * lam * A_(t+1)     (A after the last token = 0)
        R_t     = A_t + V(t)                           the value function's target

    Returns (advantages, returns) [N, T], 0 outside the mask, without gradient.
    ``gae`` computes the same, vectorised; this one is the readable reference.
    """
    _check_mask(mask, rewards=rewards, values=values)
    _check_rewards_and_values(rewards, values, mask)
    advantages = torch.zeros(mask.shape, dtype=torch.promote_types(_float(rewards).dtype, values.dtype))
    for row in range(mask.shape[0]):
        next_value, next_advantage = 0.0, 0.0  # after the last token the episode has ended
        for t in reversed(mask[row].nonzero().flatten().tolist()):
            delta = float(rewards[row, t]) + gamma * next_value - float(values[row, t])
            next_advantage = delta + gamma * lam * next_advantage
            next_value = float(values[row, t])
            advantages[row, t] = next_advantage
    advantages = advantages.to(mask.device)
    returns = torch.where(mask, advantages + torch.where(mask, values, 0), 0)
    return advantages, returns


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation for every row at once (one loop over the columns).

    The same as ``gae_reference``: delta_t = r_t + gamma * V(t+1) - V(t), A_t = delta_t +
    gamma * lam * A_(t+1), R_t = A_t + V(t), over each row's masked tokens, V and A after
    the last one 0. ``rewards`` [N, T] are per token (PPO: -beta * KL on every token, the
    reward model's score added on the last one). ``lam`` trades bias (0: one-step TD,
    trusts V) for variance (1: the Monte Carlo return minus V). The language-model
    default gamma = 1: no discount within a completion of a few hundred tokens.

    Returns (advantages, returns) [N, T], 0 outside the mask, without gradient (they are
    targets, constants of the losses).
    """
    _check_mask(mask, rewards=rewards, values=values)
    _check_rewards_and_values(rewards, values, mask)
    dtype = torch.promote_types(_float(rewards).dtype, values.dtype)
    rewards = torch.where(mask, rewards, 0).to(dtype)
    values = torch.where(mask, values, 0).to(dtype)
    next_value = torch.zeros(mask.shape[0], dtype=dtype, device=mask.device)
    next_advantage = torch.zeros_like(next_value)
    columns = []
    for t in reversed(range(mask.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # a column outside the mask is no step: what comes after it passes through unchanged,
        # so after the completion V = A = 0, the episode's end
        next_value = torch.where(m, values[:, t], next_value)
        next_advantage = torch.where(m, advantage, next_advantage)
        columns.append(torch.where(m, advantage, 0))
    advantages = torch.stack(columns[::-1], dim=1) if columns else torch.zeros_like(values)
    return advantages, torch.where(mask, advantages + values, 0)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss: the mean over masked tokens of -min(ratio * A, clip(ratio) * A).

    ratio = exp(logprobs - old_logprobs) = pi(token) / pi_old(token), clip(ratio) =
    ratio clamped to [1 - clip, 1 + clip]. The min is the pessimistic bound: a token whose
    ratio already moved past the clip range in the direction its advantage pushes gets no
    gradient (it has been pushed enough this round); a move in the wrong direction is
    never clipped. At ratio 1 the gradient is the policy gradient, -A * grad(logprobs) / n.

    ``advantages`` [N, T] per token (PPO), or [N] one per completion (GRPO), and
    ``old_logprobs`` are constants (detached here). Returns (loss, metrics):
    ``clip_fraction`` (share of masked tokens whose clipped term is the one taken, so
    they get no gradient), ``approx_kl`` (the k3 estimate of KL(pi_old || pi), mean over
    tokens: how far this update moved) and ``ratio_mean``.
    """
    per_token, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip)
    n = _count(mask, "ppo_policy_loss")
    return per_token.sum() / n, metrics


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per token [N, T], -min(ratio * A, clip(ratio) * A) (0 outside the mask), and the metrics of
    ``ppo_policy_loss`` (means over the masked tokens). ``advantages`` [N, T], or [N] (one per
    completion, broadcast over its tokens). PPO and GRPO differ only in how they average it."""
    if torch.is_tensor(advantages) and advantages.dim() == 1 and logprobs.dim() == 2 \
            and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages[:, None].expand_as(logprobs)  # one advantage per completion
    _check_mask(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    if not clip > 0:
        raise ValueError(f"clip must be > 0 (e.g. 0.2), got {clip}")
    n = _count(mask, "the clipped objective")
    # detached: if old_logprobs were logprobs itself (one update per batch), the ratio would be
    # exp(0) = 1 with no gradient at all
    log_ratio = torch.where(mask, _float(logprobs) - old_logprobs.detach(), 0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, advantages.detach(), 0).to(ratio.dtype)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)  # 0 outside the mask: adv is 0
    with torch.no_grad():
        clipped_taken = mask & (((ratio > 1 + clip) & (adv > 0)) | ((ratio < 1 - clip) & (adv < 0)))
        metrics = {
            "clip_fraction": clipped_taken.sum() / n,
            "approx_kl": torch.where(mask, torch.expm1(log_ratio) - log_ratio, 0).sum() / n,  # r - 1 - log r
            "ratio_mean": torch.where(mask, ratio, 0).sum() / n,
        }
    return per_token, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean over masked tokens of max((v - R)^2, (v_clip - R)^2), v_clip = old_v + clamp(v - old_v, ±clip).

    The value head regresses on the returns R of ``gae``. The clipped term, like the
    policy's, keeps one update from moving a value further than ``clip`` from the value
    at sampling time (``old_values``): past it, the max takes the clipped term, whose
    gradient is 0. ``clip=None`` is the plain 0.5 * masked MSE. Returns (loss, metrics):
    ``value_clip_fraction``, the share of masked tokens where the clipped term is taken.
    """
    _check_mask(mask, values=values, old_values=old_values, returns=returns)
    n = _count(mask, "value_loss")
    v = torch.where(mask, _float(values), 0)
    old = torch.where(mask, old_values.detach(), 0).to(v.dtype)
    target = torch.where(mask, returns.detach(), 0).to(v.dtype)
    per_token = (v - target) ** 2  # 0 outside the mask: all three are 0 there
    clip_fraction = torch.zeros((), device=v.device)
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0 (e.g. 0.2), or None for no clipping; got {clip}")
        clipped = (old + (v - old).clamp(-clip, clip) - target) ** 2
        with torch.no_grad():
            clip_fraction = (mask & (clipped > per_token)).sum() / n
        per_token = torch.maximum(per_token, clipped)
    return 0.5 * per_token.sum() / n, {"value_clip_fraction": clip_fraction}


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - v) / Var(R) over the masked tokens: how much of the returns the values predict.

    1: perfect values; 0: no better than predicting the mean return; negative: worse.
    When the returns do not vary at all (Var(R) = 0, e.g. every reward equal), the
    fraction is undefined and this returns 0 ("explains nothing"), not nan, so that a
    logged curve stays plottable. A 0-d float tensor, without gradient.
    """
    _check_mask(mask, values=values, returns=returns)
    n = _count(mask, "explained_variance")
    v = torch.where(mask, _float(values), 0)
    target = torch.where(mask, _float(returns), 0)
    _, var_returns = _masked_moments(target, mask, n)
    _, var_residual = _masked_moments(target - v, mask, n)
    varies = var_returns > 0
    return torch.where(varies, 1 - var_residual / torch.where(varies, var_returns, 1), 0)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of H = -sum_v p_v log p_v, p = softmax(logits) ([N, T, V] logits).

    ``logits[:, t]`` must be the distribution that token t was drawn from, aligned like
    the log-probs: model(ids) at position t predicts token t + 1, so pass
    ``logits[:, :-1]`` with ``mask[:, 1:]``. A collapsing entropy is the first sign of a
    policy that stopped exploring. Differentiable (an entropy bonus).
    """
    if logits.dim() != 3 or logits.shape[:2] != mask.shape:
        raise ValueError(f"logits must be [N, T, V] with [N, T] the mask's shape {list(mask.shape)}, "
                         f"got {list(logits.shape)}")
    _check_mask(mask)
    n = _count(mask, "entropy_from_logits")
    logits = torch.where(mask[..., None], _float(logits), 0)  # garbage rows become uniform, then dropped
    logp = logits.log_softmax(dim=-1)
    p = logp.exp()
    # a token of probability 0 (a -inf logit) adds 0, not 0 * -inf = nan
    entropy = -(p * logp.masked_fill(p == 0, 0)).sum(dim=-1)
    return torch.where(mask, entropy, 0).sum() / n


# ---------------------------------------------------------------------------- preferences


def _check_pairs(what: str, **tensors: torch.Tensor) -> None:
    shapes = {name: list(x.shape) if torch.is_tensor(x) else type(x).__name__ for name, x in tensors.items()}
    if len({str(s) for s in shapes.values()}) != 1 or not all(torch.is_tensor(x) for x in tensors.values()):
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{what}: {listed} must be tensors of one shape [N], one entry per preference pair")
    if next(iter(tensors.values())).numel() == 0:
        raise ValueError(f"{what}: no pair in the batch: pass at least one (chosen, rejected) pair")


def bradley_terry_loss(r_chosen: torch.Tensor,
                       r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-mean(log sigmoid(r_chosen - r_rejected)): the reward model's loss on preference pairs.

    Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected); the loss is its
    negative log-likelihood. Only the difference counts, so rewards are defined up to a
    constant. ``F.logsigmoid`` is exact where log(sigmoid(d)) underflows (d << 0).
    Returns (loss, metrics): ``accuracy`` (share of pairs with r_chosen > r_rejected) and
    ``margin`` (mean r_chosen - r_rejected).
    """
    _check_pairs("bradley_terry_loss", r_chosen=r_chosen, r_rejected=r_rejected)
    margin = _float(r_chosen) - r_rejected
    loss = -F.logsigmoid(margin).mean()
    metrics = {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach()}
    return loss, metrics


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation: -mean(log sigmoid(beta * ((pc - rc) - (pr - rr)))).

    Inputs [N] are summed completion log-probs: pc = log pi(chosen), rc = log ref(chosen),
    likewise pr, rr for the rejected completion. beta * (log pi - log ref) is the reward
    implicit in the policy; the loss is Bradley-Terry's on those rewards. When the policy
    equals the reference, every logit is 0 and the loss is exactly ln 2. The gradient
    w.r.t. pc is -beta * sigmoid(-z) / N (z the logit): pairs the policy already ranks
    right weigh little. Returns (loss, metrics): ``chosen_reward`` and ``rejected_reward``
    (means of the implicit rewards), ``reward_accuracy`` (share of pairs whose chosen
    reward is higher), ``reward_margin`` (mean difference).
    """
    _check_pairs("dpo_loss", policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                 ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    chosen_reward = beta * (_float(policy_chosen) - ref_chosen)
    rejected_reward = beta * (_float(policy_rejected) - ref_rejected)
    logits = chosen_reward - rejected_reward
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        metrics = {"chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
                   "reward_accuracy": (logits > 0).float().mean(), "reward_margin": logits.mean()}
    return loss, metrics


# ---------------------------------------------------------------------------- GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's std + eps if ``scale``.

    ``rewards`` [N], grouped as consecutive rows: rows i*G ... i*G+G-1 are the G samples
    of prompt i (as ``nblib.engine.generate(..., num_samples=G)`` lays them out). The
    group's mean replaces PPO's value function as the baseline. std is the population
    std (unbiased=False). A group whose rewards are all equal (all right, all wrong)
    teaches nothing: its advantages are exactly 0. ``scale=False`` skips the division
    (Dr. GRPO: the std over-weights groups that are nearly all right or all wrong).
    Returns [N], without gradient (rewards are constants).
    """
    if not torch.is_tensor(rewards) or rewards.dim() != 1:
        shape = list(rewards.shape) if torch.is_tensor(rewards) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-d tensor [N], one per completion, got {shape}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of group_size={group_size}: rows "
                         "i*G ... i*G+G-1 are one prompt's samples, so N must be a multiple of group_size "
                         "(generate with num_samples=group_size)")
    check_finite(rewards, "rewards", "every reward must be a finite number (e.g. 1.0 right, 0.0 wrong)")
    r = _float(rewards.detach()).reshape(-1, group_size)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (r.std(dim=1, correction=0, keepdim=True) + eps)
    # exactly 0, not the rounding error of (r - mean(r)) / (tiny std + eps)
    return torch.where(all_equal_groups(r.reshape(-1), group_size)[:, None], 0, advantages).reshape(-1)


def all_equal_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N / group_size] bool: the groups (consecutive rows) whose rewards are all equal, which teach nothing."""
    r = rewards.reshape(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


GRPO_AVERAGES = ("sequence", "token", "constant")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2, kl_coef: float = 0.0,
              average: str = "sequence", max_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss: per token, the clipped surrogate with the completion's advantage
    (``group_advantages``), plus ``kl_coef`` times the k3 estimate of KL(pi || ref); then averaged:

    - ``"sequence"`` (the GRPO paper): each completion's mean over its own tokens, then the mean
      over completions. A token of a short completion weighs more than a token of a long one:
      a wrong (negative-advantage) answer is pushed down less per token the longer it is, a
      right one pushed up more the shorter it is (the length bias of Dr. GRPO, Liu et al. 2025).
    - ``"token"`` (DAPO, TRL's default ``loss_type="dapo"``): the mean over every token of the batch.
    - ``"constant"`` (Dr. GRPO): the sum over every token / (N * ``max_tokens``), a normaliser that
      depends on no completion's length.

    With ``old_logprobs`` = ``logprobs`` (ratio 1) and ``kl_coef`` 0, the gradient is REINFORCE with
    the group mean as baseline: -A_i * grad log pi(token) / (N * |y_i|) for "sequence". ``advantages`` [N];
    ``ref_logprobs`` [N, T] are constants (unused when ``kl_coef`` is 0). Returns (loss, metrics):
    ``ppo_policy_loss``'s metrics plus ``kl`` (k3, mean over tokens).
    """
    if average not in GRPO_AVERAGES:
        raise ValueError(f"average must be one of {GRPO_AVERAGES}, got {average!r}")
    if not torch.is_tensor(advantages) or advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        shape = list(advantages.shape) if torch.is_tensor(advantages) else type(advantages).__name__
        raise ValueError(f"advantages must be [N] = [{logprobs.shape[0]}], one per completion, got {shape}")
    per_token, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip)
    kl = kl_estimate(_float(logprobs), _float(ref_logprobs.detach()), "k3", mask=mask)
    if kl_coef:
        per_token = per_token + kl_coef * kl
    n_tokens = mask.sum(dim=1)
    if average == "sequence":
        if (n_tokens == 0).any():
            raise ValueError("a completion has no tokens in the mask: its mean over tokens is undefined")
        loss = (per_token.sum(dim=1) / n_tokens).mean()
    elif average == "token":
        loss = per_token.sum() / _count(mask, "grpo_loss")
    else:
        if max_tokens is None or max_tokens < int(n_tokens.max()):
            raise ValueError(f"average='constant' needs max_tokens >= the longest completion ({int(n_tokens.max())} "
                             f"tokens), e.g. the max_new_tokens of the rollout; got {max_tokens}")
        loss = per_token.sum() / (mask.shape[0] * max_tokens)
    metrics["kl"] = kl.detach().sum() / _count(mask, "grpo_loss")
    return loss, metrics
