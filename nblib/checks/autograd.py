"""Checks for lesson 02 (backprop by hand, scalars): a scalar engine against torch.autograd.

``compare_with_torch(Value)`` builds random expressions twice, once from ``Value`` leaves and
once from float64 torch tensors, and reports the largest gap in values and gradients.
The exercise checks run a learner's operation the same way and name the gradient that is off.
"""
from __future__ import annotations

import math
import random

import torch

from nblib.autograd import Value as EngineValue
from nblib.checks import CheckFailed, call_learner, expect_close, passed

# Unary steps a random expression may take. Each works on a Value and on a torch tensor
# alike, and keeps the argument of log/pow/division inside its domain.
UNARY = {
    "tanh": lambda x: x.tanh(),
    "relu": lambda x: x.relu(),
    "exp": lambda x: (x * 0.5).exp(),  # halved so that chains of exp stay finite
    "log": lambda x: (x * x + 0.5).log(),
    "pow": lambda x: (x * x + 0.5) ** 1.5,
    "square": lambda x: x**2,
    "neg": lambda x: -x,
    "affine": lambda x: 2.0 - 3.0 * x,
}
# How each unary step reads, with {} standing for its argument.
UNARY_TEXT = {"tanh": "tanh({})", "relu": "relu({})", "exp": "exp({}/2)", "log": "log({0}^2+0.5)",
              "pow": "({0}^2+0.5)^1.5", "square": "{}^2", "neg": "-{}", "affine": "2-3*{}"}
BINARY = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "*": lambda x, y: x * y,
    "/": lambda x, y: x / (y * y + 1.0),  # denominator >= 1
}


def random_expression(rng: random.Random, n_inputs: int = 3, n_ops: int = 8):
    """A random expression of ``n_inputs`` variables as (function, description).

    The function takes the inputs (Values or tensors) and returns the output. Inputs are
    reused at random, so many expressions use a variable more than once: that is what
    catches a backward that assigns ``grad =`` instead of accumulating ``grad +=``.
    """
    steps = []
    for i in range(n_ops):
        n_available = n_inputs + i  # the inputs plus every intermediate made so far
        if rng.random() < 0.5:
            steps.append(("unary", rng.choice(sorted(UNARY)), rng.randrange(n_available), None))
        else:
            steps.append(("binary", rng.choice(sorted(BINARY)), rng.randrange(n_available), rng.randrange(n_available)))

    def f(*xs):
        nodes = list(xs)
        for kind, op, i, j in steps:
            nodes.append(UNARY[op](nodes[i]) if kind == "unary" else BINARY[op](nodes[i], nodes[j]))
        # Add every node in, scaled down, so that every input reaches the output.
        out = nodes[-1]
        for node in nodes[:-1]:
            out = out + node * 0.1
        return out

    def name(k):
        return f"x{k}" if k < n_inputs else f"t{k - n_inputs}"

    lines = [f"t{k} = " + (UNARY_TEXT[op].format(name(i)) if kind == "unary" else
                           f"{name(i)} / ({name(j)}^2+1)" if op == "/" else f"{name(i)} {op} {name(j)}")
             for k, (kind, op, i, j) in enumerate(steps)]
    return f, "; ".join(lines) + f"; out = t{n_ops - 1} + 0.1 * (sum of all the others)"


