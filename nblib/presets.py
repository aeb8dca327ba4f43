"""What ``python -m nblib.pretrain`` trains (lesson 14): the presets, their tiny forms, their checks.

A ``Preset`` holds a run's settings: the data, the model's shape, the batch, the optimisation
and the bookkeeping intervals. Every field is also a command-line flag (``--max_steps 100``).
``check_preset`` names every setting out of its range in one ``UsageError``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from nblib.llama import LlamaConfig, padded_vocab_size


class UsageError(ValueError):
    """A flag or an --out folder the program cannot run with; the message says what to do."""


@dataclass
class Preset:
    """A run's settings. Every field is also a command-line option (``--max_steps 100``)."""

    data: str = "shakespeare-char"  # shakespeare-char, shakespeare-gpt2 (prepared when missing), fineweb-edu
                                    # (prepare it first: nblib.shards), or a folder of prepared shards
    # the model (nblib.llama.LlamaConfig)
    n_layer: int = 6
    n_head: int = 6
    n_kv_heads: int = 0             # 0: one per query head (plain multi-head attention)
    n_embd: int = 384
    seq_len: int = 256              # tokens per row: the model's block_size
    tie_embeddings: bool = False
    vocab_multiple: int = 128       # the vocabulary is padded up to a multiple of this (GPU matmul tiles)
    # the batch
    batch_size: int = 64            # rows per micro-batch, per process
    global_batch: int = 64          # rows per optimizer step, all processes and micro-batches together
    # the optimisation (nblib.train.TrainConfig)
    max_steps: int = 5000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # max global gradient norm; 0: no clipping (as nanoGPT)
    dtype: str = "auto"             # bfloat16, float16 (with a GradScaler), float32, or auto (nblib.train.resolve_dtype)
    shuffle: bool = True            # a seeded order of windows, shifted each pass; False: sequential
    seed: int = 1337                # the model's initialisation and the data order
    # bookkeeping
    log_interval: int = 10          # steps between log rows (the only times the host waits for the device)
    eval_interval: int = 250        # steps between evaluations (also at step 0 and at the end)
    eval_batches: int = 200         # batches per split per evaluation (each batch_size rows)
    ckpt_interval: int = 1000       # steps between checkpoints (also at the end)
    sample_tokens: int = 200        # tokens sampled from the final checkpoint

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


PRESETS = {
    # nanoGPT's shakespeare-char GPU demo (6 layers, 6 heads, 384 wide, block 256, batch 64,
    # 5000 iterations, lr 1e-3, beta2 0.99), Llama-style and without dropout. nanoGPT's
    # best validation loss: 1.4697 (A100, about 3 minutes). 16,384 tokens per step.
    "shakespeare-char": Preset(),
    # GPT-2 small's shape (12 layers, 12 heads, 768 wide, T=1024, tied embeddings: 124M
    # parameters with the padded 50,304-token vocabulary) Llama-style, on FineWeb-edu, with
    # build-nanogpt's recipe: 524,288 tokens per step (512 rows; gradient accumulation where
    # fewer than 8 GPUs hold 64 rows each), lr 6e-4 warmed up over 715 steps, cosine to 6e-5.
    # 19,073 steps x 524,288 tokens = 10.0B tokens (one pass over FineWeb-edu's sample-10BT).
    "gpt2-124m": Preset(data="fineweb-edu", n_layer=12, n_head=12, n_embd=768, seq_len=1024, tie_embeddings=True,
                        batch_size=64, global_batch=512, max_steps=19_073, lr=6e-4, min_lr=6e-5, warmup_steps=715,
                        beta2=0.95, eval_interval=250, eval_batches=20, ckpt_interval=1000, sample_tokens=64),
    # Lesson 15's base model at CPU size: GPT-2 tokens (the chat tokens live in the padded rows) of
    # tinyshakespeare, the only corpus that ships with the course; 4 layers, 128 wide, tied embeddings
    # (7.2M parameters, 0.8M outside the embedding): about 6 minutes on 2 CPU cores.
    "chat-cpu": Preset(data="shakespeare-gpt2", n_layer=4, n_head=4, n_embd=128, seq_len=256, tie_embeddings=True,
                       batch_size=8, global_batch=8, max_steps=250, lr=2e-3, min_lr=2e-4, warmup_steps=25,
                       beta2=0.95, eval_interval=125, eval_batches=8, ckpt_interval=125, sample_tokens=48),
    # A free Colab T4 (float16 Tensor Cores, no bfloat16: GradScaler): a 30M-parameter model
    # (10.6M outside the tied embeddings) on GPT-2 tokens of FineWeb-edu, 4,000 steps of
    # 32,768 tokens = 131M tokens, 194 MFLOP per token: 2.5e16 FLOPs, about 26 min at 25%
    # of the T4's 65 TFLOP/s (an estimate, not measured). Prepare 140M tokens first.
    "colab-t4": Preset(data="fineweb-edu", n_layer=6, n_head=6, n_embd=384, seq_len=512, tie_embeddings=True,
                       batch_size=16, global_batch=64, max_steps=4000, lr=1e-3, min_lr=1e-4, warmup_steps=200,
                       beta2=0.95, dtype="float16", eval_interval=250, eval_batches=20, ckpt_interval=500,
                       sample_tokens=64),
}


