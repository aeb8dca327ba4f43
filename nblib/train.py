"""A training loop for any course model (lesson 06; lessons 07 and later reuse it).

The model only has to follow the course contract: ``model.config`` is a dataclass and
``model(idx, targets) -> (logits, loss)``. The loop has what a real pre-training run has:

- AdamW with two parameter groups: weight decay on matrices (>= 2-D), none on biases and
  norm gains (decaying those only hurts); embeddings optionally excluded too;
- learning rate: linear warmup, then cosine decay to ``min_lr`` (``lr_at``);
- gradient clipping by global norm, gradient accumulation (a big batch from small ones);
- autocast to bfloat16 where the device has it (``dtype="auto"``: CUDA with bf16);
- periodic evaluation on fixed batches of train and val, a progress bar, a history of
  losses (``plot_history`` draws the curves);
- checkpoints (``nblib.checkpoint``) and exact resume.

**Why a resumed run equals one that never stopped.** Every random choice is either
restored from the checkpoint or recomputed from numbers the checkpoint holds:
the model, AdamW's moments and the global RNG (dropout) are saved; the batches are not
drawn from a running generator but from one seeded by ``(seed, step, micro-step)``
(``batch_generator``), so step 1234's batch is the same whether or not the process
restarted in between; the learning rate is a function of the step; evaluation uses fixed
batches and no randomness.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from nblib import checkpoint
from nblib.progress import progress
from nblib.text import random_batch


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model and the data."""

    max_steps: int = 1000  # optimizer steps; the lr schedule ends here
    batch_size: int = 16  # sequences per micro-batch
    block_size: int | None = None  # tokens per sequence; None: the model's block_size
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    decay_embeddings: bool = True  # weight decay on nn.Embedding weights (GPT-2/nanoGPT: yes)
    eval_interval: int = 100  # evaluate every this many steps (and at the start and end)
    eval_batches: int = 20  # batches per split per evaluation
    dtype: str = "auto"  # "auto" (bf16 on CUDA with bf16, else fp32), "bfloat16", "float16", "float32"
    seed: int = 1337  # batches and nothing else (the model's init is the caller's)
    checkpoint_path: str | None = None  # where to save; None: no checkpoints
    checkpoint_interval: int | None = None  # steps between saves; None: eval_interval

    # fields that may differ between a run and its resumption
    _RESUMABLE_CHANGES = ("checkpoint_path", "checkpoint_interval")


@dataclass
class History:
    """What a run measured. ``step`` counts optimizer steps done (1 after the first update)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # training loss of that step's batch
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)  # before clipping
    eval_step: list[int] = field(default_factory=list)
    train_eval: list[float] = field(default_factory=list)  # mean loss on fixed train batches
    val: list[float] = field(default_factory=list)  # mean loss on fixed val batches
    tokens_per_step: int = 0
    seconds: float = 0.0  # training wall time, summed over resumptions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**d)

    @property
    def tokens_per_second(self) -> float:
        return len(self.step) * self.tokens_per_step / max(self.seconds, 1e-9)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for (0-based) optimizer step ``step``: linear warmup, then cosine to ``min_lr``.

    Warmup goes from ``lr / warmup_steps`` at step 0 to ``lr`` at step ``warmup_steps - 1``
    (never 0, which would waste a step); the cosine then falls from ``lr`` to ``min_lr``
    at ``max_steps``, and stays there if training goes on.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_ = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress_)) * (cfg.lr - cfg.min_lr)


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only.

    Decay pulls weights towards 0, which regularises the matrices that mix features; for
    biases and LayerNorm gains (1-D) it only fights their job, so they get none. With
    ``decay_embeddings=False`` the embedding tables join the no-decay group too.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # a tied parameter is listed once
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and (cfg.decay_embeddings or id(p) not in embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def autocast_context(device: torch.device, dtype: str = "auto"):
    """The autocast context for ``dtype`` on ``device`` (a no-op for float32)."""
    device = torch.device(device)
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _derived_seed(*parts) -> int:
    """A 63-bit seed from a tuple of ints/strings, the same on every machine and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_generator(seed: int, *where) -> torch.Generator:
    """A CPU generator for one batch, seeded by ``(seed, *where)``, e.g. ``(seed, "train", step, micro)``."""
    return torch.Generator().manual_seed(_derived_seed(seed, *where))


