"""Lesson 12's library: FLOP counts against PyTorch's counter, fits against known answers."""
import math

import numpy as np
import pytest
import torch

from nblib import llama, scaling
from nblib.checks import CheckFailed
from nblib.checks import scaling as checks


@pytest.mark.parametrize("n_layer,n_embd,n_head,n_kv,T", [(2, 64, 2, 2, 128), (3, 96, 4, 2, 32), (1, 32, 1, 1, 8)])
def test_flops_per_token_is_what_the_flop_counter_measures(n_layer, n_embd, n_head, n_kv, T):
    config = llama.LlamaConfig(vocab_size=65, block_size=T, n_layer=n_layer, n_head=n_head, n_kv_heads=n_kv,
                               n_embd=n_embd)
    measured = checks.measured_flops_per_token(config, T)
    ours = scaling.flops_per_token(config, T)
    # ours also counts the norm gains as parameters (6 per gain per token, no matmul)
    norm_gains = (2 * n_layer + 1) * n_embd
    assert ours - measured == pytest.approx(6 * norm_gains)
    # and the attention term is 12 * n_layer * n_embd * T of it
    with torch.device("meta"):
        model = llama.Llama(config)
    assert ours - 6 * model.num_params(exclude_embeddings=True) == 12 * n_layer * n_embd * T


def test_tokens_for_budget_and_counts():
    config = scaling.model_config(2, 64, vocab_size=65, block_size=128)
    assert config.n_head == 2
    fpt = scaling.flops_per_token(config, 128)
    assert scaling.tokens_for_budget(config, 10 * fpt + 3, 128) == 10
    assert scaling.count_params(config) == llama.Llama(config).num_params(exclude_embeddings=True)


def test_sizes_grow():
    params = [scaling.count_params(scaling.model_config(L, d, 65, 128)) for L, d in scaling.SIZES]
    ratios = np.array(params[1:]) / np.array(params[:-1])
    assert (ratios > 1.3).all() and (ratios < 3.0).all(), ratios


def test_isoflop_minimum_finds_the_vertex_and_refuses_a_hill():
    x = np.log(1e5) + np.linspace(-1, 1, 5)
    y = 2.0 + 0.1 * (x - math.log(1e5)) ** 2
    n_opt, loss = scaling.isoflop_minimum(np.exp(x), y)
    assert n_opt == pytest.approx(1e5, rel=1e-6) and loss == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(ValueError, match="no minimum"):
        scaling.isoflop_minimum(np.exp(x), -y)
    with pytest.raises(ValueError, match="at least 3"):
        scaling.isoflop_minimum([1, 2], [1, 2])


def test_fit_power_law_exact():
    x = np.array([1e11, 3e11, 9e11, 2.7e12])
    k, a = scaling.fit_power_law(x, 0.7 * x ** 0.42)
    assert a == pytest.approx(0.42, abs=1e-9) and k == pytest.approx(0.7, rel=1e-6)


TRUTH = {"E": 1.5, "A": 30.0, "alpha": 0.4, "B": 60.0, "beta": 0.4}
BUDGETS = (1e11, 3e11, 9e11, 2.7e12)


def synthetic_runs(noise=0.0, seed=0):
    """Runs whose loss is a known surface, alpha = beta: N_opt ~ C^0.5."""
    return TRUTH, scaling.synthetic_runs(TRUTH, BUDGETS, noise=noise, seed=seed)


def test_synthetic_runs_centre_on_the_true_optimum():
    _, runs = synthetic_runs()
    for budget, group in scaling.by_budget(runs).items():
        losses = [r.val_loss for r in group]
        assert losses.index(min(losses)) == 2  # the middle factor, 1.0, is the true optimum
        assert all(abs(6 * r.params * r.tokens / budget - 1) < 1e-3 for r in group)


