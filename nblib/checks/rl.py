"""Checks for lessons 09-11: GAE, PPO's clipped policy loss, the reward model's
Bradley-Terry loss, a reply's summed log-probability, DPO, and GRPO's advantages and loss.

Each check runs the learner's function on small seeded cases and compares with
``nblib.rl``. When an answer is off, the check computes the usual mistakes on the same
inputs (min and max exchanged, the mask forgotten, the reference model left out, ...)
and names the one the answer matches; otherwise it says expected vs got. A loss may be
returned alone or as ``(loss, metrics)``: the first element is the loss. Losses must be
tensors that gradients flow through, and the gradients are checked too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nblib import rl
from nblib.checks import CheckFailed, call_learner, expect_close, passed

ATOL, RTOL = 1e-5, 1e-4


def _loss(what: str, result) -> torch.Tensor:
    """The loss in a learner's result (the result itself, or the first element of a tuple), as a 0-d tensor."""
    if isinstance(result, (tuple, list)):
        if not result:
            raise CheckFailed(f"{what} returned an empty {type(result).__name__}: return the loss, or (loss, metrics)")
        result = result[0]
    if not torch.is_tensor(result):
        if isinstance(result, (int, float)) or type(result).__module__ == "numpy":
            raise CheckFailed(f"{what} returned a Python number ({result!r}), not a tensor: no gradient can flow "
                              "back through it. Return the tensor itself (no .item(), no float())")
        raise CheckFailed(f"{what}: expected the loss as a 0-d tensor, got {type(result).__name__}")
    if result.numel() != 1:
        raise CheckFailed(f"{what}: expected one number (a 0-d tensor), got shape {tuple(result.shape)}: "
                          "average into a single loss")
    return result.reshape(())


def _needs_grad(what: str, loss: torch.Tensor, inputs: str) -> None:
    if not loss.requires_grad:
        raise CheckFailed(f"{what}: the loss has no gradient (was it computed with .item(), float(), .detach() or "
                          f"under torch.no_grad()?): gradients must flow back to {inputs}")


def _close(a, b) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and bool(((a - b).abs() <= ATOL + RTOL * b.abs()).all())


def _diagnose(what: str, got, want, mistakes) -> None:
    """Pass if ``got`` is ``want``; else name the first mistake whose value ``got`` is; else expected vs got."""
    if _close(got, want):
        return
    for value, message in mistakes:
        if _close(got, value) and not _close(value, want):
            raise CheckFailed(f"{what}: {message} (expected {float(want):.6g}, got {float(got):.6g})")
    expect_close(what, got, want, atol=ATOL, rtol=RTOL)


def _masks() -> torch.Tensor:
    """Completions starting at different columns, of different lengths; row 0 runs to the last column."""
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for row, (start, end) in enumerate([(2, 10), (3, 7), (2, 5), (4, 9)]):
        mask[row, start:end] = True
    return mask


def _expect_dtype(what: str, got: torch.Tensor, dtype: torch.dtype) -> None:
    if got.dtype != dtype:
        raise CheckFailed(f"{what}: the inputs are {dtype}, the result is {got.dtype}: compute in the inputs' dtype "
                          "(no .float(), no float32 tensors made along the way)")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0).sum() / mask.sum()


# ---------------------------------------------------------------------------- GAE


def _gae_case(seed: int):
    """PPO-like rewards (a small KL penalty on every token, a score on the last one), a value on every position."""
    g = torch.Generator().manual_seed(seed)
    mask = _masks()
    rewards = torch.where(mask, 0.1 * torch.randn(mask.shape, generator=g), 0)
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # each row's last masked column
    rewards[torch.arange(mask.shape[0]), last] += torch.randn(mask.shape[0], generator=g)
    values = torch.randn(mask.shape, generator=g)  # a value head outputs one everywhere, padding too
    return rewards, values, mask


def _gae_result(what: str, result, shape) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise CheckFailed(f"{what} should return a tuple (advantages, returns), got {type(result).__name__}")
    out = []
    for name, x in zip(("advantages", "returns"), result):
        if not torch.is_tensor(x) or tuple(x.shape) != tuple(shape):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise CheckFailed(f"{what}: {name} should be a tensor of shape {tuple(shape)} like the rewards, got {got}")
        out.append(x.detach().double())
    return out[0], out[1]


def _gae_ignoring_mask(rewards, values, mask, gamma, lam):
    """The classic mistake: GAE over every column, bootstrapping from the padding, masked at the end."""
    T = rewards.shape[1]
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return torch.where(mask, advantages, 0)


def _gae_resetting_at_holes(rewards, values, mask, gamma, lam):
    """The mistake of treating a column outside the mask as the episode's end: the chain restarts after a hole."""
    advantages, next_value, next_advantage = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0]), 0
    for t in reversed(range(rewards.shape[1])):
        advantage = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        next_value, next_advantage = torch.where(mask[:, t], values[:, t], 0), torch.where(mask[:, t], advantage, 0)
        advantages[:, t] = next_advantage
    return advantages


