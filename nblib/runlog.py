"""The log of a training run (lesson 14): ``log.jsonl`` written by rank 0 and read back.

``RunLog`` writes one JSON object per line and a console line for each; ``read_log`` and
``log_rows`` read them back for the notebook's plots, ``launch`` starts
``python -m nblib.pretrain`` (or ``torchrun``) from a notebook, printing as a terminal would,
and ``measurement`` / ``measured_runs`` keep finished GPU runs as JSON in ``nblib/measured/``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROGRESS_S = 30.0                # a line on the console at least this often


class RunLog:
    """``log.jsonl`` and the console, written by rank 0 only (``path=None`` elsewhere).

    One JSON object per line, each with a ``kind``:

    - ``start``: ``step`` (0, or the checkpoint's on resume), ``resumed``, ``world_size``;
    - ``train``: ``step``, ``loss`` (mean training loss of the steps since the previous row,
      over all processes), ``lr`` and ``grad_norm`` (before clipping) of that step,
      ``tokens`` (seen so far), ``tokens_per_s`` (all processes), ``mfu`` (against the peak of
      one device times config.json's ``devices_in_peak``; None without a peak figure),
      ``memory_bytes`` (CUDA max allocated, or the CPU's peak RSS), ``elapsed_s``,
      ``grad_scale`` (float16 only);
    - ``eval``: ``step``, ``val_loss``, ``train_loss`` (fixed batches of each split), ``elapsed_s``;
    - ``checkpoint``: ``step``, ``path``;
    - ``sample``: ``step``, ``prompt``, ``text`` (from the final checkpoint);
    - ``debug`` (``--debug``): ``step``, ``rows`` and ``window_starts`` of each rank's first micro-batch;
    - ``summary``: the run's totals (see ``summary``).

    A resumed run appends to the same file; a step logged before the interruption and
    again after it has the same numbers (to rounding on a GPU).
    """

    def __init__(self, path: Path | None, append: bool = False):
        self.path = path
        # a fresh run starts a fresh log; a resumed one goes on with its own
        self.file = open(path, "a" if append else "w", encoding="utf-8") if path is not None else None
        self.printed = time.monotonic()  # when the console last got a line (see ``heartbeat``)

    def write(self, kind: str, **row) -> dict:
        row = {"kind": kind, **row}
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            line = describe_row(row)
            if line:
                self.say(line)
        return row

    def say(self, line: str) -> None:
        """A console line (rank 0), not a log row."""
        if self.file is not None:
            print(line, flush=True)
            self.printed = time.monotonic()

    def heartbeat(self, what) -> None:
        """``what()`` on the console if nothing was printed for ``PROGRESS_S`` seconds: a long
        run on a slow device is never silent for minutes."""
        if self.file is not None and time.monotonic() - self.printed >= PROGRESS_S:
            self.say(what())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def describe_row(row: dict) -> str | None:
    """One console line for a log row."""
    kind = row["kind"]
    if kind == "train":
        mfu = f" | MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        mem = f" | {row['memory_bytes'] / 2**30:.2f} GiB" if row["memory_bytes"] else ""
        return (f"step {row['step']:6d} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f}"
                f" | {row['tokens_per_s']:,.0f} tok/s{mfu}{mem}")
    if kind == "eval":
        return f"step {row['step']:6d} | val {row['val_loss']:.4f} | train {row['train_loss']:.4f}"
    if kind == "rl":  # lesson 15's RL stage
        return (f"step {row['step']:6d} | reward {row['reward']:.3f} | all-equal groups {row['all_equal']:.0%} | "
                f"KL {row['kl']:.4f} | reply {row['length']:.1f} tokens | loss {row['loss']:.4f}")
    if kind == "rl_eval":
        ks = " | ".join(f"{k} {v:.1%}" for k, v in row.items() if k.startswith("pass@"))
        return f"step {row['step']:6d} | {row['task']} held out ({row['n']} problems): {ks}"
    if kind == "sample":
        return f"--- sample from step {row['step']} ---\n{row['prompt']}{row['text']}\n---"
    if kind == "summary":
        return "summary: " + json.dumps(row)
    if kind in ("start", "checkpoint"):
        return f"{kind}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "kind")
    return None


MEASURED = Path(__file__).resolve().parent / "measured"  # runs measured on GPUs, committed as JSON


def read_log(out: str | Path) -> list[dict]:
    """The rows of ``out/log.jsonl``, in order (see ``RunLog`` for the kinds)."""
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no log at {path}: has the run started (and is --out right)?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def log_rows(log: list[dict], kind: str) -> list[dict]:
    return [r for r in log if r["kind"] == kind]


def set_aside(folder: str | Path) -> Path:
    """``folder``, ready for a new run: what an earlier pass of a notebook left there (a run's
    checkpoints, prepared data) moves to ``<folder>-previous-<time>`` beside it, never deleted (the
    programs refuse to start over a run without --resume or --overwrite). Returns ``folder``."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = folder.with_name(f"{folder.name}-previous-{stamp}"), 1
        while aside.exists():
            aside, n = folder.with_name(f"{folder.name}-previous-{stamp}-{n}"), n + 1
        folder.rename(aside)
        print(f"the earlier {folder} is kept in {aside} (delete it yourself when you no longer need it)")
    return folder


def launch(args: list[str], processes: int = 1, echo: bool = True, module: str = "nblib.pretrain") -> None:
    """Run ``python -m MODULE ARGS`` (``nblib.pretrain``, or one of lesson 15's stages) as a new
    process (under ``torchrun`` with ``processes`` > 1), printing its output as it comes, as a
    terminal would. A failed run raises ``RuntimeError`` with the end of its output."""
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", module, *args]
    else:
        command = [sys.executable, "-m", module, *args]
    env = dict(os.environ)
    if processes > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # CPU processes share the cores: one thread each
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        try:
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    print(line, end="", flush=True)
        except KeyboardInterrupt:  # the notebook's stop button: stop the run too, not only the reading
            proc.terminate()  # SIGTERM: the run saves a checkpoint and says how to resume
            for line in proc.stdout:
                print(line, end="", flush=True)
            proc.wait()
            raise
        code = proc.wait()
    if code != 0:
        tail = "".join(lines[-40:])
        raise RuntimeError(f"the run failed (exit status {code}): {' '.join(command)}\n--- its last lines ---\n{tail}")


def measurement(out: str | Path, preset: str | None = None) -> dict:
    """What a finished run measured, as one JSON-able record: the device, torch, the date, the
    command, config.json and the log's train, eval and summary rows (for ``nblib/measured/``)."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    log = read_log(out)
    summaries = log_rows(log, "summary")
    if not summaries:
        raise ValueError(f"{out}: the run has no summary row; it did not finish")
    return {"kind": "pretrain", "preset": preset, "device": config["device_name"], "torch": config["torch"],
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(config["command"]), "config": config,
            "train": log_rows(log, "train"), "eval": log_rows(log, "eval"), "summary": summaries[-1]}


def measured_runs(folder: str | Path | None = None) -> list[dict]:
    """The measured runs committed under ``nblib/measured/`` (``pretrain_*.json``), if any."""
    folder = Path(folder) if folder else MEASURED
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("pretrain_*.json"))]

