"""Training-step speed of ``python -m nblib.pretrain`` beside nanoGPT's ``train.py`` on a CPU.

The shape of issue 22: 4 layers x 128 wide, 4 heads, T=64, 12 rows a step, float32, no
torch.compile, the shakespeare-char recipe of both (lr 1e-3 warmed up over 100 steps, cosine
to 1e-4, AdamW betas (0.9, 0.99), weight decay 0.1, gradient clipping 1, no dropout)::

    python tools/bench_train_step.py                                   # ours only
    python tools/bench_train_step.py --nanogpt ~/nanoGPT --repeat 3    # both, alternately
    python tools/bench_train_step.py --nanogpt ~/nanoGPT --steps 200 --threads 1

Both programs run as they are, each in its own process, one after the other (ours, nanoGPT,
ours, ...). Both log every step, and a step's time is read from the program's own log:

- nanoGPT prints ``iter i: ... time X ms`` per iteration; the iterations that evaluated
  (every ``--steps``: at 0 and at the end) are left out, since their time includes it;
- ours logs ``tokens_per_s`` per step in ``log.jsonl``, which leaves out evaluation and
  checkpoint time (``nblib.pretrain.Speedometer``).

So tokens/s = counted steps x 768 tokens / their summed seconds, evaluation excluded in
both, and the first ``--warmup`` steps left out of both. The held-out loss is each program's
last evaluation, on ``--eval-batches`` random batches of 12 rows of the validation split
(the last 10% of tinyshakespeare for both; nanoGPT's ``train.bin``/``val.bin`` are written
here from the same text, with its character vocabulary, when its folder has none).
Ours pads the 65 characters to a vocabulary of 128 (its preset's ``vocab_multiple``); nanoGPT
keeps 65 and ties the embedding to the output layer. The rest is each model as it is:
Llama-style (RMSNorm, RoPE, SwiGLU) against GPT-2 (LayerNorm, learned positions, GELU).

Nothing is downloaded; stdlib and torch only (nanoGPT itself needs numpy).
"""
from __future__ import annotations

import argparse
import array
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nblib import data  # noqa: E402  (tinyshakespeare, from the package's data or the cache)

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
TOKENS_PER_STEP = SHAPE["block_size"] * SHAPE["batch_size"]
NANO_ITER = re.compile(r"^iter (\d+): loss [-\d.naninf]+, time ([\d.]+)ms")
NANO_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def prepare_nanogpt_data(nanogpt: Path) -> Path:
    """nanoGPT's ``data/shakespeare_char`` (its prepare.py's files) from our copy of
    tinyshakespeare, without the network: 90/10 split, uint16 ids of the sorted characters."""
    folder = nanogpt / "data" / "shakespeare_char"
    if (folder / "train.bin").is_file() and (folder / "val.bin").is_file() and (folder / "meta.pkl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    text = data.read_text("tinyshakespeare")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)
    for name, part in (("train", text[:cut]), ("val", text[cut:])):
        ids = array.array("H", (stoi[c] for c in part))  # uint16, little-endian on the usual machines
        if sys.byteorder != "little":
            ids.byteswap()
        with open(folder / f"{name}.bin", "wb") as f:
            ids.tofile(f)
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return folder


def run_ours(steps: int, eval_batches: int, out: Path, env: dict) -> tuple[list[float], float]:
    """(seconds of each step, last val loss) of ``python -m nblib.pretrain`` at the shape."""
    s = SHAPE
    command = [sys.executable, "-m", "nblib.pretrain", "--preset", "shakespeare-char", "--device", "cpu",
               "--no-compile", "--overwrite", "--out", str(out), "--dtype", "float32",
               "--n_layer", str(s["n_layer"]), "--n_head", str(s["n_head"]), "--n_embd", str(s["n_embd"]),
               "--seq_len", str(s["block_size"]), "--batch_size", str(s["batch_size"]),
               "--global_batch", str(s["batch_size"]), "--max_steps", str(steps), "--log_interval", "1",
               "--eval_interval", str(steps), "--eval_batches", str(eval_batches), "--ckpt_interval", str(steps),
               "--sample_tokens", "0"]
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    seconds = [TOKENS_PER_STEP / r["tokens_per_s"] for r in rows if r["kind"] == "train"]
    val = [r["val_loss"] for r in rows if r["kind"] == "eval"][-1]
    return seconds, val


def run_nanogpt(nanogpt: Path, steps: int, eval_batches: int, out: Path, env: dict) -> tuple[list[float], float]:
    """(seconds of each step, last val loss) of nanoGPT's ``train.py`` with its CPU flags at the shape."""
    s = SHAPE
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--dtype=float32", f"--out_dir={out}", "--log_interval=1", f"--eval_interval={steps}",
               f"--eval_iters={eval_batches}", f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
               *(f"--{k}={v}" for k, v in s.items())]
    result = subprocess.run(command, cwd=nanogpt, env=env, check=True, capture_output=True, text=True)
    seconds, val = {}, None
    for line in result.stdout.splitlines():
        if m := NANO_ITER.match(line):
            seconds[int(m[1])] = float(m[2]) / 1000
        elif m := NANO_EVAL.match(line):
            val = float(m[3])
    # the iterations that evaluated: their time includes the evaluation (and a checkpoint)
    return [t for i, t in sorted(seconds.items()) if i % steps != 0], val