def test_power_law_of_the_optima_recovers_the_exponent():
    _, runs = synthetic_runs()
    rows = scaling.optima(runs)
    _, a_n = scaling.fit_power_law([r["budget"] for r in rows], [r["n_opt"] for r in rows])
    _, a_d = scaling.fit_power_law([r["budget"] for r in rows], [r["d_opt"] for r in rows])
    # alpha = beta gives exactly 0.5 each; the parabola is an approximation of the true valley
    assert a_n == pytest.approx(0.5, abs=0.02) and a_d == pytest.approx(0.5, abs=0.02)


def test_bootstrap_spreads_with_noise_and_centres_on_the_truth():
    _, runs = synthetic_runs(noise=0.003, seed=1)
    boot = scaling.bootstrap_exponents(runs, n_boot=300, seed=0)
    assert len(boot["a_n"]) + boot["dropped"] == 300
    lo, hi = np.percentile(boot["a_n"], [5, 95])
    assert lo - 0.01 < 0.5 < hi + 0.01 and hi - lo > 0.005  # centred near the truth (the parabola is an approximation)
    _, noisier = synthetic_runs(noise=0.03, seed=1)
    wide = scaling.bootstrap_exponents(noisier, n_boot=300, seed=0)
    assert np.ptp(np.percentile(wide["a_n"], [5, 95])) > 2 * (hi - lo)  # more scatter, wider interval


def test_fit_loss_surface_recovers_a_known_surface():
    truth, runs = synthetic_runs(noise=0.0)
    fit = scaling.fit_loss_surface([r.params for r in runs], [r.tokens for r in runs], [r.val_loss for r in runs])
    n, d = np.array([1e4, 1e6]), np.array([1e8, 1e6])
    np.testing.assert_allclose(scaling.loss_surface(fit, n, d), scaling.loss_surface(truth, n, d), rtol=2e-3)
    assert fit["alpha"] == pytest.approx(0.4, abs=0.05) and fit["beta"] == pytest.approx(0.4, abs=0.05)


def test_train_run_spends_its_budget_and_learns():
    torch.manual_seed(0)
    ids = torch.randint(0, 8, (4000,))
    ids[1::2] = (ids[0::2] + 1) % 8  # every other token predictable
    train_ids, val_ids = ids[:3600], ids[3600:]
    config = scaling.model_config(1, 32, vocab_size=8, block_size=16)
    fpt = scaling.flops_per_token(config, 16)
    run = scaling.train_run(1, 32, 40 * 4 * 16 * fpt, train_ids, val_ids, vocab_size=8, seq_len=16, batch_size=4,
                            lr=1e-2, eval_windows=16)
    assert run.steps == 40 and run.tokens == 40 * 4 * 16 and run.flops == pytest.approx(run.tokens * fpt)
    assert run.epochs == pytest.approx(run.tokens / 3600)
    assert run.val_loss < math.log(8) - 0.3  # half the tokens are predictable: well below uniform
    again = scaling.train_run(1, 32, 40 * 4 * 16 * fpt, train_ids, val_ids, vocab_size=8, seq_len=16, batch_size=4,
                              lr=1e-2, eval_windows=16)
    assert again.val_loss == pytest.approx(run.val_loss, abs=1e-5)  # seeded


def test_checks_accept_the_reference_and_reject_mistakes():
    def flops_ok(config, T):
        d, kv, h = config.n_embd, config.n_kv_heads * config.head_dim, config.ffn_hidden
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * h
        return 6 * (config.n_layer * per_layer + d * config.vocab_size) + 12 * config.n_layer * d * T

    checks.check_flops_per_token(flops_ok)
    with pytest.raises(CheckFailed, match="FlopCounterMode"):
        checks.check_flops_per_token(lambda c, T: flops_ok(c, T) - 12 * c.n_layer * c.n_embd * T)  # no attention
    checks.check_isoflop_minimum(lambda p, l: scaling.isoflop_minimum(p, l))  # the course's own is refused
    with pytest.raises(CheckFailed, match="N_opt"):
        checks.check_isoflop_minimum(lambda p, l: (p[int(np.argmin(l))], min(l)))  # the best run, not the vertex
    checks.check_fit_power_law(lambda x, y: scaling.fit_power_law(x, y))
    with pytest.raises(CheckFailed, match="exponent"):
        checks.check_fit_power_law(lambda x, y: (1.0, float(np.polyfit(x, y, 1)[0])))  # a line in linear space
    with pytest.raises(CheckFailed, match="None"):
        checks.check_fit_power_law(lambda x, y: None)


