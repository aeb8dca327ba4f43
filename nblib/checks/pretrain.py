"""Checks for lesson 14's exercises: the steady MFU of a run from its log, averaging gradients across
processes (what DDP's backward does), and the micro-batch size from measured memory.

``check_average_gradients`` runs the learner's function in two real processes (gloo, under
``torchrun``): a function defined in a notebook cannot be sent to other processes, so the
check copies its source into a file that each process imports.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import numbers
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from nblib import pretrain
from nblib.checks import CheckFailed, call_learner, expect_close, passed

# ---------------------------------------------------------------------------- 1. MFU of a run, from its log


def _as_float(what: str, got) -> float:
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        kind = "a tensor: return float(...) or .item()" if torch.is_tensor(got) else type(got).__name__
        raise CheckFailed(f"{what}: expected a float (like 0.42), got {got!r} ({kind})")
    return float(got)


def log_rows(tokens_per_step: int, steps: list[int], speeds: list[float]) -> list[dict]:
    """``train`` rows as the program logs them: row i covers ``steps[i]`` steps at ``speeds[i]`` tokens/s."""
    rows, done = [], 0
    for n, speed in zip(steps, speeds):
        done += n
        rows.append({"step": done, "tokens": done * tokens_per_step, "tokens_per_s": speed, "loss": 3.0})
    return rows


RUN_MFU_CASES = [  # (what, rows, flops_per_token, peak_per_device, devices)
    ("one GPU, a slow first interval (warm-up)", log_rows(64 * 256, [10, 10, 10, 10], [2.0e4, 1.0e5, 1.1e5, 0.9e5]),
     6 * 10.6e6, 65e12, 1),
    ("8 GPUs, the last interval shorter than the others", log_rows(512 * 1024, [25, 25, 25, 7], [3e5, 9e5, 9.5e5, 5e5]),
     6 * 124e6, 989e12, 8),
    ("2 processes, intervals of different lengths", log_rows(32 * 64, [5, 20, 3, 12], [1e3, 4e4, 1e4, 3.5e4]),
     737_664, 1e11, 2),
    ("a run short enough for one log row", log_rows(16 * 64, [6], [5e3]), 737_664, 2e10, 2),
]


def _interval_slips(rows, fpt, peak, n) -> dict[float, str]:
    """What familiar slips give on ``rows``, and what to say about each."""
    def mfu_of(tokens_per_s):
        return fpt * tokens_per_s / (peak * n)
    before = [0] + [r["tokens"] for r in rows[:-1]]
    tokens = [r["tokens"] - b for r, b in zip(rows, before)]
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, rows)]
    kept = slice(1, None) if len(rows) > 1 else slice(None)
    right = mfu_of(sum(tokens[kept]) / sum(seconds[kept]))
    speeds = [r["tokens_per_s"] for r in rows]
    return {
        mfu_of(sum(tokens) / sum(seconds)): "the first interval holds the warm-up (and compilation): leave its row "
                                            "out (unless it is the only one)",
        mfu_of(sum(speeds[kept]) / len(speeds[kept])): "a mean of the rows' tokens/s weighs a short interval as much "
                                                       "as a long one: add up the tokens and the seconds of the "
                                                       "intervals, then divide",
        mfu_of(speeds[-1]): "the last row alone is one interval; the run's speed is over every interval but the first",
        mfu_of(sum(r["tokens"] for r in rows[kept]) / sum(r["tokens"] / r["tokens_per_s"] for r in rows[kept])):
            "a row's tokens count everything since step 0; its interval's tokens are its tokens minus the previous "
            "row's",
        right * n: "divide by the peak of all the devices: peak_per_device x devices",
        right * 100: "return a fraction (0.42), not a percentage",
    }


def check_run_mfu(run_mfu) -> None:
    """``run_mfu(train_rows, flops_per_token, peak_per_device, devices) -> float``: the steady MFU of a run
    from its log's train rows, as ``nblib.pretrain.logged_mfu`` (and the program's summary row)."""
    for what, rows, fpt, peak, n in RUN_MFU_CASES:
        call = f"run_mfu({what}: {len(rows)} rows, devices={n})"
        given = copy.deepcopy(rows)
        try:
            got = _as_float(call, call_learner(call, run_mfu, given, fpt, peak, n))
        except CheckFailed as err:
            if len(rows) == 1 and isinstance(err.__cause__, ZeroDivisionError):
                raise CheckFailed(f"{call}: with a single row there is no other interval to keep: use that one "
                                  "(leave the first row out only when others remain)") from err
            raise
        if given != rows:
            raise CheckFailed(f"{call} changed the log rows it was given: they are the caller's, read them only")
        expected = pretrain.logged_mfu(rows, fpt, peak, n)
        for wrong, hint in _interval_slips(rows, fpt, peak, n).items():
            if not math.isclose(wrong, expected, rel_tol=1e-6) and math.isclose(got, wrong, rel_tol=1e-6):
                raise CheckFailed(f"{call}: expected {expected:.6g}, got {got:.6g}: {hint}")
        expect_close(call, got, expected, atol=0, rtol=1e-6)
    passed("run_mfu")


# ---------------------------------------------------------------------------- 2. averaging gradients

WORLD = 2                  # processes the check starts
RUN_TIMEOUT_S = 120        # for torchrun and both processes together
GROUP_TIMEOUT_S = 40       # a collective waiting longer than this fails (a rank that never joins)
_HEADER = ("# check_average_gradients: your function, as each process runs it\n"
           "import math\n\nimport torch\nimport torch.distributed as dist\nimport torch.nn as nn\n\n")
_GIVEN = "`torch`, `torch.distributed as dist`, `torch.nn as nn` and `math`"


class _GradNet(nn.Module):
    """A small model with a frozen parameter and one unused in the step: both keep ``.grad = None``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3), requires_grad=False)  # frozen
        self.spare = nn.Linear(3, 3)                                                  # not used in forward

    def forward(self, x):
        return self.body(x) * self.scale


