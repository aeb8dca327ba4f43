"""nblib.checks.rl (lessons 09-10): right answers pass, each typical mistake fails with a
message that names it."""
import pytest
import torch
import torch.nn.functional as F

from nblib import rl
from nblib.checks import CheckFailed
from nblib.checks.rl import (check_bradley_terry_loss, check_dpo_loss, check_gae, check_group_advantages,
                              check_grpo_loss, check_ppo_policy_loss, check_reply_logprobs)

CHECKS = [check_gae, check_ppo_policy_loss, check_bradley_terry_loss, check_dpo_loss]


def test_the_course_functions_pass(capsys):
    # wrapped in lambdas: call_learner refuses nblib's own functions passed as they are
    check_gae(lambda r, v, m, gamma, lam: rl.gae(r, v, m, gamma, lam))
    check_gae(lambda r, v, m, gamma, lam: rl.gae_reference(r, v, m, gamma, lam))
    check_ppo_policy_loss(lambda lp, old, a, m, clip: rl.ppo_policy_loss(lp, old, a, m, clip))  # (loss, metrics)
    check_ppo_policy_loss(lambda lp, old, a, m, clip: rl.ppo_policy_loss(lp, old, a, m, clip)[0])  # loss alone
    check_bradley_terry_loss(lambda c, r: rl.bradley_terry_loss(c, r))
    check_bradley_terry_loss(lambda c, r: rl.bradley_terry_loss(c, r)[0])
    check_dpo_loss(lambda pc, pr, rc, rr, beta: rl.dpo_loss(pc, pr, rc, rr, beta))
    check_dpo_loss(lambda pc, pr, rc, rr, beta: rl.dpo_loss(pc, pr, rc, rr, beta)[0])
    assert capsys.readouterr().out.count("passed") == 8


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_a_missing_return_and_the_course_function_are_named(check):
    with pytest.raises(CheckFailed, match=r"returned None: is a `return` missing\?"):
        check(lambda *args: None)
    course_own = {check_gae: rl.gae, check_ppo_policy_loss: rl.ppo_policy_loss,
                  check_bradley_terry_loss: rl.bradley_terry_loss, check_dpo_loss: rl.dpo_loss}[check]
    with pytest.raises(CheckFailed, match=rf"course's own implementation \(nblib\.rl\.{course_own.__name__}\)"):
        check(course_own)


# ---------------------------------------------------------------------------- GAE mistakes


def gae_bootstrapping_past_the_mask(rewards, values, mask, gamma, lam):
    T = rewards.shape[1]
    advantages, last = torch.zeros_like(rewards), torch.zeros(rewards.shape[0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else 0.0  # the padding's value, past the completion
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def gae_returns_are_reward_to_go(rewards, values, mask, gamma, lam):
    advantages, _ = rl.gae(rewards, values, mask, gamma, lam)
    returns, running = torch.zeros_like(rewards), torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return advantages, returns


@pytest.mark.parametrize("mistake, phrase", [
    (gae_bootstrapping_past_the_mask, "bootstrap past the end of the mask"),
    (gae_returns_are_reward_to_go, "returns must be advantages \\+ values"),
    (lambda r, v, m, gamma, lam: rl.gae(r, v, m, lam, gamma), "gamma and lam swapped"),
    (lambda r, v, m, gamma, lam: (rl.gae(r, v, m, gamma, lam)[0], rl.gae(r, v, m, gamma, lam)[0] + v),
     "returns outside the mask must be 0"),
    (lambda r, v, m, gamma, lam: rl.gae(r, v, m, gamma, lam)[0], "tuple \\(advantages, returns\\)"),
    (lambda r, v, m, gamma, lam: rl.gae(r, v, m, gamma, 1.0),
     "advantages on the masked tokens \\[row, column\\]: off by .* at index \\(3, 4\\)"),
])
def test_gae_mistakes_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        check_gae(mistake)


# ---------------------------------------------------------------------------- PPO mistakes


def ppo(reduce_min=torch.minimum, average="tokens", clip_what="ratio", fixed_clip=None):
    """A learner's PPO loss with one planted mistake."""
    def loss_fn(logprobs, old_logprobs, advantages, mask, clip):
        clip = fixed_clip or clip
        # the masked tokens first: the check puts nan and inf outside the mask
        logprobs, old_logprobs, advantages = (torch.where(mask, x, 0.0) for x in (logprobs, old_logprobs, advantages))
        ratio = (logprobs - old_logprobs).exp()
        if clip_what == "ratio":
            clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
        else:
            clipped = ratio * advantages.clamp(1 - clip, 1 + clip)
        per_token = -reduce_min(ratio * advantages, clipped)
        if average == "tokens":
            return (per_token * mask).sum() / mask.sum()
        if average == "positions":
            return (per_token * mask).mean()
        return ((per_token * mask).sum(1) / mask.sum(1)).mean()  # rows
    return loss_fn


def test_ppo_planted_learner_is_right_without_mistakes(capsys):
    check_ppo_policy_loss(ppo())
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, phrase", [
    (ppo(reduce_min=torch.maximum), "takes the max of the two terms: .* pessimistic bound"),
    (ppo(average="positions"), "averages over every position"),
    (ppo(average="rows"), "averages each completion, then the completions"),
    (ppo(clip_what="advantage"), "clips the advantage instead of the ratio"),
    (ppo(fixed_clip=0.2), "whatever the clip argument"),
    (lambda *a: ppo()(*a).item(), "returned a Python number .*no .item\\(\\)"),
    (lambda *a: ppo()(*a).detach(), "the loss has no gradient"),
    (lambda lp, old, a, m, clip: ppo()(lp, old, a, m, clip) + 0.0 * lp.sum() + 1e-3, "off by"),
])
def test_ppo_mistakes_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        check_ppo_policy_loss(mistake)


