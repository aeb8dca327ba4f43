"""nblib.checks.backprop (lesson 03): correct backward formulas pass, typical mistakes fail
with a message naming the tensor and how far off it is."""
import pytest
import torch

from nblib.checks import CheckFailed
from nblib.checks.backprop import check_label_smoothing_backward, check_layernorm_backward, check_softmax_backward


# Reference answers, derived by hand (the checks compare them with torch.autograd).
def softmax_backward(probs, dprobs):
    return probs * (dprobs - (probs * dprobs).sum(1, keepdim=True))


def label_smoothing_backward(logits, targets, smoothing):
    n, v = logits.shape
    target_dist = torch.full_like(logits, smoothing / v)
    target_dist[torch.arange(n), targets] += 1 - smoothing
    return (torch.softmax(logits, 1) - target_dist) / n


def layernorm_backward(dout, x, gamma, eps, unbiased=False):
    mean = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=unbiased)
    xhat = (x - mean) / (var + eps).sqrt()
    dxhat = dout * gamma
    dx = (dxhat - dxhat.mean(1, keepdim=True) - xhat * (dxhat * xhat).mean(1, keepdim=True)) / (var + eps).sqrt()
    return dx, (dout * xhat).sum(0), dout.sum(0)


def test_correct_answers_pass(capsys):
    check_softmax_backward(softmax_backward)
    check_label_smoothing_backward(label_smoothing_backward)
    check_layernorm_backward(layernorm_backward)
    assert capsys.readouterr().out.count("passed") == 3


def test_softmax_mistakes_are_named():
    with pytest.raises(CheckFailed, match=r"dlogits .* off by"):
        check_softmax_backward(lambda p, dp: p * dp)  # forgot the coupling term
    with pytest.raises(CheckFailed, match="expected shape"):
        check_softmax_backward(lambda p, dp: (p * dp).sum(1))


def test_label_smoothing_mistakes_are_named():
    with pytest.raises(CheckFailed, match=r"smoothing=0.1\): off by"):
        # ignores the smoothing: right only when smoothing is 0
        check_label_smoothing_backward(lambda lg, t, s: label_smoothing_backward(lg, t, 0.0))
    with pytest.raises(CheckFailed, match="off by"):
        # forgot to divide by the batch size (the loss is a mean)
        check_label_smoothing_backward(lambda lg, t, s: label_smoothing_backward(lg, t, s) * lg.shape[0])


def test_layernorm_mistakes_are_named():
    with pytest.raises(CheckFailed, match=r"^dx .* off by"):
        check_layernorm_backward(lambda *a: layernorm_backward(*a, unbiased=True))
    with pytest.raises(CheckFailed, match=r"^dgamma .* off by"):
        check_layernorm_backward(lambda *a: (layernorm_backward(*a)[0], a[0].sum(0), a[0].sum(0)))
    with pytest.raises(CheckFailed, match="should return 3 tensors"):
        check_layernorm_backward(lambda *a: layernorm_backward(*a)[0])


def test_a_crash_or_nan_is_a_failed_check():
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError"):
        check_softmax_backward(lambda p, dp: 1 / 0)
    with pytest.raises(CheckFailed, match="NaN"):
        check_softmax_backward(lambda p, dp: p * float("nan"))
    with pytest.raises(NotImplementedError):  # the student stub's error reaches the learner as is
        check_softmax_backward(lambda p, dp: (_ for _ in ()).throw(NotImplementedError("hint")))
