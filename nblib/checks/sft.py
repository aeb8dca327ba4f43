"""Checks for lesson 08's exercises: the chat template with its mask, the masked loss, per-task accuracy."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from nblib import chat, sft, tasks
from nblib.checks import CheckFailed, call_learner, expect_close, expect_equal, expect_unchanged, passed

TOK = chat.ChatTokenizer()

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12+34?"}, {"role": "assistant", "content": "46"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hail!"},
     {"role": "user", "content": "Spell dog."}, {"role": "assistant", "content": "d-o-g"}],
    [{"role": "user", "content": "x"}],
    # the assistant speaks first, the user types the end token's text, and a reply is empty
    [{"role": "assistant", "content": "Good morrow."}, {"role": "user", "content": "Say <|end|> twice."},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "ok"}],
    [],
]


def check_render(render) -> None:
    """``render(conversation, tokenizer) -> (ids, mask)`` as ``nblib.chat.render``."""
    for conv in CONVERSATIONS:
        got = call_learner("render", render, conv, TOK)
        if not isinstance(got, tuple) or len(got) != 2:
            raise CheckFailed(f"render should return a tuple (ids, mask), got {type(got).__name__}")
        ids, mask = (list(x.tolist()) if torch.is_tensor(x) else list(x) for x in got)
        want_ids, want_mask = chat.render(conv, TOK)
        roles = " / ".join(m["role"] for m in conv) or "empty"
        expect_equal(f"ids of the conversation ({roles}), as text", TOK.decode(ids), TOK.decode(want_ids))
        if ids.count(TOK.end_id) != want_ids.count(TOK.end_id):
            raise CheckFailed(f"ids of the conversation ({roles}): the text is right but the end token appears "
                              f"{ids.count(TOK.end_id)} times, not {want_ids.count(TOK.end_id)}: '<|end|>' typed in a "
                              "message is seven characters (tok.encode), only the template adds the end token")
        expect_equal(f"ids of the conversation ({roles})", ids, want_ids)
        if len(mask) != len(ids):
            raise CheckFailed(f"the mask has {len(mask)} entries for {len(ids)} ids: one per token")
        mask = [bool(m) for m in mask]
        if mask != want_mask:
            raise CheckFailed(f"the mask of ({roles}) is off; [brackets] mark the masked tokens.\n"
                              f"expected: {chat.show_mask(want_ids, want_mask, TOK)}\n"
                              f"     got: {chat.show_mask(ids, mask, TOK)}")
    what = "render of a role the template does not know ('system')"
    try:
        got = call_learner(what, render, [{"role": "system", "content": "x"}], TOK)
    except CheckFailed as err:
        if not isinstance(err.__cause__, ValueError):
            raise CheckFailed(f"{what} should raise ValueError (tok.role_id does), got {err}") from err
    else:
        raise CheckFailed(f"{what} should raise ValueError (tok.role_id does), got {got!r}")
    passed("render")


def _cases(seed: int = 8):
    g = torch.Generator().manual_seed(seed)
    batch = sft.collate([chat.render(c, TOK) for c in CONVERSATIONS[:2]], TOK.pad_id)
    logits = torch.randn(*batch.ids.shape, TOK.vocab_size, generator=g)
    yield "two padded conversations", logits, batch.ids, batch.mask
    ids = torch.randint(4, TOK.vocab_size, (3, 9), generator=g)
    mask = torch.rand(3, 9, generator=g) < 0.5
    mask[:, 1] = True  # at least one target in the mask
    yield "random ids and mask [3, 9]", torch.randn(3, 9, TOK.vocab_size, generator=g) * 3, ids, mask


def check_sft_loss(sft_loss) -> None:
    """``sft_loss(logits [B, T, V], ids [B, T], mask [B, T]) -> scalar`` as ``nblib.sft.sft_loss``."""
    for what, logits, ids, mask in _cases():
        given = {"logits": logits.clone(), "ids": ids.clone(), "mask": mask.clone()}
        got = call_learner("sft_loss", sft_loss, *given.values())
        expect_unchanged(f"sft_loss on {what}", given, {"logits": logits, "ids": ids, "mask": mask},
                         "the batch belongs to the caller, who uses it again (e.g. ids[~mask] = -100 or "
                         "logits.masked_fill_ wrote into it). Build new tensors instead "
                         "(torch.where(mask, ids, -100), or .clone() first)")
        want = sft.sft_loss(logits, ids, mask)
        if torch.is_tensor(got) and got.numel() != 1:
            raise CheckFailed(f"sft_loss on {what}: expected one number (a 0-d tensor), got shape {tuple(got.shape)}")
        got_f = float(got)
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                    reduction="none").view(ids.shape[0], -1)
        unshifted = (per_token * mask[:, :-1]).sum() / mask[:, :-1].sum()
        over_all = (per_token * mask[:, 1:]).sum() / per_token.numel()
        keep = mask[:, 1:].float()
        row_means = (per_token * keep).sum(1)[keep.sum(1) > 0] / keep.sum(1)[keep.sum(1) > 0]
        per_row = row_means.mean()
        same_position = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids.reshape(-1),
                                        reduction="none").view(ids.shape)
        no_shift = (same_position * mask).sum() / mask.sum()
        mistakes = [  # (what a typical mistake computes, what to say when the learner's value is that)
            (unshifted, "is the loss with the mask of the *input* tokens; position t predicts token t+1, so the "
                        "mask of the target (mask[:, 1:]) decides"),
            (over_all, f"divides by every position; the mean is over the masked targets only (expected {float(want):.4f})"),
            (no_shift, "scores logits[:, t] against ids[:, t]; logits[:, t] predicts the *next* token ids[:, t + 1]: "
                       "shift by one"),
            (per_row, "is a mean of per-conversation means; every masked token weighs the same, whatever its row "
                      f"(expected {float(want):.4f})"),
        ]
        for wrong, message in mistakes:
            if abs(got_f - float(wrong)) < 1e-5 and abs(float(wrong) - float(want)) > 1e-4:
                raise CheckFailed(f"sft_loss on {what}: {got_f:.4f} {message}")
        expect_close(f"sft_loss on {what}", got_f, float(want), atol=1e-4, rtol=1e-4)
    # no gradient reaches logits whose target is outside the mask
    _, logits, ids, mask = next(_cases(9))
    logits = logits.clone().requires_grad_(True)
    loss = call_learner("sft_loss", sft_loss, logits, ids, mask)
    if not torch.is_tensor(loss) or not loss.requires_grad:
        raise CheckFailed("sft_loss must return a tensor that gradients flow through (not a float or .item())")
    loss.backward()
    outside = torch.ones_like(mask)
    outside[:, :-1] = ~mask[:, 1:]
    leaked = logits.grad.abs().sum(-1)[outside]
    if leaked.max() > 0:
        raise CheckFailed("logits whose target is outside the mask (or padding, or the last position) got a "
                          f"gradient of up to {leaked.max().item():.3g}: they must not count at all")
    passed("sft_loss")


def _accuracy_against_demonstrations(problems, replies) -> dict[str, float]:
    """``sft.accuracy_by_task`` with each verifiable problem's demonstration taken as its answer (the mistake)."""
    as_demonstrated = [dataclasses.replace(p, answer=p.reply) if p.verifiable else p for p in problems]
    return sft.accuracy_by_task(as_demonstrated, replies)