@torch.no_grad()
def estimate_loss(model: nn.Module, get_batch: Callable, cfg: TrainConfig, device) -> dict[str, float]:
    """Mean loss over ``cfg.eval_batches`` fixed batches of each split (model in eval mode)."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = []
        for i in range(cfg.eval_batches):
            x, y = get_batch(split, batch_generator(cfg.seed, "eval", split, i))
            with autocast_context(device, cfg.dtype):
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.item())
        out[split] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def _train_config_dict(cfg: TrainConfig) -> dict:
    return {k: v for k, v in checkpoint.config_dict(cfg)["fields"].items() if k not in cfg._RESUMABLE_CHANGES}


def train(model: nn.Module, train_data: torch.Tensor | None, val_data: torch.Tensor | None, cfg: TrainConfig,
          device: str | torch.device | None = None, resume: bool = False, stop_at: int | None = None,
          get_batch: Callable | None = None, show_progress: bool = True) -> History:
    """Train ``model`` on token streams ``train_data`` / ``val_data`` (1-D LongTensors); return the history.

    - ``device``: where the batches go; default: where the model's parameters are.
    - ``resume=True``: continue from ``cfg.checkpoint_path`` if that file exists (model,
      optimizer, RNG, step and history come back), else start fresh.
    - ``stop_at``: stop after this many steps although the schedule runs to
      ``cfg.max_steps`` (an interruption on purpose; a checkpoint is saved there).
    - ``get_batch(split, generator) -> (x, y)`` replaces the default random windows
      (``nblib.text.random_batch``) for other data.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    block_size = cfg.block_size or model.config.block_size
    if get_batch is None:
        if train_data is None or val_data is None:
            raise ValueError("pass train_data and val_data, or a get_batch function")
        data = {"train": train_data, "val": val_data}

        def get_batch(split, generator):
            return random_batch(data[split], cfg.batch_size, block_size, generator=generator)

    optimizer = configure_optimizer(model, cfg)
    history = History(tokens_per_step=cfg.batch_size * block_size * cfg.grad_accum_steps)
    start = 0
    ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    if resume and ckpt is None:
        raise ValueError("resume=True needs cfg.checkpoint_path")
    if resume and ckpt.is_file():
        meta = checkpoint.load_checkpoint(ckpt, model, optimizer)
        saved = meta["extra"].get("train_config")
        if saved is None:
            raise ValueError(f"{ckpt} was not written by nblib.train.train (no training state to resume)")
        if saved != _train_config_dict(cfg):
            diff = {k: (saved.get(k), v) for k, v in _train_config_dict(cfg).items() if saved.get(k) != v}
            raise ValueError(f"resuming with another TrainConfig changes the run; (checkpoint, now): {diff}")
        start = meta["step"]
        history = History.from_dict(meta["extra"]["history"])
    stop = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    save_every = cfg.checkpoint_interval or cfg.eval_interval

    def save(step: int) -> None:
        if ckpt is not None:
            checkpoint.save_checkpoint(ckpt, model, optimizer, step=step,
                                       extra={"history": history.to_dict(), "train_config": _train_config_dict(cfg)})

    def evaluate(step: int) -> None:
        losses = estimate_loss(model, get_batch, cfg, device)
        history.eval_step.append(step)
        history.train_eval.append(losses["train"])
        history.val.append(losses["val"])

    model.train()
    if start == 0 and not history.eval_step:
        evaluate(0)  # the untrained model: about ln(vocab_size)
    bar = progress(total=cfg.max_steps, initial=start, desc="train", **({} if show_progress else {"disable": True}))
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(start, stop):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum_steps):
            x, y = get_batch("train", batch_generator(cfg.seed, "train", step, micro))
            with autocast_context(device, cfg.dtype):
                _, loss = model(x.to(device), y.to(device))
            # the mean over micro-batches: each contributes 1/accum of the gradient
            (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.item()
        clip = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        optimizer.step()
        history.seconds += time.perf_counter() - t0  # training time only, not eval or saving
        done = step + 1
        history.step.append(done)
        history.loss.append(loss_sum / cfg.grad_accum_steps)
        history.lr.append(lr)
        history.grad_norm.append(grad_norm)
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            evaluate(done)
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", val=f"{history.val[-1]:.3f}")
        if done % save_every == 0 or done == stop:
            save(done)
        bar.update(1)
    bar.close()
    return history


def plot_history(history: History, ax=None, label: str | None = None, smooth: int = 20):
    """Loss curves: the training loss (smoothed over ``smooth`` steps) and the val loss."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    prefix = f"{label}: " if label else ""
    if history.loss:
        w = max(1, min(smooth, len(history.loss)))
        losses = torch.tensor(history.loss)
        smoothed = losses.unfold(0, w, 1).mean(1) if len(losses) >= w else losses
        line, = ax.plot(history.step[w - 1:], smoothed.tolist(), alpha=0.5, label=f"{prefix}train (batch, mean of {w})")
        ax.plot(history.eval_step, history.val, "o-", color=line.get_color(), label=f"{prefix}val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