def _rank_loss(model: nn.Module, rank: int) -> torch.Tensor:
    """The loss on rank ``rank``'s rows: every rank reads different data."""
    g = torch.Generator().manual_seed(1000 + rank)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    return ((model(x) - y) ** 2).mean()


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _rank_case(rank: int, world: int) -> tuple[nn.Module, dict, dict]:
    """(the model after backward on this rank's data, this rank's gradients, the mean over all ranks'):
    every rank computes every rank's gradients on a copy, so the reference needs no communication."""
    model = _GradNet()
    per_rank = []
    for r in range(world):
        m = copy.deepcopy(model)
        _rank_loss(m, r).backward()
        per_rank.append(_grads(m))
    mean = {n: None if g is None else sum(pr[n] for pr in per_rank) / world for n, g in per_rank[0].items()}
    _rank_loss(model, rank).backward()
    return model, _grads(model), mean


def _tensor_json(t: torch.Tensor | None):
    return None if t is None else {"shape": list(t.shape), "values": t.detach().double().flatten().tolist()}


def _tensor_from(d) -> torch.Tensor | None:
    return None if d is None else torch.tensor(d["values"], dtype=torch.float64).reshape(d["shape"])


def _exception_json(err: BaseException, learner_path: str) -> dict:
    """The error's type and text, and the deepest line of the learner's file it passed through."""
    where = None
    for frame in traceback.extract_tb(err.__traceback__):
        if Path(frame.filename).resolve() == Path(learner_path).resolve():
            where = {"line": frame.lineno - _HEADER.count("\n"), "code": (frame.line or "").strip()}
    return {"type": type(err).__name__, "message": str(err), "where": where,
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-3000:]}


def _run_rank(fn_loader, rank: int, world: int, learner_path: str) -> dict:
    """One rank's part: backward on its data, the learner's function, what the gradients became."""
    model, local, mean = _rank_case(rank, world)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = {"rank": rank, "world": world, "names": list(local)}
    try:
        fn = fn_loader()
        fn(model)
    except NotImplementedError as err:
        report["not_implemented"] = str(err)
        return report
    except Exception as err:  # noqa: BLE001 (the learner's crash, reported to the parent)
        report["error"] = _exception_json(err, learner_path)
        return report
    after = dict(model.named_parameters())
    report["params"] = {
        n: {"local": _tensor_json(local[n]), "mean": _tensor_json(mean[n]),
            "got": _tensor_json(after[n].grad) if n in after else None,
            "weight_change": float((after[n].detach() - before[n]).abs().max()) if n in after else None}
        for n in local}
    return report


def _rank_main(argv: list[str]) -> None:
    """What each process of the harness runs: ``learner_file function_name out_dir``."""
    learner_path, name, out_dir = argv
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=GROUP_TIMEOUT_S))

    def load():
        import importlib.util
        spec = importlib.util.spec_from_file_location("yours", learner_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, name)

    report = _run_rank(load, rank, world, learner_path)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    # Leave without destroy_process_group: with gloo on older torch (2.4) a rank can wait in it
    # forever once the other rank has gone. The result is written; nothing else is left to do.
    sys.stdout.flush()
    os._exit(0)


