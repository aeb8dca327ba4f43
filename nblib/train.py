"""A training loop for any course model (lesson 06; lessons 07 and later reuse it).

The model only has to follow the course contract: ``model.config`` is a dataclass and
``model(idx, targets) -> (logits, loss)``. The loop has what a real pre-training run has:

- AdamW with two parameter groups: weight decay on matrices (>= 2-D), none on biases and
  norm gains (decaying those only hurts); embeddings optionally excluded too;
- learning rate: linear warmup, then cosine decay to ``min_lr`` (``lr_at``);
- gradient clipping by global norm, gradient accumulation (a big batch from small ones);
- autocast (``dtype="auto"``, ``resolve_dtype``): bfloat16 on a CUDA GPU with native bf16,
  float16 with a ``GradScaler`` on older CUDA GPUs, float32 elsewhere; fused AdamW;
- periodic evaluation on fixed batches of train and val, a progress bar, a history of
  losses (``plot_history`` draws the curves);
- checkpoints (``nblib.checkpoint``) and exact resume.

``train`` is a loop over ``Trainer.step``, one optimizer step for any loss: post-training
(lessons 08-11) calls ``trainer.step(micro_batches, loss_fn)`` with its own batches (chat
examples, preference pairs, rollouts) and its own ``loss_fn(model, batch) -> (loss, metrics)``,
and gets the same schedule, clipping, accumulation, autocast, history and checkpoints.
The losses stay on the device as tensors and are read back every ``log_interval`` steps:
reading a GPU number waits for the GPU, and doing that at every micro-step would idle it.

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
import warnings
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
    dtype: str = "auto"  # "auto" (resolve_dtype: bf16 or fp16 on CUDA, else fp32), "bfloat16", "float16", "float32"
    fused_adamw: bool | None = None  # AdamW's one-kernel update; None: on CUDA only (see configure_optimizer)
    seed: int = 1337  # batches and nothing else (the model's init is the caller's)
    checkpoint_path: str | None = None  # where to save; None: no checkpoints
    checkpoint_interval: int | None = None  # steps between saves; None: eval_interval
    log_interval: int = 10  # read losses back from the device every this many steps (History has every step)

    # fields that may differ between a run and its resumption
    _RESUMABLE_CHANGES = ("checkpoint_path", "checkpoint_interval", "log_interval")


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
    # what a loss_fn reports besides the loss, e.g. {"accuracy": [...]}: one value per step
    # (the mean over micro-batches; NaN where a step did not report it)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    # per evaluation (eval_step): "train/<name>", "val/<name>" from loss_fn, and eval_fn's results
    eval_metrics: dict[str, list[float]] = field(default_factory=dict)

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
    ``cfg.fused_adamw`` updates every parameter in one kernel launch instead of several per
    parameter: the same numbers up to float rounding. None turns it on where the parameters are
    on CUDA. On a CPU it makes the whole training step about 5% faster on 2 cores
    (``tools/bench_train_step.py``), but its rounding differs from the default kernel's, and
    a small model trained for thousands of steps ends somewhere else: lesson 11's buggy-teacher
    student, trained with it, came out at 19% held-out accuracy instead of 60%. So the lessons
    keep the default kernel on the CPU, and the pretraining program (lesson 14) asks for it.
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
    fused = cfg.fused_adamw
    if fused is None:
        fused = all(p.device.type == "cuda" for p in decay + no_decay)
    # fused=None rather than False when off: torch's default, so checkpoints of either kind load alike
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def finetune_config(steps: int, lr: float, batch_size: int, seed: int = 0) -> TrainConfig:
    """Post-training on fixed data (the reward model, DPO): ``steps`` steps, a 5% warmup, cosine to ``lr / 10``,
    no weight decay, float32, an evaluation every quarter of the run on 4 batches per split."""
    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 20),
                       weight_decay=0.0, eval_interval=max(1, steps // 4), eval_batches=4, dtype="float32", seed=seed)


def rl_config(steps: int, lr: float, warmup_steps: int = 0, log_interval: int = 10) -> TrainConfig:
    """Reinforcement learning (PPO, GRPO): ``steps`` optimizer steps at a constant ``lr`` after a linear
    warmup of ``warmup_steps``, gradient clipping 1, no weight decay, float32 (its batches are rollouts)."""
    return TrainConfig(max_steps=steps, lr=lr, min_lr=lr, warmup_steps=warmup_steps, weight_decay=0.0,
                       dtype="float32", grad_clip=1.0, log_interval=log_interval)


def resolve_dtype(device: torch.device, dtype: str = "auto") -> str:
    """``dtype`` with "auto" decided, the one rule every lesson uses: bfloat16 on a CUDA GPU
    with bfloat16 Tensor Cores (compute capability 8.0 on: A100, H100, L4, RTX 30xx), float16
    (trained with a GradScaler) on older ones (T4, V100: ``torch.cuda.is_bf16_supported()``
    says yes there, but it is emulated, slowly), float32 elsewhere."""
    device = torch.device(device)
    if dtype == "auto":
        if device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return dtype


def autocast_context(device: torch.device, dtype: str = "auto"):
    """The autocast context for ``dtype`` on ``device`` (a no-op for float32)."""
    device = torch.device(device)
    dtype = resolve_dtype(device, dtype)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def check_autocast(device: torch.device, dtype: str = "auto") -> None:
    """Refuse a dtype that autocast would quietly ignore on this device (torch only warns
    and runs float32): try one matmul under it and look at what comes out."""
    device = torch.device(device)
    want = resolve_dtype(device, dtype)
    if want == "float32":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "disabling autocast" warning: we raise instead
        with autocast_context(device, want):
            got = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype
    if got != getattr(torch, want):
        raise ValueError(f"torch {torch.__version__} has no {want} autocast on {device.type} (a matmul stayed "
                         f"{got}): use dtype='float32'" + (" or 'bfloat16'" if want == "float16" else ""))


def grad_scaler(device: torch.device, dtype: str = "auto"):
    """A ``torch.amp.GradScaler`` for float16 training, else None.

    float16 has 5 exponent bits: small gradients underflow to 0. The scaler multiplies
    the loss before the backward pass and divides the gradients after, skipping the step
    (and lowering the scale) when that overflowed. bfloat16 has float32's range: no scaler.
    """
    device = torch.device(device)
    if resolve_dtype(device, dtype) != "float16":
        return None
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError, RuntimeError) as err:
        raise ValueError(f"float16 training needs a GradScaler, which torch {torch.__version__} does not have for "
                         f"{device.type} ({err}): use dtype='bfloat16' or 'float32'") from err


def _derived_seed(*parts) -> int:
    """A 63-bit seed from a tuple of ints/strings, the same on every machine and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_generator(seed: int, *where) -> torch.Generator:
    """A CPU generator for one batch, seeded by ``(seed, *where)``, e.g. ``(seed, "train", step, micro)``."""
    return torch.Generator().manual_seed(_derived_seed(seed, *where))


