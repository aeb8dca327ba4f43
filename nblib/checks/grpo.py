"""Check of lesson 11's GRPO step (exercise 11.grpo_step) against ``nblib.grpo.step``.

The check builds a tiny Llama policy and a different tiny reference, a toy reward that depends
on the prompt and the reply, and takes one step, the learner's and nblib's from the same weights
and the same generator seed, in two configurations: two epochs of two minibatches with a KL term;
no std, the per-token average and three minibatches. Both steps must sample the same replies, so
the groups must match, and the trained weights within a tolerance. Each usual mistake in the
update is replayed with nblib's pieces, so that a step that lands on one is told which.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from nblib import chat, engine, grpo, llama, rl, train
from nblib.checks import CheckFailed, call_learner, course_functions_refused, expect_close, passed

TOK = chat.ChatTokenizer()
SEED = 11


def _tiny(seed: int) -> llama.Llama:
    torch.manual_seed(seed)
    model = llama.Llama(llama.LlamaConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                          eos_token_id=TOK.end_id))
    with torch.no_grad():   # the end token's logit follows one feature: replies of 1 to 4 tokens, so that the
        model.lm_head.weight[TOK.end_id] = 0.0   # per-reply and per-token averages differ
        model.lm_head.weight[TOK.end_id, 0] = 4.0
    return model.eval()


def _case():
    """(policy, reference, prompts of different lengths, reward_fn, cfgs): a reward of 0 to 1 in quarters that
    depends on the prompt, so that replies scored against the wrong prompt get other rewards; the lesson's
    defaults with a KL term and two epochs of two minibatches, then the other switches of the recipe."""
    prompts = [chat.render_prompt([{"role": "user", "content": text}], TOK) for text in ("Hi", "2+2?", "Say a")]
    cfg = grpo.GRPOConfig(prompts_per_step=len(prompts), group_size=4, max_new_tokens=4, kl_coef=0.5, epochs=2,
                          minibatches=2, lr=1e-2)
    cfgs = [cfg, dataclasses.replace(cfg, kl_coef=0.0, scale_advantages=False, average="token", epochs=1,
                                     minibatches=3)]
    return _tiny(SEED), _tiny(SEED + 1), prompts, lambda i, completion: ((completion[0] * 7 + 3 * i) % 5) / 4, cfgs


def _nblib_step(policy, ref, prompts, reward_fn, cfg, step=grpo.step):
    """nblib's step (or ``step``) on a copy of ``policy``: (groups, results, the trained copy)."""
    trainer = train.Trainer(copy.deepcopy(policy), cfg.train_config(1))
    torch.manual_seed(SEED)
    groups, results = step(trainer, ref, prompts, reward_fn, cfg, TOK.end_id, TOK.pad_id,
                           torch.Generator().manual_seed(SEED))
    return groups, results, trainer.model


def _step_with_ratio_one(trainer, ref, prompts, reward_fn, cfg, end_id, pad_id, generator):
    """The mistake of old log-probs taken from the policy inside the loss: every ratio is 1, the clip never acts."""
    groups = grpo.rollout(trainer.model, ref, prompts, reward_fn, cfg, end_id, pad_id, generator)

    def loss_fn(model, batch):
        _, logprobs = engine.sequence_logprobs(model, batch.ids, batch.mask, batch.attention_mask)
        return rl.grpo_loss(logprobs, logprobs.detach(), batch.ref_logprobs, batch.advantages, batch.mask, cfg.clip,
                            cfg.kl_coef, cfg.average, cfg.max_new_tokens)
    return groups, train.minibatch_steps(trainer, groups, loss_fn, cfg.epochs, cfg.minibatches, generator)


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _close(got: torch.Tensor, want: torch.Tensor, atol: float) -> bool:
    return got.shape == want.shape and bool(((got - want).abs() <= atol).all())