def _holed_case():
    """Rows of 11, 1 and 0 reply tokens, and two with holes (columns outside the mask between reply tokens)."""
    g = torch.Generator().manual_seed(11)
    mask = torch.zeros(5, 11, dtype=torch.bool)
    for row, (start, end) in enumerate([(0, 11), (4, 5), (3, 3), (2, 9), (1, 10)]):
        mask[row, start:end] = True
    mask[3, 5] = mask[4, 3] = mask[4, 7] = False
    return torch.randn(mask.shape, generator=g), torch.randn(mask.shape, generator=g), mask


def _check_gae_holes(gae) -> None:
    rewards, values, mask = _holed_case()
    what = "gae(gamma=0.95, lam=0.9) on rows of 11, 1 and 0 tokens and two rows with holes in the mask"
    adv, ret = _gae_result(what, call_learner("gae", gae, rewards.clone(), values.clone(), mask.clone(), 0.95, 0.9),
                           mask.shape)
    want_adv, want_ret = (x.double() for x in rl.gae(rewards, values, mask, 0.95, 0.9))
    reset = _gae_resetting_at_holes(rewards.double(), values.double(), mask, 0.95, 0.9)
    if not _close(adv[mask], want_adv[mask]) and _close(adv[mask], reset[mask]):
        raise CheckFailed(f"{what}: your advantages restart after a hole (row 3, column 5 is outside the mask, "
                          "with reply tokens on both sides): a column outside the mask is no step, not the end. "
                          "Pass over it: keep next_value and next_advantage as they were there "
                          "(torch.where(inside, new, old)); only after the last masked token are they 0")
    expect_close(f"{what}: advantages", torch.where(mask, adv, 0), want_adv, atol=ATOL, rtol=RTOL)
    expect_close(f"{what}: returns", ret, want_ret, atol=ATOL, rtol=RTOL)


def _check_gae_junk(gae) -> None:
    rewards, values, mask = _gae_case(3)
    what = "gae with nan rewards and inf values outside the mask"
    got = call_learner("gae", gae, torch.where(mask, rewards, float("nan")), torch.where(mask, values, float("inf")),
                       mask.clone(), 0.99, 0.95)
    adv, ret = _gae_result(what, got, mask.shape)
    if not (torch.isfinite(adv).all() and torch.isfinite(ret).all()):
        raise CheckFailed(f"{what}: nan or inf reached the advantages or returns. Multiplying by the mask keeps "
                          "them (0 * nan = nan, 0 * inf = nan): select with torch.where(mask, x, 0) instead")
    want_adv, want_ret = rl.gae(rewards, values, mask, 0.99, 0.95)
    expect_close(f"{what}: advantages", adv, want_adv, atol=ATOL, rtol=RTOL)
    expect_close(f"{what}: returns", ret, want_ret, atol=ATOL, rtol=RTOL)


def check_gae(gae) -> None:
    """``gae(rewards, values, mask, gamma, lam) -> (advantages, returns)`` as ``nblib.rl.gae``.

    rewards, values [N, T] per token, mask [N, T] bool (each row's completion); the value
    after the last masked token is 0; returns = advantages + values; both 0 outside the mask.
    """
    for seed, gamma, lam in [(0, 1.0, 0.95), (1, 0.9, 0.7), (2, 0.99, 0.5)]:
        rewards, values, mask = _gae_case(seed)
        what = f"gae with gamma={gamma}, lam={lam}"
        got = call_learner("gae", gae, rewards.clone(), values.clone(), mask.clone(), gamma, lam)
        adv, ret = _gae_result(what, got, mask.shape)
        want_adv, want_ret = (x.double() for x in rl.gae(rewards, values, mask, gamma, lam))
        values64 = values.double()
        if not _close(adv[mask], want_adv[mask]):
            swapped = rl.gae(rewards, values, mask, lam, gamma)[0].double()
            if _close(adv[mask], swapped[mask]):
                raise CheckFailed(f"{what}: your advantages are GAE's with gamma and lam swapped. gamma discounts "
                                  "the next value in the TD error, delta_t = r_t + gamma * V(t+1) - V(t); the "
                                  "advantages add up with gamma * lam: A_t = delta_t + gamma * lam * A_(t+1)")
            junk = torch.randn(mask.shape, generator=torch.Generator().manual_seed(9))
            other_values = torch.where(mask, values, junk)  # the same values, other ones past the completion
            again = call_learner("gae", gae, rewards.clone(), other_values, mask.clone(), gamma, lam)
            leaked = not _close(_gae_result(what, again, mask.shape)[0][mask], adv[mask])
            if leaked or _close(adv[mask], _gae_ignoring_mask(rewards, values, mask, gamma, lam).double()[mask]):
                raise CheckFailed(f"{what}: your advantages depend on the values after the completion: you "
                                  "bootstrap past the end of the mask. The episode ends at the last masked token: "
                                  "there V(t+1) = 0 and A_(t+1) = 0, and nothing from the padding flows back")
            expect_close(f"{what}: advantages on the masked tokens [row, column]", torch.where(mask, adv, 0),
                         want_adv, atol=ATOL, rtol=RTOL)
        if not _close(ret[mask], (adv + values64)[mask]):
            off = torch.where(mask, (ret - adv - values64).abs(), 0)
            row, col = (int(i) for i in divmod(int(off.argmax()), mask.shape[1]))
            raise CheckFailed(f"{what}: returns must be advantages + values (the value function's targets, "
                              f"R_t = A_t + V(t)); at [row, column] = [{row}, {col}] expected "
                              f"{float(adv[row, col] + values64[row, col]):.6g}, got {float(ret[row, col]):.6g}")
        for name, x in (("advantages", adv), ("returns", ret)):
            if (x[~mask] != 0).any():
                raise CheckFailed(f"{what}: {name} outside the mask must be 0 (prompt and padding are no steps; "
                                  f"select with torch.where(mask, x, 0)), got up to {x[~mask].abs().max().item():.3g}")
    _check_gae_holes(gae)
    _check_gae_junk(gae)
    passed("gae")


