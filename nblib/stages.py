"""Lesson 15's stages after pre-training, as programs: mid-training and SFT (``python -m nblib.midtrain``,
``python -m nblib.chat_sft``; GRPO is ``nblib.chat_rl``).

    python -m nblib.pretrain --preset chat-cpu --out runs/base                    # lesson 14's program
    python -m nblib.midtrain --preset cpu --from runs/base --out runs/mid
    python -m nblib.chat_sft --preset cpu --from runs/mid --out runs/sft --identity me.jsonl
    python -m nblib.chat_rl  --preset cpu --from runs/sft --out runs/rl
    torchrun --standalone --nproc_per_node=8 -m nblib.midtrain --preset gpt2-124m --from runs/124m ...

A stage is lesson 14's training run with two things changed, and nothing else:

- **the data**: rows are conversations (``ChatRows``), one per row, rendered with lesson 08's
  template in GPT-2's BPE plus the chat tokens (``nblib.chatbpe``), and the loss is on the
  assistant's tokens only (the other targets are -100, which the model's loss skips);
- **the first weights**: the final checkpoint of the stage before (``--from DIR``), not a
  fresh initialisation.

So every stage has what ``nblib.pretrain`` has: presets with a ``--tiny`` form, every preset
field a flag, ``torchrun`` for several GPUs, checkpoints with exact resume (``--resume``;
``--overwrite`` moves an old run aside, nothing is deleted), a JSON log (``log.jsonl``),
Ctrl-C saving a checkpoint, and errors that say what to do.

``load_run(DIR)`` gives a stage's model and tokenizer (the chat server and evals use it).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nblib import chat, chatdata, checkpoint, evals, hardware, pretrain
from nblib.chatbpe import chat_bpe
from nblib.presets import UsageError
from nblib.processes import init_distributed
from nblib.runmode import is_fast, setup

IGNORE = -100  # a target the loss skips (nblib.llama's loss, as in lesson 06)


# ---------------------------------------------------------------------------- the data: conversations as rows

class ChatRows:
    """Conversations as training rows: one conversation per row, cut at ``seq_len + 1`` tokens.

    ``batch(rows, device) -> (x, y)`` as ``nblib.shards.Windows``: ``x`` the tokens (``<|pad|>``
    after the conversation), ``y`` the next tokens where the next token is the assistant's,
    ``IGNORE`` elsewhere. Row ``k`` is conversation ``perm[k % n]`` of pass ``k // n`` (a
    seeded permutation per pass; ``seed=None``: in order), so a step's rows depend only on
    the step: what makes resuming exact.
    """

    def __init__(self, conversations: list[list[dict]], tokenizer, seq_len: int, seed: int | None = None):
        self.seq_len, self.seed, self.pad_id = seq_len, seed, tokenizer.pad_id
        self.examples = []
        for conversation in conversations:
            ids, mask = chat.render(conversation, tokenizer)
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            if any(mask[1:]):  # something of the assistant's is left to learn after the cut
                self.examples.append((ids, mask))
        self.n_windows = len(self.examples)
        if self.n_windows == 0:
            raise ValueError(f"no conversation has an assistant token within seq_len={seq_len}: nothing to train on")
        self.trained_tokens = sum(sum(m[1:]) for _, m in self.examples)

    def example(self, row: int) -> tuple[list[int], list[bool]]:
        n, i = divmod(row, self.n_windows)
        if self.seed is not None:
            i = int(np.random.default_rng([self.seed, n]).permutation(self.n_windows)[i])
        return self.examples[i]

    def batch(self, rows, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        rows = list(rows)
        x = torch.full((len(rows), self.seq_len), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), self.seq_len), IGNORE, dtype=torch.long)
        for r, k in enumerate(rows):
            ids, mask = self.example(k)
            n = len(ids) - 1
            x[r, :n] = torch.tensor(ids[:-1])
            y[r, :n] = torch.where(torch.tensor(mask[1:]), torch.tensor(ids[1:]), IGNORE)
        return x.to(device), y.to(device)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.examples).encode()).hexdigest()


# ---------------------------------------------------------------------------- presets

@dataclass
class StagePreset:
    """A stage's settings (the model comes from ``--from``). Every field is also a flag."""

    batch_size: int = 16            # rows (conversations) per micro-batch, per process
    global_batch: int = 16          # rows per optimizer step
    max_steps: int = 300
    lr: float = 3e-4                # lower than pre-training's: the weights are already good
    min_lr: float = 3e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"
    shuffle: bool = True
    seed: int = 1337
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 100
    sample_tokens: int = 60         # tokens of the final model's reply to "Who are you?"
    generated: int = 400            # course-made multiple-choice questions and word problems in the mixture
    identity_copies: int = 4        # times the identity conversations (--identity) appear in SFT's mixture
    seq_len: int = 0                # tokens per row: 0 is the model's context (its block_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