def compare_with_torch(value_cls=EngineValue, n_expressions: int = 100, seed: int = 0, verbose: bool = False) -> float:
    """Largest absolute difference between ``value_cls`` and torch.autograd over random expressions.

    Compares the output and the gradient of every input, in float64; expressions whose
    output or gradients exceed 1e4 in size are skipped. Raises ``CheckFailed``
    (naming the expression and the input) if any gradient is not finite or differs by
    more than 1e-6; otherwise returns the worst difference seen.
    """
    rng = random.Random(seed)
    worst, e = 0.0, 0
    while e < n_expressions:
        n_inputs = rng.randint(1, 4)
        f, description = random_expression(rng, n_inputs, n_ops=rng.randint(3, 12))
        xs = [rng.uniform(-2.0, 2.0) for _ in range(n_inputs)]
        ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
        ref = f(*ts)
        ref.backward()
        if max([abs(ref.item())] + [abs(t.grad.item()) for t in ts]) > 1e4:
            continue  # exp of exp can reach 1e30, where an absolute 1e-6 says nothing; draw another
        vs = [value_cls(x) for x in xs]
        out = f(*vs)
        out.backward()
        pairs = [("output", out.data, ref.item())] + [(f"d out/d x{k}", v.grad, t.grad.item()) for k, (v, t) in enumerate(zip(vs, ts))]
        for what, got, expected in pairs:
            gap = abs(got - expected)
            if not math.isfinite(got) or gap > 1e-6:
                raise CheckFailed(f"expression {e} ({description}) at x={xs}: {what} is {got!r}, torch says {expected!r} (off by {gap:.3g})")
            worst = max(worst, gap)
        if verbose and e < 3:
            print(f"{description}\n  -> output {out.data:.6f}, grads {[round(v.grad, 6) for v in vs]}")
        e += 1
    return worst


def _torch_grads(fn, xs):
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    out = fn(*ts)
    out.backward()
    return out.item(), [t.grad.item() for t in ts]


def check_sigmoid(sigmoid, value_cls=EngineValue) -> None:
    """Exercise: ``sigmoid(x: Value) -> Value`` as one new operation with its own backward."""
    for x in (-3.0, -0.5, 0.0, 0.7, 2.5):
        v = value_cls(x)
        out = call_learner(f"sigmoid(Value({x}))", sigmoid, v)
        if not isinstance(out, value_cls):
            raise CheckFailed(f"sigmoid(Value({x})) should return a Value, got {type(out).__name__}")
        if v not in out._prev:
            raise CheckFailed("sigmoid's output should have x among its children (_children=(x,)): "
                              "build it as one operation, not from exp and division")
        expect_close(f"sigmoid({x}).data", out.data, torch.sigmoid(torch.tensor(x, dtype=torch.float64)).item())
        out.backward()
        _, (g,) = _torch_grads(torch.sigmoid, [x])
        expect_close(f"x.grad after sigmoid(x).backward() at x={x}", v.grad, g)
    # x used twice: the backward must add to x.grad, not overwrite it.
    v = value_cls(0.3)
    (call_learner("sigmoid(Value(0.3))", sigmoid, v) * v).backward()
    _, (g,) = _torch_grads(lambda t: torch.sigmoid(t) * t, [0.3])
    expect_close("x.grad of sigmoid(x) * x at x=0.3 (x is used twice: does your backward use += ?)", v.grad, g)
    passed("sigmoid with its backward")


def check_fixed_power(power, value_cls=EngineValue) -> None:
    """Exercise: ``power(a: Value, b: Value) -> Value``, a ** b with gradients for both a and b."""
    for a, b in ((2.0, 3.0), (1.5, -0.5), (0.7, 2.2), (3.0, 0.0)):
        va, vb = value_cls(a), value_cls(b)
        out = call_learner(f"power(Value({a}), Value({b}))", power, va, vb)
        expect_close(f"power({a}, {b}).data", out.data, a**b)
        out.backward()
        _, (ga, gb) = _torch_grads(lambda s, t: s**t, [a, b])
        expect_close(f"a.grad (d a**b / d a) at a={a}, b={b}", va.grad, ga)
        expect_close(f"b.grad (d a**b / d b) at a={a}, b={b}", vb.grad, gb)
    va = value_cls(1.3)
    (call_learner("power(a, a)", power, va, va) * 2).backward()
    _, (g,) = _torch_grads(lambda s: s**s * 2, [1.3])
    expect_close("a.grad of power(a, a) * 2 at a=1.3 (a is used twice)", va.grad, g)
    passed("a ** b with both gradients")