# ---------------------------------------------------------------------------- PPO


def _ppo_case(seed: int):
    """Log-probs whose ratios go past the clip range both ways; finite junk outside the mask."""
    g = torch.Generator().manual_seed(seed)
    mask = _masks()
    old = -3 * torch.rand(mask.shape, generator=g)
    logprobs = old + 0.4 * torch.randn(mask.shape, generator=g)
    advantages = torch.randn(mask.shape, generator=g)
    junk = lambda: torch.randn(mask.shape, generator=g)  # noqa: E731
    return (torch.where(mask, logprobs, junk()), torch.where(mask, old, junk()),
            torch.where(mask, advantages, junk()), mask)


def _ppo_mistakes(logprobs, old, adv, mask, clip):
    ratio = (logprobs - old).exp()
    clipped = ratio.clamp(1 - clip, 1 + clip)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    n_rows = mask.any(1).sum()
    per_row = torch.where(mask, loss, 0).sum(1) / mask.sum(1).clamp(min=1)
    clip_adv = "clips the advantage instead of the ratio: clip the probability ratio, " \
               "torch.clamp(ratio, 1 - clip, 1 + clip) * A, so the policy cannot move far from the old one"
    over_all = "averages over every position; the loss is the mean over the masked tokens only " \
               "(prompt and padding must not count): divide by the number of masked tokens"
    return [
        (_masked_mean(-torch.maximum(ratio * adv, clipped * adv), mask),
         "takes the max of the two terms: PPO's objective is the min, the pessimistic bound (the loss is "
         "-min(ratio * A, clip(ratio) * A), i.e. max(-ratio * A, -clip(ratio) * A))"),
        (_masked_mean(-ratio * adv, mask), "has no clipping: the loss is -min(ratio * A, clip(ratio) * A)"),
        (_masked_mean(-torch.minimum(ratio * adv, ratio * adv.clamp(1 - clip, 1 + clip)), mask), clip_adv),
        (_masked_mean(-torch.minimum(ratio * adv, ratio * adv.clamp(-clip, clip)), mask), clip_adv),
        (_masked_mean(-torch.minimum(ratio * adv, adv.clamp(1 - clip, 1 + clip)), mask), clip_adv),
        (torch.where(mask, loss, 0).sum() / mask.numel(), over_all),
        (loss.mean(), over_all),
        (loss.sum() / mask.sum(), "counts the tokens outside the mask in the sum: select the masked tokens "
                                  "(torch.where(mask, loss, 0)) before adding them up"),
        (per_row.sum() / n_rows, "averages each completion, then the completions: here every masked token of "
                                 "the batch weighs the same (sum over the masked tokens / their number)"),
        (_masked_mean(-torch.minimum(adv / ratio, adv * (1 / ratio).clamp(1 - clip, 1 + clip)), mask),
         "inverts the ratio: ratio = exp(logprobs - old_logprobs) = pi_new / pi_old"),
        (_masked_mean(-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv), mask),
         f"clips to [0.8, 1.2] whatever the clip argument ({clip} here): use 1 - clip and 1 + clip"),
    ]


