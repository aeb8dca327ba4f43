"""Lesson 09's PPO pieces in the story (09.kl_rewards, 09.ppo_loss, 09.ppo_update): the instructor solutions and nblib's own
functions pass their checks, each typical mistake fails with a message that names it, and the lesson's PPO run
and reward model train on the pieces passed to them."""
import copy
import dataclasses
import json
import math
import pathlib

import pytest
import torch

from nblib import chat, engine, hardware, llama, ppo, prefs, reward, rl, train
from nblib.checks import CheckFailed
from nblib.checks import ppo as ppo_checks
from nblib.checks import rl as rl_checks

LESSON = pathlib.Path(__file__).parents[1] / "notebooks" / "09_reward_model_ppo.ipynb"
TOK = chat.ChatTokenizer()


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return llama.Llama(llama.LlamaConfig(vocab_size=TOK.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16,
                                         eos_token_id=TOK.end_id))


def exercise_cell(name: str) -> str:
    cells = json.loads(LESSON.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return next(s for s in sources if s.startswith(f"# Exercise 09.{name} "))


def policy_loss_fn(logprobs, old_logprobs, advantages, mask, clip):
    return rl.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip)[0]


def run_cell(name: str) -> dict:
    """The instructor's exercise cell (solution, check and hidden tests), run as the notebook runs it."""
    namespace = {"torch": torch, "copy": copy, "dataclasses": dataclasses, "engine": engine, "hardware": hardware,
                 "ppo": ppo, "rl": rl, "train": train, "ppo_checks": ppo_checks, "checks": rl_checks, "math": math,
                 "policy_loss_fn": policy_loss_fn}
    exec(exercise_cell(name), namespace)
    return namespace


def test_instructor_solutions_and_nblib_pass(capsys):
    run_cell("kl_rewards")
    run_cell("ppo_loss")
    run_cell("ppo_update")
    run_cell("whiten")
    ppo_checks.check_kl_rewards(lambda *args: ppo.kl_rewards(*args))   # the course's, wrapped
    ppo_checks.check_ppo_loss(lambda *args: ppo.ppo_loss(*args))
    assert capsys.readouterr().out.count("passed") == 6


def test_the_course_functions_and_stubs_are_refused():
    with pytest.raises(CheckFailed, match=r"course's own implementation \(nblib\.ppo\.kl_rewards\)"):
        ppo_checks.check_kl_rewards(ppo.kl_rewards)
    with pytest.raises(CheckFailed, match=r"course's own implementation \(nblib\.ppo\.ppo_loss\)"):
        ppo_checks.check_ppo_loss(ppo.ppo_loss)

    def stub(*args):
        raise NotImplementedError("09.ppo_loss is not written yet")
    with pytest.raises(NotImplementedError):
        ppo_checks.check_ppo_loss(stub)


# ---------------------------------------------------------------------------- 09.kl_rewards


def last_of(mask):
    return torch.where(mask, torch.arange(mask.shape[1]).expand_as(mask), -1).amax(1)


def first_of(mask):
    return torch.where(mask, torch.arange(mask.shape[1]).expand_as(mask), mask.shape[1]).amin(1)


def rewards(price_everywhere=False, sign=-1.0, coef=None, at=last_of, every_token=False, all_rows=False,
            multiply=False, in_place=False, no_score=False):
    """A learner's kl_rewards with one planted mistake."""
    def kl_rewards(logprobs, ref_logprobs, scores, mask, kl_coef):
        price = sign * (kl_coef if coef is None else coef) * (logprobs - ref_logprobs)
        if in_place:
            logprobs -= ref_logprobs
        out = price * mask if multiply else price if price_everywhere else torch.where(mask, price, 0.0)
        if no_score:
            return out
        if every_token:
            return out + torch.where(mask, scores[:, None], 0.0)
        if all_rows:
            out[:, at(mask)] += scores
        else:
            out[torch.arange(len(scores)), at(mask)] += scores
        return out
    return kl_rewards


