"""Lesson 10's DPO step (exercise 10.dpo_step): the course's step and a right answer pass the check,
each named wrong answer fails it with a message that names the mistake; the lesson's helpers
take the learner's reply_logprobs and give nblib's numbers with a right one."""
import functools
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from nblib import dpo, engine, rl
from nblib.checks import CheckFailed
from nblib.checks import dpo as dpo_checks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import exercises  # noqa: E402


def reply_logprobs_right(logits, ids, mask):
    taken = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.where(mask[:, 1:], taken, 0.0).sum(-1)


def make_step(swap=False, swap_policy=False, mean=False, prompt=False, ref_from_model=False, no_grad=False,
              beta=None, beta_twice=False, as_float=False, detached=False, drop_metric=None, loss_tuple=False,
              in_place=False, two_forwards=False, ref_second_forward=False):
    """The instructor's step, with one planted mistake when a flag is set."""
    def make_dpo_loss_fn(cfg):
        def dpo_batch_loss(model, batch):
            pairs, B = batch.pairs, batch.n_pairs
            mask = pairs.completion_mask
            if prompt:
                mask = torch.arange(pairs.ids.shape[1]) <= pairs.last[:, None]
            with torch.set_grad_enabled(not no_grad):
                if two_forwards:  # the chosen rows, then the rejected rows: the same numbers from two calls
                    logprobs = torch.cat([engine.sequence_logprobs(model, pairs.ids[:B], mask[:B])[0],
                                          engine.sequence_logprobs(model, pairs.ids[B:], mask[B:])[0]])
                else:
                    logprobs = engine.sequence_logprobs(model, pairs.ids, mask)[0]
            if mean:
                logprobs = logprobs / mask.sum(-1)
            ref = logprobs if ref_from_model else batch.ref_logprobs
            if ref_second_forward:  # "the reference" recomputed, with gradient, by the model being trained
                ref = engine.sequence_logprobs(model, pairs.ids, mask)[0]
            if in_place:
                ref = ref.sub_(ref.mean())  # a shift that cancels in the loss, written into the batch
            order = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
            if swap or swap_policy:
                logprobs = logprobs[order]
            if swap:
                ref = ref[order]
            b = cfg.beta if beta is None else beta
            scale = cfg.beta if beta_twice else 1.0
            loss, metrics = rl.dpo_loss(scale * logprobs[:B], scale * logprobs[B:], scale * ref[:B], scale * ref[B:], b)
            if drop_metric:
                metrics.pop(drop_metric)
            if as_float:
                loss = loss.item()
            if detached:
                loss = loss.detach()
            if loss_tuple:
                loss = (loss, metrics)
            return loss, metrics
        return dpo_batch_loss
    return make_dpo_loss_fn


def make_step_with_reply_logprobs(cfg):
    """A right answer as the lesson's exercise writes it: one forward, the learner's reply_logprobs."""
    def dpo_batch_loss(model, batch):
        B = batch.n_pairs
        logprobs = dpo.completion_logprobs(model, batch.pairs, reply_logprobs=reply_logprobs_right)
        ref = batch.ref_logprobs
        loss = rl.dpo_loss(logprobs[:B], logprobs[B:], ref[:B], ref[B:], cfg.beta)[0]
        with torch.no_grad():
            chosen, rejected = cfg.beta * (logprobs[:B] - ref[:B]), cfg.beta * (logprobs[B:] - ref[B:])
        return loss, {"chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
                      "reward_accuracy": (chosen > rejected).float().mean(), "reward_margin": (chosen - rejected).mean()}
    return dpo_batch_loss


def test_right_answers_pass(capsys):
    dpo_checks.check_dpo_step(make_step())
    dpo_checks.check_dpo_step(make_step_with_reply_logprobs)
    assert "dpo_step: passed" in capsys.readouterr().out


def test_the_course_step_is_refused_as_an_answer():
    with pytest.raises(CheckFailed, match="course's own implementation"):
        dpo_checks.check_dpo_step(dpo.make_loss_fn)
    with pytest.raises(CheckFailed, match="called nblib.dpo.make_loss_fn, the course's own version"):
        dpo_checks.check_dpo_step(lambda cfg: lambda model, batch: dpo.make_loss_fn(cfg)(model, batch))


def exercise_namespace(version):
    """The lesson's 10.dpo_step cell up to its check, run as the instructor or the student version, with the
    pieces the lesson picks before it (here the learner's reply_logprobs and nblib's loss)."""
    nb = nbformat.read(ROOT / "notebooks" / "10_dpo.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.source.startswith("# Exercise 10.dpo_step"))
    source = cell if version == "instructor" else "\n".join(exercises.parse_code(cell, "10.dpo_step")["student"])
    namespace = {"torch": torch, "dpo_loss_fn": lambda *args: rl.dpo_loss(*args)[0],
                 "completion_logprobs": functools.partial(dpo.completion_logprobs, reply_logprobs=reply_logprobs_right)}
    exec(source[:source.index("dpo_checks.check_dpo_step(")], namespace)
    return namespace


def test_the_lessons_solution_passes_and_its_stub_says_not_written_yet(capsys):
    dpo_checks.check_dpo_step(exercise_namespace("instructor")["make_dpo_loss_fn"])
    assert "dpo_step: passed" in capsys.readouterr().out
    with pytest.raises(NotImplementedError, match="not written yet"):
        dpo_checks.check_dpo_step(exercise_namespace("student")["make_dpo_loss_fn"])


@pytest.mark.parametrize("flags, phrase", [
    ({"swap": True}, "chosen and rejected swapped"),
    ({"swap_policy": True}, "the policy's chosen and rejected halves the wrong way round"),
    ({"mean": True}, "averages the log-probs over the reply's tokens"),
    ({"prompt": True}, "counts the prompt's tokens too"),
    ({"ref_from_model": True}, r"ln 2, as if the policy were the reference.*batch\.ref_logprobs"),
    ({"ref_second_forward": True}, r"ln 2, as if the policy were the reference.*not recomputed"),
    ({"no_grad": True}, r"no gradient.*torch\.no_grad"),
    ({"beta": 1.0}, "leaves beta out"),
    ({"beta": 0.1}, r"uses beta=0\.1 .*pass cfg\.beta"),
    ({"beta_twice": True}, "applies beta twice"),
    ({"as_float": True}, r"not a tensor.*no \.item\(\)"),
    ({"detached": True}, r"no gradient \(\.detach\(\)"),
    ({"drop_metric": "reward_margin"}, r"metrics \['reward_margin'\] missing"),
    ({"loss_tuple": True}, r"the loss is a tuple"),
    ({"in_place": True}, r"changed its input batch\.ref_logprobs in place"),
    ({"two_forwards": True}, r"ran the model 2 times \(on \[3, 3\] rows\).*one forward over all 6 rows"),
])
def test_wrong_steps_are_named(flags, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        dpo_checks.check_dpo_step(make_step(**flags))


def test_completion_logprobs_with_a_reply_logprobs_gives_the_engines_sums():
    model = dpo_checks._tiny_model(3)
    batch = dpo_checks._tiny_batch(model, 3, n_pairs=4)
    torch.testing.assert_close(dpo.completion_logprobs(model, batch.pairs, reply_logprobs=reply_logprobs_right),
                               dpo.completion_logprobs(model, batch.pairs), atol=1e-5, rtol=1e-5)


def test_a_step_that_returns_the_courses_loss_is_refused():
    with pytest.raises(CheckFailed, match="called nblib.dpo.make_loss_fn, the course's own version"):
        dpo_checks.check_dpo_step(lambda cfg: dpo.make_loss_fn(cfg))
