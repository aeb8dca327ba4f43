"""``python -m nblib.chat_rl``: lesson 15's RL stage: lesson 11's GRPO on math word problems, with a
verifiable reward (the number after ``####`` is right or not: ``nblib.evals.gsm8k_reward``).

    python -m nblib.chat_rl --preset cpu --from runs/sft --out runs/rl
    python -m nblib.chat_rl --preset cpu --from runs/sft --out runs/rl --resume   # after Ctrl-C

Each step draws ``prompts_per_step`` problems, samples ``group_size`` replies to each with the
engine, rewards them, and takes lesson 11's step (``nblib.grpo.step``: group advantages, the
clipped objective, no KL by default, as TRL and nanochat). The problems are GSM8K's training
problems (``--task gsm8k``) or the course's one-step word problems in GSM8K's format
(``--task simple-math``, the CPU preset's: a model this small gets almost no GSM8K problem
right, and a group whose rewards are all 0 teaches nothing).

Step ``s`` draws its problems and its samples from generators seeded with (seed, s), so a
run resumed from a checkpoint (model, AdamW, step) takes the same steps as one never stopped.
The log (``log.jsonl``) has an ``rl`` row per step (reward, groups with all-equal rewards,
KL to the start, reply length) and ``rl_eval`` rows (GSM8K-style pass@1 on held-out problems of
the task) at the start, every ``eval_interval`` steps and at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nblib import chatdata, checkpoint, evals, grpo, hardware, pretrain, train
from nblib.presets import UsageError
from nblib.processes import StopSignals
from nblib.runlog import RunLog
from nblib.runmode import is_fast, setup
from nblib.stages import check_chat_model, stage_checkpoint
from nblib.chatbpe import chat_bpe

TASKS = ("simple-math", "gsm8k")


@dataclass
class RLPreset:
    task: str = "simple-math"
    max_steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = evals.PRACTICE_REPLY_TOKENS
    lr: float = 2e-4
    warmup_steps: int = 5
    clip: float = 0.2
    kl_coef: float = 0.0
    epochs: int = 1
    minibatches: int = 1
    eval_interval: int = 20
    eval_problems: int = 100
    ckpt_interval: int = 10
    seed: int = 1337

    def grpo_config(self) -> grpo.GRPOConfig:
        return grpo.GRPOConfig(prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                               max_new_tokens=self.max_new_tokens, clip=self.clip, kl_coef=self.kl_coef,
                               average="token", epochs=self.epochs, minibatches=self.minibatches, lr=self.lr,
                               warmup_steps=self.warmup_steps)


RL_PRESETS = {
    # CPU size, on the 2-core machine: lr 2e-4 over 40 steps drifted (replies grew to 40 tokens, KL near 2 nats);
    # lr 1e-4 over 30 steps is the preset. Neither helps a model this small reliably: lesson 15 shows why.
    "cpu": RLPreset(lr=1e-4, max_steps=30, eval_interval=15),
    # the GPU presets: real GSM8K, a learning rate for larger models (not yet measured on a GPU)
    "colab-t4": RLPreset(task="gsm8k", max_steps=200, prompts_per_step=16, group_size=8, max_new_tokens=192, lr=1e-5,
                         eval_interval=50, eval_problems=400, ckpt_interval=25),
    "gpt2-124m": RLPreset(task="gsm8k", max_steps=500, prompts_per_step=32, group_size=16, max_new_tokens=256, lr=1e-5,
                          eval_interval=100, eval_problems=1319, ckpt_interval=50),
}
TINY_RL = dict(max_steps=3, prompts_per_step=2, group_size=4, max_new_tokens=8, eval_interval=2, eval_problems=4,
               ckpt_interval=2)


def load_reward(path: str):
    """``gsm8k_reward(reply, answer)`` from the Python file at ``path`` (lesson 15's exercise, written out by
    ``nblib.checks.chatbot.write_reward``): the RL stage then rewards with the learner's function."""
    return pretrain.load_learner_function(path, "gsm8k_reward", "--reward", "gsm8k_reward(reply, answer)")


