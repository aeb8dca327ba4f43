"""Exercise checks: a learner calls ``check_xxx(their_function)`` and reads the verdict.

Each lesson has its own module (``nblib.checks.bigram``, ...). They share the helpers
here: run the learner's code on tiny inputs, compare with tolerances, and on failure
say what was expected, what came back, and by how much it is off.
"""
from __future__ import annotations

import contextlib
import reprlib
from unittest import mock

import torch


class CheckFailed(AssertionError):
    """The learner's code ran but gave a wrong answer; the message says where."""


def _to_write(fn) -> str:
    """The first paragraph of the exercise's docstring (what the function must do), for a 'not written yet'."""
    doc = (getattr(fn, "__doc__", None) or "").strip().split("\n\n")[0]
    return f" The exercise: {' '.join(doc.split())}" if doc else ""


def _mentions_ellipsis(err: Exception) -> bool:
    """A crash on a `...` left in the skeleton (``... + 1``, ``x = ...; x.sum()``)."""
    return isinstance(err, (TypeError, AttributeError)) and "'ellipsis'" in str(err)


def call_learner(what: str, fn, *args):
    """Run the learner's function on ``args``; every check calls the learner's code through here.

    An exercise not yet written (its stub's ``NotImplementedError``, or a ``...`` still in
    place) raises ``NotImplementedError`` (not a wrong answer: the grader's "not attempted")
    that says so and what the exercise asks, from its docstring; any other crash, or a
    missing ``return``, becomes a ``CheckFailed`` that names the inputs. The traceback goes
    from the check's call straight to the learner's line that failed: IPython hides this
    frame (``__tracebackhide__``), so the learner reads their own code, not the check's.
    (Checks keep the expected answer's computation off the lines around their call.) The
    course's own function (``nblib.llama.repeat_kv``, ...) is refused before it runs: it
    would pass without the learner having written anything.
    """
    __tracebackhide__ = True  # noqa: F841 (read by IPython's traceback printer)
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", what)
    if module == "nblib" or module.startswith("nblib."):
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
        raise CheckFailed(f"{what}: that is the course's own implementation ({module}.{qualname}); "
                          "write your own and pass it to the check")
    try:
        result = fn(*args)
    except NotImplementedError as err:
        said = f": {err}" if str(err) else "."
        message = str(err) if "not written yet" in str(err) else f"{name} is not written yet{said}{_to_write(fn)}"
        raise NotImplementedError(message).with_traceback(err.__traceback__.tb_next) from None
    except Exception as err:  # noqa: BLE001 (any crash is the learner's to see, with its type)
        if _mentions_ellipsis(err):
            raise NotImplementedError(f"{name} is not written yet: replace each `...` with your code "
                                      f"({type(err).__name__}: {err}).{_to_write(fn)}"
                                      ).with_traceback(err.__traceback__.tb_next) from None
        inputs = ", ".join(str(tuple(a.shape)) if torch.is_tensor(a) else reprlib.repr(a) for a in args)
        raise CheckFailed(f"{what}: your function raised {type(err).__name__}: {err} (inputs: {inputs})"
                          ).with_traceback(err.__traceback__.tb_next) from err  # checks read the cause
    if result is Ellipsis:
        raise NotImplementedError(f"{name} is not written yet: it returns `...`; replace it with your code."
                                  f"{_to_write(fn)}")
    if result is None:
        raise CheckFailed(f"{what} returned None: is a `return` missing?")
    return result


def passed(what: str) -> None:
    print(f"✅ {what}: passed")


def expect_close(what: str, got, expected, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Fail with a readable message unless ``got`` is within tolerance of ``expected``.

    Works for numbers, lists and tensors. Never exact float equality: a correct answer
    computed in another order differs in the last bits.
    """
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    try:
        got_t = torch.as_tensor(got.detach() if torch.is_tensor(got) else got, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckFailed(f"{what}: expected a number or tensor like {expected_t.tolist()!r}, got {got!r}") from err
    if got_t.shape != expected_t.shape:
        raise CheckFailed(f"{what}: expected shape {tuple(expected_t.shape)}, got shape {tuple(got_t.shape)}")
    if not torch.isfinite(got_t).all():
        raise CheckFailed(f"{what}: contains NaN or inf: {got_t}")
    diff = (got_t - expected_t).abs()
    bound = atol + rtol * expected_t.abs()
    if (diff > bound).any():
        worst = int(torch.argmax(diff - bound))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), expected_t.shape)) if expected_t.dim() else ()
        where = f" at index {index}" if index else ""
        raise CheckFailed(
            f"{what}: off by {diff.max().item():.3g}{where} "
            f"(expected {expected_t[index].item() if index else expected_t.item():.6g}, "
            f"got {got_t[index].item() if index else got_t.item():.6g}; tolerance atol={atol:g}, rtol={rtol:g})"
        )


def name_the_gap(gap: float, terms: dict[str, float]) -> str:
    """If a wrong count is off by exactly one familiar term, say which (a hint in the failure).

    ``gap`` is expected - got. A term's value is positive for something a count usually
    leaves out ("short of"), negative for something it usually adds wrongly ("over by").
    """
    for name, value in terms.items():
        if abs(gap - value) < 0.5:
            return f" (yours is {'short of' if value > 0 else 'over by'} exactly {name})"
    return ""


def expect_unchanged(what: str, inputs: dict, saved: dict, fix: str = "compute new tensors instead") -> None:
    """Fail if the learner's function wrote into one of its ``inputs`` (``saved`` holds copies made before
    the call): the caller uses its tensors again."""
    for name, value in inputs.items():
        if not torch.equal(value, saved[name]):
            raise CheckFailed(f"{what} changed its input {name} in place: {fix}")


def expect_equal(what: str, got, expected) -> None:
    """Fail unless ``got == expected`` (for ints, strings, token lists: exact things)."""
    if got != expected:
        raise CheckFailed(f"{what}: expected {expected!r}, got {got!r}")


def yours_or_ours(check, yours, ours, name: str):
    """The learner's function if it passes ``check``, else the course's ``ours``, saying so.

    Code after an exercise calls this, so that Run All goes on past an exercise not yet
    done (or not yet right) with ``nblib``'s version, and uses the learner's once it passes.
    """
    try:
        check(yours)
    except (NotImplementedError, CheckFailed) as err:
        print(f"(using nblib's {name} below: yours does not pass its check yet: {type(err).__name__})")
        return ours
    print(f"(using your {name} below)")
    return yours


@contextlib.contextmanager
def course_functions_refused(what: str, module, *names: str, write_from: str):
    """While the learner's ``what`` runs, ``module``'s functions ``names`` (the course's whole answer to
    the exercise) raise instead: calling them would pass the check without writing anything.
    ``write_from`` says what to build it from instead."""
    def refuse(name):
        def refused(*args, **kwargs):
            raise CheckFailed(f"{what} called {module.__name__}.{name}, the course's own version: write it from "
                              f"{write_from}")
        return refused
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(module, name, refuse(name)))
        yield

