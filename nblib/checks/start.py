"""Check for lesson 00's warm-up exercise: a numerically stable softmax."""
from __future__ import annotations

import math

import torch

from nblib.checks import CheckFailed, call_learner, expect_close, passed


def check_softmax(softmax) -> None:
    """``softmax(x)``: probabilities along the last dimension of a tensor."""
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    total = sum(math.exp(v) for v in (1.0, 2.0, 3.0))
    expected = [[math.exp(v) / total for v in (1.0, 2.0, 3.0)], [1 / 3] * 3]
    expect_close("softmax([[1, 2, 3], [0, 0, 0]])", call_learner("softmax", softmax, x), expected, atol=1e-6)
    big = call_learner("softmax([1000, 1000])", softmax, torch.tensor([1000.0, 1000.0]))
    if not torch.isfinite(torch.as_tensor(big)).all():
        raise CheckFailed("softmax([1000, 1000]) overflowed to nan/inf: subtract the maximum before exp")
    expect_close("softmax([1000, 1000])", big, [0.5, 0.5], atol=1e-6)
    passed("softmax")
