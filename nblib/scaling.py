"""Scaling laws (lesson 12): count a run's FLOPs, sweep model sizes at fixed compute, fit.

The recipe is Chinchilla's "approach 2" (Hoffmann et al. 2022), small enough for a CPU:

1. A **budget** C is a number of training FLOPs. A model spends ``flops_per_token(T)``
   per token trained (``6N`` plus the attention term, ``nblib.llama.Llama.flops_per_token``),
   so at budget C it sees ``D = C / flops_per_token`` tokens (``tokens_for_budget``).
2. For each of a few budgets, train models of several sizes, each for exactly its budget
   with its own warmup + cosine schedule ending there (``train_run``). Plotting final loss
   against log N gives a valley: the **IsoFLOP profile**. Its bottom (a parabola fitted in
   log N, ``isoflop_minimum``) is the compute-optimal size N_opt(C).
3. Across budgets, N_opt(C) and D_opt(C) follow power laws ``k * C^a``
   (``fit_power_law``, a straight line in log-log); the exponents, with bootstrap
   uncertainty (``bootstrap_exponents``), are what Kaplan et al. and Chinchilla disagree on.
4. A parametric surface ``L(N, D) = E + A / N^alpha + B / D^beta`` fitted to every run
   (``fit_loss_surface``, Chinchilla's approach 3) predicts the loss of runs not yet made.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from nblib import llama, train
from nblib.progress import progress
from nblib.text import random_batch

# The model family: (n_layer, n_embd), deeper and wider together, each about 1.6-2.6x the
# parameters of the one before. Head size 32 (n_head = n_embd // 32), one head below that.
SIZES = [(1, 12), (1, 16), (1, 24), (2, 24), (2, 32), (2, 48), (3, 64), (3, 80), (4, 96), (4, 128)]


def model_config(n_layer: int, n_embd: int, vocab_size: int, block_size: int) -> llama.LlamaConfig:
    """The family's Llama-style config for one size (head size 32, or n_embd if smaller)."""
    n_head = max(1, n_embd // 32)
    return llama.LlamaConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                             n_head=n_head, n_embd=n_embd)


def count_params(config: llama.LlamaConfig) -> int:
    """N: the parameters that multiply activations (``num_params(exclude_embeddings=True)``,
    the output head included), counted on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        return llama.Llama(config).num_params(exclude_embeddings=True)


def flops_per_token(config: llama.LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token of ``config`` at ``seq_len`` (``Llama.flops_per_token``)."""
    with torch.device("meta"):
        return llama.Llama(config).flops_per_token(seq_len)


def flops_exponent(runs: list["Run"]) -> float:
    """gamma in ``FLOPs per token ~ N^gamma`` over the runs' sizes (a power-law fit).

    With C = f(N) * D and N_opt ~ C^a, D_opt = C / f(N_opt) ~ C^(1 - gamma * a): the two
    exponents satisfy ``gamma * a + b = 1``, which is ``a + b = 1`` only when f = 6N
    (gamma = 1). The attention term makes gamma < 1 for small models."""
    return fit_power_law([r.params for r in runs], [r.flops / r.tokens for r in runs])[1]