def check_ppo_policy_loss(ppo_policy_loss) -> None:
    """``ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip)`` -> loss (or (loss, metrics)).

    The mean over masked tokens of -min(ratio * A, clamp(ratio, 1 - clip, 1 + clip) * A),
    ratio = exp(logprobs - old_logprobs). The inputs hold junk outside the mask.
    """
    for seed, clip in [(0, 0.2), (1, 0.1)]:
        logprobs, old, adv, mask = _ppo_case(seed)
        what = f"ppo_policy_loss with clip={clip}"
        leaf = logprobs.clone().requires_grad_(True)
        loss = _loss(what, call_learner("ppo_policy_loss", ppo_policy_loss, leaf, old.clone(), adv.clone(),
                                        mask.clone(), clip))
        want, _ = rl.ppo_policy_loss(logprobs, old, adv, mask, clip)
        _diagnose(what, loss.detach(), want, _ppo_mistakes(logprobs, old, adv, mask, clip))
        _needs_grad(what, loss, "logprobs")
        loss.backward()
        if leaf.grad is None:
            raise CheckFailed(f"{what}: no gradient reached logprobs: compute the ratio from the logprobs argument")
        want_leaf = logprobs.clone().requires_grad_(True)
        rl.ppo_policy_loss(want_leaf, old, adv, mask, clip)[0].backward()
        expect_close(f"{what}: gradient w.r.t. logprobs", leaf.grad, want_leaf.grad, atol=1e-6, rtol=RTOL)
    logprobs, old, adv, mask = _ppo_case(2)
    what = "ppo_policy_loss with nan logprobs, -inf old_logprobs and inf advantages outside the mask"
    leaf = torch.where(mask, logprobs, float("nan")).requires_grad_(True)
    loss = _loss(what, call_learner("ppo_policy_loss", ppo_policy_loss, leaf, torch.where(mask, old, -math.inf),
                                    torch.where(mask, adv, math.inf), mask.clone(), 0.2))
    _expect_finite_loss_and_grad(what, loss, leaf)
    expect_close(what, loss.detach(), rl.ppo_policy_loss(logprobs, old, adv, mask, 0.2)[0], atol=ATOL, rtol=RTOL)
    passed("ppo_policy_loss")


def _expect_finite_loss_and_grad(what: str, loss: torch.Tensor, leaf: torch.Tensor) -> None:
    """Junk (nan, inf) outside the mask must reach neither the loss nor the gradient."""
    if not torch.isfinite(loss.detach()):
        raise CheckFailed(f"{what}: the loss is {loss.item()}: nan or inf outside the mask got in. Multiplying by the "
                          "mask keeps them (0 * nan = nan): select the masked tokens with torch.where(mask, x, 0) "
                          "before any exp, never x * mask")
    _needs_grad(what, loss, "logprobs")
    loss.backward()
    if leaf.grad is None or not torch.isfinite(leaf.grad).all():
        raise CheckFailed(f"{what}: the gradient w.r.t. logprobs holds nan (or none reached it): select with "
                          "torch.where(mask, x, 0) *before* the exp, so nothing from outside the mask reaches the "
                          "backward pass (the gradient of exp(nan) times 0 is still nan)")


# ---------------------------------------------------------------------------- Bradley-Terry


def check_bradley_terry_loss(bradley_terry_loss) -> None:
    """``bradley_terry_loss(r_chosen, r_rejected)`` -> -mean(log sigmoid(r_chosen - r_rejected)), or (loss, metrics)."""
    g = torch.Generator().manual_seed(0)
    r_chosen, r_rejected = 2 * torch.randn(8, generator=g), 2 * torch.randn(8, generator=g)
    what = "bradley_terry_loss"
    leaves = [r_chosen.clone().requires_grad_(True), r_rejected.clone().requires_grad_(True)]
    loss = _loss(what, call_learner(what, bradley_terry_loss, *leaves))
    want, _ = rl.bradley_terry_loss(r_chosen, r_rejected)
    d = r_chosen - r_rejected
    no_log = "the log is missing: the loss is the negative log-likelihood -log sigmoid(r_chosen - r_rejected) " \
             "(use F.logsigmoid), not a probability"
    _diagnose(what, loss.detach(), want, [
        (-F.logsigmoid(-d).mean(), "the sign is swapped: P(chosen is preferred) = sigmoid(r_chosen - r_rejected), so "
                                   "the loss -log sigmoid(r_chosen - r_rejected) is small when chosen scores higher"),
        (-torch.sigmoid(d).mean(), no_log), (torch.sigmoid(-d).mean(), no_log),
        (-F.logsigmoid(d).sum(), "sums over the pairs: take the mean, so the loss does not grow with the batch"),
    ])
    _needs_grad(what, loss, "r_chosen and r_rejected")
    loss.backward()
    want_leaves = [r_chosen.clone().requires_grad_(True), r_rejected.clone().requires_grad_(True)]
    rl.bradley_terry_loss(*want_leaves)[0].backward()
    for name, leaf, ref in zip(("r_chosen", "r_rejected"), leaves, want_leaves):
        if leaf.grad is None:
            raise CheckFailed(f"{what}: no gradient reached {name}")
        expect_close(f"{what}: gradient w.r.t. {name}", leaf.grad, ref.grad, atol=1e-6, rtol=RTOL)
    # far apart rewards: log(sigmoid(-200)) is log(0) in float32, F.logsigmoid is exact
    far = _loss(what, call_learner(what, bradley_terry_loss, torch.tensor([-100.0]), torch.tensor([100.0])))
    if not torch.isfinite(far):
        raise CheckFailed(f"{what}: r_chosen=-100, r_rejected=100 gives {far.item()}: log(sigmoid(-200)) "
                          "underflows to log(0). Use F.logsigmoid(r_chosen - r_rejected), which is exact")
    expect_close(f"{what} with r_chosen=-100, r_rejected=100", far.detach(), 200.0, atol=1e-3, rtol=RTOL)
    passed("bradley_terry_loss")


