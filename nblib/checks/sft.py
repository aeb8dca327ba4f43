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


# ---------------------------------------------------------------------------- 08.generate

def _tiny_models():
    """A tiny GPT and a tiny Llama (random weights, vocab 61): both families take the same loop."""
    from nblib import gpt, llama
    torch.manual_seed(0)
    small_gpt = gpt.GPT(gpt.GPTConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_embd=32)).eval()
    torch.manual_seed(0)
    small_llama = llama.Llama(llama.LlamaConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_kv_heads=2,
                                                n_embd=32)).eval()
    return {"a tiny GPT": small_gpt, "a tiny Llama": small_llama}


GEN_PROMPTS = [[5, 9, 2, 7, 7, 1, 30], [11], [3, 40, 8, 12]]  # lengths 7, 1, 4: rows 1 and 2 are padded


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _a_stop_token(model, prompts, steps: int) -> int:
    """A token that the first row writes greedily in the middle of its completion, and the others not at once:
    with it as the stop token, rows finish at different steps."""
    from nblib import engine
    out = engine.generate(model, prompts, steps, temperature=0.0).completions()
    firsts = {row[0] for row in out}
    return next(t for t in out[0][2:] if t not in firsts)


def _diagnose_generate(what: str, got, want, model, pad_id: int, temperature: float) -> None:
    """Compare the learner's rollout with ``engine.generate``'s, naming the first mistake found."""
    for field in ("ids", "attention_mask", "completion_mask", "logprobs", "finished", "prompt_len"):
        if not hasattr(got, field):
            raise CheckFailed(f"generate ({what}) should return an engine.Rollout (ids, attention_mask, "
                              f"completion_mask, logprobs, finished, prompt_len); it has no {field!r}")
    P = want.prompt_len
    expect_equal(f"generate ({what}): prompt_len (the longest prompt)", int(got.prompt_len), P)
    if tuple(got.ids.shape[:1]) != tuple(want.ids.shape[:1]) or got.ids.dim() != 2:
        raise CheckFailed(f"generate ({what}): ids should be [{want.ids.shape[0]}, P + new tokens], "
                          f"got shape {tuple(got.ids.shape)}")
    if not torch.equal(got.ids[:, :P].cpu(), want.ids[:, :P].cpu()):
        right = torch.stack([torch.cat([r[m], r[~m]]) for r, m in zip(want.ids[:, :P], want.attention_mask[:, :P])])
        if torch.equal(got.ids[:, :P].cpu(), right.cpu()):
            raise CheckFailed(f"generate ({what}): the prompts are padded on the right. Pad on the LEFT, so that "
                              "every row's last prompt token is in column P - 1 and one decode step serves all rows")
        raise CheckFailed(f"generate ({what}): the first P columns should be the left-padded prompts "
                          f"(pad_id {pad_id}, then the prompt).\nexpected {want.ids[:, :P].tolist()}\n"
                          f"     got {got.ids[:, :P].tolist()}")
    if not torch.equal(got.attention_mask[:, :P].bool().cpu(), want.attention_mask[:, :P].cpu()):
        raise CheckFailed(f"generate ({what}): the attention mask of the prompts should be True on the prompt's "
                          "tokens and False on the padding before them")
    n_got, n_want = got.ids.shape[1] - P, want.ids.shape[1] - P
    gen = slice(P, P + min(n_got, n_want))
    same_tokens = torch.equal(got.ids[:, gen].cpu(), want.ids[:, gen].cpu())
    if not same_tokens:
        wrong_rows = (got.ids[:, gen].cpu() != want.ids[:, gen].cpu()).any(1)
        padded = ~want.attention_mask[:, :P].all(1).cpu()
        after_stop = torch.zeros_like(want.completion_mask[:, gen].cpu())
        after_stop[:, 1:] = ~want.completion_mask[:, gen][:, 1:].cpu() & want.finished.cpu()[:, None]
        before_stop = ~after_stop
        if torch.equal(got.ids[:, gen].cpu()[before_stop], want.ids[:, gen].cpu()[before_stop]):
            raise CheckFailed(f"generate ({what}): after a row writes its stop token, the row is finished: write "
                              f"pad_id ({pad_id}) in its later columns (attention and completion masks False, "
                              "log-prob 0), not more tokens")
        if bool((wrong_rows <= padded).all()):
            raise CheckFailed(f"generate ({what}): the rows without padding are right and the padded rows "
                              f"{padded.nonzero().flatten().tolist()} are not: attention sees their padding. Pass "
                              "the attention mask to prefill and to every decode_step, one column longer each step "
                              "(True for a row still writing)")
        raise CheckFailed(f"generate ({what}): the new tokens differ from the engine's.\nexpected "
                          f"{want.ids[:, P:].tolist()}\n     got {got.ids[:, P:].tolist()}\n"
                          "Pick each token with sample.sample_next_token(logits, temperature, generator=generator) "
                          "from the logits of the step (prefill's first, then decode_step's on the column just written)")
    if n_got != n_want:
        if n_got > n_want:
            raise CheckFailed(f"generate ({what}): every row had finished after {n_want} new tokens, but the loop "
                              f"went on to {n_got}: stop as soon as all rows are finished")
        raise CheckFailed(f"generate ({what}): {n_got} new tokens, expected {n_want}: go on while a row is still "
                          "writing, up to max_new_tokens")
    if not torch.equal(got.finished.bool().cpu(), want.finished.cpu()):
        raise CheckFailed(f"generate ({what}): finished should be {want.finished.tolist()} (True for a row that "
                          f"wrote a stop token), got {got.finished.tolist()}")
    for field, meaning in (("completion_mask", "True on every new token a row wrote, its stop token included, "
                                               "False on the prompt and after the stop"),
                           ("attention_mask", "the prompt's mask, then True on every new token a row wrote, its "
                                              "stop token included")):
        if not torch.equal(getattr(got, field).bool().cpu(), getattr(want, field).cpu()):
            raise CheckFailed(f"generate ({what}): {field} should be {meaning}.\nexpected "
                              f"{getattr(want, field).int().tolist()}\n     got {getattr(got, field).int().tolist()}")
    got_lp, want_lp = got.logprobs.detach().float().cpu(), want.logprobs.cpu()
    if (got_lp[~want.completion_mask.cpu()] != 0).any():
        raise CheckFailed(f"generate ({what}): logprobs should be 0 outside the completion (the prompt, and a "
                          "finished row's padding)")
    if temperature not in (0.0, 1.0):
        if not torch.allclose(got_lp, want_lp, atol=1e-4) and _logprobs_at_temperature_one(model, want, got_lp):
            raise CheckFailed(f"generate ({what}): the log-probs are the model's softmax(logits), but a token "
                              f"drawn at temperature {temperature} comes from softmax(logits / temperature): "
                              "give its log-prob under that distribution")
    if not torch.allclose(got_lp, want_lp, atol=1e-4, rtol=1e-4):
        worst = (got_lp - want_lp).abs().max().item()
        raise CheckFailed(f"generate ({what}): the log-probs are off by up to {worst:.3g}: each is "
                          "log_softmax(logits / temperature) (temperature 0: of the logits) at the token picked, "
                          "from the logits that picked it")


