"""A scalar autograd engine (lesson 02): ``Value`` wraps one number and remembers how it was made.

Every operation returns a new ``Value`` whose ``_backward`` knows the local derivative of
that one operation. ``backward()`` sorts the graph topologically and applies the chain
rule from the output back to the leaves::

    a, b = Value(2.0), Value(-3.0)
    y = (a * b + a).tanh()
    y.backward()          # a.grad == dy/da, b.grad == dy/db

Lesson 02 builds this class cell by cell; the exercise checks (``nblib.checks.autograd``)
and the unit tests use this copy.
"""
from __future__ import annotations

import math


class Value:
    """One scalar in a computation graph, with the gradient of the final output w.r.t. it."""

    def __init__(self, data: float, _children: tuple = (), _op: str = "", label: str = ""):
        if isinstance(data, Value):
            raise TypeError("Value(Value(...)): pass the number, e.g. Value(v.data)")
        self.data = float(data)
        self.grad = 0.0  # d(output)/d(self); zero until backward() runs
        self._backward = lambda: None  # spreads out.grad to the children; set by each op
        self._prev = tuple(_children)
        self._op = _op  # the operation that produced this value, for pictures and debugging
        self.label = label

    def __repr__(self) -> str:
        name = f"{self.label}=" if self.label else ""
        return f"Value({name}{self.data:.4g}, grad={self.grad:.4g})"

    # --- the operations, each with its local derivative ---------------------------------
    def __add__(self, other) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other), "+")

        def _backward():
            # d(a+b)/da = 1 and d(a+b)/db = 1. "+=": a value used twice gets both contributions.
            self.grad += out.grad
            other.grad += out.grad

        out._backward = _backward
        return out

    def __mul__(self, other) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other), "*")

        def _backward():
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad

        out._backward = _backward
        return out

    def __pow__(self, exponent: float) -> Value:
        if not isinstance(exponent, (int, float)):
            raise TypeError("Value ** x supports a plain number x (int or float) only")
        out = Value(self.data**exponent, (self,), f"**{exponent:g}")

        def _backward():
            self.grad += exponent * self.data ** (exponent - 1) * out.grad

        out._backward = _backward
        return out

    def exp(self) -> Value:
        out = Value(math.exp(self.data), (self,), "exp")

        def _backward():
            self.grad += out.data * out.grad  # d e^x / dx = e^x, which we already computed

        out._backward = _backward
        return out

    def log(self) -> Value:
        if self.data <= 0:
            raise ValueError(f"log of a non-positive number: {self.data}")
        out = Value(math.log(self.data), (self,), "log")

        def _backward():
            self.grad += out.grad / self.data

        out._backward = _backward
        return out

    def tanh(self) -> Value:
        t = math.tanh(self.data)
        out = Value(t, (self,), "tanh")

        def _backward():
            self.grad += (1 - t * t) * out.grad

        out._backward = _backward
        return out

    def relu(self) -> Value:
        out = Value(max(self.data, 0.0), (self,), "relu")

        def _backward():
            self.grad += (self.data > 0) * out.grad

        out._backward = _backward
        return out

    # --- the rest follows from the operations above --------------------------------------
    def __neg__(self) -> Value:
        return self * -1

    def __sub__(self, other) -> Value:
        return self + (-other)

    def __truediv__(self, other) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        return self * other**-1

    def __radd__(self, other) -> Value:  # 2 + v
        return self + other

    def __rsub__(self, other) -> Value:  # 2 - v
        return (-self) + other

    def __rmul__(self, other) -> Value:  # 2 * v
        return self * other

    def __rtruediv__(self, other) -> Value:  # 2 / v
        return Value(other) / self

    # --- backpropagation -----------------------------------------------------------------
    def backward(self) -> None:
        """Add d(self)/d(v) to ``v.grad`` for every value ``v`` this one depends on.

        Like torch, gradients accumulate across calls: reset them (``v.grad = 0``) between
        training steps.
        """
        self.grad = 1.0
        # Children after parents in reverse: a node's grad is complete before it is spread.
        for v in reversed(topological_order(self)):
            v._backward()


def topological_order(root: Value) -> list[Value]:
    """Every value ``root`` depends on, each listed after all of its children."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:  # iterative depth-first search: deep graphs would hit Python's recursion limit
        v, children_done = stack.pop()
        if children_done:
            order.append(v)
        elif id(v) not in seen:
            seen.add(id(v))
            stack.append((v, True))
            stack.extend((c, False) for c in v._prev if id(c) not in seen)
    return order
