"""Lesson 14's exercise checks accept right answers and explain the usual wrong ones.

``check_average_gradients`` starts torchrun (2 gloo processes, ~5 s): twice here, for a right
answer and a sum left undivided; its verdict on the other mistakes is tested in this process,
on reports built the way each rank builds its own."""
import json
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from nblib import pretrain
from nblib.checks import CheckFailed
from nblib.checks import pretrain as checks

# ---------------------------------------------------------------------------- run_mfu


def run_mfu(train_rows, flops_per_token, peak_per_device, devices):
    previous = [0] + [row["tokens"] for row in train_rows[:-1]]
    tokens = [row["tokens"] - before for row, before in zip(train_rows, previous)]
    seconds = [t / row["tokens_per_s"] for t, row in zip(tokens, train_rows)]
    first = 1 if len(train_rows) > 1 else 0
    return flops_per_token * sum(tokens[first:]) / sum(seconds[first:]) / (peak_per_device * devices)


def test_run_mfu_accepts_the_formula_and_the_programs_function():
    checks.check_run_mfu(run_mfu)
    checks.check_run_mfu(lambda rows, fpt, peak, n: pretrain.logged_mfu(rows, fpt, peak, n))


def _all_rows(rows, fpt, peak, n):
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)]
    return fpt * sum(tokens) / sum(t / r["tokens_per_s"] for t, r in zip(tokens, rows)) / (peak * n)


def _mean_of_speeds(rows, fpt, peak, n):
    kept = rows[1:] or rows
    return fpt * sum(r["tokens_per_s"] for r in kept) / len(kept) / (peak * n)


def _every_row_but_the_first_always(rows, fpt, peak, n):
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)][1:]
    return fpt * sum(tokens) / sum(t / r["tokens_per_s"] for t, r in zip(tokens, rows[1:])) / (peak * n)


def _popping_rows(rows, fpt, peak, n):
    rows.pop(0)
    return run_mfu(rows or [{"tokens": 1, "tokens_per_s": 1.0}], fpt, peak, n)


@pytest.mark.parametrize("wrong, message", [
    (_all_rows, "leave its row out"),
    (_mean_of_speeds, "a mean of the rows' tokens/s"),
    (lambda rows, fpt, peak, n: fpt * rows[-1]["tokens_per_s"] / (peak * n), "the last row alone"),
    (lambda rows, fpt, peak, n: fpt * sum(r["tokens"] for r in rows[1:]) / sum(r["tokens"] / r["tokens_per_s"]
                                                                                 for r in rows[1:]) / (peak * n),
     "its interval's tokens are its tokens minus the previous row's"),
    (lambda rows, fpt, peak, n: n * run_mfu(rows, fpt, peak, n), "the peak of all the devices"),
    (lambda rows, fpt, peak, n: 100 * run_mfu(rows, fpt, peak, n), "not a percentage"),
    (_every_row_but_the_first_always, "with a single row there is no other interval"),
    (_popping_rows, "changed the log rows"),
    (lambda rows, fpt, peak, n: 1.1 * run_mfu(rows, fpt, peak, n), r"run_mfu\(one GPU.*off by"),
    (lambda rows, fpt, peak, n: torch.tensor(run_mfu(rows, fpt, peak, n)), r"expected a float.*\.item\(\)"),
    (lambda rows, fpt, peak, n: None, "returned None"),
])
def test_run_mfu_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_run_mfu(wrong)


def test_logged_mfu_is_what_the_program_reports(tmp_path):
    # the course's function, on a real log, gives the summary row's MFU (the program's Speedometer.steady)
    from nblib import runlog
    args = ["--preset", "shakespeare-char", "--tiny", "--max_steps", "12", "--log_interval", "3", "--eval_interval", "12",
            "--out", str(tmp_path / "run"), "--device", "cpu"]
    summary = pretrain.main(args)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    rows = runlog.log_rows(runlog.read_log(tmp_path / "run"), "train")
    assert len(rows) == 4
    got = pretrain.logged_mfu(rows, config["flops_per_token"], config["peak_flops_per_device"], config["devices_in_peak"])
    assert got == pytest.approx(summary["mfu"], rel=1e-6)


# ---------------------------------------------------------------------------- average_gradients


def average_gradients(model):
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def summed_gradients(model):
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


@pytest.mark.slow
def test_average_gradients_in_two_processes():
    checks.check_average_gradients(average_gradients)
    with pytest.raises(CheckFailed, match=r"rank 0: parameter body.0.weight's gradient differs from the mean of "
                                          r"the ranks' gradients by 0.\d+ \(it is the sum over the 2 ranks: divide"):
        checks.check_average_gradients(summed_gradients)