# ---------------------------------------------------------------------------- DPO


def _dpo_mistakes(pc, pr, rc, rr, beta):
    z = (pc - rc) - (pr - rr)
    return [
        (-F.logsigmoid(beta * (pc - pr)).mean(),
         "forgets the reference model: the implicit reward is beta * (log pi(y|x) - log pi_ref(y|x)), so the "
         "logit is beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))"),
        (-beta * F.logsigmoid(z).mean(),
         "applies beta outside the sigmoid: beta scales the log-ratio difference inside it, "
         "-log sigmoid(beta * ((pc - rc) - (pr - rr)))"),
        (-F.logsigmoid(z).mean(), f"ignores beta (={beta}): the logit is beta * ((pc - rc) - (pr - rr))"),
        (-F.logsigmoid(-beta * z).mean(), "has chosen and rejected swapped: the loss must fall as the chosen "
                                          "completion gains probability relative to the reference"),
        (-torch.sigmoid(beta * z).mean(), "the log is missing: -log sigmoid(...) (F.logsigmoid), not -sigmoid(...)"),
        (-F.logsigmoid(beta * z).sum(), "sums over the pairs: take the mean"),
    ]


def check_dpo_loss(dpo_loss) -> None:
    """``dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)`` -> loss (or (loss, metrics)).

    Inputs [N] are summed completion log-probs; the loss is
    -mean(log sigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))).
    """
    g = torch.Generator().manual_seed(0)
    logprob = lambda: -5 - 40 * torch.rand(6, generator=g)  # noqa: E731 (summed log-probs of completions)
    # the policy before any step is the reference: every logit is 0, the loss ln 2
    pc, pr = logprob(), logprob()
    beta = 0.1
    what = "dpo_loss with policy = reference (every logit is 0: the loss must be ln 2 = 0.693147)"
    loss = _loss(what, call_learner("dpo_loss", dpo_loss, pc.clone(), pr.clone(), pc.clone(), pr.clone(), beta))
    _diagnose(what, loss.detach(), math.log(2), _dpo_mistakes(pc, pr, pc, pr, beta))
    for beta in (0.1, 0.5):
        pc, pr, rc, rr = logprob(), logprob(), logprob(), logprob()
        what = f"dpo_loss with beta={beta}"
        leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
        loss = _loss(what, call_learner("dpo_loss", dpo_loss, *leaves, rc.clone(), rr.clone(), beta))
        want, _ = rl.dpo_loss(pc, pr, rc, rr, beta)
        _diagnose(what, loss.detach(), want, _dpo_mistakes(pc, pr, rc, rr, beta))
        _needs_grad(what, loss, "policy_chosen and policy_rejected")
        loss.backward()
        want_leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
        rl.dpo_loss(*want_leaves, rc, rr, beta)[0].backward()
        for name, leaf, ref in zip(("policy_chosen", "policy_rejected"), leaves, want_leaves):
            if leaf.grad is None:
                raise CheckFailed(f"{what}: no gradient reached {name}")
            expect_close(f"{what}: gradient w.r.t. {name}", leaf.grad, ref.grad, atol=1e-7, rtol=RTOL)
    # far apart: the logit 0.2 * (-5000 + 10) = -998, where log(sigmoid(-998)) is log(0) in float32
    what = "dpo_loss with policy_chosen=-5000, the rest -10, beta=0.2 (a logit of -998)"
    far = _loss(what, call_learner("dpo_loss", dpo_loss, torch.tensor([-5000.0]), torch.tensor([-10.0]),
                                   torch.tensor([-10.0]), torch.tensor([-10.0]), 0.2))
    if not torch.isfinite(far):
        raise CheckFailed(f"{what}: got {far.item()}: log(sigmoid(-998)) underflows to log(0). "
                          "Use F.logsigmoid, which is exact for any logit")
    expect_close(what, far.detach(), 998.0, atol=1e-2, rtol=RTOL)
    passed("dpo_loss")


def _reply_logprobs(logits, ids, mask):
    """The reference: log p(ids[:, t] | logits[:, t - 1]) summed over the masked columns (by cross-entropy)."""
    taken = -F.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    return torch.where(mask[:, 1:], taken, 0.0).sum(-1)