def test_heldout_window_loss_is_the_mean_over_fixed_windows_and_restores_train_mode():
    torch.manual_seed(0)
    config = scaling.model_config(1, 16, vocab_size=11, block_size=8)
    model = llama.Llama(config).train()
    val_ids = torch.randint(0, 11, (100,))
    got = scaling.heldout_window_loss(model, val_ids, seq_len=8, n_windows=5, batch_size=2)
    assert model.training
    model.eval()
    starts = torch.linspace(0, 100 - 8 - 1, 5).long().tolist()  # evenly spread, first and last included
    with torch.no_grad():
        by_hand = [torch.nn.functional.cross_entropy(model(val_ids[s:s + 8][None])[0][0], val_ids[s + 1:s + 9]).item()
                   for s in starts]
    assert starts[0] == 0 and starts[-1] == 91
    assert got == pytest.approx(sum(by_hand) / 5, rel=1e-5)


def test_train_run_schedule_ends_at_min_lr(monkeypatch):
    made = []

    class Recording(scaling.train.Trainer):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(scaling.train, "Trainer", Recording)
    ids = torch.randint(0, 8, (2000,), generator=torch.Generator().manual_seed(0))
    config = scaling.model_config(1, 16, vocab_size=8, block_size=16)
    budget = 30 * 4 * 16 * scaling.flops_per_token(config, 16)
    run = scaling.train_run(1, 16, budget, ids[:1800], ids[1800:], vocab_size=8, seq_len=16, batch_size=4,
                            lr=1e-2, eval_windows=4)
    lrs = made[0].history.lr
    assert run.steps == scaling.steps_for_budget(config, budget, 16, 4) == 30 == len(lrs)
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3, rel=0.03)  # cosine to lr/10, one step short of its end


def test_bootstrap_drops_replicates_without_a_minimum_and_fits_both_exponents():
    _, runs = synthetic_runs(noise=0.003, seed=1)
    boot = scaling.bootstrap_exponents(runs, n_boot=100, seed=0)
    assert len(boot["a_d"]) == len(boot["a_n"])
    assert np.median(boot["a_d"]) == pytest.approx(0.5, abs=0.03)  # alpha = beta: D_opt ~ C^0.5 as well
    # a nearly flat valley with large scatter: many resampled parabolas open downwards
    _, flat = synthetic_runs(noise=0.2, seed=2)
    shaky = scaling.bootstrap_exponents(flat, n_boot=100, seed=0)
    assert shaky["dropped"] > 0 and len(shaky["a_n"]) + shaky["dropped"] == 100
    with pytest.raises(ValueError, match="at least 4 runs"):
        scaling.bootstrap_exponents([r for r in runs if r.budget == BUDGETS[0]][:3], n_boot=5)


def test_flops_exponent_and_the_relation_between_the_two_exponents():
    _, runs = synthetic_runs()
    assert scaling.flops_exponent(runs) == pytest.approx(1.0, abs=1e-3)  # C = 6ND exactly: f = 6N
    family = [scaling.model_config(*s, 65, 128) for s in scaling.SIZES]
    real = [scaling.Run(budget=1e12, n_layer=c.n_layer, n_embd=c.n_embd, params=scaling.count_params(c), tokens=1000,
                        flops=1000.0 * scaling.flops_per_token(c, 128), steps=1, epochs=0.0, val_loss=0.0, seconds=0.0)
            for c in family]
    assert 0.7 < scaling.flops_exponent(real) < 0.95  # the attention term weighs most in the smallest models