REWARD_MISTAKES = {
    "score on the first token": (rewards(at=first_of), "first token"),
    "score on every token": (rewards(every_token=True), "on every reply token"),
    "KL sign": (rewards(sign=1.0), "wrong sign"),
    "padding not zeroed": (rewards(price_everywhere=True), "outside the mask the rewards must be 0"),
    "score added to every row": (rewards(all_rows=True), "to every row"),
    "score in the last column": (rewards(at=lambda m: torch.full((len(m),), m.shape[1] - 1)), "last column"),
    "last token by counting": (rewards(at=lambda m: first_of(m) + m.sum(1) - 1), "hole in the mask"),
    "kl_coef hard-coded": (rewards(coef=0.1), "whatever kl_coef"),
    "score missing": (rewards(no_score=True), "score is missing"),
    "multiplied by the mask": (rewards(multiply=True), r"0 \* nan = nan"),
    "in-place edit of an input": (rewards(in_place=True), "changed its input logprobs in place"),
}



# ---------------------------------------------------------------------------- 09.ppo_loss


def loss(value_sign=1.0, vf_coef=None, value_clip="cfg", clip=None, whiten=False, old_is_current=False,
         unshifted=False, old_values=False, detached=False, metrics=True):
    """A learner's ppo_loss with one planted mistake."""
    def ppo_loss(ac, exp, cfg):
        _, logprobs = engine.sequence_logprobs(ac.policy, exp.ids, exp.mask, exp.attention_mask)
        values = ppo.token_values(ac.value, exp.ids, exp.attention_mask)
        shown = ac.value(exp.ids, exp.attention_mask) if unshifted else exp.values if old_values else values
        advantages = rl.masked_whiten(exp.advantages, exp.mask) if whiten else exp.advantages
        old = logprobs if old_is_current else exp.logprobs
        pg = policy_loss_fn(logprobs, old, advantages, exp.mask, cfg.clip if clip is None else clip)
        v, _ = rl.value_loss(shown, exp.values, exp.returns, exp.mask, cfg.value_clip if value_clip == "cfg"
                             else value_clip)
        total = pg + value_sign * (cfg.vf_coef if vf_coef is None else vf_coef) * v
        total = total.detach() if detached else total
        return (total, ppo.update_metrics(logprobs, values, exp, cfg)) if metrics else total
    return ppo_loss


LOSS_MISTAKES = {
    "vf_coef missing": (loss(vf_coef=1.0), "vf_coef is missing"),
    "vf_coef hard-coded": (loss(vf_coef=0.1), "vf_coef = 0.1 whatever"),
    "value loss with the wrong sign": (loss(value_sign=-1.0), "value loss has the wrong sign"),
    "value loss unclipped": (loss(value_clip=None), "value loss is not clipped"),
    "value clip hard-coded": (loss(value_clip=0.2), "clips the values at 0.2 whatever"),
    "ratio clip hard-coded": (loss(clip=0.2), "clips the ratio at 0.2 whatever"),
    "advantages whitened again": (loss(whiten=True), "whitens the advantages again"),
    "old log-probs are the current ones": (loss(old_is_current=True), "compares the policy with itself"),
    "values not shifted": (loss(unshifted=True), "not before it"),
    "the rollout's values": (loss(old_values=True), r"rollout's values \(exp.values\)"),
    "detached loss": (loss(detached=True), "has no gradient"),
    "no metrics": (loss(metrics=False), r"return \(loss, metrics\)"),
}



# ---------------------------------------------------------------------------- 09.ppo_update


def update(epochs=None, minibatches=None, order="shuffled", in_place=False, results=True):
    """A learner's ppo_update with one planted mistake."""
    def ppo_update(trainer, exp, cfg, generator, loss):
        loss_fn, n, out = ppo.make_loss_fn(cfg, loss), len(exp.ids), []
        first = torch.randperm(n, generator=generator) if order == "once" else None
        for _ in range(cfg.epochs if epochs is None else epochs):
            rows_order = {"shuffled": lambda: torch.randperm(n, generator=generator), "in order": lambda: torch.arange(n),
                          "once": lambda: first, "no generator": lambda: torch.randperm(n)}[order]()
            for rows in rows_order.chunk(cfg.minibatches if minibatches is None else minibatches):
                if in_place:
                    exp.advantages[rows] *= 1.0 + 1e-3
                minibatch = dataclasses.replace(exp, **{f.name: getattr(exp, f.name)[rows]
                                                        for f in dataclasses.fields(exp)})
                out.append(trainer.step([minibatch], loss_fn))
        return out if results else None
    return ppo_update