def _reply_mistakes(logits, ids, mask):
    logp = logits.double().log_softmax(-1)
    same_column = logp.gather(-1, ids[..., None]).squeeze(-1)          # logits[:, t] scored against ids[:, t]
    shifted = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    probs = logits.double().softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    wrong_dim = logits.double().log_softmax(1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return [
        (torch.where(mask, same_column, 0.0).sum(-1),
         "scores each token with the logits of its own column: logits[:, t] predict the *next* token, ids[:, t + 1], "
         "so pair logits[:, :-1] with ids[:, 1:] (and the mask's columns 1:)"),
        (torch.where(mask[:, :-1], shifted, 0.0).sum(-1),
         "shifts the logits and ids but not the mask: the log-prob of ids[:, t + 1] counts where completion_mask[:, t + 1] "
         "is True, so use completion_mask[:, 1:]"),
        (shifted.sum(-1), "sums over every position, the prompt and the padding too: keep only the reply's tokens "
                          "(completion_mask)"),
        (torch.where(mask[:, 1:], shifted, 0.0).sum(-1) / mask[:, 1:].sum(-1),
         "averages over the reply's tokens: DPO compares whole replies, log pi(y|x) = the *sum* of their log-probs"),
        (torch.where(mask[:, 1:], probs, 0.0).sum(-1), "sums probabilities: take the log-softmax, not the softmax"),
        (torch.where(mask[:, 1:], wrong_dim, 0.0).sum(-1),
         "normalises over the wrong dimension: the log-softmax runs over the vocabulary, dim=-1"),
    ]


def check_reply_logprobs(reply_logprobs) -> None:
    """``reply_logprobs(logits, ids, completion_mask)`` -> [N]: each row's log-probs summed over its reply tokens,
    ``logits[:, t]`` predicting ``ids[:, t + 1]``."""
    g = torch.Generator().manual_seed(0)
    N, T, V = 4, 9, 11
    for dtype in (torch.float32, torch.float64):
        logits = 3 * torch.randn(N, T, V, generator=g, dtype=dtype)
        ids = torch.randint(0, V, (N, T), generator=g)
        starts, ends = torch.tensor([2, 3, 1, 4]), torch.tensor([9, 6, 8, 5])   # right padding after each end
        cols = torch.arange(T)
        mask = (cols >= starts[:, None]) & (cols < ends[:, None])
        ids = torch.where(cols < ends[:, None], ids, 0)
        what = f"reply_logprobs on {N} rows of {T} {dtype} logits (replies of {(ends - starts).tolist()} tokens)"
        leaf = logits.clone().requires_grad_(True)
        got = call_learner("reply_logprobs", reply_logprobs, leaf, ids.clone(), mask.clone())
        if not torch.is_tensor(got) or got.shape != (N,):
            shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
            raise CheckFailed(f"{what}: expected a tensor of shape ({N},), one summed log-prob per row, got {shape}")
        _expect_dtype(what, got, dtype)
        want = _reply_logprobs(logits, ids, mask)
        for value, message in _reply_mistakes(logits, ids, mask):
            if _close(got.detach(), value) and not _close(value, want):
                raise CheckFailed(f"{what}: {message}")
        expect_close(what, got.detach(), want, atol=1e-4, rtol=RTOL)
        if not got.requires_grad:
            raise CheckFailed(f"{what}: the result has no gradient (.item(), .detach() or torch.no_grad()?): DPO trains "
                              "the policy through these log-probs")
        got.sum().backward()
        want_leaf = logits.clone().double().requires_grad_(True)
        _reply_logprobs(want_leaf, ids, mask).sum().backward()
        expect_close(f"{what}: gradient w.r.t. the logits", leaf.grad, want_leaf.grad, atol=1e-5, rtol=RTOL)
    passed("reply_logprobs")


# ---------------------------------------------------------------------------- GRPO


def check_group_advantages(group_advantages) -> None:
    """``group_advantages(rewards, group_size, scale=True)`` -> [N]: each reward minus its group's mean,
    over the group's std (population) + 1e-6 when ``scale``; rows i*G ... i*G+G-1 are one group."""
    cases = [torch.tensor([0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 3.0, 1.0, 1.0]),    # 3 groups of 3: one group all 0
             torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])]          # 2 groups of 4
    # first the case where the usual mistakes all differ: in the second, the batch's population std (0.5) is
    # each group's sample std too, so one answer would fit two mistakes
    for rewards, G in zip(cases, (3, 4)):
        for scale in (True, False):
            what = f"group_advantages(rewards={rewards.tolist()}, group_size={G}, scale={scale})"
            got = call_learner("group_advantages", group_advantages, rewards.clone(), G, scale)
            if not torch.is_tensor(got) or got.shape != rewards.shape:
                shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
                raise CheckFailed(f"{what}: expected a tensor of shape {tuple(rewards.shape)}, one advantage per "
                                  f"reply, got {shape}")
            want = rl.group_advantages(rewards, G, scale=scale)
            r = rewards.double().view(-1, G)
            centred = r - r.mean(1, keepdim=True)
            mistakes = [
                (rewards.double() - rewards.double().mean(), "subtracts the mean of the whole batch: each reply is "
                 "compared with its own group, the other replies to the same prompt (rows i*G ... i*G+G-1)"),
                ((rewards.double().view(G, -1) - rewards.double().view(G, -1).mean(0)).reshape(-1),
                 "groups the wrong rows: rows i*G ... i*G+G-1 are prompt i's replies, so view(-1, group_size)"),
            ]
            if scale:
                own_std = "scale each group by its own std, the population std of its group_size rewards: " \
                          "rewards.view(-1, group_size).std(dim=1, correction=0, keepdim=True)"
                mistakes += [
                    ((centred / (rewards.double().std(correction=0) + 1e-6)).reshape(-1),
                     f"divides by the std of the whole batch: {own_std}"),
                    ((centred / (rewards.double().std() + 1e-6)).reshape(-1),
                     f"divides by the (sample) std of the whole batch: {own_std}"),
                    ((centred / (r.std(1, keepdim=True) + 1e-6)).reshape(-1),
                     "divides by the sample std (n - 1): use the population std, std(correction=0)"),
                    (centred.reshape(-1), "does not divide by the std although scale=True"),
                ]
            else:
                mistakes.append(((centred / (r.std(1, correction=0, keepdim=True) + 1e-6)).reshape(-1),
                                 "divides by the std although scale=False (Dr. GRPO only subtracts the mean)"))
            got64 = got.detach().double()
            if not torch.isfinite(got64).all():
                raise CheckFailed(f"{what}: contains nan or inf: a group whose rewards are all equal has std 0; "
                                  "add eps to the std (and its advantages are 0 anyway)")
            for value, message in mistakes:
                if _close(got64, value) and not _close(value, want):
                    raise CheckFailed(f"{what}: {message}")
            expect_close(what, got64, want, atol=1e-5, rtol=RTOL)
    passed("group_advantages")


