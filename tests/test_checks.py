"""Exercise checks accept right answers and explain wrong ones."""
import pytest
import torch

from nblib.checks import CheckFailed, expect_close
from nblib.checks import bigram, start


def test_expect_close_passes_within_tolerance():
    expect_close("x", torch.tensor([1.0, 2.0 + 1e-8]), [1.0, 2.0])


def test_expect_close_says_where_and_by_how_much():
    with pytest.raises(CheckFailed) as err:
        expect_close("grad of W", torch.tensor([[1.0, 2.0], [3.0, 4.5]]), [[1.0, 2.0], [3.0, 4.0]])
    message = str(err.value)
    assert "grad of W" in message and "(1, 1)" in message and "0.5" in message


def test_expect_close_reports_shape_and_nan():
    with pytest.raises(CheckFailed, match="shape"):
        expect_close("x", torch.zeros(3), [0.0, 0.0])
    with pytest.raises(CheckFailed, match="NaN"):
        expect_close("x", torch.tensor([float("nan")]), [0.0])


def stable_softmax(x):
    e = (x - x.max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def test_softmax_check():
    start.check_softmax(stable_softmax)
    with pytest.raises(CheckFailed, match="overflow|nan"):
        start.check_softmax(lambda x: x.exp() / x.exp().sum(dim=-1, keepdim=True))
    with pytest.raises(CheckFailed):
        start.check_softmax(lambda x: x / x.sum(dim=-1, keepdim=True))


def test_smoothed_probs_check():
    bigram.check_smoothed_probs(lambda c, a: (c + a) / (c + a).sum(dim=1, keepdim=True))
    with pytest.raises(CheckFailed, match="alpha=0.5"):  # ignores alpha
        bigram.check_smoothed_probs(lambda c, a: (c + 1) / (c + 1).sum(dim=1, keepdim=True))
    with pytest.raises(CheckFailed):  # normalises columns instead of rows
        bigram.check_smoothed_probs(lambda c, a: (c + a) / (c + a).sum(dim=0, keepdim=True))


def test_trigram_check_against_hand_computed_value():
    # train ["ab"], alpha 1: vocab {. a b}; trigrams ..a .ab ab.; each context seen once.
    # P(a|..) = (1+1)/(1+3) = 0.5, likewise P(b|.a) and P(.|ab): NLL = ln 2.
    import math
    assert bigram._reference_ngram_nll(["ab"], ["ab"], 3, 1.0) == pytest.approx(math.log(2))
    with pytest.raises(CheckFailed):
        bigram.check_trigram_nll(lambda train, ev, alpha: 2.0)


def test_call_learner_turns_crashes_into_failed_checks():
    from nblib.checks import call_learner

    assert call_learner("double", lambda x: 2 * x, 3) == 6
    with pytest.raises(CheckFailed, match=r"raised ZeroDivisionError.*inputs: \(2, 3\)"):
        call_learner("inverse", lambda x: 1 / 0, torch.zeros(2, 3))
    with pytest.raises(CheckFailed, match="return"):
        call_learner("forgot", lambda x: None, 1)
    with pytest.raises(NotImplementedError):  # an unsolved exercise is not a wrong answer
        call_learner("stub", lambda x: (_ for _ in ()).throw(NotImplementedError("hint")), 1)


def all_checks():
    """(name, function) for every ``check_*`` in every module of nblib.checks."""
    import importlib
    import pkgutil

    import nblib.checks

    found = []
    for info in pkgutil.iter_modules(nblib.checks.__path__):
        module = importlib.import_module(f"nblib.checks.{info.name}")
        found += [(f"{info.name}.{name}", fn) for name, fn in vars(module).items()
                  if name.startswith("check_") and callable(fn) and fn.__module__ == module.__name__]
    return sorted(found, key=lambda pair: pair[0])


CHECKS = all_checks()


def learner_functions(check, fn):
    """``fn`` for every argument a learner must pass to ``check`` (those without a default)."""
    import inspect

    required = [p for p in inspect.signature(check).parameters.values() if p.default is p.empty]
    # a check of several small functions at once takes them as one tuple, named ``fns``
    return [(fn, fn, fn) if p.name == "fns" else fn for p in required]


def test_all_checks_are_found():
    assert len(CHECKS) >= 23 and "attention.check_split_merge_heads" in dict(CHECKS)


# exercises whose function works in place and returns nothing: doing nothing is what fails there
IN_PLACE = {"pretrain.check_average_gradients"}


@pytest.mark.parametrize("name, check", CHECKS, ids=[name for name, _ in CHECKS])
def test_every_check_says_a_return_is_missing(name, check):
    def forgot_return(*args, **kwargs):
        pass

    message = r"rank \d|gradient" if name in IN_PLACE else r"returned None: is a `return` missing\?"
    with pytest.raises(CheckFailed, match=message):
        check(*learner_functions(check, forgot_return))


@pytest.mark.parametrize("name, check", CHECKS, ids=[name for name, _ in CHECKS])
def test_every_check_refuses_the_course_own_implementation(name, check):
    def course_function(*args, **kwargs):
        raise AssertionError("a check ran the course's own function instead of refusing it")

    course_function.__module__, course_function.__qualname__ = "nblib.llama", "rms_norm"
    with pytest.raises(CheckFailed, match=r"that is the course's own implementation \(nblib\.llama\.rms_norm\); "
                                          r"write your own and pass it to the check"):
        check(*learner_functions(check, course_function))


def test_real_course_functions_are_refused():
    from nblib import bpe, llama
    from nblib.checks import llama as llama_checks
    from nblib.checks import tokenizer as tokenizer_checks

    with pytest.raises(CheckFailed, match=r"course's own implementation \(nblib\.llama\.apply_rope\)"):
        llama_checks.check_apply_rope(llama.apply_rope)
    with pytest.raises(CheckFailed, match=r"course's own implementation \(nblib\.bpe\.merge\)"):
        tokenizer_checks.check_merge(bpe.merge)
    with pytest.raises(CheckFailed, match=r"course's own implementation \(nblib\.bpe\.Tokenizer\.encode_chunk\)"):
        tokenizer_checks.check_encode(bpe.train("aaab", 257).encode_chunk)