def tokens_for_budget(config: llama.LlamaConfig, budget: float, seq_len: int) -> int:
    """D: how many tokens a run of ``budget`` FLOPs trains ``config`` on."""
    return int(budget // flops_per_token(config, seq_len))


def steps_for_budget(config: llama.LlamaConfig, budget: float, seq_len: int, batch_size: int) -> int:
    """Whole optimizer steps of ``batch_size`` x ``seq_len`` tokens closest to ``budget`` FLOPs."""
    return max(1, round(budget / flops_per_token(config, seq_len) / (batch_size * seq_len)))


@dataclass
class Run:
    """One training run of the sweep and what it measured."""

    budget: float          # FLOPs the run was given
    n_layer: int
    n_embd: int
    params: int            # N (``count_params``)
    tokens: int            # D actually trained on (whole steps)
    flops: float           # D * flops_per_token: the budget, up to rounding to whole steps
    steps: int
    epochs: float          # D / tokens in the training split: how often the data repeats
    val_loss: float        # mean loss on the fixed held-out windows after training
    seconds: float         # training wall time

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def heldout_window_loss(model: torch.nn.Module, val_ids: torch.Tensor, seq_len: int, n_windows: int,
                        batch_size: int = 32) -> float:
    """Mean next-token loss over ``n_windows`` fixed windows spread evenly over ``val_ids``:
    the same windows for every run, so runs differ only by their models."""
    device = next(model.parameters()).device
    starts = torch.linspace(0, len(val_ids) - seq_len - 1, n_windows).long()
    offsets = torch.arange(seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n_windows, batch_size):
        s = starts[i:i + batch_size, None] + offsets
        _, loss = model(val_ids[s].to(device), val_ids[s + 1].to(device))
        total += loss.item() * len(s)
    model.train(was_training)
    return total / n_windows


def train_run(n_layer: int, n_embd: int, budget: float, train_ids: torch.Tensor, val_ids: torch.Tensor,
              vocab_size: int, seq_len: int = 128, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
              eval_windows: int = 256, device="cpu") -> Run:
    """Train one size for one budget, with a schedule (5% warmup, cosine to lr/10) that ends
    at the budget (whole steps: the run spends it to within half a step), and measure its
    held-out loss.

    A run cut short of a longer schedule would be judged unfairly (its learning rate never
    decayed): Kaplan et al. did that, and it is one reason their optimal N grew too fast.
    """
    config = model_config(n_layer, n_embd, vocab_size, seq_len)
    fpt = flops_per_token(config, seq_len)
    tokens_per_step = batch_size * seq_len
    steps = steps_for_budget(config, budget, seq_len, batch_size)
    torch.manual_seed(seed)
    model = llama.Llama(config).to(device)
    cfg = train.TrainConfig(max_steps=steps, batch_size=batch_size, block_size=seq_len, lr=lr, min_lr=lr / 10,
                            warmup_steps=max(1, steps // 20), weight_decay=0.1, seed=seed, log_interval=max(1, steps))
    trainer = train.Trainer(model, cfg, device, tokens_per_step=tokens_per_step)
    for step in range(steps):
        x, y = random_batch(train_ids, batch_size, seq_len, generator=train.batch_generator(seed, "train", step, 0))
        trainer.step([(x, y)])
    seconds = trainer.history.seconds
    tokens = steps * tokens_per_step
    return Run(budget=float(budget), n_layer=n_layer, n_embd=n_embd, params=count_params(config), tokens=tokens,
               flops=float(tokens * fpt), steps=steps, epochs=tokens / len(train_ids),
               val_loss=heldout_window_loss(model, val_ids, seq_len, eval_windows), seconds=seconds)


def sweep(plan: dict[float, list[tuple[int, int]]], train_ids, val_ids, vocab_size: int, **run_kw) -> list[Run]:
    """Every (budget, size) of ``plan`` ({budget: [(n_layer, n_embd), ...]}), one after another."""
    jobs = [(budget, size) for budget, sizes in plan.items() for size in sizes]
    runs = []
    bar = progress(jobs, desc="sweep")
    for budget, (n_layer, n_embd) in bar:
        bar.set_postfix(C=f"{budget:.1e}", size=f"{n_layer}x{n_embd}")
        runs.append(train_run(n_layer, n_embd, budget, train_ids, val_ids, vocab_size, **run_kw))
    return runs


# ---------------------------------------------------------------------------- fits

def profile(sizes, losses, what: str = "N") -> tuple[np.ndarray, np.ndarray]:
    """``(ln sizes, losses)`` of one IsoFLOP profile as arrays, refusing what no parabola can be
    fitted to: a size that is not positive, a diverged run (loss nan or inf), fewer than 3
    different sizes (a parabola through 2 sizes is anything: its "minimum" can be a negative
    loss at a fraction of a parameter)."""
    n, y = np.asarray(sizes, dtype=float), np.asarray(losses, dtype=float)
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError(f"one loss per size: got {n.shape} sizes and {y.shape} losses")
    for size, loss in zip(n, y):
        if not (math.isfinite(size) and size > 0):
            raise ValueError(f"{what} = {size:.0f} is not a size: every {what} must be a positive number")
        if not math.isfinite(loss):
            raise ValueError(f"loss {loss} at {what} = {size:.0f}: a diverged run; leave it out of the fit "
                             "(or run it again with a lower learning rate)")
    different = np.unique(n)
    if len(different) < 3:
        listed = ", ".join(f"{v:.0f}" for v in different)
        raise ValueError(f"a parabola needs runs of at least 3 different sizes, got {len(different)} "
                         f"({what} = [{listed}]): add sizes on both sides of the best one")
    return np.log(n), y


def isoflop_minimum(params, losses, what: str = "N") -> tuple[float, float]:
    """The bottom of one IsoFLOP profile: fit ``loss = a x^2 + b x + c`` with ``x = ln N``
    (least squares) and return ``(N_opt, loss at N_opt)`` from the vertex ``x = -b / 2a``.

    Raises ValueError when the fitted parabola opens downwards (no minimum: the sizes do
    not bracket the optimum), and for runs no parabola can be fitted to (``profile``: fewer
    than 3 different sizes, a diverged run). ``what`` names the sizes in the messages.
    """
    x, y = profile(params, losses, what)
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        raise ValueError("the fitted parabola has no minimum (it opens downwards): "
                         "add sizes on both sides of the best one")
    x_opt = -b / (2 * a)
    return float(math.exp(x_opt)), float(c - b * b / (4 * a))


def logs(name: str, values, fit: str) -> np.ndarray:
    """``ln values``, refusing nan, inf, 0 and negatives (whose logs are nan, and the fit's result with them)."""
    v = np.asarray(values, dtype=float)
    bad = np.flatnonzero(~np.isfinite(v) | (v <= 0))
    if len(bad):
        raise ValueError(f"{fit} fits in log-log: {name} = {v[bad[0]]} at index {bad[0]} ({len(bad)} of {v.size} "
                         "values): every value must be positive and finite (leave diverged or empty runs out)")
    return np.log(v)


def fit_power_law(x, y) -> tuple[float, float]:
    """``y = k * x^a``: a straight line ``ln y = ln k + a ln x`` fitted by least squares;
    returns ``(k, a)``. x and y must be positive and finite, with at least 2 different x."""
    lx, ly = logs("x", x, "fit_power_law"), logs("y", y, "fit_power_law")
    if lx.shape != ly.shape or len(np.unique(lx)) < 2:
        raise ValueError(f"a power law needs one y per x and at least 2 different x, got x = {list(x)}, y = {list(y)}")
    a, log_k = np.polyfit(lx, ly, 1)
    return float(math.exp(log_k)), float(a)


@contextmanager
def at_budget(budget: float):
    """Name the budget in a fit's ValueError: which IsoFLOP profile needs another run."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"budget C = {budget:.2e}: {err}") from None


def by_budget(runs: list[Run]) -> dict[float, list[Run]]:
    """The runs grouped by budget, each group sorted by size."""
    groups: dict[float, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.budget, []).append(r)
    return {b: sorted(g, key=lambda r: r.params) for b, g in sorted(groups.items())}


def optima(runs: list[Run]) -> list[dict]:
    """Per budget: N_opt and the loss there (``isoflop_minimum``), and D_opt, the same fit in ln D."""
    rows = []
    for budget, group in by_budget(runs).items():
        with at_budget(budget):
            n_opt, loss_opt = isoflop_minimum([r.params for r in group], [r.val_loss for r in group])
            d_opt, _ = isoflop_minimum([r.tokens for r in group], [r.val_loss for r in group], "D")
        rows.append({"budget": budget, "n_opt": n_opt, "d_opt": d_opt, "loss_opt": loss_opt})
    return rows


def bootstrap_exponents(runs: list[Run], n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Exponents of N_opt(C) and D_opt(C) over ``n_boot`` residual-bootstrap replicates.

    Each replicate keeps every run's size and budget, adds to each IsoFLOP parabola's
    fitted losses residuals drawn with replacement from that parabola's own residuals
    (how far the runs scatter around a smooth valley; a different seed's scatter is not
    measured here), refits the parabolas and the power laws. A parabola through n points
    has 3 parameters, so its residuals are smaller than the scatter that produced them;
    they are scaled by sqrt(n / (n - 3)) first (with 5 runs per budget, x1.58).
    A replicate whose parabola has no minimum is dropped (counted in ``"dropped"``).
    """
    rng = np.random.default_rng(seed)
    groups = list(by_budget(runs).values())
    fitted = []
    for g in groups:
        if len(g) < 4:
            raise ValueError(f"the bootstrap needs at least 4 runs per budget (a parabola has 3 parameters), "
                             f"got {len(g)} at C = {g[0].budget:.2e}")
        with at_budget(g[0].budget):  # refused here, not dropped replicate after replicate below
            x, y = profile([r.params for r in g], [r.val_loss for r in g])
            profile([r.tokens for r in g], y, "D")
        coef = np.polyfit(x, y, 2)
        residuals = (y - np.polyval(coef, x)) * math.sqrt(len(g) / (len(g) - 3))
        fitted.append((g, np.polyval(coef, x), residuals))
    a_n, a_d, dropped = [], [], 0
    for _ in range(n_boot):
        try:
            rows = []
            for g, mean, resid in fitted:
                y = mean + rng.choice(resid, size=len(resid), replace=True)
                n_opt, _ = isoflop_minimum([r.params for r in g], y)
                d_opt, _ = isoflop_minimum([r.tokens for r in g], y, "D")
                rows.append((g[0].budget, n_opt, d_opt))
        except ValueError:
            dropped += 1
            continue
        budgets, n_opts, d_opts = zip(*rows)
        a_n.append(fit_power_law(budgets, n_opts)[1])
        a_d.append(fit_power_law(budgets, d_opts)[1])
    return {"a_n": np.array(a_n), "a_d": np.array(a_d), "dropped": dropped}


def loss_surface(params: dict, n, d):
    """Chinchilla's parametric loss ``E + A / N^alpha + B / D^beta`` (numpy or floats)."""
    return params["E"] + params["A"] / np.power(n, params["alpha"]) + params["B"] / np.power(d, params["beta"])


def fit_loss_surface(n, d, loss, delta: float = 1e-3, refine: int = 5) -> dict:
    """Fit ``L(N, D) = E + A/N^alpha + B/D^beta`` to measured runs, as Chinchilla's approach 3:
    minimise the Huber loss (``delta``) of ``ln L_pred - ln L``, written in ``ln A, ln B, ln E``
    so the three stay positive. The fit has local minima, so: score a grid of starting
    points, then refine the ``refine`` best with L-BFGS and keep the best result."""
    ln_n, ln_d, ln_l = (torch.from_numpy(logs(name, v, "fit_loss_surface"))
                        for name, v in (("N", n), ("D", d), ("loss", loss)))
    if not len(ln_n) == len(ln_d) == len(ln_l) or len(ln_n) < 5:
        raise ValueError(f"the surface has 5 parameters: it needs at least 5 runs, one N, D and loss each; got "
                         f"{len(ln_n)} N, {len(ln_d)} D, {len(ln_l)} losses")

    def objective(theta):  # theta: [..., 5] = ln A, ln B, ln E, alpha, beta
        ln_a, ln_b, ln_e, alpha, beta = (theta[..., i, None] for i in range(5))
        pred = torch.logsumexp(torch.stack([ln_a - alpha * ln_n, ln_b - beta * ln_d,
                                            ln_e.expand(*ln_e.shape[:-1], len(ln_n))]), dim=0)
        return torch.nn.functional.huber_loss(pred, ln_l.expand_as(pred), delta=delta, reduction="none").sum(-1)

    grid = torch.cartesian_prod(torch.arange(0.0, 12.5, 2.5), torch.arange(0.0, 12.5, 2.5),
                                torch.tensor([-1.0, -0.5, 0.0, 0.5]), torch.tensor([0.1, 0.3, 0.5, 0.8, 1.2]),
                                torch.tensor([0.1, 0.3, 0.5, 0.8, 1.2])).double()
    starts = grid[objective(grid).argsort()[:refine]]
    best_value, best_theta = math.inf, None
    for start in starts:
        theta = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = objective(theta)
            value.backward()
            return value

        opt.step(closure)
        value = objective(theta.detach()).item()
        if math.isfinite(value) and value < best_value:
            best_value, best_theta = value, theta.detach().clone()
    if best_theta is None:
        raise ValueError("the loss-surface fit failed from every starting point")
    ln_a, ln_b, ln_e, alpha, beta = best_theta.tolist()
    return {"E": math.exp(ln_e), "A": math.exp(ln_a), "alpha": alpha, "B": math.exp(ln_b), "beta": beta,
            "objective": best_value}


def synthetic_runs(truth: dict, budgets, factors=(0.25, 0.5, 1.0, 2.0, 4.0), noise: float = 0.0,
                   seed: int = 0) -> list[Run]:
    """Runs whose losses come from a known surface ``truth`` (``loss_surface``'s keys) at
    ``C = 6ND``, plus Gaussian ``noise``: sizes at ``factors`` times each budget's true optimum.

    A known answer to test the fits against: with ``alpha == beta`` the optimum grows as C^0.5.
    """
    rng = np.random.default_rng(seed)
    a, b, alpha, beta = truth["A"], truth["B"], truth["alpha"], truth["beta"]
    runs = []
    for budget in budgets:
        # minimise A/N^alpha + B/D^beta with D = C / 6N: N_opt = G (C/6)^(beta/(alpha+beta))
        g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
        centre = g * (budget / 6) ** (beta / (alpha + beta))
        for f in factors:
            n = centre * f
            d = budget / (6 * n)
            loss = float(loss_surface(truth, n, d) + noise * rng.standard_normal())
            runs.append(Run(budget=float(budget), n_layer=0, n_embd=0, params=round(n), tokens=round(d),
                            flops=float(budget), steps=0, epochs=0.0, val_loss=loss, seconds=0.0))
    return runs


def run_table(runs: list[Run]) -> str:
    """The sweep as a plain-text table, one run per line."""
    lines = [f"{'budget':>9} {'size':>7} {'N':>9} {'D':>10} {'D/N':>6} {'epochs':>6} {'val loss':>8} {'s':>6}"]
    for r in runs:
        lines.append(f"{r.budget:9.2e} {r.n_layer:>2}x{r.n_embd:<4} {r.params:9,d} {r.tokens:10,d} "
                     f"{r.tokens / r.params:6.1f} {r.epochs:6.2f} {r.val_loss:8.4f} {r.seconds:6.1f}")
    return "\n".join(lines)
