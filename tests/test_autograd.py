"""nblib.autograd (lesson 02's scalar engine) against hand-computed values and torch.autograd."""
import math
import random

import pytest

from nblib.autograd import Value, topological_order
from nblib.checks import CheckFailed
from nblib.checks.autograd import check_fixed_power, check_sigmoid, compare_with_torch, random_expression


def test_hand_computed_gradients():
    # L = (a*b + c) * f at a=2, b=-3, c=10, f=-2: d = 4, L = -8
    a, b, c, f = Value(2.0), Value(-3.0), Value(10.0), Value(-2.0)
    L = (a * b + c) * f
    L.backward()
    assert math.isclose(L.data, -8.0)
    assert math.isclose(a.grad, 6.0)   # f * b
    assert math.isclose(b.grad, -4.0)  # f * a
    assert math.isclose(c.grad, -2.0)  # f
    assert math.isclose(f.grad, 4.0)   # a*b + c


@pytest.mark.parametrize("x", [-1.5, -0.2, 0.3, 2.0])
def test_each_unary_op_matches_its_derivative(x):
    cases = {
        "exp": (lambda v: v.exp(), math.exp(x)),
        "tanh": (lambda v: v.tanh(), 1 - math.tanh(x) ** 2),
        "relu": (lambda v: v.relu(), 1.0 if x > 0 else 0.0),
        "pow3": (lambda v: v**3, 3 * x**2),
        "div": (lambda v: 1 / v, -1 / x**2),
        "sub": (lambda v: 5 - v, -1.0),
    }
    for name, (op, expected) in cases.items():
        v = Value(x)
        op(v).backward()
        assert math.isclose(v.grad, expected, rel_tol=1e-12, abs_tol=1e-12), name
    v = Value(abs(x))
    v.log().backward()
    assert math.isclose(v.grad, 1 / abs(x), rel_tol=1e-12)


def test_variable_used_twice_accumulates():
    a = Value(3.0)
    b = a + a  # db/da = 2; a backward that assigned instead of adding would give 1
    b.backward()
    assert math.isclose(a.grad, 2.0)
    x = Value(-1.5)
    (x * x * x).backward()
    assert math.isclose(x.grad, 3 * 1.5**2)


def test_gradients_accumulate_across_backward_calls_like_torch():
    a = Value(2.0)
    y = a * 3
    y.backward()
    y.backward()
    assert math.isclose(a.grad, 6.0)


def test_engine_matches_torch_autograd_on_random_expressions():
    # The issue asks for >= 100 expressions within 1e-6; we run 300 over three seeds.
    for seed in range(3):
        worst = compare_with_torch(Value, n_expressions=100, seed=seed)
        assert worst < 1e-6


def test_random_expressions_reuse_variables():
    rng = random.Random(0)
    reused = 0
    for _ in range(100):
        _, text = random_expression(rng, n_inputs=2, n_ops=8)
        reused += text.count("x0") > 1 or text.count("x1") > 1
    assert reused > 50  # most expressions exercise gradient accumulation


def test_compare_with_torch_catches_a_broken_backward():
    class Broken(Value):
        def tanh(self):
            t = math.tanh(self.data)
            out = Broken(t, (self,), "tanh")

            def _backward():
                self.grad += (1 - self.data**2) * out.grad  # bug: should be 1 - t**2

            out._backward = _backward
            return out

        def __add__(self, other):
            other = other if isinstance(other, Value) else Broken(other)
            return Value.__add__(self, other)

    with pytest.raises(CheckFailed, match="torch says"):
        compare_with_torch(Broken, n_expressions=100)


def test_topological_order_puts_children_first_and_handles_deep_graphs():
    a, b = Value(1.0), Value(2.0)
    c = a * b
    d = c + a
    order = topological_order(d)
    assert order.index(a) < order.index(c) < order.index(d)
    assert order.index(b) < order.index(c)
    x = Value(0.5)
    y = x
    for _ in range(5000):  # deeper than Python's default recursion limit
        y = y + 0.001
    y.backward()
    assert math.isclose(x.grad, 1.0)


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="non-positive"):
        Value(-1.0).log()
    with pytest.raises(TypeError, match="plain number"):
        Value(2.0) ** Value(3.0)
    with pytest.raises(TypeError):
        Value(Value(1.0))


def _sigmoid(x, accumulate=True):
    s = 1 / (1 + math.exp(-x.data))
    out = Value(s, (x,), "sigmoid")

    def _backward():
        if accumulate:
            x.grad += s * (1 - s) * out.grad
        else:
            x.grad = s * (1 - s) * out.grad

    out._backward = _backward
    return out


def _power(a, b, bug=False):
    out = Value(a.data**b.data, (a, b), "pow")

    def _backward():
        a.grad += b.data * a.data ** (b.data - 1) * out.grad
        if bug:
            b.grad += out.data * math.log(b.data if b.data > 0 else 1.0) * out.grad
        else:
            b.grad += out.data * math.log(a.data) * out.grad

    out._backward = _backward
    return out


def test_sigmoid_check_passes_a_correct_answer_and_catches_overwriting(capsys):
    check_sigmoid(_sigmoid)
    assert "passed" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match="used twice"):
        check_sigmoid(lambda x: _sigmoid(x, accumulate=False))
    with pytest.raises(CheckFailed, match="children"):
        check_sigmoid(lambda x: 1 / (1 + (-x).exp()))


def test_power_check_names_the_gradient_that_is_off():
    check_fixed_power(_power)
    with pytest.raises(CheckFailed, match=r"b\.grad .* off by"):
        check_fixed_power(lambda a, b: _power(a, b, bug=True))