def _source_of(fn) -> tuple[str, str]:
    """(the function's source, dedented, its name) or a CheckFailed saying why there is none."""
    module = getattr(fn, "__module__", None) or ""
    if module == "nblib" or module.startswith("nblib."):  # as call_learner refuses it: it would pass unwritten
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        raise CheckFailed(f"average_gradients: that is the course's own implementation ({module}.{name}); "
                          "write your own and pass it to the check")
    if not inspect.isfunction(fn):
        raise CheckFailed(f"average_gradients: expected a function written with `def`, got {fn!r}")
    if fn.__name__ == "<lambda>":
        raise CheckFailed("average_gradients: the check copies your function's source into the processes it "
                          "starts; a lambda has no source of its own: write it with `def average_gradients(model):`")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as err:
        raise CheckFailed(f"average_gradients: cannot read the source of {fn.__name__} ({err}): the check copies "
                          "it into the processes it starts, so define it with `def` in a notebook cell or a file"
                          ) from err
    return source, fn.__name__


def _cut_off(err: dict) -> bool:
    """Whether the error is a process losing or waiting for another: the consequence of a crash elsewhere."""
    return any(s in err["message"] for s in ("Connection closed", "Connection reset", "Timed out", "timed out",
                                              "timeout"))


def _hint_for_error(err: dict) -> str:
    text = f"{err['type']}: {err['message']}"
    if err["type"] == "NameError":
        return (f" (the check runs your function in fresh processes that have only {_GIVEN}: "
                "import or define inside the function what it uses)")
    if "NoneType" in text:
        return (" (a frozen parameter, or one not used in this step, has .grad None: skip the parameters whose "
                ".grad is None)")
    if "AVG" in text:
        return " (ReduceOp.AVG is missing from some backends: all_reduce the sum, then divide by the world size)"
    if _cut_off(err):
        return (" (a process waited for another in a collective: every process must make the same all_reduce "
                "calls, on tensors of the same shapes, in the same order)")
    return ""


def _error_message(report: dict) -> str:
    err = report["error"]
    where = err.get("where")
    at = f" at line {where['line']} of your function (`{where['code']}`)" if where and where.get("code") else ""
    message = " ".join(err["message"].split())
    message = message if len(message) <= 300 else message[:300] + " ..."
    return (f"rank {report['rank']}: your average_gradients raised {err['type']}{at}: {message}"
            f"{_hint_for_error(err)}")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _verdict(reports: list[dict]) -> None:
    """Raise (NotImplementedError or CheckFailed) unless every rank holds the mean of the ranks' gradients."""
    for r in reports:
        if "not_implemented" in r:
            raise NotImplementedError(r["not_implemented"])
    errors = [r for r in reports if "error" in r]
    if errors:
        # a rank that crashed leaves the others waiting or cut off: name the cause, not the consequence
        first = min(errors, key=lambda r: (_cut_off(r["error"]), r["rank"]))
        raise CheckFailed(_error_message(first))
    world = reports[0]["world"]
    for r in reports:
        rank, params = r["rank"], r["params"]
        for name, p in params.items():
            if p["weight_change"]:
                raise CheckFailed(f"rank {rank}: your average_gradients changed parameter {name} itself (by up to "
                                  f"{p['weight_change']:.3g}): average the gradients p.grad, not the weights")
        done = []  # parameters already right on this rank
        for name, p in params.items():
            local, mean, got = (_tensor_from(p[k]) for k in ("local", "mean", "got"))
            if local is None:
                if got is not None:
                    raise CheckFailed(f"rank {rank}: parameter {name} had no gradient (.grad is None: frozen, or not "
                                      f"used in this step) and now has one: skip such parameters, leave .grad None")
                continue
            if got is None:
                raise CheckFailed(f"rank {rank}: parameter {name}'s .grad is None after your function: replace "
                                  "it with the averaged gradient")
            if got.shape != mean.shape:
                raise CheckFailed(f"rank {rank}: parameter {name}'s .grad has shape {tuple(got.shape)}, expected "
                                  f"{tuple(mean.shape)} (the parameter's shape)")
            if _close(got, mean):
                done.append(name)
                continue
            off = float((got - mean).abs().max())
            head = (f"rank {rank}: parameter {name}'s gradient differs from the mean of the ranks' gradients "
                    f"by {off:.3g}")
            if _close(got, local):
                if done:
                    hint = (f"it is still this rank's own gradient, while {done[0]} was averaged: does the loop "
                            "stop early (a return inside the loop?)")
                else:
                    hint = ("it is still this rank's own gradient: all_reduce works in place on the tensor you "
                            "give it, so give it p.grad itself, or assign the result back to p.grad")
            elif _close(got, mean * world):
                hint = f"it is the sum over the {world} ranks: divide by the world size, dist.get_world_size()"
            elif _close(got, mean / world):
                hint = f"it is the mean divided by {world} once more: divide by the world size only once"
            elif _close(got, local / world):
                hint = ("it is this rank's own gradient divided by the world size: the all_reduce did not reach "
                        "p.grad")
            else:
                hint = "expected (the sum of every rank's gradient) / world size, on every rank"
                others = [o["rank"] for o in reports if o is not r and (o_got := _tensor_from(o["params"][name]["got"]))
                          is not None and not _close(o_got, got)]
                if others:
                    hint += (f"; rank {others[0]} holds another gradient for it: the ranks' models would drift apart")
            raise CheckFailed(f"{head} ({hint})")