def test_run_table_has_one_line_per_run():
    _, runs = synthetic_runs()
    table = scaling.run_table(runs).splitlines()
    assert len(table) == len(runs) + 1 and "val loss" in table[0]
    assert f"{runs[0].val_loss:8.4f}" in table[1]


def test_check_isoflop_minimum_wants_a_value_error_for_a_hill():
    def no_guard(params, losses):
        x = np.log(np.asarray(params, dtype=float))
        a, b, c = np.polyfit(x, losses, 2)
        return math.exp(-b / (2 * a)), c - b * b / (4 * a)

    with pytest.raises(CheckFailed, match="ValueError"):
        checks.check_isoflop_minimum(no_guard)


def test_check_flops_names_the_missing_term():
    def no_head(config, T):
        d, kv, h = config.n_embd, config.n_kv_heads * config.head_dim, config.ffn_hidden
        return 6 * config.n_layer * (2 * d * d + 2 * d * kv + 3 * d * h) + 12 * config.n_layer * d * T

    with pytest.raises(CheckFailed, match="output head"):
        checks.check_flops_per_token(no_head)


def test_fits_refuse_too_few_sizes_diverged_runs_and_non_positive_values():
    """Each of these gave a number or an unrelated error before: a negative loss at a fraction of a
    parameter, nan, nan with numpy warnings, "SVD did not converge"."""
    with pytest.raises(ValueError, match=r"at least 3 different sizes, got 2 \(N = \[1000, 2000\]\)"):
        scaling.isoflop_minimum([1000, 1000, 2000], [3.0, 3.1, 2.9])
    with pytest.raises(ValueError, match=r"loss nan at N = 2000: a diverged run"):
        scaling.isoflop_minimum([1000, 2000, 4000, 8000], [3.0, math.nan, 2.9, 3.2])
    with pytest.raises(ValueError, match=r"loss inf at N = 1000"):
        scaling.isoflop_minimum([1000, 2000, 4000], [math.inf, 2.8, 2.9])
    with pytest.raises(ValueError, match=r"N = 0 .*positive"):
        scaling.isoflop_minimum([0, 2000, 4000], [3.0, 2.8, 2.9])
    with pytest.raises(ValueError, match=r"fit_power_law fits in log-log: y = 0.0 at index 1 .*positive"):
        scaling.fit_power_law([1, 2, 3], [1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match=r"x = -1.0 at index 0"):
        scaling.fit_power_law([-1, 2, 3], [1.0, 1.5, 2.0])
    with pytest.raises(ValueError, match=r"y = nan at index 2"):
        scaling.fit_power_law([1, 2, 3], [1.0, 1.5, math.nan])
    with pytest.raises(ValueError, match=r"at least 2 different x"):
        scaling.fit_power_law([5, 5], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"loss = nan at index 3"):
        scaling.fit_loss_surface([1e3, 2e3, 4e3, 8e3, 1.6e4], [1e5] * 5, [3.0, 2.9, 2.8, math.nan, 2.7])


def test_optima_and_bootstrap_name_the_budget_with_too_few_sizes():
    _, runs = synthetic_runs()
    squeezed = [r for r in runs if r.budget != BUDGETS[0]] + [r for r in runs if r.budget == BUDGETS[0]][:2] * 2
    with pytest.raises(ValueError, match=r"C = 1.00e\+11: .*at least 3 different sizes, got 2"):
        scaling.optima(squeezed)
    with pytest.raises(ValueError, match=r"C = 1.00e\+11: .*at least 3 different sizes, got 2"):
        scaling.bootstrap_exponents(squeezed, n_boot=5)   # today: every replicate dropped, empty exponents
    runs[3].val_loss = math.nan
    with pytest.raises(ValueError, match=r"C = 1.00e\+11: .*diverged"):
        scaling.bootstrap_exponents(runs, n_boot=5)