def _expect_result(what: str, result) -> tuple:
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise CheckFailed(f"{what}: expected (groups, step_logs), got {type(result).__name__}: return both")
    groups, step_logs = result
    missing = [f.name for f in dataclasses.fields(grpo.Groups) if not torch.is_tensor(getattr(groups, f.name, None))]
    if missing:
        raise CheckFailed(f"{what}: groups must be a grpo.Groups with every field a tensor; missing or not a tensor: "
                          f"{', '.join(missing)}")
    if not isinstance(step_logs, (list, tuple)):
        raise CheckFailed(f"{what}: step_logs must be the list of trainer.step results, got {type(step_logs).__name__}")
    return groups, list(step_logs)


def _check_groups(what: str, got: grpo.Groups, want: grpo.Groups, trained, reward_fn, cfg) -> None:
    """The groups before the update: sampled replies, rewards, advantages, old and reference log-probs."""
    if not torch.equal(got.ids.cpu(), want.ids) or not torch.equal(got.mask.cpu(), want.mask):
        raise CheckFailed(f"{what}: the sampled ids or the reply mask differ from engine.generate's with the same "
                          "generator: sample once, with num_samples=cfg.group_size, temperature 1, before anything "
                          "else draws from the generator, and keep out.completion_mask as the mask")
    completions = engine.completion_tokens(want.ids, want.mask)
    by_prompt_major = torch.tensor([reward_fn(row % cfg.prompts_per_step, c) for row, c in enumerate(completions)])
    if not _close(got.rewards.double().cpu(), want.rewards.double(), 1e-6):
        if _close(got.rewards.double().cpu(), by_prompt_major.double(), 1e-6):
            raise CheckFailed(f"{what}: rewards score reply row r against prompt r % prompts: engine.generate lays "
                              "out rows i*G ... i*G+G-1 as prompt i's group, so score row r with "
                              "reward_fn(r // G, ...)")
        expect_close(f"{what}: the rewards (reward_fn(row // group_size, reply with its end token))", got.rewards,
                     want.rewards)
    whole_batch = rl.group_advantages(want.rewards, len(want.rewards), scale=cfg.scale_advantages)
    if _close(got.advantages.double().cpu(), whole_batch.double(), 1e-5):
        raise CheckFailed(f"{what}: advantages over the whole batch as one group: each reply is compared with its "
                          "own group, group_advantages(rewards, cfg.group_size, ...)")
    other_scale = rl.group_advantages(want.rewards, cfg.group_size, scale=not cfg.scale_advantages)
    if _close(got.advantages.double().cpu(), other_scale.double(), 1e-5):
        raise CheckFailed(f"{what}: the advantages ignore cfg.scale_advantages={cfg.scale_advantages}: pass it to "
                          "group_advantages as its scale")
    expect_close(f"{what}: the advantages (your group_advantages of the rewards)", got.advantages, want.advantages,
                 atol=1e-5)
    for name in ("logprobs", "ref_logprobs"):
        if getattr(got, name).requires_grad:
            raise CheckFailed(f"{what}: groups.{name} carries a gradient: the log-probs of the sampling policy and of "
                              "the reference are constants of the update; compute them under torch.no_grad()")
    _, after = engine.sequence_logprobs(trained, want.ids, want.mask, want.attention_mask)
    if _close(got.logprobs.double().cpu(), after.detach().double(), 1e-5):
        raise CheckFailed(f"{what}: groups.logprobs are the policy's after the update: the old log-probs are those "
                          "of the policy that sampled the replies, computed before the first trainer.step")
    if _close(got.ref_logprobs.double().cpu(), want.logprobs.double(), 1e-5):
        raise CheckFailed(f"{what}: groups.ref_logprobs are the policy's: compute them with ref, the frozen "
                          "reference model")
    expect_close(f"{what}: groups.logprobs (the sampling policy's, per token)", got.logprobs, want.logprobs, atol=1e-5)
    expect_close(f"{what}: groups.ref_logprobs (the reference's, per token)", got.ref_logprobs, want.ref_logprobs,
                 atol=1e-5)


