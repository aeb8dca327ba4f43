"""Exercise checks: a learner calls ``check_xxx(their_function)`` and reads the verdict.

Each lesson has its own module (``nblib.checks.bigram``, ...). They share the helpers
here: run the learner's code on tiny inputs, compare with tolerances, and on failure
say what was expected, what came back, and by how much it is off.
"""
from __future__ import annotations

import reprlib

import torch


class CheckFailed(AssertionError):
    """The learner's code ran but gave a wrong answer; the message says where."""


def call_learner(what: str, fn, *args):
    """Run the learner's function on ``args``; every check calls the learner's code through here.

    ``NotImplementedError`` (an exercise not yet done) passes through unchanged; any other
    crash, or a missing ``return``, becomes a ``CheckFailed`` that names the inputs. The
    course's own function (``nblib.llama.repeat_kv``, ...) is refused before it runs: it
    would pass without the learner having written anything.
    """
    module = getattr(fn, "__module__", None) or ""
    if module == "nblib" or module.startswith("nblib."):
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        raise CheckFailed(f"{what}: that is the course's own implementation ({module}.{name}); "
                          "write your own and pass it to the check")
    try:
        result = fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001 (any crash is the learner's to see, with its type)
        inputs = ", ".join(str(tuple(a.shape)) if torch.is_tensor(a) else reprlib.repr(a) for a in args)
        raise CheckFailed(f"{what}: your function raised {type(err).__name__}: {err} (inputs: {inputs})") from err
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
