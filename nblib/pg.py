"""The policy gradient on a problem small enough to solve exactly (lesson 09, before PPO).

A tiny autoregressive "language model": a reply is ``L`` tokens from a vocabulary of ``V``,
and the policy is a table of logits ``theta[t, prev, v]``: the score of token ``v`` at
position ``t`` after the token ``prev`` (``prev = V``, the start token, at t = 0). With
V = 3 and L = 4 there are only 3**4 = 81 replies, so every expectation over replies is a
sum over ``all_replies``: the objective J(theta) = E_{y~pi}[r(y)], its gradient (by
autograd through the sum), the KL between two policies, the value of every prefix. The
estimators PPO uses (REINFORCE, a baseline, the importance ratio, GAE) are then measured
against the exact numbers.

Replies are long tensors [N, L]; per-token log-probs are [N, L]; rewards are per reply, [N].
"""
from __future__ import annotations

import functools
import itertools

import torch

V, L = 3, 4          # vocabulary size, reply length
LIKED = 0            # the reward pays +1 for each occurrence of this token ...
PATTERN = (1, 2)     # ... and BONUS once if these two tokens appear one after the other
BONUS = 2.0


def init_theta(scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Random logits [L, V + 1, V] (float64): a policy with preferences of its own, like an SFT model."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(L, V + 1, V, generator=g, dtype=torch.float64)


@functools.lru_cache(maxsize=1)
def all_replies() -> torch.Tensor:
    """Every reply [V**L, L], in lexicographic order: replies sharing a prefix of k tokens are one block of V**(L-k).

    Built once and shared (do not write into it)."""
    return torch.tensor(list(itertools.product(range(V), repeat=L)))


def reward(replies: torch.Tensor) -> torch.Tensor:
    """r(y) [N] (float64): +1 per LIKED token, + BONUS if PATTERN occurs somewhere in the reply."""
    liked = (replies == LIKED).sum(-1).double()
    pattern = ((replies[:, :-1] == PATTERN[0]) & (replies[:, 1:] == PATTERN[1])).any(-1)
    return liked + BONUS * pattern.double()


def token_logprobs(theta: torch.Tensor, replies: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | y_<t) [N, L]: token t's log-prob under its row of logits theta[t, y_(t-1)]."""
    start = torch.full_like(replies[:, :1], V)
    prev = torch.cat([start, replies[:, :-1]], dim=1)
    logp = theta.log_softmax(-1)[torch.arange(L), prev]          # [N, L, V]: the distribution of each token
    return logp.gather(-1, replies[..., None]).squeeze(-1)


def reply_logprob(theta: torch.Tensor, replies: torch.Tensor) -> torch.Tensor:
    """log pi(y) [N] = the sum of the reply's token log-probs."""
    return token_logprobs(theta, replies).sum(-1)


def probs(theta: torch.Tensor) -> torch.Tensor:
    """pi(y) [V**L] of every reply of ``all_replies`` (they add up to 1)."""
    return reply_logprob(theta, all_replies()).exp()


def exact_J(theta: torch.Tensor) -> torch.Tensor:
    """J(theta) = sum over every reply of pi(y) r(y): the expected reward, exactly (differentiable)."""
    ys = all_replies()
    return (probs(theta) * reward(ys)).sum()


def exact_grad(theta: torch.Tensor) -> torch.Tensor:
    """grad J(theta) [L, V + 1, V], by autograd through the enumeration."""
    theta = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(exact_J(theta), theta)
    return grad


def exact_kl(theta_p: torch.Tensor, theta_q: torch.Tensor) -> float:
    """KL(pi_p || pi_q) = sum_y p(y) (log p(y) - log q(y)) over whole replies, in nats."""
    ys = all_replies()
    logp, logq = reply_logprob(theta_p, ys), reply_logprob(theta_q, ys)
    return float((logp.exp() * (logp - logq)).sum())


@torch.no_grad()
def sample(theta: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n replies [n, L] drawn from pi_theta token by token, as a language model writes."""
    replies = torch.empty(n, L, dtype=torch.long)
    prev = torch.full((n,), V)
    for t in range(L):
        p = theta[t, prev].softmax(-1)
        prev = torch.multinomial(p, 1, generator=generator).squeeze(-1)
        replies[:, t] = prev
    return replies


def reinforce_loss(logprobs: torch.Tensor, rewards: torch.Tensor, baseline=0.0) -> torch.Tensor:
    """-mean((r - b) * log pi(y)) with r and b constants: its gradient is minus the REINFORCE estimate."""
    return -((rewards - baseline).detach() * logprobs).mean()


def baseline(rewards: torch.Tensor, kind: str):
    """A baseline for each reply: "none" (0), "mean" (the batch's mean reward, itself included: it
    shrinks the estimate by (N - 1)/N) or "loo" (leave-one-out: the mean reward of the *other* replies)."""
    n = len(rewards)
    return {"none": 0.0, "mean": rewards.mean(), "loo": (rewards.sum() - rewards) / (n - 1)}[kind]


def estimate(loss_fn, theta: torch.Tensor, replies: torch.Tensor, b=0.0) -> torch.Tensor:
    """The gradient estimate [L, V + 1, V] = -grad of ``loss_fn(log pi(y), r(y), b)`` on these replies."""
    theta = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(reply_logprob(theta, replies), reward(replies), b), theta)
    return -grad


def exact_values(theta: torch.Tensor) -> torch.Tensor:
    """V(y_<t) for every reply and t = 0 ... L [V**L, L + 1]: the expected reward given the first t tokens.

    Column 0 is J(theta), column L the reward itself. Replies sharing a prefix of t tokens
    are a block of ``all_replies``, so V is each block's probability-weighted mean reward."""
    p, r = probs(theta), reward(all_replies())
    columns = []
    for t in range(L + 1):
        block = V ** (L - t)
        mass = p.view(-1, block).sum(-1)
        value = (p * r).view(-1, block).sum(-1) / mass
        columns.append(value.repeat_interleave(block))
    return torch.stack(columns, dim=1)


def token_score_jacobian(theta: torch.Tensor) -> torch.Tensor:
    """grad_theta log pi(y_t | y_<t) for every reply and token [V**L, L, theta.numel()]."""
    ys = all_replies()
    jac = torch.autograd.functional.jacobian(lambda th: token_logprobs(th, ys), theta.detach(), vectorize=True)
    return jac.reshape(len(ys), L, -1)


def state_error(sigma: float, seed: int = 0) -> torch.Tensor:
    """A value table's error [V**L, L]: one N(0, sigma^2) number per state y_<t, so replies sharing a prefix share it."""
    g = torch.Generator().manual_seed(seed)
    columns = [sigma * torch.randn(V ** t, generator=g, dtype=torch.float64).repeat_interleave(V ** (L - t))
               for t in range(L)]
    return torch.stack(columns, dim=1)


def moments(estimates: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(bias^2, variance) of gradient estimates [K, D] drawn with probabilities ``weights`` [K]: ||E g - target||^2
    and E||g - E g||^2 (the trace of the covariance). Their sum is the mean squared error."""
    mean = (weights[:, None] * estimates).sum(0)
    bias2 = (mean - target.flatten()).pow(2).sum()
    var = (weights * (estimates - mean).pow(2).sum(-1)).sum()
    return float(bias2), float(var)