def next_token_loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """The default ``loss_fn``: ``batch`` is ``(x, y)``, the loss is the model's mean cross-entropy."""
    x, y = batch
    _, loss = model(x, y)
    return loss, {}


def minibatch_steps(trainer: "Trainer", batch, loss_fn: Callable, epochs: int, minibatches: int,
                    generator: torch.Generator | None = None) -> list[dict]:
    """``epochs`` passes over ``batch`` (a dataclass of tensors whose first dimension is its rows, as
    ``ppo.Experience`` and ``grpo.Groups``) in ``minibatches`` shuffled minibatches, one ``trainer.step``
    each: PPO's and GRPO's update."""
    n = batch.ids.shape[0]
    results = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for rows in order.chunk(minibatches):
            minibatch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[rows]
                                                      for f in dataclasses.fields(batch)})
            results.append(trainer.step([minibatch], loss_fn))
    return results


def to_device(batch, device):
    """``batch`` with every tensor in it moved to ``device`` (tuples, lists, dicts, dataclasses)."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # namedtuples too
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def _loss_and_metrics(out) -> tuple[torch.Tensor, dict]:
    """What a loss_fn returned, as ``(loss, metrics)``: a bare loss tensor means no metrics."""
    loss, metrics = (out, {}) if torch.is_tensor(out) else out
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise ValueError("loss_fn must return a scalar loss tensor, or (loss, {name: scalar tensor}); got "
                         f"{type(loss).__name__}" + (f" of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else ""))
    return loss, metrics


@torch.no_grad()
def estimate_loss(model: nn.Module, get_batch: Callable, cfg: TrainConfig, device,
                  loss_fn: Callable | None = None) -> dict[str, float]:
    """Mean loss over ``cfg.eval_batches`` fixed batches of each split (model in eval mode).

    Returns ``{"train": ..., "val": ...}`` and, for each metric ``loss_fn`` reports,
    ``"train/<name>"`` and ``"val/<name>"`` (means over the same batches).
    """
    loss_fn = loss_fn or next_token_loss
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses, metrics = [], {}
        for i in range(cfg.eval_batches):
            batch = get_batch(split, batch_generator(cfg.seed, "eval", split, i))
            with autocast_context(device, cfg.dtype):
                loss, named = _loss_and_metrics(loss_fn(model, to_device(batch, device)))
            losses.append(loss.item())
            for name, value in named.items():
                metrics.setdefault(name, []).append(float(value))
        out[split] = sum(losses) / len(losses)
        out.update({f"{split}/{name}": sum(v) / len(v) for name, v in metrics.items()})
    model.train(was_training)
    return out


def _train_config_dict(cfg: TrainConfig) -> dict:
    return {k: v for k, v in checkpoint.config_dict(cfg)["fields"].items() if k not in cfg._RESUMABLE_CHANGES}


def _append_aligned(store: dict[str, list[float]], values: dict[str, float], length: int) -> None:
    """Append one row of named values; a name seen for the first time is NaN before, a
    missing one NaN now, so every list stays ``length + 1`` long."""
    for name in set(store) | set(values):
        column = store.setdefault(name, [math.nan] * length)
        column.append(values.get(name, math.nan))


class Trainer:
    """Model, AdamW, schedule, clipping, autocast, step counter and history: a training run
    that the caller drives one optimizer step at a time.

    ``trainer.step(micro_batches, loss_fn)`` is one optimizer step: the learning rate of
    this step (``lr_at``), then for each micro-batch ``loss, metrics = loss_fn(model,
    batch)`` under autocast and ``(loss / n_micro).backward()``, then clipping and the
    optimizer step (through a ``GradScaler`` for float16). ``loss_fn`` defaults to the
    language-model loss on ``(x, y)`` batches; its metrics (a dict of scalar tensors) are
    averaged over the micro-batches into ``history.metrics``. Batches are moved to the
    device (``to_device``). ``history`` is read back from the device every
    ``cfg.log_interval`` steps and whenever you read ``trainer.history``; a nan or inf loss
    among those steps stops the run there with a ``FloatingPointError`` (without float16's scaler).
    ``after_backward(model)``, if given, runs after the step's backward passes and before
    clipping: where data-parallel training averages the gradients over processes.

    ``save(path)`` / ``load(path)`` checkpoint everything, RNG included; a run that loads
    and goes on with the same batches equals one that never stopped (draw each batch
    from ``batch_generator(cfg.seed, ..., step, micro)``, as ``train`` does).
    ``evaluate(get_batch, loss_fn, eval_fn)`` records an evaluation; for a progress bar,
    wrap the loop in ``nblib.progress.progress``.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: str | torch.device | None = None,
                 tokens_per_step: int = 0, after_backward: Callable | None = None):
        self.model, self.cfg = model, cfg
        self.after_backward = after_backward  # called with the model after a step's backward passes
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if cfg.log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {cfg.log_interval}")
        check_autocast(self.device, cfg.dtype)
        self.scaler = grad_scaler(self.device, cfg.dtype)
        self.optimizer = configure_optimizer(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps_done = 0  # optimizer steps taken; the next step's lr is lr_at(steps_done)
        self._history = History(tokens_per_step=tokens_per_step)
        self._pending = []  # steps whose numbers are still tensors on the device

    @property
    def history(self) -> History:
        """Every step so far (reading it copies pending numbers from the device)."""
        self._flush()
        return self._history

    def step(self, micro_batches, loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step over ``micro_batches`` (a list); returns the step's mean loss,
        grad norm (before clipping) and metrics as tensors, without waiting for the device."""
        loss_fn = loss_fn or next_token_loss
        n_micro = len(micro_batches)
        if n_micro == 0:
            raise ValueError("step needs at least one micro-batch")
        t0 = time.perf_counter()
        lr = lr_at(self.steps_done, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        losses, metrics = [], {}
        for batch in micro_batches:
            with autocast_context(self.device, self.cfg.dtype):
                loss, named = _loss_and_metrics(loss_fn(self.model, to_device(batch, self.device)))
            # the mean over micro-batches: each contributes 1/n of the gradient
            scaled = loss / n_micro
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses.append(loss.detach())
            for name, value in named.items():
                metrics.setdefault(name, []).append(torch.as_tensor(value).detach().float())
        if self.after_backward is not None:  # e.g. averaging the gradients over processes by hand (lesson 14)
            self.after_backward(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped if a gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.steps_done += 1
        losses = torch.stack(losses)
        metrics = {name: torch.stack(values) for name, values in metrics.items()}
        self._pending.append((self.steps_done, lr, losses, grad_norm.detach(), metrics))
        if self.steps_done % self.cfg.log_interval == 0:
            self._flush()  # inside the timed region: the wait for the device is training time
            if self.scaler is None:  # float16's GradScaler skips a step whose gradients overflowed by itself
                self._refuse_nonfinite_loss(self.cfg.log_interval)
        self._history.seconds += time.perf_counter() - t0
        return {"loss": losses.mean(), "grad_norm": grad_norm.detach(),
                **{name: values.mean() for name, values in metrics.items()}}

    def _refuse_nonfinite_loss(self, last: int) -> None:
        """Stop at a nan or inf loss among the ``last`` steps: its update spread it into the weights,
        and every step after would train nothing. Checked when the history is read back (no wait)."""
        h = self._history
        start = max(0, len(h.loss) - last)
        bad = next((i for i in range(start, len(h.loss)) if not math.isfinite(h.loss[i])), None)
        if bad is not None:
            raise FloatingPointError(
                f"the training loss is {h.loss[bad]} at step {h.step[bad]} (lr {h.lr[bad]:.3g}, grad norm "
                f"{h.grad_norm[bad]:.3g}); the weights are no longer usable. A diverged run: lower the learning "
                "rate, add warmup or gradient clipping, train in float32 or bfloat16. Or a loss_fn that divides by "
                "0 (an empty mask) or takes the log of 0. Start again from a checkpoint or a fresh model; "
                "trainer.history shows the steps before.")

    def _flush(self) -> None:
        """Copy the pending steps' numbers to the history (the one place that waits for the device)."""
        h = self._history
        for step, lr, losses, grad_norm, metrics in self._pending:
            values = losses.tolist()
            h.step.append(step)
            h.loss.append(sum(values) / len(values))
            h.lr.append(lr)
            h.grad_norm.append(grad_norm.item())
            means = {name: sum(v) / len(v) for name, v in ((n, t.tolist()) for n, t in metrics.items())}
            _append_aligned(h.metrics, means, len(h.step) - 1)
        self._pending = []

    def evaluate(self, get_batch: Callable, loss_fn: Callable | None = None,
                 eval_fn: Callable | None = None) -> dict[str, float]:
        """Mean loss (and metrics) on the fixed train and val batches of ``get_batch``, plus
        ``eval_fn(model) -> {name: float}`` if given (in eval mode); recorded at the current step."""
        results = estimate_loss(self.model, get_batch, self.cfg, self.device, loss_fn)
        if eval_fn is not None:
            was_training = self.model.training
            self.model.eval()
            results.update(eval_fn(self.model))
            self.model.train(was_training)
        h = self.history
        h.eval_step.append(self.steps_done)
        h.train_eval.append(results["train"])
        h.val.append(results["val"])
        _append_aligned(h.eval_metrics, {k: v for k, v in results.items() if k not in ("train", "val")},
                        len(h.eval_step) - 1)
        return results

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Checkpoint model, optimizer, RNG, step, history, TrainConfig (and the GradScaler)."""
        state = {"history": self.history.to_dict(), "train_config": _train_config_dict(self.cfg)}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return checkpoint.save_checkpoint(path, self.model, self.optimizer, step=self.steps_done,
                                          extra={**(extra or {}), **state})

    def load(self, path: str | Path) -> dict:
        """Continue from a checkpoint that ``save`` wrote; returns its metadata.

        The TrainConfig must be the one the checkpoint was saved with (apart from
        checkpoint_path, checkpoint_interval and log_interval): another one changes the run.
        """
        meta = checkpoint.load_checkpoint(path, self.model, self.optimizer)
        saved = meta["extra"].get("train_config")
        if saved is None:
            raise ValueError(f"{path} was not written by nblib.train (no training state to resume)")
        ours = _train_config_dict(self.cfg)
        if saved != ours:
            diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
            raise ValueError(f"resuming with another TrainConfig changes the run; (checkpoint, now): {diff}")
        self.steps_done = meta["step"]
        self._history = History.from_dict(meta["extra"]["history"])
        self._pending = []
        if self.scaler is not None and "grad_scaler" in meta["extra"]:
            self.scaler.load_state_dict(meta["extra"]["grad_scaler"])
        return meta


def train(model: nn.Module, train_data: torch.Tensor | None, val_data: torch.Tensor | None, cfg: TrainConfig,
          device: str | torch.device | None = None, resume: bool = False, stop_at: int | None = None,
          get_batch: Callable | None = None, show_progress: bool = True, loss_fn: Callable | None = None,
          eval_fn: Callable | None = None) -> History:
    """Train ``model`` on token streams ``train_data`` / ``val_data`` (1-D LongTensors); return the history.

    - ``device``: where the batches go; default: where the model's parameters are.
    - ``resume=True``: continue from ``cfg.checkpoint_path`` if that file exists (model,
      optimizer, RNG, step and history come back), else start fresh.
    - ``stop_at``: stop after this many steps although the schedule runs to
      ``cfg.max_steps`` (an interruption on purpose; a checkpoint is saved there).
    - ``get_batch(split, generator) -> batch`` replaces the default random windows
      (``nblib.text.random_batch``, which give ``(x, y)``) for other data; a batch can be
      anything ``loss_fn`` understands.
    - ``loss_fn(model, batch) -> loss`` or ``(loss, {name: scalar tensor})``: default the
      model's next-token loss on ``(x, y)``. Training and evaluation both use it.
    - ``eval_fn(model) -> {name: float}``: more measurements at every evaluation, into
      ``history.eval_metrics``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    block_size = cfg.block_size or model.config.block_size
    if get_batch is None:
        if train_data is None or val_data is None:
            raise ValueError("pass train_data and val_data, or a get_batch function")
        data = {"train": train_data, "val": val_data}

        def get_batch(split, generator):
            return random_batch(data[split], cfg.batch_size, block_size, generator=generator)

    trainer = Trainer(model, cfg, device, tokens_per_step=cfg.batch_size * block_size * cfg.grad_accum_steps)
    ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    if resume and ckpt is None:
        raise ValueError("resume=True needs cfg.checkpoint_path")
    if resume and ckpt.is_file():
        trainer.load(ckpt)
    stop = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    save_every = cfg.checkpoint_interval or cfg.eval_interval

    model.train()
    if trainer.steps_done == 0 and not trainer.history.eval_step:
        trainer.evaluate(get_batch, loss_fn, eval_fn)  # the untrained model: about ln(vocab_size)
    bar = progress(total=cfg.max_steps, initial=trainer.steps_done, desc="train",
                   **({} if show_progress else {"disable": True}))
    for step in range(trainer.steps_done, stop):
        micro_batches = [get_batch("train", batch_generator(cfg.seed, "train", step, micro))
                         for micro in range(cfg.grad_accum_steps)]
        trainer.step(micro_batches, loss_fn)
        done = trainer.steps_done
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            trainer.evaluate(get_batch, loss_fn, eval_fn)
            history = trainer.history
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", val=f"{history.val[-1]:.3f}")
        elif done % cfg.log_interval == 0:  # the numbers are on the host now anyway
            bar.set_postfix(loss=f"{trainer.history.loss[-1]:.3f}")
        if ckpt is not None and (done % save_every == 0 or done == stop):
            trainer.save(ckpt)
        bar.update(1)
    bar.close()
    return trainer.history


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