def _grpo_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    N, T = 6, 8
    cols = torch.arange(T)
    starts = torch.randint(1, 3, (N,), generator=g)
    ends = torch.minimum(starts + 1 + torch.randint(0, 6, (N,), generator=g), torch.tensor(T))
    mask = (cols >= starts[:, None]) & (cols < ends[:, None])
    logprobs = -3 * torch.rand(N, T, generator=g)
    old = logprobs + 0.3 * torch.randn(N, T, generator=g)      # some ratios leave [0.8, 1.2]
    ref = logprobs + 0.5 * torch.randn(N, T, generator=g)
    junk = torch.full((N, T), float("nan"))
    advantages = torch.randn(N, generator=g)
    return (torch.where(mask, logprobs, junk), torch.where(mask, old, junk), torch.where(mask, ref, junk),
            advantages, mask)


def _grpo_mistakes(logprobs, old, ref, adv, mask, clip, kl_coef):
    lp, o, rf = (torch.where(mask, x, 0.0).double() for x in (logprobs, old, ref))
    a = adv.double()[:, None]
    ratio = torch.exp(lp - o)
    surrogate = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    k3 = torch.exp(rf - lp) - 1 - (rf - lp)
    n = mask.sum(1)

    def seq(per_token):
        return (torch.where(mask, per_token, 0.0).sum(1) / n).mean()

    def tok(per_token):
        return torch.where(mask, per_token, 0.0).sum() / mask.sum()

    return [
        (tok(surrogate + kl_coef * k3), "averages over all the tokens of the batch: GRPO takes each reply's mean "
                                        "over its own tokens, then the mean over the replies"),
        (seq(-torch.maximum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a) + kl_coef * k3),
         "takes the max of the two terms: the objective is the min (the pessimistic bound), the loss its negative"),
        (seq(surrogate + kl_coef * (lp - rf)), "uses the k1 estimate log pi - log ref for the KL: GRPO uses k3, "
                                               "exp(log ref - log pi) - 1 - (log ref - log pi), never negative"),
        (seq(surrogate - kl_coef * k3), "subtracts the KL term: the loss pays kl_coef * KL, so it is added"),
        (seq(surrogate), f"leaves out the KL term (kl_coef={kl_coef})"),
        (seq(-ratio * a + kl_coef * k3), "does not clip the ratio: min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A)"),
    ]