def test_average_gradients_stub_and_sourceless_functions_start_no_process():
    def stub(model):
        raise NotImplementedError("Exercise 14.2: average the gradients")

    with pytest.raises(NotImplementedError, match="Exercise 14.2"):
        checks.check_average_gradients(stub)
    with pytest.raises(CheckFailed, match="lambda has no source"):
        checks.check_average_gradients(lambda model: None)
    namespace = {}
    exec("def typed_in(model):\n    pass\n", namespace)
    with pytest.raises(CheckFailed, match="cannot read the source of typed_in"):
        checks.check_average_gradients(namespace["typed_in"])

    def course(model):
        pass

    course.__module__ = "nblib.pretrain"
    with pytest.raises(CheckFailed, match="course's own"):
        checks.check_average_gradients(course)


def test_a_hanging_run_is_stopped(tmp_path):
    with pytest.raises(CheckFailed, match="did not finish within 1 s: does every process make the same all_reduce"):
        checks._launch([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, timeout=1)


def reports(change):
    """What the 2 ranks would report after ``change(model, rank_grads, mean_grads)`` in place of the learner's call."""
    out = []
    for rank in range(2):
        _, local, mean = checks._rank_case(rank, 2)

        def fn(model, local=local, mean=mean):
            change(dict(model.named_parameters()), local, mean)

        out.append(checks._run_rank(lambda fn=fn: fn, rank, 2, "yours.py"))
    return out


def set_grads(value):
    def change(params, local, mean):
        for name, p in params.items():
            if p.grad is not None:
                p.grad = value(local[name], mean[name])
    return change


def test_verdict_accepts_the_mean_in_either_form():
    checks._verdict(reports(set_grads(lambda local, mean: mean.clone())))
    checks._verdict(reports(set_grads(lambda local, mean: mean + 1e-8)))


@pytest.mark.parametrize("change, message", [
    (set_grads(lambda local, mean: local), "still this rank's own gradient: all_reduce works in place"),
    (set_grads(lambda local, mean: mean / 2), "the mean divided by 2 once more"),
    (set_grads(lambda local, mean: 2 * mean), "the sum over the 2 ranks"),
    (set_grads(lambda local, mean: local / 2), "own gradient divided by the world size"),
    (set_grads(lambda local, mean: mean + 0.1), r"differs .* by 0.1 \(expected \(the sum of every rank's gradient\)"),
    (set_grads(lambda local, mean: None), r"\.grad is None after your function"),
])
def test_verdict_names_the_mistake(change, message):
    with pytest.raises(CheckFailed, match=message):
        checks._verdict(reports(change))


def test_verdict_on_loops_weights_and_frozen_parameters():
    def first_only(params, local, mean):
        params["body.0.weight"].grad = mean["body.0.weight"].clone()

    with pytest.raises(CheckFailed, match=r"body.0.bias's gradient .* while body.0.weight was averaged: does the loop"):
        checks._verdict(reports(first_only))

    def weights_too(params, local, mean):
        set_grads(lambda local, mean: mean)(params, local, mean)
        with torch.no_grad():
            params["body.2.bias"].mul_(2)

    with pytest.raises(CheckFailed, match="changed parameter body.2.bias itself .* not the weights"):
        checks._verdict(reports(weights_too))

    def zeros_for_frozen(params, local, mean):
        set_grads(lambda local, mean: mean)(params, local, mean)
        params["scale"].grad = torch.zeros(3)

    with pytest.raises(CheckFailed, match=r"parameter scale had no gradient .* leave .grad None"):
        checks._verdict(reports(zeros_for_frozen))


def test_verdict_on_errors():
    def raising(err):
        def change(params, local, mean):
            raise err
        return change

    with pytest.raises(NotImplementedError, match="Exercise 14.2"):  # a stub that only fails inside the processes
        checks._verdict(reports(raising(NotImplementedError("Exercise 14.2"))))
    with pytest.raises(CheckFailed, match=r"rank 0: your average_gradients raised NameError: name 'WORLD'.*fresh "
                                          r"processes that have only `torch`"):
        checks._verdict(reports(raising(NameError("name 'WORLD' is not defined"))))
    with pytest.raises(CheckFailed, match=r"raised TypeError: .*NoneType.*skip the parameters whose .grad is None"):
        checks._verdict(reports(raising(TypeError("expected a Tensor, got <class 'NoneType'>"))))
    crashed = reports(raising(TypeError("got <class 'NoneType'>")))
    crashed[0]["error"]["message"] = "[pair.cc:553] Connection closed by peer"  # rank 0 only lost rank 1
    with pytest.raises(CheckFailed, match="rank 1: your average_gradients raised TypeError"):
        checks._verdict(crashed)
    with pytest.raises(CheckFailed, match="every process must make the same all_reduce calls"):
        checks._verdict(crashed[:1])


# ---------------------------------------------------------------------------- choose_batch_size


def choose_batch_size(measured, budget_bytes, global_batch):
    rows = sorted(measured)
    per_row, fixed = np.polyfit(rows, [measured[b] for b in rows], 1)
    divisors = [b for b in range(1, global_batch + 1) if global_batch % b == 0]
    fits = [b for b in divisors if fixed + per_row * b <= budget_bytes]
    if not fits:
        raise ValueError(f"even B=1 needs {fixed + per_row:.3g} bytes, over the budget of {budget_bytes:.3g}")
    return max(fits), fixed, per_row


def with_choice(choose):
    """A learner's function that fits like ``choose_batch_size`` and picks with ``choose(fixed, per_row, ...)``."""
    def fn(measured, budget, global_batch):
        rows = sorted(measured)
        per_row, fixed = np.polyfit(rows, [measured[b] for b in rows], 1)
        return choose(fixed, per_row, measured, budget, global_batch), fixed, per_row
    return fn


def two_point(measured, budget, global_batch):
    lo, hi = min(measured), max(measured)
    per_row = (measured[hi] - measured[lo]) / (hi - lo)
    fixed = measured[lo] - per_row * lo
    b = max(b for b in range(1, global_batch + 1) if global_batch % b == 0 and fixed + per_row * b <= budget)
    return b, fixed, per_row


def test_choose_batch_size_accepts_least_squares():
    checks.check_choose_batch_size(choose_batch_size)

    def lstsq(measured, budget, global_batch):  # the same fit by the normal equations
        B = np.array(sorted(measured), dtype=float)
        A = np.stack([np.ones_like(B), B], axis=1)
        (fixed, per_row), *_ = np.linalg.lstsq(A, np.array([measured[b] for b in sorted(measured)]), rcond=None)
        b = global_batch
        while global_batch % b or fixed + per_row * b > budget:
            b -= 1
            if b == 0:
                raise ValueError("nothing fits")
        return int(b), fixed, per_row

    checks.check_choose_batch_size(lstsq)


@pytest.mark.parametrize("wrong, message", [
    (with_choice(lambda f, r, m, budget, G: int((budget - f) // r)), "26 does not divide global_batch=64"),
    (with_choice(lambda f, r, m, budget, G: max(b for b in m if G % b == 0 and f + r * b <= budget)),
     "not only the measured sizes"),
    (with_choice(lambda f, r, m, budget, G: max(b for b in range(1, G) if G % b == 0 and f + r * b <= budget)),
     r"whole global batch fits.*expected batch_size 32, got 16: 32 also divides 32 and fits"),
    (with_choice(lambda f, r, m, budget, G: max(b for b in range(1, G + 1) if G % b == 0 and f + r * b <= 2 * budget)),
     "predicted to need .* over the budget"),
    (lambda m, budget, G: (lambda b, f, r: (float(b), f, r))(*choose_batch_size(m, budget, G)),
     r"batch_size should be an int .*float"),
    (lambda m, budget, G: choose_batch_size(m, budget, G)[0], "expected a tuple"),
    (lambda m, budget, G: (lambda b, f, r: (b, r, f))(*choose_batch_size(m, budget, G)), "swapped"),
    (two_point, r"noisy measurements.*bytes_per_row \(a line through the first and last points"),
])
def test_choose_batch_size_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_choose_batch_size(wrong)


def test_choose_batch_size_wants_a_value_error_when_nothing_fits():
    def no_error(measured, budget, global_batch):
        try:
            return choose_batch_size(measured, budget, global_batch)
        except ValueError:
            return 0, 0.0, 0.0

    with pytest.raises(CheckFailed, match=r"even B=1 is over the budget, expected a ValueError, got \(0, 0.0, 0.0\)"):
        checks.check_choose_batch_size(no_error)

    def silent(measured, budget, global_batch):
        try:
            return choose_batch_size(measured, budget, global_batch)
        except ValueError:
            raise ValueError() from None

    with pytest.raises(CheckFailed, match="ValueError without a message"):
        checks.check_choose_batch_size(silent)

    def other_error(measured, budget, global_batch):
        try:
            return choose_batch_size(measured, budget, global_batch)
        except ValueError:
            raise RuntimeError("out of memory") from None

    with pytest.raises(CheckFailed, match="your function raised RuntimeError: out of memory"):
        checks.check_choose_batch_size(other_error)