def check_per_task_accuracy(per_task_accuracy) -> None:
    """``per_task_accuracy(problems, replies) -> {task: fraction right}`` over verifiable problems."""
    add = tasks.Addition()
    problems = [add.problem(12, 34), add.problem(50, 50), add.problem(19, 80),
                add.problem(58, 67, drop=True),  # a teacher forgetting the carry demonstrates "115"; the answer: 125
                tasks.Problem("reverse", "Reverse night.", "thgin", "thgin"),
                tasks.Problem("reverse", "Reverse dog.", "god", "god"),
                tasks.Problem("say", "Speak like a king.", "Now is the winter."),  # open: no answer, skipped
                tasks.Problem("opposite", "Opposite of someone?", "no one", "no one")]
    cases = [
        ("every reply right", ["46", "100", "99", "125", "thgin", "god", "anything", "no one"],
         {"add": 1.0, "reverse": 1.0, "opposite": 1.0}),
        ("some wrong", ["46", "10", "98", "115", "thgin", "dog", "", "noone"],
         {"add": 1 / 4, "reverse": 0.5, "opposite": 0.0}),
        ("spaces and case do not count", [" 46", "100 ", "99\n", " 125", "THGIN", "God", "x", " No   one"],
         {"add": 1.0, "reverse": 1.0, "opposite": 1.0}),
    ]
    for what, replies, want in cases:
        got = call_learner("per_task_accuracy", per_task_accuracy, list(problems), list(replies))
        if not isinstance(got, dict):
            raise CheckFailed(f"per_task_accuracy should return a dict {{task: accuracy}}, got {type(got).__name__}")
        if "say" in got:
            raise CheckFailed(f"per_task_accuracy ({what}): 'say' is an open request (answer None): "
                              "skip it, it has no accuracy and no entry in the result")
        expect_equal(f"tasks in the result ({what})", sorted(got), sorted(want))
        if got.get("add") == _accuracy_against_demonstrations(problems, replies)["add"] != want["add"]:
            raise CheckFailed(f"per_task_accuracy ({what}): you scored the replies against problem.reply, the "
                              "teacher's demonstration, which can be wrong (this teacher forgets the carry: "
                              "58+67 -> '115'). A reply is right when it equals problem.answer, the true answer")
        for task, value in want.items():
            expect_close(f"accuracy of {task!r} ({what})", got[task], value, atol=1e-9, rtol=0)
    passed("per_task_accuracy")