def test_the_right_update_passes(capsys):
    ppo_checks.check_ppo_update(update(order="shuffled"))
    assert "passed" in capsys.readouterr().out


UPDATE_MISTAKES = {
    "one epoch": (update(epochs=1), "one pass only"),
    "the whole rollout in one step per epoch": (update(minibatches=1), "one step per pass"),
    "no shuffling": (update(order="in order"), "takes the rows in their order"),
    "one order for every epoch": (update(order="once"), "shuffles once"),
    "the generator not used": (update(order="no generator"), r"torch.randperm\(n, generator=generator\)"),
    "an input changed in place": (update(in_place=True), "changed its input advantages in place"),
    "no results": (update(results=False), "return` missing"),
}



MISTAKES = [(check, name, fn, message) for check, mistakes in (("kl_rewards", REWARD_MISTAKES), ("ppo_loss", LOSS_MISTAKES),
                                                                ("ppo_update", UPDATE_MISTAKES))
            for name, (fn, message) in mistakes.items()]


@pytest.mark.parametrize("check, name, fn, message", MISTAKES, ids=[f"{c}: {n}" for c, n, _, _ in MISTAKES])
def test_each_mistake_is_named(check, name, fn, message):
    with pytest.raises(CheckFailed, match=message):
        getattr(ppo_checks, f"check_{check}")(fn)


# ---------------------------------------------------------------------------- the lesson's runs take the picks


def test_reward_model_trains_with_a_learners_bradley_terry_loss():
    def bradley_terry(r_chosen, r_rejected):   # returns the loss alone, as the exercise does
        return -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()
    lm = tiny_lm()
    good, bad = TOK.encode("good")[0], TOK.encode("x")[0]
    pairs = [prefs.Pair([1], [good, good, 3], [bad, 3], 1.0, 0.0), prefs.Pair([1], [bad, 3], [good, 3], 0.0, 1.0)] * 4
    cfg = reward.RewardConfig(steps=3, batch_size=4, lr=1e-2)
    ours, ours_history = reward.train_reward_model(lm, pairs, pairs[:4], TOK.pad_id, cfg, show_progress=False)
    yours, your_history = reward.train_reward_model(lm, pairs, pairs[:4], TOK.pad_id, cfg, show_progress=False,
                                                    bradley_terry=bradley_terry)
    assert your_history.loss == pytest.approx(ours_history.loss, abs=1e-6)
    assert "val/accuracy" in your_history.eval_metrics   # the lesson's accuracy curve reads it


def test_ppo_run_uses_the_pieces_it_is_given():
    policy = tiny_lm()
    prompts = [chat.render_prompt([{"role": "user", "content": "Hi" + "!" * i}], TOK) for i in range(4)]
    rm = reward.ScalarHead(copy.deepcopy(policy)).eval()
    cfg = ppo.PPOConfig(prompts_per_iter=4, max_new_tokens=4, epochs=1, minibatches=2)
    called = set()

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            called.add(name)
            return fn(*args, **kwargs)
        return wrapped
    _, ours = ppo.run(policy, rm, policy, prompts, cfg, 2, TOK.end_id, TOK.pad_id)
    _, yours = ppo.run(policy, rm, policy, prompts, cfg, 2, TOK.end_id, TOK.pad_id,
                       kl_rewards_fn=spy("kl_rewards", ppo.kl_rewards), gae_fn=spy("gae", rl.gae),
                       loss=spy("loss", ppo.ppo_loss), update_fn=spy("update", ppo.update))
    assert called == {"kl_rewards", "gae", "loss", "update"}
    assert [h["score"] for h in yours] == pytest.approx([h["score"] for h in ours])