# The tiny form of every preset (--tiny, or NBLIB_FAST=1): a ~0.1M-parameter model and a
# few steps, seconds on a CPU; GPT-2-token presets read tinyshakespeare's GPT-2 tokens
# (packaged, offline) instead of FineWeb-edu (their 50,304-row embedding is most of the model).
TINY = dict(n_layer=2, n_head=2, n_kv_heads=0, n_embd=64, seq_len=64, batch_size=8, global_batch=16, max_steps=8,
            warmup_steps=2, log_interval=1, eval_interval=4, eval_batches=2, ckpt_interval=4, sample_tokens=32)


TINY_DATA = {"fineweb-edu": "shakespeare-gpt2"}
# GPT-2 tokens: the 50,304-way output layer is most of a tiny model's step, so a quarter of the tokens
TINY_GPT2_TOKENS = dict(batch_size=4, global_batch=4)


def tiny(preset: Preset) -> Preset:
    data = TINY_DATA.get(preset.data, preset.data)
    return dataclasses.replace(preset, **{**TINY, **(TINY_GPT2_TOKENS if data == "shakespeare-gpt2" else {})}, data=data)


def preset_model(preset: Preset, vocab_size: int) -> LlamaConfig:
    """The model of ``preset`` for a vocabulary of ``vocab_size`` tokens, padded to a multiple
    of ``vocab_multiple`` (``nblib.llama.padded_vocab_size``; ``resize_vocab`` takes it off again)."""
    return LlamaConfig(vocab_size=padded_vocab_size(vocab_size, preset.vocab_multiple), block_size=preset.seq_len,
                       n_layer=preset.n_layer, n_head=preset.n_head, n_kv_heads=preset.n_kv_heads or None,
                       n_embd=preset.n_embd, tie_embeddings=preset.tie_embeddings)


def accum_steps(preset: Preset, world_size: int) -> int:
    """Micro-batches per optimizer step, so that every step has ``global_batch`` rows."""
    per_micro = preset.batch_size * world_size
    if preset.global_batch % per_micro:
        raise ValueError(f"global_batch={preset.global_batch} is not a multiple of batch_size x processes = "
                         f"{preset.batch_size} x {world_size} = {per_micro}: change --batch_size or --global_batch")
    return preset.global_batch // per_micro


POSITIVE = ("n_layer", "n_head", "n_embd", "seq_len", "vocab_multiple", "batch_size", "global_batch", "max_steps",
            "log_interval", "eval_interval", "eval_batches", "ckpt_interval")


NON_NEGATIVE = ("n_kv_heads", "warmup_steps", "sample_tokens", "seed")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_preset(preset: Preset) -> None:
    """Raise ``UsageError`` naming every setting out of its range (all of them, in one message)."""
    p, problems = preset, []
    problems += [f"--{n} must be >= 1, got {getattr(p, n)}" for n in POSITIVE if getattr(p, n) < 1]
    problems += [f"--{n} must be >= 0, got {getattr(p, n)}" for n in NON_NEGATIVE if getattr(p, n) < 0]
    if not (math.isfinite(p.lr) and p.lr > 0):
        problems.append(f"--lr must be a finite number > 0, got {p.lr}")
    if not (math.isfinite(p.min_lr) and 0 <= p.min_lr <= max(p.lr, 0)):
        problems.append(f"--min_lr must be between 0 and --lr ({p.lr}), got {p.min_lr}")
    if not (math.isfinite(p.weight_decay) and p.weight_decay >= 0):
        problems.append(f"--weight_decay must be a finite number >= 0, got {p.weight_decay}")
    problems += [f"--{n} must be in [0, 1), got {getattr(p, n)}" for n in ("beta1", "beta2")
                 if not 0 <= getattr(p, n) < 1]
    if not (math.isfinite(p.grad_clip) and p.grad_clip >= 0):
        problems.append(f"--grad_clip must be a finite number >= 0 (0: no clipping), got {p.grad_clip}")
    if p.dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {p.dtype!r}")
    if not p.data.strip():
        problems.append("--data must name a dataset or a folder of shards, got ''")
    if not problems:  # with every number in range, the model's own checks
        try:
            preset_model(p, 1)  # n_embd divisible by n_head, n_head by n_kv_heads, an even head size (RoPE)
        except ValueError as err:
            problems.append(f"{err} (set --n_embd, --n_head, --n_kv_heads)")
    if problems:
        raise UsageError("; ".join(problems))

