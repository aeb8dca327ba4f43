"""nblib.pg: the tiny policy whose expectations are exact sums, and the estimators measured against them."""
import torch

from nblib import pg, rl


def test_the_enumeration_is_a_distribution():
    ys = pg.all_replies()
    assert ys.shape == (pg.V ** pg.L, pg.L) and len({tuple(y) for y in ys.tolist()}) == pg.V ** pg.L
    torch.testing.assert_close(pg.probs(pg.init_theta()).sum().item(), 1.0)
    assert pg.reward(torch.tensor([[0, 1, 2, 0], [1, 1, 1, 1], [2, 1, 2, 1]])).tolist() == [4.0, 0.0, 2.0]


def test_exact_gradient_matches_finite_differences():
    theta = pg.init_theta(seed=3)
    grad = pg.exact_grad(theta)
    eps = 1e-6
    for index in [(0, 3, 0), (1, 0, 2), (2, 1, 1), (3, 2, 0)]:
        step = torch.zeros_like(theta)
        step[index] = eps
        numeric = (pg.exact_J(theta + step) - pg.exact_J(theta - step)) / (2 * eps)
        assert abs(numeric.item() - grad[index].item()) < 1e-7


def test_sampling_follows_the_policy():
    theta = pg.init_theta()
    ys = pg.sample(theta, 20_000, torch.Generator().manual_seed(0))
    codes = (ys * pg.V ** torch.arange(pg.L - 1, -1, -1)).sum(-1)     # the index of each reply in all_replies
    freq = torch.bincount(codes, minlength=pg.V ** pg.L).double() / len(ys)
    assert (freq - pg.probs(theta)).abs().max() < 0.01


def _mean_estimate(theta, baseline_kind, batches=400, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(theta)
    for _ in range(batches):
        ys = pg.sample(theta, n, gen)
        total += pg.estimate(pg.reinforce_loss, theta, ys, pg.baseline(pg.reward(ys), baseline_kind))
    return total / batches


def test_reinforce_converges_to_the_exact_gradient_and_a_baseline_keeps_the_mean():
    theta = pg.init_theta()
    exact = pg.exact_grad(theta)
    scale = exact.norm().item()
    for kind in ("none", "loo"):
        err = (_mean_estimate(theta, kind) - exact).norm().item()
        assert err < 0.1 * scale, (kind, err, scale)
    # the batch mean includes each reply's own reward: the estimate shrinks by exactly (n - 1) / n in expectation
    err = (_mean_estimate(theta, "mean") - exact * 15 / 16).norm().item()
    assert err < 0.1 * scale


def test_importance_weighted_estimate_is_unbiased_exactly():
    theta_old, theta = pg.init_theta(), pg.init_theta() + 0.3 * pg.init_theta(seed=1)
    ys = pg.all_replies()
    p_old = pg.probs(theta_old)
    # E_old[ratio * r * grad log pi_theta] as an exact sum over replies = grad J(theta)
    theta_leaf = theta.clone().requires_grad_(True)
    logp = pg.reply_logprob(theta_leaf, ys)
    ratio = (logp - pg.reply_logprob(theta_old, ys)).exp()
    (grad,) = torch.autograd.grad((p_old * ratio * pg.reward(ys)).sum(), theta_leaf)
    torch.testing.assert_close(grad, pg.exact_grad(theta))
    assert pg.exact_kl(theta_old, theta) > 0 and abs(pg.exact_kl(theta, theta)) < 1e-12


def test_values_and_gae_lambda_one_is_monte_carlo():
    theta = pg.init_theta()
    values = pg.exact_values(theta)
    torch.testing.assert_close(values[:, 0], pg.exact_J(theta).expand(len(values)))
    torch.testing.assert_close(values[:, -1], pg.reward(pg.all_replies()))
    ys = pg.all_replies()
    rewards = torch.zeros(len(ys), pg.L, dtype=torch.float64)
    rewards[:, -1] = pg.reward(ys)
    guess = values[:, :-1] + 0.3 * torch.randn(len(ys), pg.L, generator=torch.Generator().manual_seed(0),
                                               dtype=torch.float64)
    mask = torch.ones(len(ys), pg.L, dtype=torch.bool)
    adv, _ = rl.gae(rewards, guess, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, pg.reward(ys)[:, None] - guess)      # the return (the reward) minus V
    exact_adv, _ = rl.gae(rewards, values[:, :-1], mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(exact_adv, values[:, 1:] - values[:, :-1])   # TD with exact values: the advantage
