"""Lesson 16's checks: nblib's own answers pass (as a learner's copy would), and each usual mistake
fails with its name in the message."""
import pytest
import torch

from nblib import paged, quant, speculative
from nblib.checks import CheckFailed
from nblib.checks import inference as checks


def learners(fn):
    """A learner's copy of ``fn`` (the checks refuse the course's own function object)."""
    return lambda *args: fn(*args)


def test_right_answers_pass():
    checks.check_token_slots(learners(paged.token_slots))
    checks.check_quantize_int8(learners(quant.quantize_int8))
    checks.check_accept_draft(learners(speculative.accept_draft))
    # a list of ints is as good as a tensor for the slots
    checks.check_token_slots(lambda table, ps, start, end: [table[t // ps] * ps + t % ps for t in range(start, end)])


MISTAKES = [(check, name, fn) for check, variants in ((checks.check_token_slots, checks._slot_variants()),
                                                        (checks.check_quantize_int8, checks._quant_variants()),
                                                        (checks.check_accept_draft, checks._accept_variants()))
            for name, fn in variants.items()]


@pytest.mark.parametrize("check, mistake, fn", MISTAKES, ids=[name[:40] for _, name, _ in MISTAKES])
def test_each_usual_mistake_is_named(check, mistake, fn):
    with pytest.raises(CheckFailed) as err:
        check(learners(fn))
    assert mistake in str(err.value)


def test_quantize_checks_dtype_zero_rows_and_in_place_changes():
    ours = quant.quantize_int8  # taken now: while a learner's function runs, the check refuses nblib's

    def float_q(w):
        q, s = ours(w)
        return q.float(), s

    def zero_scale(w):
        scale = w.abs().amax(dim=1) / 127
        return torch.round(w / scale[:, None]).nan_to_num().clamp(-127, 127).to(torch.int8), scale

    def in_place(w):
        q, s = ours(w.clone())
        w.zero_()
        return q, s

    for fn, phrase in ((float_q, "torch.int8"), (zero_scale, "row of zeros"), (in_place, "in place")):
        with pytest.raises(CheckFailed, match=phrase):
            checks.check_quantize_int8(learners(fn))


def test_accept_draft_greedy_cases_and_shapes():
    ours = speculative.accept_draft  # taken now: while a learner's function runs, the check refuses nblib's

    def no_bonus(p, q, drafted, generator=None):
        out = ours(p, q, drafted, generator)
        return out[:len(drafted)] if len(out) > len(drafted) else out

    with pytest.raises(CheckFailed, match=r"expected \[1, 0, 2\]"):
        checks.check_accept_draft(no_bonus)
    with pytest.raises(CheckFailed, match="expected"):
        checks.check_accept_draft(lambda p, q, d, g=None: torch.tensor(ours(p, q, d, g)))