# cpu: lesson 15 at CPU size (a few minutes each on 2 cores); colab-t4 and gpt2-124m: after lesson 14's presets
# of the same names (their arithmetic is in lesson 15; not yet measured on a GPU).
STAGE_PRESETS = {
    "mid": {"cpu": StagePreset(batch_size=8, global_batch=8, max_steps=150, lr=1e-3, min_lr=1e-4, eval_interval=75,
                               ckpt_interval=75),
            "colab-t4": StagePreset(batch_size=32, global_batch=64, max_steps=1500, lr=3e-4, eval_interval=250,
                                    ckpt_interval=500, dtype="float16", generated=20_000),
            "gpt2-124m": StagePreset(batch_size=32, global_batch=256, max_steps=3000, lr=2e-4, eval_interval=500,
                                     ckpt_interval=500, generated=100_000)},
    # SFT at CPU size: fewer course-made questions (mid-training taught the formats) and the identity
    # conversations 20 times over, about a fifth of the mixture, so that 100 steps teach the name
    "sft": {"cpu": StagePreset(batch_size=8, global_batch=8, max_steps=100, lr=5e-4, min_lr=5e-5, eval_interval=50,
                               ckpt_interval=50, generated=150, identity_copies=20),
            "colab-t4": StagePreset(batch_size=32, global_batch=64, max_steps=600, lr=1e-4, eval_interval=200,
                                    ckpt_interval=200, dtype="float16", generated=5000),
            "gpt2-124m": StagePreset(batch_size=32, global_batch=256, max_steps=1000, lr=1e-4, eval_interval=250,
                                     ckpt_interval=250, generated=20_000)},
}

TINY_STAGE = dict(batch_size=4, global_batch=8, max_steps=4, warmup_steps=1, log_interval=1, eval_interval=2,
                  eval_batches=1, ckpt_interval=2, sample_tokens=12, generated=20)


def check_stage_preset(p: StagePreset) -> None:
    problems = [f"--{n} must be >= 1, got {getattr(p, n)}" for n in
                ("batch_size", "global_batch", "max_steps", "log_interval", "eval_interval", "eval_batches",
                 "ckpt_interval") if getattr(p, n) < 1]
    problems += [f"--{n} must be >= 0, got {getattr(p, n)}" for n in ("warmup_steps", "sample_tokens", "generated",
                                                                       "identity_copies") if getattr(p, n) < 0]
    if not 0 < p.lr < 1 or not 0 <= p.min_lr <= p.lr:
        problems.append(f"--lr must be in (0, 1) and --min_lr in [0, lr], got lr={p.lr}, min_lr={p.min_lr}")
    if p.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"--dtype must be auto, float32, bfloat16 or float16, got {p.dtype!r}")
    if problems:
        raise UsageError("; ".join(problems))


# ---------------------------------------------------------------------------- the model a stage starts from

def stage_checkpoint(run_dir: str | Path) -> Path:
    """``run_dir/ckpt.safetensors``, the final checkpoint of a stage (or of lesson 14's pre-training);
    a clear error when the folder holds none or a damaged one."""
    path = Path(run_dir) / pretrain.CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir}: pass the --out folder of the stage before "
                                "(pre-training for midtrain, midtrain for chat_sft, chat_sft for chat_rl)")
    checkpoint.read_metadata(path)  # a truncated or foreign file fails here, with its own message
    return path


def check_chat_model(config: dict, where: Path) -> None:
    """The model must have rows for the chat tokens: a GPT-2-token model (50,304 rows), not a character one."""
    needed = chat_bpe().vocab_size
    if config.get("vocab_size", 0) < needed:
        raise ValueError(f"{where} has a vocabulary of {config.get('vocab_size')} tokens; a chat model needs "
                         f"{needed} (GPT-2's BPE and the chat tokens): pre-train on GPT-2 tokens (e.g. --preset chat-cpu "
                         "or colab-t4), not characters")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) of a stage's final checkpoint."""
    path = stage_checkpoint(run_dir)
    check_chat_model(checkpoint.read_metadata(path)["config"]["fields"], path)
    return checkpoint.load_model(path, device).eval(), chat_bpe()


# ---------------------------------------------------------------------------- the run

