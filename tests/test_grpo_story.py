"""Lesson 11 in the story: exercise 11.grpo_step. The instructor's step (on nblib's pieces or on the
instructor's own group_advantages and grpo_loss) passes its check and gives grpo.run the same run as
nblib's step; each planted mistake fails the check with a message that names it."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import nblib.checks as course_checks
from nblib import chat, engine, grpo, llama, rl, train
from nblib.checks import CheckFailed
from nblib.checks import grpo as grpo_checks
from nblib.checks import rl as rl_checks

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "11_grpo.ipynb"
TOK = chat.ChatTokenizer()


def cell(start: str) -> str:
    """The source of the lesson's code cell that starts with ``start``."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    [source] = ["".join(c["source"]) for c in cells if "".join(c["source"]).startswith(start)]
    return source


def solution(exercise: str, namespace: dict):
    """The instructor's function of ``exercise``, defined in ``namespace`` from its cell (the visible check and the
    hidden tests left out)."""
    source = cell(f"# Exercise 11.{exercise} ")
    exec(source[:source.index("### END SOLUTION")], namespace)
    return namespace[exercise]


def instructor_step(own_pieces: bool = False):
    """The instructor's grpo_step, on nblib's group_advantages and grpo_loss or on the instructor's (picked and
    wrapped as the lesson does)."""
    namespace = {"torch": torch, "dataclasses": dataclasses, "engine": engine, "grpo": grpo, "train": train,
                 "rl": rl, "course_checks": course_checks, "checks": rl_checks,
                 "group_advantages_fn": rl.group_advantages, "grpo_loss_fn": lambda *args: rl.grpo_loss(*args)[0]}
    if own_pieces:
        namespace["group_advantages_fn"] = solution("group_advantages", namespace)
        solution("grpo_loss", namespace)
        exec(cell("# The rest of the lesson uses your grpo_loss"), namespace)   # defines grpo_loss_fn
    return solution("grpo_step", namespace)


@pytest.mark.parametrize("own_pieces", [False, True])
def test_the_instructor_step_passes(own_pieces):
    grpo_checks.check_grpo_step(instructor_step(own_pieces))