def test_ppo_gradient_must_match_not_only_the_value():
    def stop_gradient_through_clipped(logprobs, old, advantages, mask, clip):
        ratio = (logprobs - old).exp()
        per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).detach()
        value = (per_token * mask).sum() / mask.sum()
        return value + 0 * logprobs.sum()  # right value, no gradient of the policy

    with pytest.raises(CheckFailed, match="gradient w.r.t. logprobs"):
        check_ppo_policy_loss(stop_gradient_through_clipped)


# ---------------------------------------------------------------------------- Bradley-Terry mistakes


@pytest.mark.parametrize("mistake, phrase", [
    (lambda c, r: -F.logsigmoid(r - c).mean(), "the sign is swapped"),
    (lambda c, r: -torch.sigmoid(c - r).mean(), "the log is missing"),
    (lambda c, r: (1 - torch.sigmoid(c - r)).mean(), "the log is missing"),
    (lambda c, r: -torch.log(torch.sigmoid(c - r)).mean(), "underflows to log\\(0\\). Use F.logsigmoid"),
    (lambda c, r: -F.logsigmoid(c - r).mean().item(), "returned a Python number"),
    (lambda c, r: -F.logsigmoid(c - r).sum(), "sums over the pairs"),
])
def test_bradley_terry_mistakes_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        check_bradley_terry_loss(mistake)


# ---------------------------------------------------------------------------- DPO mistakes


def dpo_forgets_the_reference(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * (pc - pr)).mean()


def dpo_beta_outside(pc, pr, rc, rr, beta):
    return -beta * F.logsigmoid((pc - rc) - (pr - rr)).mean()


def dpo_not_ln2(pc, pr, rc, rr, beta):
    return -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr))) + 1e-2).mean()


@pytest.mark.parametrize("mistake, phrase", [
    (dpo_forgets_the_reference, "forgets the reference model"),
    (dpo_beta_outside, "applies beta outside the sigmoid"),
    (dpo_not_ln2, "the loss must be ln 2"),
    (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pr - rr) - (pc - rc))).mean(), "chosen and rejected swapped"),
    (lambda pc, pr, rc, rr, beta: -F.logsigmoid((pc - rc) - (pr - rr)).mean(), "ignores beta"),
    (lambda pc, pr, rc, rr, beta: float(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()),
     "returned a Python number"),
])
def test_dpo_mistakes_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        check_dpo_loss(mistake)


# ---------------------------------------------------------------------------- a reply's summed log-prob


def reply_logprobs_right(logits, ids, mask):
    taken = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (taken * mask[:, 1:]).sum(-1)


def test_reply_logprobs_passes_a_right_answer_and_the_engine_agrees(capsys):
    check_reply_logprobs(reply_logprobs_right)
    check_reply_logprobs(lambda logits, ids, mask: torch.where(
        mask[:, 1:], torch.distributions.Categorical(logits=logits[:, :-1]).log_prob(ids[:, 1:]), 0.0).sum(-1))
    assert capsys.readouterr().out.count("passed") == 2
    # the same numbers as the engine's (which DPO uses), on a real model's logits
    from nblib import chat, engine, llama
    tok = chat.ChatTokenizer()
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    ids = torch.randint(4, tok.vocab_size, (3, 10))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, 4:] = True
    logits, _ = model(ids)
    torch.testing.assert_close(reply_logprobs_right(logits, ids, mask), engine.sequence_logprobs(model, ids, mask)[0])