def problems(task: str, split: str, data_dir: str | None, n: int, seed: int) -> list[dict]:
    """Problems of ``task``: GSM8K's train or test items; or for "simple-math", ``n`` course-made training
    problems, and for evaluation the practice GSM8K test set (``chatdata.load("gsm8k-test")``), the same
    problems the report card's eval scores."""
    if task == "gsm8k":
        return chatdata.load("gsm8k-train" if split == "train" else "gsm8k-test", data_dir)
    if split != "train":
        return chatdata.practice("gsm8k-test")
    rng = random.Random(f"{seed}-simple-math-{split}")
    return [chatdata.simple_math(rng, "train") for _ in range(n)]


class RLRun:
    def __init__(self, preset: RLPreset, init: Path, out: Path, data_dir: str | None, resume: bool,
                 resume_command: str, stop_at: int | None, device: torch.device, reward=evals.gsm8k_reward):
        self.p, self.out, self.device, self.stop_at, self.reward = preset, out, device, stop_at, reward
        self.resume_command = resume_command
        self.tokenizer = chat_bpe()
        self.started = time.perf_counter()
        self.cfg = preset.grpo_config()
        self.train_problems = problems(preset.task, "train", data_dir, 5000, preset.seed)
        self.eval_problems = problems(preset.task, "test", data_dir, preset.eval_problems, preset.seed)
        self.eval_problems = self.eval_problems[:preset.eval_problems]
        policy = checkpoint.load_model(init, device)
        self.ref = checkpoint.load_model(init, device).eval().requires_grad_(False)
        self.ckpt = out / pretrain.CHECKPOINT
        self.trainer = train.Trainer(policy, self.cfg.train_config(preset.max_steps), device)
        self.identity = {"task": preset.task, "seed": preset.seed, "prompts_per_step": preset.prompts_per_step,
                         "group_size": preset.group_size,
                         "init": checkpoint.read_metadata(init).get("sha256")}
        self.resumed = resume and self.ckpt.is_file()
        if self.resumed:
            saved = self.trainer.load(self.ckpt)["extra"].get("rl")
            if saved != self.identity:
                raise ValueError(f"{self.ckpt} was trained with other settings ({saved}); this run has "
                                 f"{self.identity}: resume with the same, or start afresh in another --out")
        out.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(out / "log.jsonl", append=self.resumed)

    def reward_fn(self, batch: list[dict]):
        tok = self.tokenizer
        return lambda i, completion: self.reward(evals.reply_of(completion, tok), batch[i]["answer"])

    def evaluate(self) -> None:
        result = evals.gsm8k(self.trainer.model.eval(), self.tokenizer, self.eval_problems,
                             max_new_tokens=self.p.max_new_tokens, reward=self.reward)
        self.log.write("rl_eval", step=self.trainer.steps_done, task=self.p.task, **result,
                       elapsed_s=round(time.perf_counter() - self.started, 3))

    def step(self, s: int) -> dict:
        rng = random.Random(f"{self.p.seed}-{s}")
        batch = rng.sample(self.train_problems, self.p.prompts_per_step)
        prompts = [evals.gsm8k_prompt(item["question"], self.tokenizer) for item in batch]
        generator = torch.Generator().manual_seed(self.p.seed * 100_003 + s)
        tok = self.tokenizer
        groups, results = grpo.step(self.trainer, self.ref, prompts, self.reward_fn(batch), self.cfg, tok.end_id,
                                    tok.pad_id, generator)
        row = grpo.health(groups, self.p.group_size)
        row["loss"] = torch.stack([r["loss"] for r in results]).mean().item()
        return row

    def save(self) -> None:
        self.trainer.save(self.ckpt, extra={"rl": self.identity})
        self.log.write("checkpoint", step=self.trainer.steps_done, path=str(self.ckpt))

    def train(self) -> dict:
        p, trainer = self.p, self.trainer
        stop = p.max_steps if self.stop_at is None else min(self.stop_at, p.max_steps)
        if trainer.steps_done >= p.max_steps:
            raise UsageError(f"{self.ckpt} is at step {trainer.steps_done}: nothing to train (pass --max_steps N)")
        self.log.write("start", step=trainer.steps_done, resumed=self.resumed, task=p.task, device=str(self.device))
        if not self.resumed:
            self.evaluate()
        with StopSignals() as signals:
            for s in range(trainer.steps_done, stop):
                row = self.step(s)
                done = trainer.steps_done
                self.log.write("rl", step=done, **row, elapsed_s=round(time.perf_counter() - self.started, 3))
                if pretrain.due(done, p.eval_interval, p.max_steps):
                    self.evaluate()
                if done == stop or pretrain.due(done, p.ckpt_interval, stop) or signals.signum is not None:
                    self.save()
                if signals.signum is not None and done < stop:
                    self.log.close()
                    raise pretrain.Interrupted(f"stopped after step {done} of {p.max_steps}, saved in {self.ckpt}. "
                                               f"To go on: {self.resume_command}", signals.signum)
        rows = [r for r in self.log_rows() if r["kind"] == "rl_eval"]
        train_rows = [r for r in self.log_rows() if r["kind"] == "rl"]
        summary = self.log.write("summary", step=trainer.steps_done, max_steps=p.max_steps,
                                 finished=trainer.steps_done == p.max_steps, task=p.task,
                                 pass1_start=rows[0]["pass@1"] if rows else None,
                                 pass1_end=rows[-1]["pass@1"] if rows else None,
                                 mean_reward_last=sum(r["reward"] for r in train_rows[-5:]) / max(1, len(train_rows[-5:])),
                                 wall_s=round(time.perf_counter() - self.started, 3), checkpoint=str(self.ckpt))
        self.log.close()
        return summary

    def log_rows(self) -> list[dict]:
        from nblib.runlog import read_log
        return read_log(self.out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nblib.chat_rl", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=sorted(RL_PRESETS))
    p.add_argument("--from", dest="init", required=True, metavar="DIR", help="the chat_sft run's --out folder")
    p.add_argument("--tiny", action="store_true", help="seconds on a CPU (also NBLIB_FAST=1)")
    p.add_argument("--out", help="this stage's folder (default runs/chat-rl-PRESET)")
    p.add_argument("--data-dir", help="prepared full sets (python -m nblib.chatdata prepare)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--stop-at", type=pretrain._parse_int)
    p.add_argument("--device")
    p.add_argument("--reward", metavar="FILE.py", help="reward with gsm8k_reward(reply, answer) from this file "
                                                      "(lesson 15's exercise) instead of nblib.evals'")
    for f in dataclasses.fields(RLPreset):
        kind = {"int": pretrain._parse_int, "float": pretrain._parse_float, "str": str}[f.type]
        p.add_argument(f"--{f.name}", type=kind, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    tiny = args.tiny or is_fast()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RLPreset) if getattr(args, f.name) is not None}
    preset = dataclasses.replace(RL_PRESETS[args.preset], **(TINY_RL if tiny else {}), **overrides)
    if preset.task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {preset.task!r}")
    bad = [n for n in ("max_steps", "prompts_per_step", "group_size", "max_new_tokens", "eval_interval",
                       "eval_problems", "ckpt_interval", "epochs", "minibatches") if getattr(preset, n) < 1]
    if bad or not preset.lr > 0:
        raise UsageError(f"these settings must be >= 1 (and --lr > 0): {', '.join('--' + n for n in bad) or '--lr'}")
    reward = load_reward(args.reward) if args.reward else evals.gsm8k_reward
    init = stage_checkpoint(args.init)
    config = checkpoint.read_metadata(init)["config"]["fields"]
    check_chat_model(config, init)
    if preset.max_new_tokens >= config["block_size"]:
        raise UsageError(f"--max_new_tokens {preset.max_new_tokens} must be below the model's context "
                         f"({config['block_size']})")
    out = Path(args.out or f"runs/chat-rl-{args.preset}{'-tiny' if tiny else ''}")
    if out.resolve() == Path(args.init).resolve():
        raise UsageError("--out must be a new folder, not the --from folder")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = pretrain.Env(device)
    resume = pretrain.resume_command(argv, env, "nblib.chat_rl")
    lock = pretrain.prepare_out(out, args, env)
    try:
        with hardware.threads(1 if tiny and device.type == "cpu" else None):
            setup(seed=preset.seed, device=str(device), quiet=True)
            return RLRun(preset, init, out, args.data_dir, args.resume, resume, args.stop_at, device,
                         reward).train()
    finally:
        lock.close()


if __name__ == "__main__":
    pretrain.cli(main)