class StageRun(pretrain.TrainingRun):
    """Lesson 14's ``TrainingRun`` on conversations (``ChatRows``), starting from ``init``'s weights."""

    def __init__(self, stage: str, preset: StagePreset, opts: pretrain.Options, env, init: Path,
                 data_dir: str | None = None, identity: str | None = None):
        self.stage, self.init, self.data_dir, self.identity_file = stage, init, data_dir, identity
        self.tokenizer = chat_bpe()
        super().__init__(preset, opts, env)

    def load_data(self) -> None:
        p, tok = self.preset, self.tokenizer
        convs = {split: chatdata.mixture(self.stage, split, self.data_dir, self.identity_file, seed=p.seed,
                                         generated=p.generated, identity_copies=p.identity_copies)
                 for split in ("train", "val")}
        self.windows = {"train": ChatRows(convs["train"], tok, p.seq_len, p.seed if p.shuffle else None),
                        "val": ChatRows(convs["val"], tok, p.seq_len)}
        init_meta = checkpoint.read_metadata(self.init)
        self.identity = {"stage": self.stage, "rows_sha256": self.windows["train"].fingerprint(),
                         "global_batch": p.global_batch, "seq_len": p.seq_len, "order_seed": p.seed if p.shuffle else None,
                         "init": init_meta.get("sha256", str(init_meta["step"]))}

    def new_model(self) -> torch.nn.Module:
        return checkpoint.load_model(self.init)  # the stage before's weights

    def sample(self) -> tuple[str, str]:
        model = checkpoint.load_model(self.ckpt, self.env.device)
        reply = evals.vibe_check(model, self.tokenizer, ["Who are you?"], self.preset.sample_tokens)[0]
        return reply["prompt"], reply["reply"]

    def data_info(self) -> dict:
        train, val = self.windows["train"], self.windows["val"]
        return dict(stage=self.stage, init=str(self.init), passes_over_data=self.preset.max_steps *
                    self.preset.global_batch / train.n_windows,
                    data=dict(tokenizer="gpt2+chat", data_dir=self.data_dir, identity=self.identity_file,
                              train_conversations=train.n_windows, val_conversations=val.n_windows,
                              train_assistant_tokens=train.trained_tokens))


# ---------------------------------------------------------------------------- command line

PROGRAMS = {"mid": "nblib.midtrain", "sft": "nblib.chat_sft"}


def parser(stage: str) -> argparse.ArgumentParser:
    what = {"mid": "Mid-training: the base model learns the chat format, its tokens, multiple choice and math.",
            "sft": "Supervised fine-tuning on conversations, with your own identity conversations."}[stage]
    p = argparse.ArgumentParser(prog=f"python -m {PROGRAMS[stage]}", description=what)
    p.add_argument("--preset", required=True, choices=sorted(STAGE_PRESETS[stage]))
    p.add_argument("--from", dest="init", required=True, metavar="DIR",
                   help="the --out folder of the stage before (its ckpt.safetensors)")
    p.add_argument("--tiny", action="store_true", help="seconds on a CPU (also NBLIB_FAST=1)")
    p.add_argument("--out", help=f"this stage's folder (default runs/chat-{stage}-PRESET)")
    p.add_argument("--data-dir", help="prepared full sets (python -m nblib.chatdata prepare); default: the slices "
                                      "packaged with nblib")
    if stage == "sft":
        p.add_argument("--identity", metavar="FILE.jsonl", help="your model's identity conversations, mixed into SFT")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.safetensors")
    p.add_argument("--overwrite", action="store_true", help="start afresh; the old run moves to OUT/previous-<time>/")
    p.add_argument("--stop-at", type=pretrain._parse_int, help="stop and save after this step, as if interrupted")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", help="cuda, cpu, mps (default: the best there is)")
    for f in dataclasses.fields(StagePreset):
        kind = {"int": pretrain._parse_int, "float": pretrain._parse_float, "bool": pretrain._parse_bool,
                "str": str}[f.type]  # the annotations are strings (from __future__ import annotations)
        p.add_argument(f"--{f.name}", type=kind, default=None, help=argparse.SUPPRESS)
    return p


def main(stage: str, argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(stage).parse_args(argv)
    tiny = args.tiny or is_fast()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StagePreset)
                 if getattr(args, f.name) is not None}
    preset = dataclasses.replace(STAGE_PRESETS[stage][args.preset], **(TINY_STAGE if tiny else {}), **overrides)
    check_stage_preset(preset)
    init = stage_checkpoint(args.init)
    config = checkpoint.read_metadata(init)["config"]["fields"]
    check_chat_model(config, init)
    if not 0 <= preset.seq_len <= config["block_size"]:
        raise UsageError(f"--seq_len {preset.seq_len} is longer than the model's context ({config['block_size']})")
    preset = dataclasses.replace(preset, seq_len=preset.seq_len or config["block_size"])
    out = Path(args.out or f"runs/chat-{stage}-{args.preset}{'-tiny' if tiny else ''}")
    if out.resolve() == Path(args.init).resolve():
        raise UsageError("--out must be a new folder, not the --from folder: each stage keeps its own checkpoint")
    identity = getattr(args, "identity", None)
    if identity is not None:
        chatdata.read_identity(identity)  # a bad line is an error now, not after the model has loaded
    env = init_distributed(args.device)
    opts = pretrain.Options(out=out, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at,
                            compile=args.compile, resume_command=pretrain.resume_command(argv, env, PROGRAMS[stage]))
    lock = None
    try:
        lock = pretrain.prepare_out(out, args, env)
        with hardware.threads(1 if tiny and env.device.type == "cpu" else None):
            setup(seed=preset.seed, device=str(env.device), quiet=not env.is_main)
            return StageRun(stage, preset, opts, env, init, args.data_dir, identity).train()
    finally:
        if lock is not None:
            lock.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
