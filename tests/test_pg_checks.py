"""nblib.checks.rl.check_reinforce_loss (lesson 09, before PPO): the right answer passes, each typical
mistake fails with a message that names it."""
import pytest
import torch

from nblib import pg
from nblib.checks import CheckFailed
from nblib.checks.rl import check_reinforce_loss


def right(logprobs, rewards, baseline):
    return -((rewards - baseline).detach() * logprobs).mean()


def test_right_answers_pass(capsys):
    check_reinforce_loss(right)
    check_reinforce_loss(lambda lp, r, b: pg.reinforce_loss(lp, r, b))    # the course's, wrapped
    check_reinforce_loss(lambda lp, r, b: -((r.detach() - (b.detach() if torch.is_tensor(b) else b)) * lp).sum() / len(r))
    assert capsys.readouterr().out.count("passed") == 3


WRONG = {
    "baseline not detached": (lambda lp, r, b: -((r - b) * lp).mean(), "gradient flowed into the baseline"),
    "rewards not detached": (lambda lp, r, b: -((r - (b.detach() if torch.is_tensor(b) else b)) * lp).mean(),
                             "gradient flowed into the rewards"),
    "sum instead of mean": (lambda lp, r, b: -((r - b).detach() * lp).sum(), "sums over the samples"),
    "sign flip": (lambda lp, r, b: ((r - b).detach() * lp).mean(), "wrong sign"),
    "baseline forgotten": (lambda lp, r, b: -(r.detach() * lp).mean(), "leaves out the baseline"),
    "baseline added": (lambda lp, r, b: -((r + b).detach() * lp).mean(), "adds the baseline"),
    "a float": (lambda lp, r, b: float(-((r - b).detach() * lp.detach()).mean()), "Python number"),
    ".item()": (lambda lp, r, b: -((r - b).detach() * lp).mean().item(), "Python number"),
    "detached loss": (lambda lp, r, b: -((r - b) * lp).mean().detach(), "has no gradient"),
    "one loss per reply": (lambda lp, r, b: -((r - b).detach() * lp), "one number"),
    "no return": (lambda lp, r, b: None, "return` missing"),
}


@pytest.mark.parametrize("name", WRONG)
def test_each_mistake_is_named(name):
    fn, message = WRONG[name]
    with pytest.raises(CheckFailed, match=message):
        check_reinforce_loss(fn)


def test_unwritten_and_the_course_function():
    def stub(logprobs, rewards, baseline):
        raise NotImplementedError("09.reinforce_loss is not written yet")
    with pytest.raises(NotImplementedError):
        check_reinforce_loss(stub)
    with pytest.raises(CheckFailed, match=r"course's own implementation \(nblib\.pg\.reinforce_loss\)"):
        check_reinforce_loss(pg.reinforce_loss)
