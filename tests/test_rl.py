"""nblib.rl: the losses and estimators of lessons 09-11, checked against hand values, exact
expectations, torch.autograd and the readable references, never against their own formula."""
import math

import pytest
import torch

from nblib import rl

NAN, INF = float("nan"), float("inf")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def ragged_mask(n: int, t: int, g: torch.Generator) -> torch.Tensor:
    """Completions of different lengths starting at different columns, pad columns after most."""
    mask = torch.zeros(n, t, dtype=torch.bool)
    for row in range(n):
        start = int(torch.randint(1, t // 2, (1,), generator=g))
        end = t if row == 0 else int(torch.randint(start + 1, t + 1, (1,), generator=g))
        mask[row, start:end] = True
    return mask


def with_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with nan, inf, -inf and huge numbers outside the mask."""
    junk = torch.tensor([NAN, INF, -INF, 1e30], dtype=x.dtype).repeat(x.numel() // 4 + 1)[:x.numel()].view(x.shape)
    return torch.where(mask, x, junk)


# ---------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 7.0])
def test_dpo_loss_is_ln2_when_the_policy_is_the_reference(beta):
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 8):
        chosen, rejected = -30 * torch.rand(n, generator=g), -30 * torch.rand(n, generator=g)
        loss, metrics = rl.dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
        assert abs(loss.item() - math.log(2)) < 1e-7
        assert metrics["reward_margin"].item() == 0 and metrics["reward_accuracy"].item() == 0


def test_dpo_gradient_matches_the_hand_formula():
    g = torch.Generator().manual_seed(1)
    beta, n = 0.3, 5
    pc, pr, rc, rr = (-20 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))
    leaves = [x.clone().requires_grad_(True) for x in (pc, pr, rc, rr)]
    loss, _ = rl.dpo_loss(*leaves, beta=beta)
    loss.backward()
    for i in range(n):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        s = sigmoid(-z)  # d/dz of -log sigmoid(z) is -sigmoid(-z)
        want = [-beta * s / n, beta * s / n, beta * s / n, -beta * s / n]  # d/d pc, pr, rc, rr
        got = [x.grad[i].item() for x in leaves]
        assert got == pytest.approx(want, abs=1e-12)
    z_all = beta * ((pc - rc) - (pr - rr))
    assert loss.item() == pytest.approx(sum(-math.log(sigmoid(z)) for z in z_all.tolist()) / n, abs=1e-12)


def test_dpo_metrics_on_a_hand_example():
    pc, rc = torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -4.0])
    pr, rr = torch.tensor([-3.0, -3.0]), torch.tensor([-3.0, -3.5])
    loss, m = rl.dpo_loss(pc, pr, rc, rr, beta=1.0)
    # chosen rewards [1, -1], rejected [0, 0.5]: logits [1, -1.5]
    assert loss.item() == pytest.approx(-(math.log(sigmoid(1.0)) + math.log(sigmoid(-1.5))) / 2, abs=1e-6)
    assert m["chosen_reward"].item() == pytest.approx(0.0)
    assert m["rejected_reward"].item() == pytest.approx(0.25)
    assert m["reward_accuracy"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx(-0.25)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


# ---------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand_values_swap_and_gradient():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    loss, m = rl.bradley_terry_loss(chosen, rejected)
    d = [1.0, 0.0, -2.0]
    assert loss.item() == pytest.approx(sum(-math.log(sigmoid(x)) for x in d) / 3, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3) and m["margin"].item() == pytest.approx(-1 / 3)
    loss.backward()
    assert chosen.grad.tolist() == pytest.approx([-sigmoid(-x) / 3 for x in d], abs=1e-7)
    assert rejected.grad.tolist() == pytest.approx([sigmoid(-x) / 3 for x in d], abs=1e-7)
    for c, r in zip([2.0, 0.0, -1.0], [1.0, 0.0, 1.0]):  # P(c > r) + P(r > c) = 1, pair by pair
        forward, _ = rl.bradley_terry_loss(torch.tensor([c]), torch.tensor([r]))
        swapped, _ = rl.bradley_terry_loss(torch.tensor([r]), torch.tensor([c]))
        assert math.exp(-forward.item()) + math.exp(-swapped.item()) == pytest.approx(1.0, abs=1e-6)


def test_bradley_terry_is_exact_where_log_of_sigmoid_underflows():
    loss, _ = rl.bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert loss.item() == pytest.approx(200.0)


# ---------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0), (0.5, 0.3)])
def test_gae_equals_the_reference_on_ragged_masks(gamma, lam):
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask(6, 11, g)
    mask[3, 4] = False  # a hole: both skip it, the masked tokens are the steps
    rewards, values = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    adv_ref, ret_ref = rl.gae_reference(rewards, values, mask, gamma, lam)
    adv, ret = rl.gae(with_garbage(rewards, mask), with_garbage(values, mask), mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ret_ref, atol=1e-5, rtol=1e-5)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    torch.testing.assert_close(ret[mask], (adv + values)[mask])


def hand_row():
    """One completion in columns 2-4 of 6, values and rewards garbage elsewhere."""
    mask = torch.tensor([[False, False, True, True, True, False]])
    rewards = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 9.0]])
    values = torch.tensor([[9.0, 9.0, 0.5, 0.1, -0.2, 9.0]])
    return rewards, values, mask


@pytest.mark.parametrize("gae", [rl.gae, rl.gae_reference])
def test_gae_lambda_one_gives_the_reward_to_go(gae):
    rewards, values, mask = hand_row()
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert ret[0].tolist() == pytest.approx([0, 0, 6.0, 5.0, 3.0, 0])
    assert adv[0, 2:5].tolist() == pytest.approx([5.5, 4.9, 3.2])
    _, ret = gae(rewards, values, mask, 0.5, 1.0)  # discounted: 3, 2 + 3/2, 1 + 3.5/2
    assert ret[0, 2:5].tolist() == pytest.approx([2.75, 3.5, 3.0])


@pytest.mark.parametrize("gae", [rl.gae, rl.gae_reference])
def test_gae_lambda_zero_gives_one_step_td_errors(gae):
    rewards, values, mask = hand_row()
    adv, ret = gae(rewards, values, mask, 0.9, 0.0)
    td = [1.0 + 0.9 * 0.1 - 0.5, 2.0 + 0.9 * -0.2 - 0.1, 3.0 + 0.0 - -0.2]  # V after the end is 0
    assert adv[0].tolist() == pytest.approx([0, 0, *td, 0])
    assert ret[0, 2:5].tolist() == pytest.approx([td[0] + 0.5, td[1] + 0.1, td[2] - 0.2])


# ---------------------------------------------------------------------------- PPO


def test_ppo_at_ratio_one_is_the_policy_gradient():
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask(4, 9, g)
    logprobs = (-3 * torch.rand(4, 9, generator=g)).requires_grad_(True)
    advantages = torch.randn(4, 9, generator=g)
    loss, m = rl.ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    loss.backward()
    n = mask.sum()
    torch.testing.assert_close(logprobs.grad, torch.where(mask, -advantages / n, 0))
    assert loss.item() == pytest.approx(-(advantages[mask].sum() / n).item(), abs=1e-6)
    assert m["clip_fraction"].item() == 0 and m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_ppo_clips_only_the_moves_the_advantage_asks_for():
    # ratios 1.5, 0.5, 1.5, 1.0 with advantages +1, -1, -1, +2; a fifth column is padding
    ratio = torch.tensor([[1.5, 0.5, 1.5, 1.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, NAN]])
    logprobs = (old + ratio.log()).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, -1.0, 2.0, INF]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, m = rl.ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # min(1.5, 1.2) = 1.2 clipped; min(-0.5, -0.8) = -0.8 clipped; min(-1.5, -1.2) = -1.5 NOT clipped
    # (a move against the advantage is never forgiven); 2 unclipped
    assert loss.item() == pytest.approx(-(1.2 - 0.8 - 1.5 + 2.0) / 4, abs=1e-6)
    assert m["clip_fraction"].item() == 0.5
    assert m["ratio_mean"].item() == pytest.approx(1.125, abs=1e-6)
    r = torch.tensor([1.5, 0.5, 1.5, 1.0], dtype=torch.float64)
    assert m["approx_kl"].item() == pytest.approx((r - 1 - r.log()).mean().item(), abs=1e-6)
    loss.backward()
    # d/dlogp of -ratio*A / n is -A * ratio / n where the unclipped term is taken, else 0
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 0.0, 1.5 / 4, -2.0 / 4, 0.0], abs=1e-6)


def test_ppo_takes_one_advantage_per_completion():
    g = torch.Generator().manual_seed(4)
    mask = ragged_mask(3, 7, g)
    logprobs, old = -torch.rand(3, 7, generator=g), -torch.rand(3, 7, generator=g)
    per_sequence = torch.randn(3, generator=g)
    a, _ = rl.ppo_policy_loss(logprobs, old, per_sequence, mask)
    b, _ = rl.ppo_policy_loss(logprobs, old, per_sequence[:, None].expand(3, 7), mask)
    assert a.item() == pytest.approx(b.item())


def test_value_loss_hand_values():
    # (v, old_v, R): clipped taken; equal terms; clipped taken; unclipped larger
    v = torch.tensor([[1.5, 1.1, 0.5, 0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, NAN]])
    returns = torch.tensor([[2.0, 2.0, 0.6, 2.0, INF]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, m = rl.value_loss(v, old, returns, mask, clip=0.2)
    # max(0.25, (1.2-2)^2=0.64); 0.81; max(0.01, (0.8-0.6)^2=0.04); max(2.25, (0.8-2)^2=1.44)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.04 + 2.25) / 4, abs=1e-6)
    assert m["value_clip_fraction"].item() == 0.5
    loss.backward()
    assert v.grad[0].tolist() == pytest.approx([0.0, (1.1 - 2.0) / 4, 0.0, (0.5 - 2.0) / 4, 0.0], abs=1e-6)
    plain, m = rl.value_loss(v, old, returns, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.01 + 2.25) / 4, abs=1e-6)
    assert m["value_clip_fraction"].item() == 0


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, NAN]])
    mask = torch.tensor([[True, True, True, True, False]])
    assert rl.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert rl.explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, INF]])  # residuals 0 0 0 1: var 0.1875; var(R) 1.25
    assert rl.explained_variance(values, returns, mask).item() == pytest.approx(1 - 0.1875 / 1.25)
    flat = torch.tensor([[2.0, 2.0, 2.0, 2.0, 5.0]])  # Var(R) = 0: documented as 0, not nan
    assert rl.explained_variance(values, flat, mask).item() == 0


def test_entropy_matches_torch_categorical():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    logits[0, 2, :5] = -INF  # a top-k filtered distribution: probability 0 adds 0
    mask = ragged_mask(3, 6, g)
    mask[0, 2] = True
    leaf = with_garbage(logits, mask[..., None]).requires_grad_(True)
    got = rl.entropy_from_logits(leaf, mask)
    want = torch.distributions.Categorical(logits=logits[mask]).entropy().mean()
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    got.backward()
    assert leaf.grad.isfinite().all() and (leaf.grad[~mask] == 0).all()
    assert rl.entropy_from_logits(torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool)).item() == \
        pytest.approx(math.log(8))


def test_metrics_are_detached_0d_tensors():
    x = torch.randn(2, 3, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    outputs = [rl.ppo_policy_loss(x, x.detach() + 0.1, torch.randn(2, 3), mask), rl.value_loss(x, x + 0.5, x, mask),
               rl.bradley_terry_loss(x[0], x[1]), rl.dpo_loss(x[0], x[1], x[1], x[0])]
    for loss, metrics in outputs:
        assert loss.dim() == 0 and loss.requires_grad
        assert all(torch.is_tensor(m) and m.dim() == 0 and not m.requires_grad for m in metrics.values())


# ---------------------------------------------------------------------------- padding changes nothing


def pad(x: torch.Tensor, mask: torch.Tensor, extra_cols: int = 3) -> torch.Tensor:
    """``x`` [N, T, ...] with ``extra_cols`` garbage columns and one garbage row appended."""
    n, t = mask.shape
    big = torch.zeros((n + 1, t + extra_cols, *x.shape[2:]), dtype=x.dtype)
    big[:n, :t] = x
    big_mask = padded_mask(mask, extra_cols)
    return with_garbage(big, big_mask.view(*big_mask.shape, *[1] * (x.dim() - 2)))


def padded_mask(mask: torch.Tensor, extra_cols: int = 3) -> torch.Tensor:
    big = torch.zeros(mask.shape[0] + 1, mask.shape[1] + extra_cols, dtype=torch.bool)
    big[:mask.shape[0], :mask.shape[1]] = mask
    return big


def scalars(out):
    """Every 0-d result of a function: the loss and the metrics, or the tensor itself."""
    if isinstance(out, tuple) and isinstance(out[-1], dict):
        return [out[0], *out[-1].values()]
    return [out]


LOSSES = {
    # the inputs go straight into nblib.rl: an x * y before the mask would leak y's nan into x's gradient
    "masked_mean": lambda x, y, z, m: rl.masked_mean(x, m),
    "masked_whiten": lambda x, y, z, m: (rl.masked_whiten(x, m) ** 3).sum(),
    "kl k1": lambda x, y, z, m: rl.masked_mean(rl.kl_estimate(x, y, "k1", mask=m), m),
    "kl k2": lambda x, y, z, m: rl.masked_mean(rl.kl_estimate(x, y, "k2", mask=m), m),
    "kl k3": lambda x, y, z, m: rl.masked_mean(rl.kl_estimate(x, y, "k3", mask=m), m),
    "ppo_policy_loss": lambda x, y, z, m: rl.ppo_policy_loss(x, y, z, m, clip=0.1),
    "value_loss": lambda x, y, z, m: rl.value_loss(x, y, z, m, clip=0.1),
    "value_loss unclipped": lambda x, y, z, m: rl.value_loss(x, y, z, m, clip=None),
    "explained_variance": lambda x, y, z, m: rl.explained_variance(x, y, m),
    "gae": lambda x, y, z, m: rl.gae(x, y, m, 0.9, 0.8)[0].sum(),
}


@pytest.mark.parametrize("name", LOSSES)
def test_padding_and_garbage_change_nothing(name):
    g = torch.Generator().manual_seed(6)
    mask = ragged_mask(4, 8, g)
    inputs = [-torch.rand(4, 8, generator=g, dtype=torch.float64) * 2 for _ in range(3)]  # float64: tight bounds
    results, grads = [], []
    for xs, m in ((inputs, mask), ([pad(x, mask) for x in inputs], padded_mask(mask))):
        leaves = [x.clone().requires_grad_(True) for x in xs]
        out = scalars(LOSSES[name](*leaves, m))
        results.append(torch.stack([o.detach().double() for o in out]))
        if out[0].requires_grad:
            out[0].backward()
        grads.append([leaf.grad for leaf in leaves])
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)  # only the summation order differs
    for small, big in zip(*grads):
        if small is None:
            assert big is None or (big == 0).all()
            continue
        assert big.isfinite().all() and (big[~padded_mask(mask)] == 0).all()
        torch.testing.assert_close(big[:4, :8], small, rtol=1e-12, atol=1e-12)


def test_entropy_ignores_padding():
    g = torch.Generator().manual_seed(7)
    mask = ragged_mask(3, 5, g)
    logits = torch.randn(3, 5, 4, generator=g)
    big = pad(logits, mask)
    a = rl.entropy_from_logits(logits, mask)
    b = rl.entropy_from_logits(big, padded_mask(mask))
    assert b.item() == pytest.approx(a.item(), abs=1e-6)


# ---------------------------------------------------------------------------- KL estimators


def categorical_pair(seed: int, closeness: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    q = (logits + closeness * torch.randn(6, generator=g, dtype=torch.float64)).softmax(-1)
    return p, q


@pytest.mark.parametrize("seed", range(4))
def test_k1_and_k3_are_unbiased_for_kl(seed):
    p, q = categorical_pair(seed)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(p), torch.distributions.Categorical(q))
    for kind in ("k1", "k3"):  # E_{x~p}[k(x)], computed exactly as a sum over the 6 outcomes
        expectation = (p * rl.kl_estimate(p.log(), q.log(), kind)).sum()
        assert expectation.item() == pytest.approx(kl.item(), abs=1e-6)


def test_k2_approximates_kl_for_close_distributions_only():
    # k2 is biased: E_p[k2] equals KL only to second order in log(p/q)
    p, q = categorical_pair(0, closeness=0.05)
    kl = (p * (p / q).log()).sum()
    e_k2 = (p * rl.kl_estimate(p.log(), q.log(), "k2")).sum()
    assert abs(e_k2 / kl - 1) < 0.05
    p, q = categorical_pair(0, closeness=2.0)
    kl = (p * (p / q).log()).sum()
    assert abs((p * rl.kl_estimate(p.log(), q.log(), "k2")).sum() / kl - 1) > 0.05


def test_k3_is_never_negative():
    u = torch.cat([torch.linspace(-20, 20, 4001), torch.tensor([0.0, 1e-8, -1e-8, 1e-4, -1e-4])])
    assert (rl.kl_estimate(u, torch.zeros_like(u), "k3") >= 0).all()
    assert (rl.kl_estimate(u.double(), torch.zeros_like(u).double(), "k3") >= 0).all()


def test_kl_monte_carlo_within_a_few_standard_errors():
    p, q = categorical_pair(1)
    kl = (p * (p / q).log()).sum().item()
    g = torch.Generator().manual_seed(8)
    x = torch.multinomial(p, 20000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        k = rl.kl_estimate(p.log()[x], q.log()[x], kind)
        assert abs(k.mean().item() - kl) < 4 * k.std().item() / math.sqrt(len(x))
    k1, k3 = (rl.kl_estimate(p.log()[x], q.log()[x], kind) for kind in ("k1", "k3"))
    assert k3.std() < k1.std()  # why GRPO prefers k3


# ---------------------------------------------------------------------------- whiten, groups


def test_masked_whiten():
    g = torch.Generator().manual_seed(9)
    mask = ragged_mask(4, 9, g)
    x = 5 + 3 * torch.randn(4, 9, generator=g)
    white = rl.masked_whiten(with_garbage(x, mask), mask)
    assert white[mask].mean().item() == pytest.approx(0, abs=1e-6)
    assert white[mask].var(unbiased=False).item() == pytest.approx(1, abs=1e-5)
    assert (white[~mask] == 0).all()
    kept = rl.masked_whiten(x, mask, shift_mean=False)
    assert kept[mask].mean().item() == pytest.approx(x[mask].mean().item(), abs=1e-5)
    assert kept[mask].var(unbiased=False).item() == pytest.approx(1, abs=1e-5)


def test_masked_mean_per_row():
    x = torch.tensor([[1.0, 2.0, NAN], [INF, 5.0, 7.0], [NAN, NAN, NAN]])
    mask = torch.tensor([[True, True, False], [False, True, True], [False, False, False]])
    assert rl.masked_mean(x, mask, dim=1).tolist() == [1.5, 6.0, 0.0]
    assert rl.masked_mean(x, mask).item() == pytest.approx(15 / 4)


def test_group_advantages_hand_example():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = rl.group_advantages(rewards, 4)
    s = 0.5 / (0.5 + 1e-6)
    third = math.sqrt(0.25 * 0.75)  # population std of 0 0 0 1
    assert adv.tolist() == pytest.approx([s, -s, -s, s, 0, 0, 0, 0, *[-0.25 / (third + 1e-6)] * 3,
                                          0.75 / (third + 1e-6)], abs=1e-6)
    assert (adv[4:8] == 0).all()
    assert rl.group_advantages(rewards, 4, scale=False).tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75])
    assert (rl.group_advantages(torch.full((6,), 0.1), 3) == 0).all()  # mean(0.1, 0.1, 0.1) != 0.1 in floats
    assert rl.group_advantages(torch.tensor([1, 0, 1, 1]), 2).tolist() == pytest.approx([1, -1, 0, 0], abs=1e-5)
    with pytest.raises(ValueError, match="multiple of group_size"):
        rl.group_advantages(torch.zeros(10), 4)


# ---------------------------------------------------------------------------- errors


def test_errors_say_what_to_do():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"advantages has shape \[2, 4\] but mask has \[2, 3\]"):
        rl.ppo_policy_loss(x, x, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match="no token in the mask"):
        rl.ppo_policy_loss(x, x, x, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no token in the mask"):
        rl.value_loss(x, x, x, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool tensor.*mask.bool\(\)"):
        rl.masked_mean(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="'k1', 'k2' or 'k3'"):
        rl.kl_estimate(x, x, "k4")
    with pytest.raises(ValueError, match="one shape"):
        rl.dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="no pair"):
        rl.bradley_terry_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match=r"\[N, T, V\]"):
        rl.entropy_from_logits(torch.zeros(2, 3), mask)


# ---------------------------------------------------------------------------- GRPO's loss


def grpo_case(seed=0, n=6, t=7):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(n, t, g)
    logprobs = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    ref = logprobs - 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    return logprobs, ref, advantages, mask


@pytest.mark.parametrize("average", rl.GRPO_AVERAGES)
def test_grpo_at_ratio_one_without_kl_is_reinforce_with_a_baseline(average):
    logprobs, ref, adv, mask = grpo_case()
    leaf = logprobs.clone().requires_grad_(True)
    loss, metrics = rl.grpo_loss(leaf, logprobs, ref, adv, mask, average=average, max_tokens=7)
    loss.backward()
    n, lengths = mask.shape[0], mask.sum(1, keepdim=True).double()
    weight = {"sequence": 1 / (n * lengths), "token": 1 / lengths.sum(), "constant": torch.full_like(lengths, 1 / (n * 7))}
    want = torch.where(mask, -adv[:, None] * weight[average], 0.0)   # -A_i * d log pi / d logprob, weighted
    torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12)
    assert metrics["clip_fraction"] == 0 and abs(metrics["ratio_mean"] - 1) < 1e-12
    # and the value: minus the weighted advantages
    assert abs(loss.item() - float(-(torch.where(mask, adv[:, None] * weight[average], 0.0)).sum())) < 1e-12


def test_grpo_groups_with_equal_rewards_give_no_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])   # group 0: all right; group 1: mixed
    adv = rl.group_advantages(rewards, 3)
    logprobs, ref, _, mask = grpo_case(n=6)
    leaf = logprobs.clone().requires_grad_(True)
    rl.grpo_loss(leaf, logprobs.detach() - 0.05, ref, adv.double(), mask)[0].backward()
    assert (leaf.grad[:3] == 0).all() and (leaf.grad[3:][mask[3:]] != 0).all()


def test_the_two_normalisations_differ_by_the_group_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    scaled, centred = rl.group_advantages(rewards, 4), rl.group_advantages(rewards, 4, scale=False)
    stds = rewards.view(2, 4).std(dim=1, correction=0)           # 0.433 and 0.433 here; 0.5 for 2 of 4 right
    torch.testing.assert_close(scaled.view(2, 4) * (stds[:, None] + 1e-6), centred.view(2, 4))
    # a group with one right answer in 8: the std blows its advantages up (x 3.02), Dr. GRPO does not
    one_right = torch.tensor([1.0] + [0.0] * 7)
    assert rl.group_advantages(one_right, 8)[0].item() == pytest.approx(0.875 / math.sqrt(7 / 64), rel=1e-5)
    assert rl.group_advantages(one_right, 8, scale=False)[0].item() == pytest.approx(0.875)


def test_grpo_sequence_average_has_the_length_bias_and_token_average_does_not():
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 1:3], mask[1, 1:11] = True, True                    # a 2-token and a 10-token wrong answer
    logprobs, adv = torch.full((2, 12), -1.0, dtype=torch.float64), torch.tensor([-1.0, -1.0], dtype=torch.float64)
    per_token = {}
    for average in ("sequence", "token"):
        leaf = logprobs.clone().requires_grad_(True)
        rl.grpo_loss(leaf, logprobs, logprobs, adv, mask, average=average)[0].backward()
        per_token[average] = (leaf.grad[0, 1].item(), leaf.grad[1, 1].item())
    short, long = per_token["sequence"]
    assert short == pytest.approx(5 * long)   # each token of the long wrong answer is pushed down 5x less
    assert per_token["token"][0] == pytest.approx(per_token["token"][1])


def test_grpo_kl_term_is_k3_with_its_gradient():
    logprobs, ref, _, mask = grpo_case(seed=2)
    leaf = logprobs.clone().requires_grad_(True)
    loss, metrics = rl.grpo_loss(leaf, logprobs, ref, torch.zeros(6, dtype=torch.float64), mask, kl_coef=0.5,
                                 average="token")
    loss.backward()
    u = ref - logprobs                                          # log ref - log pi
    k3 = torch.where(mask, torch.exp(u) - 1 - u, 0.0)
    n = mask.sum()
    assert loss.item() == pytest.approx(0.5 * k3.sum().item() / n.item(), rel=1e-12)
    assert metrics["kl"].item() == pytest.approx(k3.sum().item() / n.item(), rel=1e-12)
    torch.testing.assert_close(leaf.grad, torch.where(mask, 0.5 * (1 - torch.exp(u)) / n, 0.0))


@pytest.mark.parametrize("average", rl.GRPO_AVERAGES)
def test_grpo_padding_and_garbage_change_nothing(average):
    logprobs, ref, adv, mask = grpo_case(seed=3)
    old = logprobs - 0.1
    results, grads = [], []
    for cols in (0, 3):
        m = padded_mask(mask, cols)[:-1]                        # garbage columns, the same rows
        xs = [with_garbage(torch.cat([x, torch.zeros(6, cols, dtype=x.dtype)], 1), m) for x in (logprobs, old, ref)]
        leaf = xs[0].clone().requires_grad_(True)
        loss, metrics = rl.grpo_loss(leaf, xs[1], xs[2], adv, m, kl_coef=0.1, average=average, max_tokens=7)
        loss.backward()
        results.append(torch.stack([loss.detach(), *metrics.values()]))
        grads.append(leaf.grad)
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)
    assert grads[1].isfinite().all()
    torch.testing.assert_close(grads[1][:, :7], grads[0], rtol=1e-12, atol=1e-12)


def test_grpo_errors_say_what_to_do():
    logprobs, ref, adv, mask = grpo_case()
    with pytest.raises(ValueError, match="average must be one of"):
        rl.grpo_loss(logprobs, logprobs, ref, adv, mask, average="mean")
    with pytest.raises(ValueError, match="needs max_tokens"):
        rl.grpo_loss(logprobs, logprobs, ref, adv, mask, average="constant")
    with pytest.raises(ValueError, match="one per completion"):
        rl.grpo_loss(logprobs, logprobs, ref, adv[:, None].expand_as(logprobs), mask)
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="no tokens in the mask"):
        rl.grpo_loss(logprobs, logprobs, ref, adv, empty)


# ---------------------------------------------------------------------------- bad rewards


def test_nan_or_inf_rewards_are_refused_where_they_count():
    with pytest.raises(ValueError, match=r"rewards hold nan at \[2\] \(1 of 4\)"):
        rl.group_advantages(torch.tensor([1.0, 0.0, NAN, 1.0]), 2)
    with pytest.raises(ValueError, match=r"rewards hold inf"):
        rl.group_advantages(torch.tensor([1.0, INF]), 2)
    mask = torch.tensor([[False, True, True], [False, True, False]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, NAN, INF]])   # nan inside the mask, inf outside
    for gae in (rl.gae, rl.gae_reference):
        with pytest.raises(ValueError, match=r"rewards hold nan at \[1, 1\] \(1 of 3\)"):
            gae(rewards, torch.zeros(2, 3), mask, 1.0, 0.9)
        gae(torch.where(mask, 0.5, rewards.nan_to_num(0.0)).masked_fill(~mask, INF), torch.zeros(2, 3), mask, 1.0,
            0.9)   # outside the mask anything goes (padding)


def test_ppo_refuses_nan_scores_from_the_reward_model():
    import copy

    from nblib import chat, llama, ppo, reward
    tok = chat.ChatTokenizer()
    torch.manual_seed(0)
    policy = llama.Llama(llama.LlamaConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                           eos_token_id=tok.end_id))
    ac = ppo.ActorCritic(policy, reward.ScalarHead(copy.deepcopy(policy)))
    prompts = [chat.render_prompt([{"role": "user", "content": "Hi"}], tok)] * 3
    cfg = ppo.PPOConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"score_fn's scores \(the reward model's\) hold nan at \[1\] \(1 of 3\)"):
        ppo.rollout(ac, policy, lambda ids, attn, last: torch.tensor([0.0, NAN, 1.0]), prompts, cfg, tok.end_id,
                    tok.pad_id)
    with pytest.raises(ValueError, match=r"one score per reply, \[3\], got \[3, 1\]"):
        ppo.rollout(ac, policy, lambda ids, attn, last: torch.zeros(3, 1), prompts, cfg, tok.end_id, tok.pad_id)


def test_dpo_refuses_nan_reference_logprobs():
    from nblib import dpo, prefs
    pairs = [prefs.Pair([1, 2], [3, 4], [5], 1.0, 0.0), prefs.Pair([1], [3], [5, 6], 0.0, 1.0)]
    with pytest.raises(ValueError, match=r"ref_logprobs hold nan at \[1, 0\] \(1 of 4\)"):
        dpo.collate(pairs, torch.tensor([[-2.0, -1.0], [NAN, -1.0]]), pad_id=0)