def _mistaken_weights(policy, ref, prompts, reward_fn, cfg) -> list[tuple[torch.Tensor, str]]:
    """The weights each usual mistake in the update leaves, with its message (those that differ under ``cfg``)."""
    runs = [(dataclasses.replace(cfg, average="sequence"), grpo.step,
             (f"averages per reply whatever cfg.average says ({cfg.average!r}): pass cfg.average and "
              "cfg.max_new_tokens on to grpo_loss_fn"))] if cfg.average != "sequence" else []
    if cfg.kl_coef:
        runs.append((dataclasses.replace(cfg, kl_coef=0.0), grpo.step,
                     ("ignores the reference: the loss needs the k3 KL term, kl_coef=cfg.kl_coef, on "
                      "groups.ref_logprobs")))
    if cfg.epochs * cfg.minibatches > 1:
        runs.append((cfg, _step_with_ratio_one,
                     ("uses the policy's current log-probs as the old ones inside the loss, so every ratio is 1 "
                      "and the clip never acts: the old log-probs are fixed once, before the update "
                      "(groups.logprobs)")))
    return [(_weights(_nblib_step(policy, ref, prompts, reward_fn, run_cfg, step)[2]), message)
            for run_cfg, step, message in runs]


def _check_one(grpo_step, policy, ref, prompts, reward_fn, cfg, atol: float) -> None:
    want, want_logs, want_model = _nblib_step(policy, ref, prompts, reward_fn, cfg)
    trainer = train.Trainer(copy.deepcopy(policy), cfg.train_config(1))
    ref_before = _weights(ref)
    what = (f"grpo_step on {len(prompts)} prompts x group_size {cfg.group_size}, kl_coef {cfg.kl_coef}, "
            f"scale_advantages {cfg.scale_advantages}, average {cfg.average!r}, {cfg.epochs} epoch(s) x "
            f"{cfg.minibatches} minibatch(es)")
    torch.manual_seed(SEED)
    with course_functions_refused("grpo_step", grpo, "step", "rollout", "update",
                                  write_from="its pieces (engine.generate, your group advantages and loss, trainer.step)"):
        result = call_learner(what, grpo_step, trainer, ref, prompts, reward_fn, cfg, TOK.end_id, TOK.pad_id,
                              torch.Generator().manual_seed(SEED))
    groups, step_logs = _expect_result(what, result)
    if not torch.equal(_weights(ref), ref_before):
        raise CheckFailed(f"{what}: the reference model changed: only trainer.model is trained; ref stays frozen")
    _check_groups(what, groups, want, want_model, reward_fn, cfg)
    if len(step_logs) != len(want_logs):
        raise CheckFailed(f"{what}: {len(step_logs)} trainer.step results, expected cfg.epochs x cfg.minibatches = "
                          f"{len(want_logs)}: take cfg.epochs passes over the groups, each in cfg.minibatches shuffled "
                          "minibatches, one trainer.step per minibatch, and return every result")
    got = _weights(trainer.model)
    if not _close(got, _weights(want_model), atol):
        for weights, message in _mistaken_weights(policy, ref, prompts, reward_fn, cfg):
            if _close(got, weights, atol):
                raise CheckFailed(f"{what}: the update {message}")
        expect_close(f"{what}: the policy's weights after the step", got, _weights(want_model), atol=atol, rtol=0)


def check_grpo_step(grpo_step, atol: float = 2e-4) -> None:
    """``grpo_step(trainer, ref, prompts, reward_fn, cfg, end_id, pad_id, generator) -> (groups, step_logs)``:
    the groups and the weights after ``cfg.epochs x cfg.minibatches`` trainer steps must be nblib's."""
    policy, ref, prompts, reward_fn, cfgs = _case()
    for cfg in cfgs:
        _check_one(grpo_step, policy, ref, prompts, reward_fn, cfg, atol)
    passed("grpo_step")