def test_the_solutions_run_ppo_exactly_as_nblib():
    """The lesson's runs on the instructor solutions equal nblib's to the bit: the recorded numbers stay valid."""
    namespace = run_cell("ppo_clip")
    namespace["policy_loss_fn"] = namespace["ppo_policy_loss"]   # ppo_loss on the solution's clipped policy loss
    for name in ("kl_rewards", "gae", "whiten", "ppo_loss", "ppo_update"):
        exec(exercise_cell(name), namespace)
    policy = tiny_lm()
    rm = reward.ScalarHead(copy.deepcopy(policy)).eval()
    torch.nn.init.normal_(rm.head.weight, std=0.3)
    prompts = [chat.render_prompt([{"role": "user", "content": "Hi" + "!" * i}], TOK) for i in range(4)]
    cfg = ppo.PPOConfig(prompts_per_iter=4, max_new_tokens=6, epochs=2, minibatches=2)
    _, ours = ppo.run(policy, rm, tiny_lm(1), prompts, cfg, 2, TOK.end_id, TOK.pad_id)
    _, yours = ppo.run(policy, rm, tiny_lm(1), prompts, cfg, 2, TOK.end_id, TOK.pad_id,
                       kl_rewards_fn=namespace["kl_rewards"], gae_fn=namespace["gae"], loss=namespace["ppo_loss"],
                       update_fn=namespace["ppo_update"], whiten_fn=namespace["whiten"])
    assert yours == ours


def _whiten(x, mask, eps=1e-8, correction=0, over_all=False, per_row=False, divide=True, centre=True, zero=True,
            in_place=False):
    """09.whiten with at most one planted mistake."""
    keep = torch.ones_like(mask) if over_all else mask
    n = keep.sum()
    if over_all:
        x = torch.where(mask, x, 0)
    mean = (torch.where(keep, x, 0).sum(1, keepdim=True) / keep.sum(1, keepdim=True) if per_row
            else torch.where(keep, x, 0).sum() / n)
    var = torch.where(keep, (x - torch.where(keep, x, 0).sum() / n) ** 2, 0).sum() / (n - correction)
    white = (x - mean) if centre else x
    if divide:
        white = white * torch.rsqrt(var + eps)
    if in_place:
        x.copy_(torch.where(mask, white, 0))
    return torch.where(mask, white, 0) if zero else white


@pytest.mark.parametrize("mistake, message", [
    (dict(correction=1), "divides by the count minus 1"),
    (dict(over_all=True), "count the padding"),
    (dict(per_row=True), "the mean is per reply"),
    (dict(divide=False), "not divided by the standard deviation"),
    (dict(centre=False), "the mean is not taken off"),
    (dict(zero=False), "nan or inf outside the mask"),
    (dict(eps=0.0), "add eps"),
    (dict(in_place=True), "changed its input in place"),
])
def test_whiten_mistakes_are_named(mistake, message):
    with pytest.raises(CheckFailed, match=message):
        ppo_checks.check_whiten(lambda x, mask: _whiten(x, mask, **mistake))


def test_the_right_whitening_passes_and_the_courses_is_refused(capsys):
    ppo_checks.check_whiten(lambda x, mask: _whiten(x, mask))
    assert "whiten: passed" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match="course's own implementation"):
        ppo_checks.check_whiten(rl.masked_whiten)


def test_an_update_that_calls_the_courses_is_refused():
    with pytest.raises(CheckFailed, match="called nblib.ppo.update, the course's own version"):
        ppo_checks.check_ppo_update(lambda trainer, exp, cfg, generator, loss: ppo.update(trainer, exp, cfg, generator,
                                                                                           loss))
    with pytest.raises(CheckFailed, match="called nblib.train.minibatch_steps"):
        ppo_checks.check_ppo_update(lambda trainer, exp, cfg, generator, loss: train.minibatch_steps(
            trainer, exp, ppo.make_loss_fn(cfg, loss), cfg.epochs, cfg.minibatches, generator))
