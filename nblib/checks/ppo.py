"""Checks for lesson 09's PPO pieces: the per-token rewards of a rollout (``check_kl_rewards``), the
advantages whitened over the batch (``check_whiten``), the
loss of one minibatch step (``check_ppo_loss``) and the update over one rollout (``check_ppo_update``).

Each runs the learner's function on a small seeded case, compares with ``nblib.ppo`` and, when the
answer is off, computes the usual mistakes on the same inputs and names the one the answer matches.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from nblib import engine, hardware, llama, ppo, reward, rl, train
from nblib.checks import CheckFailed, call_learner, course_functions_refused, expect_close, expect_unchanged, passed
from nblib.checks.rl import ATOL, RTOL, _close, _diagnose, _loss, _masks


def _name_the_mistake(what: str, got: torch.Tensor, want: torch.Tensor, mistakes) -> None:
    """Pass if ``got`` is ``want``; else fail naming the first mistake whose value ``got`` is; else expected vs got
    (``nblib.checks.rl``'s diagnosis, for tensors rather than single numbers)."""
    named = next((message for value, message in mistakes if _close(got, value) and not _close(value, want)), None)
    if named is not None and not _close(got, want):
        raise CheckFailed(f"{what}: {named}")
    expect_close(what, got, want, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------- whitening


def _whiten_cases():
    """Advantages on replies of different lengths (nan outside the mask, where a rollout leaves anything), in
    float32 and float64; and advantages that are all equal (variance 0: only eps keeps the result finite)."""
    g = torch.Generator().manual_seed(4)
    mask = _masks()
    mask[3, 6] = False
    x = 3.0 + 2.0 * torch.randn(mask.shape, generator=g)
    yield "float32 advantages, nan outside the mask", x.masked_fill(~mask, float("nan")), mask
    yield "float64 advantages around 100", (100 + torch.randn(mask.shape, generator=g, dtype=torch.float64)), mask
    yield "advantages all equal to 2 (variance 0)", torch.full(mask.shape, 2.0), mask


def check_whiten(whiten) -> None:
    """``whiten(x [N, T], mask [N, T]) -> [N, T]``: (x - mean) / sqrt(var + 1e-8) over the masked entries of the
    whole batch (population variance), 0 outside the mask, as ``nblib.rl.masked_whiten``."""
    for what, x, mask in _whiten_cases():
        given = {"x": x.clone(), "mask": mask.clone()}
        got = call_learner(f"whiten ({what})", whiten, *given.values())
        if not (torch.allclose(given["x"], x, rtol=0, atol=0, equal_nan=True) and torch.equal(given["mask"], mask)):
            raise CheckFailed(f"whiten ({what}) changed its input in place: the rollout keeps its advantages; "
                              "compute a new tensor")
        if not torch.is_tensor(got) or got.shape != x.shape:
            raise CheckFailed(f"whiten ({what}): expected a tensor of shape {tuple(x.shape)}, got "
                              f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
        if got.dtype != x.dtype:
            raise CheckFailed(f"whiten ({what}): the advantages are {x.dtype}, the result {got.dtype}: keep their dtype")
        if not torch.isfinite(got).all():
            where = "outside the mask" if torch.isfinite(got[mask]).all() else "on the mask"
            hint = ("0 outside the mask: torch.where(mask, white, 0), so that nothing there (nan included) "
                    "reaches the loss" if where == "outside the mask" else
                    "add eps (1e-8) to the variance before the square root: all-equal advantages have variance 0")
            raise CheckFailed(f"whiten ({what}): the result holds nan or inf {where}: {hint}")
        want = rl.masked_whiten(x, mask)
        n = mask.sum()
        zeroed = torch.where(mask, x, 0)
        mean = zeroed.sum() / n
        centred = torch.where(mask, x - mean, 0)
        var_pop, var_unbiased = (centred ** 2).sum() / n, (centred ** 2).sum() / (n - 1)
        everything = (zeroed - zeroed.mean()) * torch.rsqrt(zeroed.var(correction=0) + 1e-8)
        per_row_mean = torch.where(mask, x, 0).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        mistakes = [
            (torch.where(mask, centred * torch.rsqrt(var_unbiased + 1e-8), 0),
             "the variance divides by the count minus 1; whitening uses the population variance: divide by the "
             "number of masked entries"),
            (torch.where(mask, everything, 0), "the mean and variance count the padding (as zeros): take them over "
                                               "the masked entries only"),
            (torch.where(mask, (x - per_row_mean) * torch.rsqrt(var_pop + 1e-8), 0),
             "the mean is per reply; PPO whitens over the whole batch: one mean and one variance for every "
             "masked entry"),
            (torch.where(mask, centred, 0), "the advantages are centred but not divided by the standard deviation"),
            (torch.where(mask, x * torch.rsqrt(var_pop + 1e-8), 0), "the advantages are divided by the standard "
                                                                    "deviation but the mean is not taken off"),
        ]
        _name_the_mistake(f"whiten ({what})", got, want, mistakes)
    passed("whiten")


# ---------------------------------------------------------------------------- per-token rewards


def _rewards_case():
    """Replies of different lengths ending in different columns (row 0 in the last one), row 3 with a hole."""
    g = torch.Generator().manual_seed(9)
    mask = _masks()
    mask[3, 6] = False  # a hole: column 6 is no reply token of row 3, whose last token is column 8
    logprobs = -3 * torch.rand(mask.shape, generator=g)
    ref_logprobs = logprobs + 0.5 * torch.randn(mask.shape, generator=g)
    scores = torch.tensor([1.5, -2.0, 0.7, 3.0])
    return logprobs, ref_logprobs, scores, mask


def _rewards_mistakes(logprobs, ref_logprobs, scores, mask, kl_coef):
    rows, cols = torch.arange(len(mask)), torch.arange(mask.shape[1]).expand_as(mask)
    last = engine.last_token_index(mask)
    first = torch.where(mask, cols, mask.shape[1]).min(1).values

    def priced(coef, on=mask):
        return torch.where(on, -coef * (logprobs - ref_logprobs), 0.0)

    def plus_score(rewards, at):
        rewards = rewards.clone()
        rewards[rows, at] += scores
        return rewards

    wrong_rows = priced(kl_coef).clone()
    wrong_rows[:, last] += scores
    every_token = "adds the score on every reply token: the reward model judges the whole reply once, on its last " \
                  "token"
    return [
        (plus_score(priced(kl_coef), first), "puts the score on each reply's first token: it goes on the last one, "
                                             "where the reward model has read the whole reply"),
        (priced(kl_coef) + torch.where(mask, scores[:, None], 0.0), every_token),
        (priced(kl_coef) + scores[:, None], every_token + " (and nowhere else: 0 outside the mask)"),
        (plus_score(priced(-kl_coef), last), "the KL price has the wrong sign: a token the policy likes more than the "
                                             "reference (logprobs > ref_logprobs) pays, -kl_coef * (logprobs - "
                                             "ref_logprobs)"),
        (plus_score(priced(kl_coef, torch.ones_like(mask)), last),
         "the prompt and the padding are priced too: outside the mask the rewards must be 0 (torch.where(mask, ..., "
         "0))"),
        (wrong_rows, "adds every reply's score to every row (rewards[:, last] += scores): index the rows too, one "
                     "(row, last column) pair per reply"),
        (plus_score(priced(kl_coef), torch.full_like(last, mask.shape[1] - 1)),
         "puts the score in the tensor's last column: a reply shorter than the batch ends earlier (in the padding "
         "the score is lost); use each row's last masked column"),
        (plus_score(priced(kl_coef), first + mask.sum(1) - 1),
         "finds the last token by counting the reply's tokens from its first: with a hole in the mask that lands "
         "short; the last token is each row's last True column"),
        (plus_score(priced(0.1), last), f"prices the KL at 0.1 whatever kl_coef ({kl_coef} here): use kl_coef"),
        (priced(kl_coef), "the reward model's score is missing: add each reply's score on its last token"),
    ]


def check_kl_rewards(kl_rewards) -> None:
    """``kl_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)`` -> [N, T] rewards: -kl_coef * (logprobs -
    ref_logprobs) on every reply token, plus each reply's score on its last token; 0 outside the mask."""
    logprobs, ref_logprobs, scores, mask = _rewards_case()
    kl_coef = 0.05
    what = f"kl_rewards(kl_coef={kl_coef}) on replies of 8, 4 and 3 tokens and one with a hole in the mask"
    junk = torch.full_like(logprobs, 7.0)  # finite junk outside the mask: log-probs of prompt and padding
    inputs = {"logprobs": torch.where(mask, logprobs, junk), "ref_logprobs": torch.where(mask, ref_logprobs, -junk),
              "scores": scores, "mask": mask}
    saved = {name: x.clone() for name, x in inputs.items()}
    got = call_learner("kl_rewards", kl_rewards, *inputs.values(), kl_coef)
    expect_unchanged("kl_rewards", inputs, saved, "start from a new tensor (torch.where or .clone()) before adding "
                                                  "the scores: the rollout keeps its log-probs and scores")
    if not torch.is_tensor(got) or got.shape != mask.shape:
        shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
        raise CheckFailed(f"{what}: expected a tensor [N, T] = {tuple(mask.shape)} like logprobs, got {shape}")
    want = ppo.kl_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)
    _name_the_mistake(what, got.detach(), want, _rewards_mistakes(*saved.values(), kl_coef))  # with the junk
    what = "kl_rewards with nan log-probs and -inf reference log-probs outside the mask"
    got = call_learner("kl_rewards", kl_rewards, torch.where(mask, logprobs, float("nan")),
                       torch.where(mask, ref_logprobs, float("-inf")), scores.clone(), mask.clone(), kl_coef)
    if not torch.isfinite(got).all():
        raise CheckFailed(f"{what}: the rewards hold nan or inf: multiplying by the mask keeps them (0 * nan = nan); "
                          "select the reply tokens with torch.where(mask, ..., 0)")
    expect_close(what, got.detach(), want, atol=ATOL, rtol=RTOL)
    passed("kl_rewards")


# ---------------------------------------------------------------------------- the loss of one minibatch


def _tiny_actor_critic() -> ppo.ActorCritic:
    """A one-layer policy and a value model (a ScalarHead with a random head, so values are not 0)."""
    torch.manual_seed(0)
    policy = llama.Llama(llama.LlamaConfig(vocab_size=24, block_size=16, n_layer=1, n_head=2, n_embd=16))
    value = reward.ScalarHead(copy.deepcopy(policy))
    torch.nn.init.normal_(value.head.weight, std=0.5)
    return ppo.ActorCritic(policy, value)


def _loss_case(ac: ppo.ActorCritic) -> ppo.Experience:
    """A minibatch whose policy and values have moved since the rollout (ratios past the clip, values past the
    value clip), with advantages not of mean 0 and variance 1 (a minibatch of whitened ones is not either)."""
    g = torch.Generator().manual_seed(3)
    mask = _masks()
    ids = torch.randint(0, 24, mask.shape, generator=g)
    attention_mask = torch.ones_like(mask)
    with torch.no_grad():
        _, logprobs = engine.sequence_logprobs(ac.policy, ids, mask, attention_mask)
        values = ppo.token_values(ac.value, ids, attention_mask)

    def noise(scale):
        return torch.where(mask, scale * torch.randn(mask.shape, generator=g), 0.0)

    advantages = 0.5 + 2 * noise(1.0)
    return ppo.Experience(ids=ids, attention_mask=attention_mask, mask=mask, logprobs=logprobs + noise(0.3),
                          ref_logprobs=logprobs + noise(0.3), values=values + noise(0.5), rewards=noise(1.0),
                          advantages=torch.where(mask, advantages, 0.0), returns=values + noise(1.0),
                          scores=torch.randn(4, generator=g), finished=torch.ones(4, dtype=torch.bool))


def _loss_mistakes(ac, exp, cfg):
    with torch.no_grad():
        _, logprobs = engine.sequence_logprobs(ac.policy, exp.ids, exp.mask, exp.attention_mask)
        values = ppo.token_values(ac.value, exp.ids, exp.attention_mask)
        unshifted = ac.value(exp.ids, exp.attention_mask)

    def policy(advantages=exp.advantages, old=exp.logprobs, clip=cfg.clip):
        return rl.ppo_policy_loss(logprobs, old, advantages, exp.mask, clip)[0]

    def value(v=values, clip=cfg.value_clip):
        return rl.value_loss(v, exp.values, exp.returns, exp.mask, clip)[0]

    return [
        (policy() + value(), f"vf_coef is missing: the value loss enters as cfg.vf_coef * value loss "
                             f"({cfg.vf_coef} here)"),
        (policy() + 0.1 * value(), f"takes vf_coef = 0.1 whatever cfg.vf_coef ({cfg.vf_coef} here)"),
        (policy() - cfg.vf_coef * value(), "the value loss has the wrong sign: it is a loss to minimise too, "
                                           "policy loss + cfg.vf_coef * value loss"),
        (policy() + cfg.vf_coef * value(clip=None),
         "the value loss is not clipped: pass cfg.value_clip to rl.value_loss, so one update cannot move a value "
         "far from the rollout's (exp.values)"),
        (policy() + cfg.vf_coef * value(clip=0.2), f"clips the values at 0.2 whatever cfg.value_clip "
                                                   f"({cfg.value_clip} here)"),
        (policy(clip=0.2) + cfg.vf_coef * value(), f"clips the ratio at 0.2 whatever cfg.clip ({cfg.clip} here)"),
        (policy(rl.masked_whiten(exp.advantages, exp.mask)) + cfg.vf_coef * value(),
         "whitens the advantages again: ppo.rollout whitened them once, over the whole rollout (read ppo.rollout); "
         "whitening each minibatch again changes them. Use exp.advantages as they are"),
        (policy(old=logprobs) + cfg.vf_coef * value(),
         "compares the policy with itself (old log-probs = the current ones, ratio 1 everywhere): the ratio's "
         "denominator is exp.logprobs, the log-probs of the policy that sampled the tokens"),
        (policy() + cfg.vf_coef * value(unshifted),
         "takes the value model's output at each token, not before it: use ppo.token_values, as the rollout did"),
        (policy() + cfg.vf_coef * value(exp.values),
         "the value loss uses the rollout's values (exp.values): compute the current ones from ac.value"),
    ]


def _grads(ac: ppo.ActorCritic, part: str) -> torch.Tensor | None:
    grads = [p.grad.flatten() for p in getattr(ac, part).parameters() if p.grad is not None]
    return torch.cat(grads) if grads else None


def check_ppo_loss(ppo_loss) -> None:
    """``ppo_loss(ac, exp, cfg)`` -> (loss, metrics): the clipped policy loss on the rollout's (whitened)
    advantages plus cfg.vf_coef times the clipped value loss; loss and gradients equal ``nblib.ppo.ppo_loss``'s."""
    with hardware.threads(1):  # a tiny model: more threads only add overhead
        _check_ppo_loss(ppo_loss)
    passed("ppo_loss")


def _check_ppo_loss(ppo_loss) -> None:
    cfg = dataclasses.replace(ppo.PPOConfig(), clip=0.15, value_clip=0.3, vf_coef=0.25)
    ours = _tiny_actor_critic()
    exp = _loss_case(ours)
    yours = copy.deepcopy(ours)
    what = f"ppo_loss (clip {cfg.clip}, value_clip {cfg.value_clip}, vf_coef {cfg.vf_coef}) on a tiny actor-critic"
    saved = {f.name: getattr(exp, f.name).clone() for f in dataclasses.fields(exp)}
    result = call_learner("ppo_loss", ppo_loss, yours, exp, cfg)
    expect_unchanged("ppo_loss", {name: getattr(exp, name) for name in saved}, saved)
    if not isinstance(result, (tuple, list)) or len(result) != 2 or not isinstance(result[1], dict):
        raise CheckFailed(f"{what}: return (loss, metrics), the metrics a dict (the skeleton's "
                          "ppo.update_metrics): the PPO loop logs its clip fraction and approx KL")
    missing = {"clip_fraction", "approx_kl", "value_loss"} - set(result[1])
    if missing:
        raise CheckFailed(f"{what}: the metrics lack {sorted(missing)}: return the skeleton's ppo.update_metrics")
    loss = _loss(what, result)
    want, _ = ppo.ppo_loss(ours, exp, cfg)
    _diagnose(what, loss.detach(), want.detach(), _loss_mistakes(ours, exp, cfg))
    if not loss.requires_grad:
        raise CheckFailed(f"{what}: the loss has no gradient: compute it from ac.policy's log-probs and ac.value's "
                          "values, with gradient (no torch.no_grad, no .detach() on them)")
    loss.backward()
    want.backward()
    for part, source in (("policy", "the log-probs: engine.sequence_logprobs(ac.policy, ...)"),
                         ("value", "the values: ppo.token_values(ac.value, ...)")):
        got_grad = _grads(yours, part)
        if got_grad is None:
            raise CheckFailed(f"{what}: no gradient reached the {part} model: compute {source}, with gradient")
        expect_close(f"{what}: the gradient of the {part} model's weights", got_grad, _grads(ours, part),
                     atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------- the update over one rollout


def _update_case():
    """Six rows of a rollout and a config of 3 epochs x 2 minibatches, the learning rate high enough that
    the order of the steps shows in the weights."""
    ac = _tiny_actor_critic()
    exp = _loss_case(ac)
    six = {f.name: torch.cat([getattr(exp, f.name), getattr(exp, f.name)[:2].flip(-1)]) for f in dataclasses.fields(exp)}
    cfg = dataclasses.replace(ppo.PPOConfig(), epochs=3, minibatches=2, lr=1e-2)
    return ac, dataclasses.replace(exp, **six), cfg


def _steps_in_orders(ac, exp, cfg, orders) -> torch.Tensor:
    """The weights after one trainer step per minibatch of each row order (a list of permutations)."""
    trainer = train.Trainer(ac, cfg.train_config(1))
    loss_fn = ppo.make_loss_fn(cfg)
    for order in orders:
        for rows in order.chunk(cfg.minibatches):
            trainer.step([dataclasses.replace(exp, **{f.name: getattr(exp, f.name)[rows]
                                                      for f in dataclasses.fields(exp)})], loss_fn)
    return _weights(ac)


def _weights(ac) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in ac.parameters()])


def check_ppo_update(ppo_update) -> None:
    """``ppo_update(trainer, exp, cfg, generator, loss)`` -> the list of ``trainer.step`` results: cfg.epochs
    passes over ``exp``, each in cfg.minibatches shuffled minibatches (the order of ``nblib.ppo.update``)."""
    with hardware.threads(1):  # a tiny model: more threads only add overhead
        _check_ppo_update(ppo_update)
    passed("ppo_update")


def _check_ppo_update(ppo_update) -> None:
    ac, exp, cfg = _update_case()
    n, expected_steps = len(exp.ids), cfg.epochs * cfg.minibatches
    what = f"ppo_update ({cfg.epochs} epochs x {cfg.minibatches} minibatches over {n} rows)"
    yours = copy.deepcopy(ac)
    trainer = train.Trainer(yours, cfg.train_config(1))
    saved = {f.name: getattr(exp, f.name).clone() for f in dataclasses.fields(exp)}
    with course_functions_refused("ppo_update", ppo, "update", write_from="the two loops (torch.randperm, .chunk, "
                                  "trainer.step)"), \
            course_functions_refused("ppo_update", train, "minibatch_steps", write_from="the two loops"):
        results = call_learner("ppo_update", ppo_update, trainer, exp, cfg, torch.Generator().manual_seed(5),
                               ppo.ppo_loss)
    expect_unchanged("ppo_update", {name: getattr(exp, name) for name in saved}, saved,
                     "index the rows into new tensors (exp.ids[rows], ...)")
    if trainer.steps_done != expected_steps:
        why = {cfg.minibatches: "one pass only: make cfg.epochs passes over the rollout",
               cfg.epochs: "one step per pass: cut each pass into cfg.minibatches minibatches, one step each",
               1: "one step in all: cfg.epochs passes, each in cfg.minibatches minibatches"}
        raise CheckFailed(f"{what}: {trainer.steps_done} optimizer steps, expected {expected_steps}"
                          f"{': ' + why[trainer.steps_done] if trainer.steps_done in why else ''}")
    if not isinstance(results, list) or len(results) != expected_steps or \
            not all(isinstance(r, dict) and "clip_fraction" in r for r in results):
        raise CheckFailed(f"{what}: return the list of the {expected_steps} trainer.step results (dicts of metrics), "
                          "in order: the PPO loop averages their clip fraction and approx KL")
    ours = copy.deepcopy(ac)
    ppo.update(train.Trainer(ours, cfg.train_config(1)), exp, cfg, torch.Generator().manual_seed(5))
    got, want = _weights(yours), _weights(ours)
    if _close(got, want):
        return
    first = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    orders = {"takes the rows in their order: shuffle them in each pass, torch.randperm(n, generator=generator)":
              [torch.arange(n)] * cfg.epochs,
              "shuffles once and makes every pass in that order: draw a new order for each pass":
              [first] * cfg.epochs}
    for message, order in orders.items():
        if _close(got, _steps_in_orders(copy.deepcopy(ac), exp, cfg, order)):
            raise CheckFailed(f"{what}: {message}")
    raise CheckFailed(f"{what}: the weights after the update differ from nblib's (by up to "
                      f"{(got - want).abs().max().item():.3g}). Each pass draws torch.randperm(n, generator=generator), "
                      "cuts it with .chunk(cfg.minibatches), and each chunk's rows of every field of exp make one "
                      "minibatch for one trainer.step([minibatch], loss_fn)")