def test_run_with_the_instructor_step_is_the_same_run():
    """grpo.run(..., step=...) with the learner's step (right) trains the same weights and logs the same signals."""
    torch.manual_seed(3)
    policy = llama.Llama(llama.LlamaConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                           eos_token_id=TOK.end_id)).eval()
    prompts = [chat.render_prompt([{"role": "user", "content": "Hi" + "!" * i}], TOK) for i in range(3)]
    a_id = TOK.encode("a")[0]
    cfg = grpo.GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=4, epochs=2, minibatches=2, lr=3e-2,
                          kl_coef=0.1)

    def draw(rng, n):
        return [rng.choice(prompts) for _ in range(n)], lambda i, completion: float(a_id in completion)

    runs = [grpo.run(policy, policy, draw, cfg, 3, TOK.end_id, TOK.pad_id, seed=1, desc="test", step=step,
                     evaluate=lambda model: {"held-out": 0.5}, eval_every=2)
            for step in (grpo.step, instructor_step())]
    (ours, our_log), (yours, your_log) = runs
    for a, b in zip(ours.parameters(), yours.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [{k: v for k, v in h.items() if k != "clip_fraction"} for h in our_log] == your_log
    assert "clip_fraction" in our_log[0] and "held-out" in our_log[0] and "held-out" not in our_log[1]


def planted_step(mistake: str):
    """A learner's grpo_step with one planted mistake."""
    def grpo_step(trainer, ref, prompts, reward_fn, cfg, end_id, pad_id, generator=None):
        policy = trainer.model.eval()
        out = engine.generate(policy, prompts, cfg.max_new_tokens, num_samples=cfg.group_size, temperature=1.0,
                              stop_tokens=[end_id], pad_id=pad_id, generator=generator)
        with torch.set_grad_enabled(mistake == "old with gradient"):
            old = engine.sequence_logprobs(policy, out.ids, out.completion_mask, out.attention_mask)[1]
            frozen = policy if mistake == "reference from the policy" else ref
            reference = engine.sequence_logprobs(frozen, out.ids, out.completion_mask, out.attention_mask)[1]
        replies = out.completions(keep_stop=True)
        prompt_of = (lambda row: row % len(prompts)) if mistake == "prompt-major rows" else \
            (lambda row: row // cfg.group_size)
        rewards = torch.tensor([reward_fn(prompt_of(row), reply) for row, reply in enumerate(replies)])
        group_size = len(rewards) if mistake == "whole batch" else cfg.group_size
        advantages = rl.group_advantages(rewards, group_size, mistake == "always scaled" or cfg.scale_advantages)
        groups = grpo.Groups(out.ids, out.attention_mask, out.completion_mask, old, reference, rewards, advantages,
                             out.finished)

        def loss_fn(model, batch):
            logprobs = engine.sequence_logprobs(model, batch.ids, batch.mask, batch.attention_mask)[1]
            old_logprobs = logprobs.detach() if mistake == "ratio 1" else batch.logprobs
            kl_coef = 0.0 if mistake == "no KL" else cfg.kl_coef
            average = "sequence" if mistake == "always per reply" else cfg.average
            return rl.grpo_loss(logprobs, old_logprobs, batch.ref_logprobs, batch.advantages, batch.mask, cfg.clip,
                                kl_coef, average, cfg.max_new_tokens)

        epochs, minibatches = (1, 1) if mistake == "one minibatch" else (cfg.epochs, cfg.minibatches)
        step_logs = train.minibatch_steps(trainer, groups, loss_fn, epochs, minibatches, generator)
        if mistake == "old after the update":
            with torch.no_grad():
                groups.logprobs = engine.sequence_logprobs(policy, out.ids, out.completion_mask,
                                                           out.attention_mask)[1]
        if mistake == "returns nothing":
            return None
        return groups if mistake == "groups only" else (groups, step_logs)
    return grpo_step


@pytest.mark.parametrize("mistake, phrase", [
    ("whole batch", r"advantages over the whole batch"),
    ("prompt-major rows", r"row r against prompt r % prompts: .* reward_fn\(r // G"),
    ("old with gradient", r"groups.logprobs carries a gradient"),
    ("old after the update", r"the policy's after the update"),
    ("ratio 1", r"every ratio is 1"),
    ("reference from the policy", r"ref_logprobs are the policy's: compute them with ref"),
    ("no KL", r"ignores the reference: .*kl_coef"),
    ("one minibatch", r"1 trainer.step results, expected cfg.epochs x cfg.minibatches = 4"),
    ("always scaled", r"ignore cfg.scale_advantages=False"),
    ("always per reply", r"averages per reply whatever cfg.average says \('token'\)"),
    ("returns nothing", r"returned None"),
    ("groups only", r"expected \(groups, step_logs\)"),
])
def test_each_planted_mistake_is_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        grpo_checks.check_grpo_step(planted_step(mistake))


def test_the_planted_step_without_a_mistake_passes():
    grpo_checks.check_grpo_step(planted_step("none"))


def test_a_step_that_trains_the_reference_is_named():
    right = instructor_step()

    def trains_the_reference(trainer, ref, *args):
        with torch.no_grad():
            next(ref.parameters()).add_(1e-3)
        return right(trainer, ref, *args)
    with pytest.raises(CheckFailed, match="the reference model changed"):
        grpo_checks.check_grpo_step(trains_the_reference)


def test_a_step_that_calls_the_courses_step_is_refused():
    def shortcut(trainer, ref, prompts, reward_fn, cfg, end_id, pad_id, generator):
        return grpo.step(trainer, ref, prompts, reward_fn, cfg, end_id, pad_id, generator)
    with pytest.raises(CheckFailed, match="called nblib.grpo.step, the course's own version"):
        grpo_checks.check_grpo_step(shortcut)
