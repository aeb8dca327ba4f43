"""Checks for lesson 10 (DPO): the training step that the lesson's runs call.

``check_dpo_step(make_dpo_loss_fn)`` builds a tiny model and a tiny ``dpo.DPOBatch`` (seeded),
runs the learner's ``make_dpo_loss_fn(cfg)(model, batch)`` and compares the loss, every
parameter's gradient and the metrics with the course's step; a wrong loss is matched against
the usual mistakes, so the message says which one it is.
"""
from __future__ import annotations

import copy

import torch

from nblib import dpo, engine, llama, prefs, rl
from nblib.checks import CheckFailed, call_learner, course_functions_refused, expect_close, expect_unchanged, passed

_PIECES = "its pieces (one forward, your reply_logprobs and dpo_loss, the batch's reference log-probs)"

METRICS = ("chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin")
VOCAB, PAD = 13, 0
ATOL, RTOL = 1e-5, 1e-4


def _tiny_model(seed: int) -> llama.Llama:
    with torch.random.fork_rng():  # the learner's notebook keeps its own random state
        torch.manual_seed(seed)
        return llama.Llama(llama.LlamaConfig(vocab_size=VOCAB, block_size=24, n_layer=1, n_head=2, n_embd=16))


def _tiny_batch(model: llama.Llama, seed: int, n_pairs: int = 3) -> dpo.DPOBatch:
    """Prompts and replies of different lengths (so the rows are padded differently), and reference
    log-probs a few nats from the model's own (so the policy is not the reference: no logit is 0,
    and none so large that the loss and its gradients vanish)."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    pairs = [prefs.Pair(tokens(2 + i), tokens(3 + (2 * i) % 5), tokens(6 - i), 1.0, 0.0) for i in range(n_pairs)]
    own = dpo.reference_logprobs(model, pairs, PAD)
    return dpo.collate(pairs, own + 3 * torch.randn(n_pairs, 2, generator=g), PAD)


def _mistakes(model: llama.Llama, batch: dpo.DPOBatch, beta: float) -> list[tuple[tuple, str]]:
    """``(loss, metrics)`` that each usual mistake gives on ``batch``, with the message that names it."""
    pairs, B = batch.pairs, batch.n_pairs
    real = torch.arange(pairs.ids.shape[1]) <= pairs.last[:, None]          # every real token, the prompt's too
    with torch.no_grad():
        _, per_token = engine.sequence_logprobs(model, pairs.ids, real)
    summed = torch.where(pairs.completion_mask, per_token, 0.0).sum(-1)
    n_reply = pairs.completion_mask.sum(-1)
    ref = batch.ref_logprobs

    def step(policy, reference=ref, b=beta):
        return rl.dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], b)

    swap = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    return [
        (step(summed[swap], ref[swap]), "has chosen and rejected swapped: rows 0..B-1 of the batch (and of "
         "ref_logprobs) are the chosen replies, rows B..2B-1 the rejected ones"),
        (step(summed[swap]), "takes the policy's chosen and rejected halves the wrong way round: rows 0..B-1 are "
         "the chosen replies, rows B..2B-1 the rejected ones, in the batch and in ref_logprobs alike"),
        (step(summed / n_reply), "averages the log-probs over the reply's tokens: DPO compares whole replies, "
         "log pi(y|x) is the SUM of the reply tokens' log-probs (the reference's are sums too)"),
        (step(summed / n_reply, ref / n_reply), "averages the log-probs over the reply's tokens: DPO compares "
         "whole replies, log pi(y|x) is the SUM of the reply tokens' log-probs"),
        # the prompt's log-probs are the same in a pair's two rows, so they cancel in the loss: the rewards show it
        (step(per_token.sum(-1)), "counts the prompt's tokens too: only the reply's tokens (completion_mask) "
         "are summed, as for the reference's log-probs (the loss hides it: the prompt is the same in both rows "
         "of a pair; the implicit rewards show it)"),
        (step(ref), "gets ln 2, as if the policy were the reference: the reference's log-probs are in the batch "
         "(batch.ref_logprobs, computed once from the frozen model), not recomputed with the model being trained"),
        (step(summed, b=1.0), f"leaves beta out: the implicit reward is cfg.beta * (log pi - log ref), "
         f"beta={beta} here; pass cfg.beta to your dpo_loss"),
        (step(summed, b=0.1), f"uses beta=0.1 (dpo_loss's default?) where cfg.beta={beta}: pass cfg.beta"),
        (step(summed, b=beta * beta), f"applies beta twice (beta**2 = {beta * beta:g}): dpo_loss multiplies by "
         "beta itself, so give it the plain log-probs"),
    ]


def _name_the_mistake(what: str, got, want, mistakes, pick) -> None:
    """Fail naming the first mistake whose ``pick``ed value ``got`` is (and the right answer is not)."""
    got, want = torch.as_tensor(got).detach(), want.detach()
    if _close(got, want):
        return
    for result, message in mistakes:
        value = pick(result)
        if _close(got, value) and not _close(value, want):
            raise CheckFailed(f"{what}: {message} (expected {want.item():.6g}, got {got.item():.6g})")


def _close(a, b) -> bool:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return bool(((a - b).abs() <= ATOL + RTOL * b.abs()).all())


def _loss_and_metrics(what: str, result):
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise CheckFailed(f"{what}: expected (loss, metrics), a 0-d tensor and a dict, got {type(result).__name__}"
                          f"{'' if not isinstance(result, (tuple, list)) else f' of {len(result)} items'}")
    loss, metrics = result
    if isinstance(loss, (tuple, list)):
        raise CheckFailed(f"{what}: the loss is a {type(loss).__name__}: if your dpo_loss returns "
                          "(loss, metrics), take its loss; the step returns (loss, metrics) with loss a 0-d tensor")
    if not torch.is_tensor(loss):
        raise CheckFailed(f"{what}: the loss is a {type(loss).__name__} ({loss!r}), not a tensor: the trainer calls "
                          ".backward() on it. Return the tensor itself (no .item(), no float())")
    if loss.numel() != 1:
        raise CheckFailed(f"{what}: expected the loss as a 0-d tensor, got shape {tuple(loss.shape)}: "
                          "the mean over the pairs")
    if not loss.requires_grad:
        raise CheckFailed(f"{what}: the loss has no gradient (.detach(), .item(), or the policy's log-probs computed "
                          "under torch.no_grad()?): the trainer's backward must reach the model's weights. Only "
                          "the reference's log-probs (from the batch) and the metrics are constants")
    if not isinstance(metrics, dict):
        raise CheckFailed(f"{what}: metrics must be a dict of 0-d tensors, got {type(metrics).__name__}")
    missing = [name for name in METRICS if name not in metrics]
    if missing:
        raise CheckFailed(f"{what}: metrics {missing} missing: the trainer logs {', '.join(METRICS)} "
                          "(the plots read them)")
    return loss.reshape(()), metrics


def check_dpo_step(make_dpo_loss_fn) -> None:
    """``make_dpo_loss_fn(cfg)`` -> ``dpo_batch_loss(model, batch) -> (loss, metrics)``, as ``dpo.make_loss_fn``."""
    for seed, beta in ((0, 0.5), (1, 0.25)):
        cfg = dpo.DPOConfig(beta=beta)
        model = _tiny_model(seed)
        batch = _tiny_batch(model, seed)
        want_model = copy.deepcopy(model)
        what = f"dpo_batch_loss with beta={beta} on a tiny model and {batch.n_pairs} pairs (rows of different lengths)"
        with course_functions_refused("make_dpo_loss_fn", dpo, "make_loss_fn", write_from=_PIECES):
            loss_fn = call_learner("make_dpo_loss_fn", make_dpo_loss_fn, cfg)
        if not callable(loss_fn):
            raise CheckFailed(f"make_dpo_loss_fn(cfg) returned a {type(loss_fn).__name__}: return the function "
                              "dpo_batch_loss itself (the trainer calls it with (model, batch))")
        inputs = {"batch.pairs.ids": batch.pairs.ids, "batch.pairs.completion_mask": batch.pairs.completion_mask,
                  "batch.ref_logprobs": batch.ref_logprobs}
        saved = {name: value.clone() for name, value in inputs.items()}
        forwards = []
        hook = model.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
        try:
            with course_functions_refused("dpo_batch_loss", dpo, "make_loss_fn", write_from=_PIECES):
                result = call_learner("dpo_batch_loss", loss_fn, model, batch)
        finally:
            hook.remove()
        loss, metrics = _loss_and_metrics(what, result)
        expect_unchanged(what, inputs, saved, fix="the batch is read again (held-out batches, the next epoch)")
        want_loss, want_metrics = dpo.make_loss_fn(cfg)(want_model, batch)
        mistakes = _mistakes(want_model, batch, beta)
        _name_the_mistake(what, loss, want_loss, mistakes, lambda result: result[0])
        expect_close(f"{what}: the loss", loss, want_loss, atol=ATOL, rtol=RTOL)
        if len(forwards) != 1:
            raise CheckFailed(f"{what}: ran the model {len(forwards)} times (on {forwards} rows): one forward over "
                              f"all {2 * batch.n_pairs} rows, chosen and rejected together, gives every log-prob")
        loss.backward()
        want_loss.backward()
        for (name, param), want_param in zip(model.named_parameters(), want_model.parameters()):
            if param.grad is None:
                raise CheckFailed(f"{what}: no gradient reached the model's {name}: compute the policy's log-probs "
                                  "with gradient, from one forward of the model on batch.pairs.ids")
            expect_close(f"{what}: the gradient of the model's {name}", param.grad, want_param.grad,
                         atol=ATOL, rtol=RTOL)
        for name in METRICS:
            _name_the_mistake(f"{what}: metrics[{name!r}]", metrics[name], want_metrics[name], mistakes,
                              lambda result: result[1][name])
            expect_close(f"{what}: metrics[{name!r}] (batch mean; reward_accuracy the share of pairs whose chosen "
                         "implicit reward is higher)", metrics[name], want_metrics[name], atol=ATOL, rtol=RTOL)
    passed("dpo_step")