def tokens_per_s(seconds: list[float], warmup: int) -> float:
    counted = seconds[warmup:]
    if not counted:
        raise SystemExit(f"no steps left after --warmup {warmup}: raise --steps")
    return len(counted) * TOKENS_PER_STEP / sum(counted)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (train.py, model.py, config/); omit: ours only")
    p.add_argument("--steps", type=int, default=2000, help="training steps per run (default 2000, as the issue)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing (default 10)")
    p.add_argument("--eval-batches", type=int, default=200, help="batches per split in the final evaluation")
    p.add_argument("--repeat", type=int, default=1, help="runs of each program, alternately (default 1)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: torch's choice)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NBLIB_FAST", None)  # FAST mode would shrink our run to its tiny form
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    programs = {"ours": lambda out: run_ours(args.steps, args.eval_batches, out, env)}
    if args.nanogpt:
        if not (args.nanogpt / "train.py").is_file():
            p.error(f"--nanogpt {args.nanogpt} has no train.py: pass the folder of a nanoGPT checkout")
        prepare_nanogpt_data(args.nanogpt)
        programs["nanoGPT"] = lambda out: run_nanogpt(args.nanogpt, args.steps, args.eval_batches, out, env)
    results = {name: [] for name in programs}
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        for r in range(args.repeat):
            for name, run in programs.items():
                seconds, val = run(Path(tmp) / f"{name}-{r}")
                speed = tokens_per_s(seconds, args.warmup)
                results[name].append((speed, val))
                print(f"run {r + 1}/{args.repeat} {name:8s} {speed:9,.0f} tokens/s  held-out loss {val:.4f}", flush=True)
    print(f"\n{args.steps} steps of {TOKENS_PER_STEP} tokens ({SHAPE}), float32, CPU, "
          f"threads={args.threads or 'default'}; tokens/s over steps {args.warmup}+, evaluation excluded")
    for name, runs in results.items():
        print(f"{name:8s} median {statistics.median(s for s, _ in runs):9,.0f} tokens/s   "
              f"held-out loss {statistics.median(v for _, v in runs):.4f}")
    if "nanoGPT" in results:
        ratios = [o / n for (o, _), (n, _) in zip(results["ours"], results["nanoGPT"])]
        print(f"ours / nanoGPT: {statistics.median(ratios):.2f}x (median of {len(ratios)} alternating pairs)")


if __name__ == "__main__":
    main()