def _logprobs_at_temperature_one(model, want, got_lp) -> bool:
    """Whether ``got_lp`` are the sampled tokens' log-probs under the model's plain softmax (temperature 1)."""
    from nblib import engine
    with torch.no_grad():
        logits = model(want.ids, attention_mask=want.attention_mask)[0]
    plain = engine.token_logprobs(logits[:, :-1], want.ids[:, 1:], 1.0)
    plain = torch.cat([torch.zeros_like(plain[:, :1]), plain], 1).masked_fill(~want.completion_mask, 0.0)
    return torch.allclose(got_lp, plain, atol=1e-4)


def check_generate(generate) -> None:
    """``generate(model, prompts, max_new_tokens, temperature, stop_tokens, pad_id, generator) -> engine.Rollout``
    as ``nblib.engine.generate`` (one sample per prompt, no top-k/top-p)."""
    from nblib import engine
    for name, model in _tiny_models().items():
        stop = _a_stop_token(model, GEN_PROMPTS, 12)
        cases = [("greedy, no stop token", 0.0, [], None),
                 ("greedy, a stop token that rows write at different steps", 0.0, [stop], None),
                 ("temperature 0.8, a generator per row, a stop token", 0.8, [stop], (10, 11, 12)),
                 ("temperature 1, every row stops at its first token", 1.0, list(range(61)), (4, 5, 6))]
        for what, temperature, stops, seeds in cases:
            what = f"{name}, {what}"
            prompts = [list(p) for p in GEN_PROMPTS]
            got = call_learner(f"generate ({what})", generate, model, prompts, 12, temperature, stops, 0,
                               _generators(seeds) if seeds else None)
            if prompts != GEN_PROMPTS:
                raise CheckFailed(f"generate ({what}) changed the prompts it was given: they are the caller's")
            want = engine.generate(model, GEN_PROMPTS, 12, temperature=temperature, stop_tokens=stops, pad_id=0,
                                   generator=_generators(seeds) if seeds else None)
            _diagnose_generate(what, got, want, model, 0, temperature)
    passed("generate")