def check_grpo_loss(grpo_loss) -> None:
    """``grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip, kl_coef)`` -> loss (or
    (loss, metrics)): per token -min(ratio * A, clip(ratio) * A) + kl_coef * k3, each reply's mean over
    its tokens, then the mean over replies (``nblib.rl.grpo_loss`` with average="sequence")."""
    for seed, clip, kl_coef, dtype in [(0, 0.2, 0.0, torch.float32), (1, 0.2, 0.1, torch.float32),
                                       (2, 0.1, 0.5, torch.float64)]:
        *floats, mask = _grpo_case(seed)
        logprobs, old, ref, adv = (x.to(dtype) for x in floats)
        what = f"grpo_loss with clip={clip}, kl_coef={kl_coef}, {dtype} (nan outside the mask)"
        leaf = logprobs.clone().requires_grad_(True)
        loss = _loss(what, call_learner("grpo_loss", grpo_loss, leaf, old.clone(), ref.clone(), adv.clone(),
                                        mask.clone(), clip, kl_coef))
        _expect_dtype(what, loss, dtype)
        want, _ = rl.grpo_loss(logprobs, old, ref, adv, mask, clip, kl_coef, average="sequence")
        if torch.isfinite(loss.detach()):
            _diagnose(what, loss.detach(), want, _grpo_mistakes(logprobs, old, ref, adv, mask, clip, kl_coef))
        _expect_finite_loss_and_grad(what, loss, leaf)
        want_leaf = logprobs.clone().requires_grad_(True)
        rl.grpo_loss(want_leaf, old, ref, adv, mask, clip, kl_coef, average="sequence")[0].backward()
        expect_close(f"{what}: gradient w.r.t. logprobs", leaf.grad, want_leaf.grad, atol=1e-6, rtol=RTOL)
    passed("grpo_loss")


# ---------------------------------------------------------------------------- REINFORCE (lesson 09, before PPO)


def _reinforce_case(seed: int, baseline_kind: str):
    """log-probs [N] (leaves), rewards [N] and a baseline: a float, or a [N] tensor that carries a gradient."""
    g = torch.Generator().manual_seed(seed)
    N = 5
    logprobs = -4 * torch.rand(N, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 0.5], dtype=torch.float64)[torch.randperm(N, generator=g)]
    if baseline_kind == "float":
        return logprobs, rewards, 0.75
    # a baseline computed by a model (a value head, the batch's rewards) may carry a gradient: it must not get one
    return logprobs, rewards, (rewards.mean() + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).requires_grad_(True)


def _reinforce_grad_mistakes(rewards, b, N):
    """What d loss / d logprobs would be for the usual mistakes (the right one is -(r - b) / N)."""
    adv = rewards - b
    return [
        (-adv, ("sums over the samples: REINFORCE averages them, -(r - b) * log pi, then .mean(), so the step "
                "does not grow with the batch size")),
        (adv / N, ("has the wrong sign: the loss is *minus* the objective, -mean((r - b) * log pi); gradient "
                   "descent on it raises the log-prob of replies with r > b")),
        (-rewards / N, "leaves out the baseline: use (rewards - baseline), it lowers the variance for free"),
        (-(rewards + b) / N, "adds the baseline: subtract it, (rewards - baseline)"),
    ]


def check_reinforce_loss(reinforce_loss) -> None:
    """``reinforce_loss(logprobs, rewards, baseline)`` -> 0-d loss -mean((r - b) * logprobs), r and b constants:
    its gradient w.r.t. logprobs is -(r - b) / N, minus the REINFORCE estimate."""
    for seed, kind in [(0, "float"), (1, "tensor"), (2, "tensor")]:
        logprobs, rewards, b = _reinforce_case(seed, kind)
        N = len(rewards)
        b_value = b.detach() if torch.is_tensor(b) else b
        what = (f"reinforce_loss on {N} replies, rewards {rewards.tolist()}, baseline "
                + (f"{b}" if kind == "float" else "a [5] tensor that requires grad"))
        leaf = logprobs.clone().requires_grad_(True)
        loss = _loss(what, call_learner("reinforce_loss", reinforce_loss, leaf, rewards.clone(), b))
        _needs_grad(what, loss, "the log-probs")
        loss.backward()
        if torch.is_tensor(b) and b.grad is not None and b.grad.abs().max() > 0:
            raise CheckFailed(f"{what}: a gradient flowed into the baseline: the baseline is a constant of the "
                              "estimator, so detach it: (rewards - baseline).detach()")
        got = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        want = -(rewards - b_value) / N
        for value, message in _reinforce_grad_mistakes(rewards, b_value, N):
            if _close(got, value) and not _close(value, want):
                raise CheckFailed(f"{what}: {message}")
        expect_close(f"{what}: gradient w.r.t. logprobs (should be -(r - b) / N)", got, want, atol=ATOL, rtol=RTOL)
        expect_close(f"{what}: the loss -mean((r - b) * logprobs)", loss.detach(),
                     -((rewards - b_value) * logprobs).mean(), atol=ATOL, rtol=RTOL)
    # rewards that carry a gradient (from a reward model) are constants too
    logprobs, rewards, _ = _reinforce_case(3, "float")
    scores = rewards.clone().requires_grad_(True)
    what = "reinforce_loss with rewards that require grad (a reward model's scores), baseline 0.0"
    loss = _loss(what, call_learner("reinforce_loss", reinforce_loss, logprobs.clone().requires_grad_(True), scores, 0.0))
    loss.backward()
    if scores.grad is not None and scores.grad.abs().max() > 0:
        raise CheckFailed(f"{what}: a gradient flowed into the rewards: they are constants of the estimator (the "
                          "policy gradient does not train the reward model), so detach them")
    passed("reinforce_loss")