@pytest.mark.parametrize("mistake, phrase", [
    (lambda lg, ids, m: (lg.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * m).sum(-1), "its own column"),
    (lambda lg, ids, m: (lg[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * m[:, :-1]).sum(-1),
     "but not the mask"),
    (lambda lg, ids, m: lg[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1), "every position"),
    (lambda lg, ids, m: reply_logprobs_right(lg, ids, m) / m[:, 1:].sum(-1), "averages"),
    (lambda lg, ids, m: (lg[:, :-1].softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * m[:, 1:]).sum(-1),
     "sums probabilities"),
    (lambda lg, ids, m: (lg.log_softmax(1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * m[:, 1:]).sum(-1),
     "wrong dimension"),
    (lambda lg, ids, m: reply_logprobs_right(lg, ids, m).sum(), r"shape \(4,\)"),
    (lambda lg, ids, m: reply_logprobs_right(lg, ids, m).detach(), "no gradient"),
    (lambda lg, ids, m: None, r"returned None: is a `return` missing\?"),
])
def test_reply_logprobs_mistakes_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        check_reply_logprobs(mistake)


# ---------------------------------------------------------------------------- GRPO


def test_grpo_course_functions_pass(capsys):
    check_group_advantages(lambda r, g, scale: rl.group_advantages(r, g, scale=scale))
    check_grpo_loss(lambda lp, old, ref, adv, m, clip, kl: rl.grpo_loss(lp, old, ref, adv, m, clip, kl))
    check_grpo_loss(lambda lp, old, ref, adv, m, clip, kl: rl.grpo_loss(lp, old, ref, adv, m, clip, kl)[0])
    assert capsys.readouterr().out.count("passed") == 3


def centred(r, g):
    x = r.view(-1, g)
    return x - x.mean(1, keepdim=True)


@pytest.mark.parametrize("mistake, phrase", [
    (lambda r, g, scale: r - r.mean(), "whole batch"),
    (lambda r, g, scale: (r.view(g, -1) - r.view(g, -1).mean(0)).reshape(-1), "groups the wrong rows"),
    (lambda r, g, scale: (centred(r, g) / (r.view(-1, g).std(1, keepdim=True) + 1e-6) if scale
                          else centred(r, g)).reshape(-1), "sample std"),
    (lambda r, g, scale: centred(r, g).reshape(-1), "does not divide by the std"),
    (lambda r, g, scale: (centred(r, g) / r.view(-1, g).std(1, correction=0, keepdim=True) if scale
                          else centred(r, g)).reshape(-1), "nan or inf"),
    (lambda r, g, scale: (centred(r, g) / (r.view(-1, g).std(1, correction=0, keepdim=True) + 1e-6)).reshape(-1),
     "although scale=False"),
    (lambda r, g, scale: centred(r, g), "shape"),
    (lambda r, g, scale: None, r"returned None: is a `return` missing\?"),
])
def test_group_advantages_mistakes_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        check_group_advantages(mistake)


def grpo_pieces(lp, old, ref, adv, m, clip):
    lp, old, ref = (torch.where(m, x, 0.0) for x in (lp, old, ref))
    ratio = torch.exp(lp - old)
    a = adv[:, None]
    return ratio, a, -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a), torch.exp(ref - lp) - 1 - (ref - lp), lp, ref


def grpo_token_average(lp, old, ref, adv, m, clip, kl):
    _, _, s, k3, _, _ = grpo_pieces(lp, old, ref, adv, m, clip)
    return torch.where(m, s + kl * k3, 0.0).sum() / m.sum()


def grpo_with(per_token_of):
    def loss(lp, old, ref, adv, m, clip, kl):
        ratio, a, s, k3, lp0, ref0 = grpo_pieces(lp, old, ref, adv, m, clip)
        per_token = per_token_of(ratio, a, s, k3, lp0, ref0, clip, kl)
        return (torch.where(m, per_token, 0.0).sum(1) / m.sum(1)).mean()
    return loss


@pytest.mark.parametrize("mistake, phrase", [
    (grpo_token_average, "all the tokens of the batch"),
    (grpo_with(lambda r, a, s, k3, lp, ref, clip, kl: -torch.maximum(r * a, r.clamp(1 - clip, 1 + clip) * a) + kl * k3),
     "max of the two terms"),
    (grpo_with(lambda r, a, s, k3, lp, ref, clip, kl: s + kl * (lp - ref)), "k1 estimate"),
    (grpo_with(lambda r, a, s, k3, lp, ref, clip, kl: s - kl * k3), "subtracts the KL"),
    (grpo_with(lambda r, a, s, k3, lp, ref, clip, kl: s), "leaves out the KL"),
    (grpo_with(lambda r, a, s, k3, lp, ref, clip, kl: -r * a + kl * k3), "does not clip"),
    (lambda lp, old, ref, adv, m, clip, kl: (torch.exp(lp - old) * adv[:, None] * m).sum(), "nan"),
    (lambda lp, old, ref, adv, m, clip, kl: float(rl.grpo_loss(lp, old, ref, adv, m, clip, kl)[0]), "Python number"),
])
def test_grpo_loss_mistakes_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        check_grpo_loss(mistake)


def test_dpo_loss_that_underflows_is_named():
    def naive(pc, pr, rc, rr, beta):
        return -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr)))).mean()
    with pytest.raises(CheckFailed, match="logsigmoid"):
        check_dpo_loss(naive)
