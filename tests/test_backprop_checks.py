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


# Section 4's exercises: the MLP with BatchNorm, piece by piece.
from nblib.checks import backprop as bp  # noqa: E402


def _learner(fn):
    # The checks refuse nblib's own functions; a lambda stands for the learner's.
    return lambda *a: fn(*a)


def test_section4_references_pass(capsys):
    bp.check_backward_loss(_learner(bp.ours_backward_loss))
    bp.check_backward_mlp((_learner(bp.ours_linear_backward), _learner(bp.ours_tanh_backward),
                           _learner(bp.ours_embedding_backward)))
    bp.check_backward_batchnorm(_learner(bp.ours_backward_batchnorm))
    bp.check_batchnorm_compact(_learner(bp.ours_batchnorm_backward))
    assert capsys.readouterr().out.count("passed") == 4


def test_nblib_pieces_are_refused():
    with pytest.raises(CheckFailed, match="course's own implementation"):
        bp.check_backward_loss(bp.ours_backward_loss)


def test_backward_loss_names_the_first_wrong_step():
    def no_max_path(t, Yb):
        d = bp.ours_backward_loss(t, Yb)
        return {**d, "lse": d["lse"] * 2}
    with pytest.raises(CheckFailed, match=r"^dlse \(batch 8, 7 classes\): off by"):
        bp.check_backward_loss(no_max_path)
    with pytest.raises(CheckFailed, match="no gradient for 'counts'"):
        bp.check_backward_loss(lambda t, Yb: {k: v for k, v in bp.ours_backward_loss(t, Yb).items() if k != "counts"})
    with pytest.raises(CheckFailed, match="should return a dict"):
        bp.check_backward_loss(lambda t, Yb: bp.ours_backward_loss(t, Yb)["logits"])


def test_layer_mistakes_are_named():
    lin, tanh, emb = (_learner(f) for f in (bp.ours_linear_backward, bp.ours_tanh_backward, bp.ours_embedding_backward))
    with pytest.raises(CheckFailed, match=r"^linear_backward: db .*expected shape"):
        bp.check_backward_mlp((lambda d, x, W: (d @ W.T, x.T @ d, d.sum(0, keepdim=True)), tanh, emb))
    with pytest.raises(CheckFailed, match=r"^tanh_backward: dpre .* off by"):
        bp.check_backward_mlp((lin, lambda d, out: (1 - out) * d, emb))

    def overwrite(demb, ix, v):  # dC[ix] = ... keeps only one of the repeated rows
        dC = torch.zeros(v, demb.shape[-1], dtype=demb.dtype)
        dC[ix.reshape(-1)] = demb.reshape(-1, demb.shape[-1])
        return dC
    with pytest.raises(CheckFailed, match=r"^embedding_backward: dC .* off by"):
        bp.check_backward_mlp((lin, tanh, overwrite))


def test_batchnorm_mistakes_are_named():
    def biased(t, dhpreact, eps):  # the variance path with 1/n instead of 1/(n - 1)
        d = bp.ours_backward_batchnorm(t, dhpreact, eps)
        n = dhpreact.shape[0]
        return {**d, "bndiff2": d["bndiff2"] * (n - 1) / n}
    with pytest.raises(CheckFailed, match=r"^dbndiff2 .* off by"):
        bp.check_backward_batchnorm(biased)

    def no_mean_path(dhpreact, bnraw, bnvar_inv, bngain):
        dx, dg, db = bp.ours_batchnorm_backward(dhpreact, bnraw, bnvar_inv, bngain)
        return dx + bngain * bnvar_inv * dhpreact.sum(0) / dhpreact.shape[0], dg, db
    with pytest.raises(CheckFailed, match=r"^batchnorm_backward: dhprebn .* off by"):
        bp.check_batchnorm_compact(no_mean_path)
    with pytest.raises(CheckFailed, match="should return 3 tensors"):
        bp.check_batchnorm_compact(lambda *a: bp.ours_batchnorm_backward(*a)[0])


def test_mlp_intermediates_match_the_lesson_forward():
    t, grads, Yb, Xb = bp.mlp_intermediates(0, n=8, vocab=7)
    loss = torch.nn.functional.cross_entropy(t["logits"], Yb)
    assert abs(loss.item() + t["logprobs"][range(8), Yb].mean().item()) < 1e-12
    torch.testing.assert_close(grads["logits"].sum(1), torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-12)