def write_average_gradients(average_gradients, path) -> Path:
    """Write the learner's ``average_gradients`` (its source, with the imports it may use) to the file
    ``path``, for processes to load: the check's, and ``python -m nblib.pretrain --average-gradients``."""
    source, name = _source_of(average_gradients)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    alias = "" if name == "average_gradients" else f"\naverage_gradients = {name}\n"
    path.write_text(_HEADER + source + alias)
    return path


def _harness(tmp: Path, source: str, name: str) -> list[str]:
    learner = tmp / "yours.py"
    learner.write_text(_HEADER + source)
    harness = tmp / "harness.py"
    root = Path(__file__).resolve().parents[2]  # the folder holding nblib: the processes import this nblib
    harness.write_text("import sys\n"
                       f"sys.path.insert(0, {str(root)!r})\n"
                       "from nblib.checks.pretrain import _rank_main\n"
                       "_rank_main(sys.argv[1:])\n")
    out = tmp / "out"
    out.mkdir()
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
            str(harness), str(learner), name, str(out)]


def _launch(cmd: list[str], cwd: Path, timeout: float) -> str:
    """Run torchrun; its output (for when a rank wrote no result). The whole process tree goes on a timeout."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    posix = os.name == "posix"
    log = cwd / "torchrun.log"  # a file, not a pipe: a process left behind cannot keep us waiting for its end
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=posix)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
            raise CheckFailed(f"average_gradients: the {WORLD} processes did not finish within {timeout:.0f} s: does "
                          "every process make the same all_reduce calls in the same order? (a process waiting in "
                          "all_reduce for one that never comes waits forever)") from None
    return log.read_text(errors="replace")


def _stub_fast(average_gradients) -> None:
    """An untouched exercise raises NotImplementedError at once: say so without starting processes."""
    model = _GradNet()  # no backward: every .grad is None, and no process group here
    try:
        call_learner("average_gradients", average_gradients, model)
    except CheckFailed:
        pass  # no process group in this process, or no return value (none is needed): the processes decide


def check_average_gradients(average_gradients, timeout: float = RUN_TIMEOUT_S) -> None:
    """``average_gradients(model) -> None``: inside an initialised process group, replace every
    parameter's ``.grad`` by the mean of that gradient over all processes (``dist.all_reduce``),
    skipping parameters whose ``.grad`` is None. Run in 2 gloo processes under torchrun."""
    source, name = _source_of(average_gradients)
    _stub_fast(average_gradients)
    with tempfile.TemporaryDirectory(prefix="nblib-avg-") as tmp:
        tmp = Path(tmp)
        cmd = _harness(tmp, source, name)
        output = _launch(cmd, tmp, timeout)
        reports = []
        for rank in range(WORLD):
            path = tmp / "out" / f"rank{rank}.json"
            if not path.exists():
                raise CheckFailed(f"average_gradients: process {rank} wrote no result; torchrun's output ends:\n"
                                  f"{output[-2000:]}")
            reports.append(json.loads(path.read_text()))
    _verdict(reports)
    passed("average_gradients")


# ---------------------------------------------------------------------------- 3. the micro-batch size


def _isclose(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    except (TypeError, ValueError):
        return False


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def check_choose_batch_size(choose_batch_size) -> None:
    """``choose_batch_size(measured, budget_bytes, global_batch) -> (batch_size, fixed_bytes, bytes_per_row)``:
    fit bytes = fixed + per_row x B to ``measured`` ({B: peak bytes}) by least squares, return the
    largest B dividing ``global_batch`` whose predicted bytes fit ``budget_bytes``; ValueError if B = 1 does not."""
    rng = np.random.default_rng(14)

    def line(fixed, per_row, rows):
        return {b: float(fixed + per_row * b) for b in rows}

    cases = []  # (what, measured, budget, global_batch)
    cases.append(("exact line, answer beyond the measured sizes",
                  line(2.0e9, 1.5e8, (8, 1, 4, 2)), 6.0e9, 64))             # B <= 26.7: 16 (measured up to 8)
    cases.append(("exact line, a budget between two divisors",
                  line(1.2e9, 3.0e8, (1, 2, 3, 4)), 3.3e9, 24))              # B <= 7: 6 fits, 8 does not
    noisy = {b: float(5.0e8 + 2.0e8 * b + 2.0e7 * rng.standard_normal()) for b in (2, 4, 6, 8, 10)}
    cases.append(("noisy measurements, global batch 48 (divisors 1 2 3 4 6 8 12 16 24 48)",
                  noisy, 3.4e9, 48))                                        # B <= ~14.5: 12, not 14
    cases.append(("the whole global batch fits", line(1e9, 1e7, (1, 2, 4)), 8e9, 32))
    cases.append(("only one row fits", line(3.0e9, 8.0e8, (1, 2, 4)), 4.0e9, 16))
    for what, measured, budget, global_batch in cases:
        what = (f"choose_batch_size({what}: measured at B={sorted(measured)}, budget {_gb(budget)}, "
                f"global_batch={global_batch})")
        want_b, want_fixed, want_per_row = pretrain.choose_batch_size(measured, budget, global_batch)
        got = call_learner(what, choose_batch_size, dict(measured), budget, global_batch)
        try:
            b, fixed, per_row = got
        except (TypeError, ValueError) as err:
            raise CheckFailed(f"{what}: expected a tuple (batch_size, fixed_bytes, bytes_per_row), "
                              f"got {got!r}") from err
        scale = max(measured.values())
        if _isclose(fixed, want_per_row) and _isclose(per_row, want_fixed):
            raise CheckFailed(f"{what}: fixed_bytes and bytes_per_row are swapped (np.polyfit(B, bytes, 1) returns "
                              "the slope, bytes per row, first)")
        rows = sorted(measured)
        two_point = (measured[rows[-1]] - measured[rows[0]]) / (rows[-1] - rows[0])
        fit_hint = (" (a line through the first and last points is not the least-squares fit: use all of them, "
                    "np.polyfit(B, bytes, 1))" if _isclose(per_row, two_point) and not _isclose(per_row, want_per_row)
                    else "")
        expect_close(f"{what}: bytes_per_row{fit_hint}", per_row, want_per_row, atol=1e-9 * scale, rtol=1e-6)
        expect_close(f"{what}: fixed_bytes{fit_hint}", fixed, want_fixed, atol=1e-9 * scale, rtol=1e-6)
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise CheckFailed(f"{what}: batch_size should be an int (rows), got {b!r} ({type(b).__name__})")
        b = int(b)
        if b == want_b:
            continue

        def need(rows):
            return want_fixed + want_per_row * rows

        if b < 1 or global_batch % b:
            hint = (f"{b} does not divide global_batch={global_batch}: every step is global_batch / batch_size "
                    "micro-batches, so batch_size must divide it")
        elif need(b) > budget:
            hint = f"{b} rows are predicted to need {_gb(need(b))}, over the budget"
        elif b < want_b and b == max((r for r in measured if need(r) <= budget and global_batch % r == 0), default=0):
            hint = (f"{b} is the largest measured size that fits, but the fitted line predicts {want_b} fits too "
                    f"({_gb(need(want_b))}): try every divisor of global_batch, not only the measured sizes")
        else:
            hint = f"{want_b} also divides {global_batch} and fits ({_gb(need(want_b))}): take the largest"
        raise CheckFailed(f"{what}: expected batch_size {want_b}, got {b}: {hint}")
    measured = line(6.0e9, 1.0e9, (1, 2, 4))
    what = f"choose_batch_size(measured at B=[1, 2, 4] with 7.00 GB at B=1, budget {_gb(5e9)}, global_batch=8)"
    try:
        got = call_learner(what, choose_batch_size, measured, 5e9, 8)
    except CheckFailed as err:
        if not isinstance(err.__cause__, ValueError):
            raise
        if not str(err.__cause__).strip():
            raise CheckFailed(f"{what}: raised ValueError without a message: say what B=1 needs and the budget"
                              ) from err
    else:
        raise CheckFailed(f"{what}: even B=1 is over the budget, expected a ValueError, got {got!r}")
    passed("choose_batch_size")

