"""The pre-training program of lesson 14: one file that trains a Llama-style model on one
device, and runs unchanged under ``torchrun`` on several GPUs and machines (DDP).

    python -m nblib.pretrain --preset shakespeare-char --out runs/char          # one GPU, or the CPU
    torchrun --standalone --nproc_per_node=8 -m nblib.pretrain --preset gpt2-124m --out runs/124m
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m nblib.pretrain --preset gpt2-124m --out /shared/runs/124m            # two machines
    python -m nblib.pretrain --preset gpt2-124m --tiny --out /tmp/t               # seconds on a CPU
    python -m nblib.pretrain --preset shakespeare-char --lr 3e-4 --max_steps 2000  # any Preset field

Every piece comes from a lesson and is imported, not rewritten: the model (``nblib.llama``),
the optimizer step with its schedule, clipping, accumulation, autocast and GradScaler
(``nblib.train.Trainer``), checkpoints (``nblib.checkpoint``), the peak FLOP/s table and
MFU (``nblib.hardware``), token shards (``nblib.shards``). What is new here is what a run
at scale adds around them:

- **Speed**: bfloat16 autocast where the GPU has it (float16 with a GradScaler where it
  does not, float32 on a CPU), TF32 matmuls, SDPA (flash) attention, ``torch.compile``
  (on by default on CUDA), fused AdamW (on CUDA and the CPU), the vocabulary padded to a multiple of 128,
  no host sync inside a step (losses stay on the device until a log row reads them),
  batches from memory-mapped shards, copied from pinned memory without blocking.
- **Data parallelism**: under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the
  environment) every process holds a copy of the model (``DistributedDataParallel``) and
  reads its own rows; the backward pass averages the gradients of all processes. The
  global batch is fixed by the preset: ``accum_steps = global_batch / (batch_size *
  processes)`` micro-batches per step, and DDP's all-reduce runs only on the last one
  (``no_sync`` on the others). Step s reads the same rows however the batch is split
  (``nblib.shards.rank_rows``), so 1 GPU and 8 GPUs train the same model, up to rounding.
- **Only rank 0** prints, evaluates, samples, writes the log and saves.
- **Checkpoints** hold the model, AdamW's moments, the step, the RNG states and the data
  order; ``--resume`` continues where the checkpoint stopped, on any number of processes.
  On a CPU with the same number of processes the losses equal the uninterrupted run's bit
  for bit; on GPUs (some CUDA kernels add in a varying order) and across process counts
  they agree to rounding. Every process reads the checkpoint: on several machines,
  ``--out`` must be a disk they share. ``best.safetensors`` keeps the weights with the
  lowest val loss so far.

The program's pieces: the presets (``nblib.presets``), the processes, DDP, signals and the run
lock (``nblib.processes``), the log and reading it back from a notebook (``nblib.runlog``);
here, the training run itself (``TrainingRun``), its measurements and the command line.

The run writes, in ``--out``: ``config.json`` (the settings and what they imply),
``log.jsonl`` (one JSON object per line, see ``nblib.runlog.RunLog``) and ``ckpt.safetensors``.

**What it survives.** One run per ``--out`` at a time (``run.lock``, held with
``fcntl.flock``: the operating system releases it when the process ends, even killed). A
new run refuses an ``--out`` that holds a run unless ``--resume`` (go on) or ``--overwrite``
(the old run's files move to ``OUT/previous-<time>/``; nothing is deleted). Ctrl-C or
SIGTERM stop every process after the step it is in (several processes: at the next log
row, all at the same step); rank 0 saves a checkpoint and the program exits with one line
giving the command that resumes (to the same losses as a run never stopped). SIGKILL loses
the steps since the last checkpoint, never the checkpoint: files are written to a
temporary name, flushed and renamed. Every flag is checked before anything starts. A loss or weight that is not
finite stops the run without saving it: the last checkpoint keeps good weights. Checkpoints
carry a sha256 (``nblib.checkpoint``), so a damaged one is an error, not a silent resume.
On a CPU, a run estimated to take long says so first (and how to make it short), and a
line of progress comes at least every 30 s.

**Training longer.** ``--resume --max_steps N``, N larger than before, continues a finished
(or unfinished) run up to step N. The learning-rate schedule is fixed when a run starts: it
still ends at the first ``max_steps``, and the steps after it train at ``min_lr`` (where
the cosine ended), so the steps already taken keep their meaning. For a cosine over N steps,
start a new run with ``--max_steps N``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nblib import checkpoint, data, hardware, shards
from nblib.llama import Llama, generate, resize_vocab
from nblib.presets import PRESETS, Preset, UsageError, accum_steps, check_preset, preset_model, tiny
from nblib.processes import Env, StopSignals, barrier, init_distributed, lock_out, unwrap, wrap
from nblib.runlog import RunLog, measurement
from nblib.runmode import is_fast, setup
from nblib.train import TrainConfig, Trainer, autocast_context, lr_at, next_token_loss, resolve_dtype


CHECKPOINT = "ckpt.safetensors"  # everything a resume needs, at the last checkpoint step
BEST = "best.safetensors"        # the weights with the lowest val loss so far
RUN_FILES = (CHECKPOINT, BEST, "config.json", "log.jsonl")  # what a run writes (moved aside by --overwrite)
LONG_RUN_S = 600.0               # a CPU run estimated longer than this is told how to make it short


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; nothing was saved from then on."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run stopped after a step and saved; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ---------------------------------------------------------------------------- presets


@dataclass
class RunConfig(TrainConfig):
    """``nblib.train``'s TrainConfig, checked on resume, except for how the step's rows are split
    into processes and micro-batches (``global_batch`` is checked instead: it is what fixes
    the run) and how often it evaluates: a run may resume on another number of GPUs."""

    _RESUMABLE_CHANGES = TrainConfig._RESUMABLE_CHANGES + ("batch_size", "grad_accum_steps", "eval_interval",
                                                           "eval_batches", "fused_adamw")


def train_config(preset: Preset, accum: int, ckpt: Path, dtype: str = "float32") -> RunConfig:
    """The run's TrainConfig, with AdamW's fused kernel on CUDA and on the CPU too: about 5% of the
    step on a CPU (``nblib.train.configure_optimizer`` says why the lessons leave it off there)."""
    p = preset
    return RunConfig(max_steps=p.max_steps, batch_size=p.batch_size, block_size=p.seq_len, grad_accum_steps=accum,
                     lr=p.lr, min_lr=p.min_lr, warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
                     betas=(p.beta1, p.beta2), grad_clip=p.grad_clip or None, eval_interval=p.eval_interval,
                     eval_batches=p.eval_batches, dtype=dtype, seed=p.seed, checkpoint_path=str(ckpt),
                     checkpoint_interval=p.ckpt_interval, log_interval=p.log_interval, fused_adamw=True)


# ---------------------------------------------------------------------------- processes


# ---------------------------------------------------------------------------- measuring

def peak_for(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for the matmuls this run does, where the figure comes from);
    None when nblib.hardware has no sourced figure for this GPU (better no MFU than a wrong one)."""
    kind = "tf32" if device.type == "cuda" and dtype == "float32" else dtype  # TF32 matmuls are on
    try:
        return hardware.device_peak(device, kind)
    except (KeyError, ValueError) as err:
        return None, f"no MFU: {err}"


def run_mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """MFU of the whole run: its FLOP/s over the peak of all its devices (= the MFU of each)."""
    return None if peak is None else hardware.mfu(flops_per_token, tokens_per_s, peak * devices)


def logged_mfu(train_rows: list[dict], flops_per_token: float, peak_per_device: float, devices: int = 1) -> float:
    """The run's steady MFU from its log's ``train`` rows (lesson 14's exercise), as its summary row
    reports it: every interval between rows but the first (warm-up, compilation) unless it is the
    only one; their tokens over their seconds (a row's ``tokens_per_s`` covers its own interval,
    and intervals can differ in length: a mean of the rows' speeds would weigh them wrongly)."""
    before = [0] + [row["tokens"] for row in train_rows[:-1]]
    intervals = [(row["tokens"] - b, (row["tokens"] - b) / row["tokens_per_s"]) for row, b in zip(train_rows, before)]
    kept = intervals[1:] or intervals
    tokens_per_s = sum(t for t, _ in kept) / sum(s for _, s in kept)
    return hardware.mfu(flops_per_token, tokens_per_s, peak_per_device * devices)


def choose_batch_size(measured: dict[int, float], budget_bytes: float, global_batch: int) -> tuple[int, float, float]:
    """(B, fixed, per_row): the largest micro-batch B that divides ``global_batch`` and fits
    ``budget_bytes``, by a least-squares line ``bytes = fixed + per_row * B`` through the
    ``measured`` {B: peak bytes} (lesson 14's exercise). ValueError when not even B = 1 fits."""
    if len(measured) < 2:
        raise ValueError(f"a line needs measurements at 2 or more batch sizes, got {sorted(measured)}")
    sizes = sorted(measured)
    per_row, fixed = np.polyfit(sizes, [measured[b] for b in sizes], 1)
    for b in sorted((d for d in range(1, global_batch + 1) if global_batch % d == 0), reverse=True):
        if fixed + per_row * b <= budget_bytes:
            return b, float(fixed), float(per_row)
    raise ValueError(f"not even one row fits: {fixed + per_row:,.0f} bytes predicted for B = 1, budget "
                     f"{budget_bytes:,.0f}; use a smaller model, shorter rows, or a device with more memory")


def memory_bytes(device: torch.device) -> int | None:
    """The most memory this process has used: CUDA's max allocated, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class Speedometer:
    """Tokens per second between log rows, leaving out time spent evaluating and saving.
    The first interval includes warm-up (torch.compile's compilation): ``steady`` leaves it out."""

    def __init__(self, tokens_per_step: int, device: torch.device):
        self.tokens_per_step, self.device = tokens_per_step, device
        self.steps, self.intervals = 0, []  # (steps, seconds) per log row
        self.restart()

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, a checkpoint) out of the current interval."""
        self.mark += seconds

    def read(self) -> float:
        hardware.synchronize(self.device)  # CUDA runs ahead of Python: wait before reading the clock
        seconds = time.perf_counter() - self.mark
        self.intervals.append((self.steps, seconds))
        tokens_per_s = self.steps * self.tokens_per_step / max(seconds, 1e-9)
        self.steps = 0
        self.restart()
        return tokens_per_s

    def steady(self) -> float | None:
        counted = self.intervals[1:] or self.intervals
        steps, seconds = sum(s for s, _ in counted), sum(t for _, t in counted)
        return steps * self.tokens_per_step / seconds if seconds else None


# ---------------------------------------------------------------------------- data

def shard_folder(preset: Preset, data_dir: str | None, env: Env) -> Path:
    """Where the preset's shards are; tinyshakespeare is prepared on the spot (by one process
    per machine; the others wait), FineWeb-edu and others must be prepared beforehand."""
    source = preset.data
    if data_dir:
        folder = Path(data_dir)
    elif Path(source).is_dir():
        folder = Path(source)
    else:
        folder = data.cache_dir() / "shards" / source
    if source in shards.PACKAGED_SOURCES:
        if env.local_rank == 0:
            shards.ensure_prepared(source, folder)
        barrier()
    elif not (folder / shards.MANIFEST).is_file():
        how = (f"python -m nblib.shards prepare --source {source} --out {folder} --tokens N"
               if not Path(source).is_dir() else "python -m nblib.shards prepare --source SOURCE --out FOLDER")
        raise FileNotFoundError(
            f"no prepared shards for {source!r} in {folder}. Prepare them first, e.g.\n  {how}\n"
            f"(fineweb-edu needs `pip install datasets` and the network; gpt2-124m reads 10B tokens, "
            f"20 GB of shards) and pass --data-dir to where they are.")
    return folder


def data_identity(folder: Path, preset: Preset) -> dict:
    """What fixes which rows each step reads: the shards (their manifest's hash), the global
    batch and the order's seed. A checkpoint resumes only with the same."""
    manifest = hashlib.sha256((folder / shards.MANIFEST).read_bytes()).hexdigest()
    return {"manifest_sha256": manifest, "global_batch": preset.global_batch, "seq_len": preset.seq_len,
            "order_seed": preset.seed if preset.shuffle else None}


# ---------------------------------------------------------------------------- the run

@dataclass
class Options:
    """How to run, apart from what to train (the preset)."""

    out: Path
    data_dir: str | None = None
    resume: bool = False            # continue from out/ckpt.safetensors if it exists (else start afresh)
    overwrite: bool = False         # start afresh in an --out that holds a run (moved to out/previous-<time>/)
    resume_command: str = ""        # the command that resumes this run, said when it is interrupted
    stop_at: int | None = None      # stop (and save) after this step, as if interrupted
    compile: bool | None = None     # None: on CUDA only
    checksums: bool = True          # hash every shard before reading it (~1 s per GB)
    debug: bool = False             # log each rank's first rows
    average_gradients: str | None = None  # a .py file whose average_gradients(model) replaces DDP (lesson 14)


def train_loss(runner: torch.nn.Module):
    """``Trainer.step``'s loss for a training micro-batch ``(x, y, last)``.

    The forward goes through the wrappers (compiled, DDP). DDP decides in its forward
    whether this micro-batch's backward all-reduces the gradients; on all but the
    ``last`` micro-batch of a step, ``no_sync`` makes it accumulate them locally instead,
    so the step costs one all-reduce however many micro-batches it has."""
    def loss_fn(_model, batch):
        x, y, last = batch
        skip_sync = isinstance(runner, DDP) and not last
        with runner.no_sync() if skip_sync else contextlib.nullcontext():
            _, loss = runner(x, y)
        return loss
    return loss_fn


def load_learner_function(path: str, name: str, flag: str, signature: str):
    """The function ``name`` from the Python file at ``path``: a learner's exercise, written to a file for a
    program (a process of its own) to run; ``flag`` and ``signature`` go into the errors."""
    import importlib.util
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file (a .py file that defines {signature})")
    spec = importlib.util.spec_from_file_location(f"learners_{name}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise ValueError(f"{flag} {path}: the file defines no function {signature}")
    return getattr(module, name)


def load_average_gradients(path: str):
    """``average_gradients(model)`` from the Python file at ``path`` (lesson 14's exercise, written out
    by ``nblib.checks.pretrain.write_average_gradients``): with it, the processes train without DDP and
    call it after each step's backward passes to average the gradients by hand."""
    return load_learner_function(path, "average_gradients", "--average-gradients", "average_gradients(model)")


def eval_batches(windows: dict[str, shards.Windows], batch_size: int, device: torch.device, tick=None):
    """``get_batch(split, generator)`` for ``nblib.train.estimate_loss``: windows drawn with its
    seeded generator, so every evaluation scores the same batches. ``tick(split, n)`` is
    called before the n-th batch (1, 2, ...) of each split: a long evaluation shows progress."""
    counts = dict.fromkeys(windows, 0)

    def get_batch(split, generator):
        counts[split] += 1
        if tick is not None:
            tick(split, counts[split])
        rows = torch.randint(windows[split].n_windows, (batch_size,), generator=generator).tolist()
        return windows[split].batch(rows, device)
    return get_batch


def sample_text(path: Path, manifest: dict, device: torch.device, n_tokens: int, seed: int) -> tuple[str, str]:
    """(prompt, continuation) sampled from the checkpoint at ``path``, loaded into a plain model
    as anyone loading it would (temperature 0.8, top-k 200, KV cache), without the padding tokens."""
    model = resize_vocab(checkpoint.load_model(path, device), manifest["vocab_size"])
    tokenizer = shards.tokenizer_for(manifest)
    if manifest["eot_token"] is not None:
        prompt_ids = [manifest["eot_token"]]  # documents begin after <|endoftext|>
    else:
        prompt_ids = tokenizer.encode("\n" if "\n" in manifest["chars"] else manifest["chars"][0])
    n = max(0, min(n_tokens, model.config.block_size - len(prompt_ids)))
    out = generate(model, torch.tensor([prompt_ids], device=device), n, temperature=0.8, top_k=200,
                   generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(prompt_ids), tokenizer.decode(out[0, len(prompt_ids):].tolist())


def due(done: int, interval: int, last: int) -> bool:
    """Whether something that happens every ``interval`` steps, and after step ``last``, happens now."""
    return done % interval == 0 or done == last


class StopEvaluation(Exception):
    """A stop was asked for during an evaluation: it is cut short (and not logged)."""


def duration(seconds: float) -> str:
    """``seconds`` for a person: "40 s", "12 min", "3 h 10 min", "2 d 3 h"."""
    minutes, hours, days = seconds / 60, seconds / 3600, seconds / 86400
    if days >= 1:
        return f"{int(days)} d {int(hours % 24)} h"
    if hours >= 1:
        return f"{int(hours)} h {int(minutes % 60)} min"
    return f"{minutes:.0f} min" if minutes >= 1 else f"{seconds:.0f} s"


class TrainingRun:
    """One process's part of a training run: everything is built in ``__init__``; ``train()``
    runs the steps and returns the summary (rank 0; the others return {})."""

    def __init__(self, preset: Preset, opts: Options, env: Env):
        self.preset, self.opts, self.env = preset, opts, env
        self.started = time.perf_counter()
        device = env.device
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever float32 matmuls remain
        self.load_data()  # self.windows {"train", "val"} and self.identity (what fixes the data order)
        self.accum = accum_steps(preset, env.world_size)
        # model and trainer
        torch.manual_seed(preset.seed)  # the same initial weights in every process
        model = self.new_model().to(device)
        self.compile = device.type == "cuda" if opts.compile is None else opts.compile
        # the gradients are averaged over the processes by DDP, or by the learner's function (--average-gradients)
        by_hand = load_average_gradients(opts.average_gradients) if opts.average_gradients else None
        self.gradient_sync = ("none (one process)" if env.world_size == 1 else
                              "DDP" if by_hand is None else f"average_gradients from {opts.average_gradients}")
        self.runner = wrap(model, env, self.compile, ddp=by_hand is None)
        # The trainer holds the plain model: what it saves has the names a plain model loads.
        self.ckpt = opts.out / CHECKPOINT
        self.dtype = resolve_dtype(device, preset.dtype)
        self.resumed = opts.resume and self.ckpt.is_file()
        # the lr schedule is the one the run began with, even if --max_steps now goes further
        self.schedule_steps = self.saved_schedule() if self.resumed else preset.max_steps
        schedule = dataclasses.replace(preset, max_steps=self.schedule_steps)
        self.trainer = Trainer(unwrap(self.runner), train_config(schedule, self.accum, self.ckpt, self.dtype),
                               device, preset.tokens_per_step,
                               after_backward=by_hand if by_hand is not None and env.world_size > 1 else None)
        if self.resumed:
            self.resume()
        # measuring and logging
        self.peak, self.peak_source = peak_for(device, self.dtype)
        self.flops_per_token = model.flops_per_token(preset.seq_len)
        self.speed = Speedometer(preset.tokens_per_step, device)
        self.evals = list(self.trainer.history.val)  # val losses so far (a resumed run has some)
        if env.is_main:
            opts.out.mkdir(parents=True, exist_ok=True)
            (opts.out / "config.json").write_text(json.dumps(self.info(), indent=1))
        self.log = RunLog(opts.out / "log.jsonl" if env.is_main else None, append=self.resumed)
        self.signals = StopSignals()

    def load_data(self) -> None:
        """The token shards' windows (lesson 15's stages read conversations instead)."""
        preset, opts, env = self.preset, self.opts, self.env
        self.folder = shard_folder(preset, opts.data_dir, env)
        # one process per machine hashes the shards (the others check their sizes): the same files,
        # read once; if they are corrupt, its error ends the run (torchrun stops every process)
        hashed = opts.checksums and env.local_rank == 0
        train_seed = preset.seed if preset.shuffle else None
        self.windows = {"train": shards.Windows(shards.TokenShards(self.folder, "train", hashed),
                                                preset.seq_len, train_seed),
                        "val": shards.Windows(shards.TokenShards(self.folder, "val", hashed), preset.seq_len)}
        self.manifest = self.windows["train"].tokens.manifest
        self.identity = data_identity(self.folder, preset)

    def new_model(self) -> torch.nn.Module:
        """The model at step 0: freshly initialised (lesson 15's stages start from the stage before)."""
        return Llama(preset_model(self.preset, self.manifest["vocab_size"]))

    def saved_schedule(self) -> int:
        """The max_steps of the checkpoint's lr schedule (the run's first --max_steps)."""
        saved = checkpoint.read_metadata(self.ckpt)["extra"].get("train_config", {})
        return saved.get("max_steps", self.preset.max_steps)

    def resume(self) -> None:
        """Model, optimizer, step, RNG, history and GradScaler from the checkpoint (nblib.train
        checks the model config and the TrainConfig), and a check that the data order is the same."""
        saved = self.trainer.load(self.ckpt)["extra"].get("data_order")
        if saved != self.identity:
            raise ValueError(f"{self.ckpt} was trained with another data order ({saved}); this run has "
                             f"{self.identity}. Resuming would not continue the same run: use the same shards, "
                             "global_batch, seq_len and seed, or start afresh in another --out folder")
        done = self.trainer.steps_done
        if self.preset.max_steps <= done:
            raise UsageError(f"{self.ckpt} is at step {done} and --max_steps is {self.preset.max_steps}: nothing "
                             f"to train. To train longer, pass --resume --max_steps N with N > {done} (the lr "
                             f"schedule still ends at step {self.schedule_steps}; later steps train at min_lr)")

    def train(self) -> dict:
        p, env, trainer = self.preset, self.env, self.trainer
        stop = p.max_steps if self.opts.stop_at is None else min(self.opts.stop_at, p.max_steps)
        self.log.write("start", step=trainer.steps_done, resumed=self.resumed, world_size=env.world_size,
                       accum_steps=self.accum, device=str(env.device), dtype=self.dtype, compile=self.compile,
                       gradient_sync=self.gradient_sync)
        if env.is_main and env.device.type == "cpu":
            self.estimate(stop)
        try:
            with self.signals:
                if env.is_main and not self.resumed:
                    self.evaluate()  # the untrained model: about ln(vocab_size)
                if env.world_size == 1 and self.signals.signum is not None:  # stopped during that evaluation
                    self.interrupted(trainer.steps_done, saved=False)
                self.steps(stop)
                return self.finish()
        finally:
            self.log.close()

    def steps(self, stop: int) -> None:
        """Train up to step ``stop``; save every ckpt_interval steps, at ``stop``, and when asked to stop."""
        p, env, trainer = self.preset, self.env, self.trainer
        loss_fn = train_loss(self.runner)
        pending = []  # each step's loss, still on the device: reading it would wait for the GPU
        first, started = trainer.steps_done, time.perf_counter()
        for step in range(trainer.steps_done, stop):
            if self.opts.debug and step == trainer.steps_done:
                self.log_first_rows(step)
            try:
                result = trainer.step(self.micro_batches(step), loss_fn)
            except FloatingPointError as err:  # nblib.train's own look at the losses it read back
                self.diverged(trainer.steps_done, str(err).split(";")[0])
            pending.append(result["loss"])
            self.speed.steps += 1
            done = trainer.steps_done
            self.log.heartbeat(lambda: self.progress(done, stop, (time.perf_counter() - started) / (done - first)))
            if due(done, p.log_interval, stop):
                self.log_train(done, pending, result["grad_norm"])
                pending = []
            if env.is_main and due(done, p.eval_interval, p.max_steps):
                self.evaluate()
            stopping = done < stop and self.stop_requested(done)
            if done == stop or due(done, p.ckpt_interval, stop) or stopping:
                self.check_weights(done)  # every process: never save weights that are not finite
                if env.is_main:
                    self.save()
            if stopping:
                self.interrupted(done)

    def stop_requested(self, done: int) -> bool:
        """Whether a signal asked to stop, agreed by every process: they must stop after the same
        step. Several processes compare at log rows only (the host waits for the device there anyway)."""
        if self.env.world_size > 1:
            if not due(done, self.preset.log_interval, self.preset.max_steps):
                return False
            flag = torch.tensor([self.signals.signum or 0], device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signals.signum = int(flag.item()) or None
        return self.signals.signum is not None

    def interrupted(self, done: int, saved: bool = True) -> None:
        """After the checkpoint of a stop: every process raises ``Interrupted``, saying how to resume."""
        name = signal.Signals(self.signals.signum).name
        self.log.write("stopped", step=done, signal=name, checkpoint=str(self.ckpt) if saved else None)
        self.log.close()
        barrier()  # the others wait for rank 0's checkpoint
        what = f"saved in {self.ckpt}" if saved else "before the first step: nothing to save"
        raise Interrupted(f"{name}: stopped after step {done} of {self.preset.max_steps}, {what}. "
                          f"To go on: {self.opts.resume_command}", self.signals.signum)

    def check_weights(self, done: int) -> None:
        """``TrainingDiverged`` if a weight is NaN or infinite (the same on every process: DDP keeps them equal)."""
        finite = torch.stack([w.isfinite().all() for w in self.trainer.model.parameters()]).all()
        if not finite.item():
            self.diverged(done, f"the weights are no longer finite after step {done}")

    def diverged(self, done: int, what: str) -> None:
        last = checkpoint.read_metadata(self.ckpt)["step"] if self.ckpt.is_file() else None
        self.log.write("stopped", step=done, reason=what)
        kept = (f"{self.ckpt} keeps the weights of step {last}, all finite" if last is not None
                else "no checkpoint had been saved")
        raise TrainingDiverged(
            f"{what}: training stopped, and nothing was saved from step {done} on; {kept}. Start again with a "
            "lower --lr (or --grad_clip 1 if it is 0), with --overwrite to keep this run's files in "
            "OUT/previous-<time>/")

    def estimate(self, stop: int) -> None:
        """Rank 0 on a CPU: time a few forward passes of a micro-batch and, if the run looks long,
        say how long and how to make it short, before the first evaluation (minutes, on a CPU)."""
        started = time.perf_counter()
        x, y, _ = self.micro_batches(self.trainer.steps_done)[0]
        model, times = unwrap(self.runner, keep_compiled=True), []
        with torch.no_grad(), autocast_context(self.env.device, self.dtype):
            for _ in range(3):
                begun = time.perf_counter()
                model(x, y)
                times.append(time.perf_counter() - begun)
        forward = min(times[1:])  # the first one warms up
        steps, step_s = stop - self.trainer.steps_done, 3 * forward * self.accum  # a backward costs ~2 forwards
        evals = 1 + steps // self.preset.eval_interval
        total = steps * step_s + evals * 2 * self.preset.eval_batches * forward
        if total > LONG_RUN_S:
            self.log.say(f"estimate: {steps:,} steps of about {step_s:.3g} s on this CPU and {evals} evaluations "
                         f"(timed from forward passes): about {duration(total)}. A GPU-sized run: add --tiny for one "
                         "of seconds, or shorten it (--max_steps, --n_layer, --n_embd, --seq_len), or use a GPU")
        self.speed.exclude(time.perf_counter() - started)

    def progress(self, done: int, stop: int, step_s: float) -> str:
        return f"step {done:6d} of {stop} | {step_s:.3g} s a step | about {duration((stop - done) * step_s)} left"

    def micro_batches(self, step: int) -> list[tuple]:
        """This process's micro-batches of ``step``: ``(x, y, last)``, ``last`` for the one that syncs."""
        p, env = self.preset, self.env
        return [(*self.windows["train"].batch(shards.rank_rows(step, m, env.rank, p.batch_size, env.world_size,
                                                               self.accum), env.device), m == self.accum - 1)
                for m in range(self.accum)]

    def log_train(self, done: int, pending: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
        """A ``train`` row: the mean loss of the steps since the last row, over every process
        (each holds the loss of its own rows), and how fast they went."""
        losses = torch.stack(pending)
        if self.env.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.env.world_size
        row = dict(step=done, loss=losses.mean().item(), lr=lr_at(done - 1, self.trainer.cfg),
                   grad_norm=grad_norm.item(), tokens=done * self.preset.tokens_per_step)
        tokens_per_s = self.speed.read()
        row.update(tokens_per_s=tokens_per_s, mfu=run_mfu(self.flops_per_token, tokens_per_s, self.peak,
                                                          self.env.devices),
                   memory_bytes=memory_bytes(self.env.device), elapsed_s=self.elapsed())
        if self.trainer.scaler is not None:
            row["grad_scale"] = self.trainer.scaler.get_scale()
        self.log.write("train", **row)
        if not math.isfinite(row["loss"]) and self.trainer.scaler is None:  # float16's scaler skips such steps
            self.diverged(done, f"the training loss is {row['loss']} at step {done}")  # the same on every process

    def evaluate(self) -> None:
        """Mean loss on fixed batches of both splits (rank 0), through the compiled model but not DDP."""
        started = time.perf_counter()
        step, n = self.trainer.steps_done, self.preset.eval_batches

        def tick(split, i):
            if self.signals.signum is not None:
                raise StopEvaluation
            self.log.heartbeat(lambda: f"evaluating at step {step}: {split} batch {i} of {n}")

        get_batch = eval_batches(self.windows, self.preset.batch_size, self.env.device, tick)
        try:
            result = self.trainer.evaluate(get_batch,
                                           lambda _model, batch: next_token_loss(unwrap(self.runner, keep_compiled=True), batch))
        except StopEvaluation:
            self.speed.exclude(time.perf_counter() - started)
            return
        best = not self.evals or result["val"] < min(self.evals)
        self.evals.append(result["val"])
        if best and self.trainer.steps_done > 0:
            # the best model so far, weights only: a small corpus read many times overfits late in a run
            checkpoint.save_checkpoint(self.opts.out / BEST, self.trainer.model, step=self.trainer.steps_done, rng=False)
        self.log.write("eval", step=self.trainer.steps_done, val_loss=result["val"], train_loss=result["train"],
                       best=best, elapsed_s=self.elapsed())
        self.speed.exclude(time.perf_counter() - started)  # evaluation time is not training time

    def save(self) -> None:
        started = time.perf_counter()
        rows_done = self.trainer.steps_done * self.preset.global_batch  # the data position (rows of the order)
        self.trainer.save(self.ckpt, extra={"data_order": self.identity, "rows_done": rows_done})
        self.log.write("checkpoint", step=self.trainer.steps_done, path=str(self.ckpt))
        self.speed.exclude(time.perf_counter() - started)

    def finish(self) -> dict:
        """Rank 0: a sample from the final checkpoint and the summary row. Everyone: wait for it."""
        summary = {}
        if self.env.is_main:
            if not self.ckpt.is_file():
                self.save()  # a run of 0 steps still leaves a checkpoint
            finished = self.trainer.steps_done == self.preset.max_steps
            if finished and self.preset.sample_tokens > 0:
                prompt, text = self.sample()
                self.log.write("sample", step=self.trainer.steps_done, prompt=prompt, text=text)
            summary = self.log.write("summary", **self.summary(finished))
        barrier()  # the other processes wait for rank 0's evaluation, sample and checkpoint
        return summary

    def sample(self) -> tuple[str, str]:
        """(prompt, text) sampled from the final checkpoint."""
        return sample_text(self.ckpt, self.manifest, self.env.device, self.preset.sample_tokens, self.preset.seed)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def log_first_rows(self, step: int) -> None:
        """Each rank's rows and window starts of its first micro-batch, gathered on rank 0 (--debug)."""
        env = self.env
        rows = list(shards.rank_rows(step, 0, env.rank, self.preset.batch_size, env.world_size, self.accum))
        mine = (rows, [self.windows["train"].start(k) for k in rows])
        everyone = [mine]
        if env.world_size > 1:
            everyone = [None] * env.world_size
            dist.all_gather_object(everyone, mine)
        self.log.write("debug", step=step, rows=[r for r, _ in everyone], window_starts=[s for _, s in everyone])

    def info(self) -> dict:
        """config.json: the settings and what they imply."""
        p, env, model = self.preset, self.env, self.trainer.model
        return dict(
            preset=dataclasses.asdict(p), model=dataclasses.asdict(model.config),
            params=model.num_params(), params_without_embeddings=model.num_params(exclude_embeddings=True),
            flops_per_token=self.flops_per_token, world_size=env.world_size, accum_steps=self.accum,
            schedule_steps=self.schedule_steps,
            tokens_per_step=p.tokens_per_step, tokens_total=p.tokens_per_step * p.max_steps,
            devices_in_peak=env.devices, device=str(env.device), device_name=(torch.cuda.get_device_name(env.device) if env.device.type == "cuda"
                                                 else hardware.cpu_info().model),
            dtype=self.dtype, compile=self.compile, peak_flops_per_device=self.peak, peak_source=self.peak_source,
            **self.data_info(), torch=torch.__version__, command=sys.argv)

    def data_info(self) -> dict:
        """config.json's entries on the data."""
        p, train_tokens = self.preset, len(self.windows["train"].tokens)
        return dict(passes_over_data=p.tokens_per_step * p.max_steps / train_tokens,
                    data=dict(folder=str(self.folder), tokenizer=self.manifest["tokenizer"],
                              source=self.manifest["source"], vocab_size=self.manifest["vocab_size"],
                              train_tokens=train_tokens, val_tokens=len(self.windows["val"].tokens)))

    def summary(self, finished: bool) -> dict:
        """The last and best val loss, throughput and MFU after the first log interval (which
        holds warm-up and compilation), peak memory, parameters, wall time."""
        tokens_per_s = self.speed.steady()
        steps = self.trainer.steps_done
        return dict(step=steps, max_steps=self.preset.max_steps, finished=finished,
                    val_loss=self.evals[-1] if self.evals else None,
                    best_val_loss=min(self.evals) if self.evals else None,
                    tokens=steps * self.preset.tokens_per_step, tokens_per_s=tokens_per_s,
                    mfu=run_mfu(self.flops_per_token, tokens_per_s, self.peak, self.env.devices)
                    if tokens_per_s else None,
                    memory_bytes=memory_bytes(self.env.device), params=self.trainer.model.num_params(),
                    world_size=self.env.world_size, wall_s=self.elapsed(), checkpoint=str(self.ckpt))


def run(preset: Preset, opts: Options, env: Env) -> dict:
    """Train ``preset`` as this process of ``env``; return the summary row (rank 0) or {}."""
    return TrainingRun(preset, opts, env).train()


# ---------------------------------------------------------------------------- from a notebook


# ---------------------------------------------------------------------------- command line

def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (1_000 is fine), got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (3e-4 is fine), got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nblib.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--tiny", action="store_true", help="the preset's tiny form: seconds on a CPU (also NBLIB_FAST=1)")
    p.add_argument("--out", help="folder for config.json, log.jsonl and ckpt.safetensors (default runs/PRESET)")
    p.add_argument("--data-dir", help="the shard folder (default: ~/.cache/nblib/shards/DATA, or NBLIB_CACHE_DIR)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/ckpt.safetensors (if there is none: start afresh, and say so); "
                        "with a larger --max_steps, train a finished run longer (the lr schedule still ends at "
                        "the first max_steps; later steps train at min_lr)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run: its files move to OUT/previous-<time>/")
    p.add_argument("--stop-at", type=_parse_int,
                   help="stop and save after this step, as if interrupted (the schedule still ends at max_steps)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA only)")
    p.add_argument("--device", help="cuda, cpu, mps (default: the best there is; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--checksums", action=argparse.BooleanOptionalAction, default=True,
                   help="check each shard's sha256 before reading (default on; off checks sizes only)")
    p.add_argument("--debug", action="store_true", help="log each rank's first rows (a 'debug' row)")
    p.add_argument("--average-gradients", metavar="FILE.py",
                   help="train without DDP: after each step's backward passes, every process calls "
                        "average_gradients(model) from this file (lesson 14's exercise) to average the gradients")
    p.add_argument("--measured", help="when the run ends, write what it measured (device, torch, date, log) to "
                                      "this JSON file, e.g. nblib/measured/pretrain_<preset>_<gpu>.json")
    fields = p.add_argument_group("preset fields (override the preset)")
    for f in dataclasses.fields(Preset):
        kind = type(f.default)
        parse = {bool: _parse_bool, int: _parse_int, float: _parse_float}.get(kind, kind)
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        fields.add_argument(*names, dest=f.name, type=parse, default=None, metavar=kind.__name__.upper(),
                            help=f"default: the preset's (shakespeare-char: {f.default})")
    return p


def preset_from_args(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    if args.tiny:
        preset = tiny(preset)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Preset) if getattr(args, f.name) is not None}
    return dataclasses.replace(preset, **overrides)


def check_args(args: argparse.Namespace, preset: Preset) -> None:
    """``UsageError`` for any flag the run cannot start with, before anything starts."""
    check_preset(preset)
    if args.stop_at is not None and args.stop_at < 1:
        raise UsageError(f"--stop-at must be >= 1, got {args.stop_at}")
    if args.average_gradients is not None and not Path(args.average_gradients).is_file():
        raise UsageError(f"--average-gradients {args.average_gradients}: no such file (a .py file that defines "
                         "average_gradients(model))")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite starts a new one: pass one of them")
    for flag, path in (("--out", args.out), ("--data-dir", args.data_dir)):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise UsageError(f"{flag} {path} is a file; pass a folder")
    if args.measured and Path(args.measured).is_dir():
        raise UsageError(f"--measured {args.measured} is a folder; pass a .json file name")
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: this machine has no CUDA GPU that torch can use")


def run_files_to_move(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """The files of an earlier run in ``out`` that must move aside before this one starts ([] if
    none). ``UsageError`` if this run would replace a run without --resume or --overwrite."""
    held = [name for name in RUN_FILES if (out / name).exists()]
    if not held or (resume and (out / CHECKPOINT).is_file()):
        return []
    if not (resume or overwrite):
        try:
            at = f", at step {checkpoint.read_metadata(out / CHECKPOINT)['step']}"
        except (OSError, ValueError):
            at = ""
        raise UsageError(f"{out} holds a run ({', '.join(held)}{at}): pass --resume to continue it, --overwrite "
                         f"to start afresh (its files move to {out}/previous-<time>/; nothing is deleted), or "
                         "another --out")
    return held


def move_aside(out: Path, names: list[str]) -> Path:
    """Move the files ``names`` of ``out`` into a new ``out/previous-<time>/``."""
    aside = out / time.strftime("previous-%Y%m%d-%H%M%S")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(time.strftime("previous-%Y%m%d-%H%M%S") + f"-{n}"), n + 1
    aside.mkdir()
    for name in names:
        os.replace(out / name, aside / name)
    return aside


def prepare_out(out: Path, args: argparse.Namespace, env: Env):
    """Lock ``out`` (rank 0), refuse it if it holds a run this one would replace, move an earlier
    run aside for --overwrite, and remove what a killed save left. Returns the lock (or None)."""
    lock = lock_out(out) if env.is_main else None
    try:
        to_move = run_files_to_move(out, args.resume, args.overwrite)  # every process: all refuse, or none
        barrier()
        if env.is_main:
            if args.resume and not (out / CHECKPOINT).is_file():
                print(f"--resume: no checkpoint in {out}, so this run starts afresh at step 0", flush=True)
            if to_move:
                print(f"the earlier run's files ({', '.join(to_move)}) moved to {move_aside(out, to_move)}",
                      flush=True)
            for name in (CHECKPOINT, BEST):  # temporary files of a save that was killed (we hold the lock)
                (out / f"{name}.tmp").unlink(missing_ok=True)
        barrier()
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock


def resume_command(argv: list[str], env: Env, module: str = "nblib.pretrain") -> str:
    """The command that resumes this run: the same arguments, with --resume instead of
    --overwrite and --stop-at."""
    args, drop_next = [], False
    for a in argv:
        if drop_next:
            drop_next = False
        elif a == "--stop-at":
            drop_next = True  # and its value
        elif a not in ("--resume", "--overwrite") and not a.startswith("--stop-at="):
            args.append(a)
    args = shlex.join(args + ["--resume"])
    if env.world_size == 1:
        try:  # the Python that runs us, e.g. .venv/bin/python
            python = str(Path(sys.executable).relative_to(Path.cwd()))
        except ValueError:
            python = "python"
        return f"{shlex.quote(python)} -m {module} {args}"
    if env.world_size == env.local_world_size:
        return f"torchrun --standalone --nproc_per_node={env.local_world_size} -m {module} {args}"
    return f"torchrun (this run's --nnodes, --nproc_per_node and --rdzv options) -m {module} {args}"


def main(argv: list[str] | None = None) -> dict:
    """Run the program with command-line ``argv`` (default: ``sys.argv``); return the summary row.
    Ctrl-C or SIGTERM during training save a checkpoint and raise ``Interrupted``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.tiny = args.tiny or is_fast()  # NBLIB_FAST=1 is --tiny; the one place the program reads it
    preset = preset_from_args(args)
    check_args(args, preset)
    out = Path(args.out or f"runs/{args.preset}{'-tiny' if args.tiny else ''}")
    env = init_distributed(args.device)
    opts = Options(out=out, data_dir=args.data_dir, resume=args.resume, stop_at=args.stop_at, compile=args.compile,
                   checksums=args.checksums, debug=args.debug, overwrite=args.overwrite,
                   average_gradients=args.average_gradients,
                   resume_command=resume_command(argv, env))
    # Tiny models on a CPU run on one thread, as nblib.setup does in FAST mode: a second
    # thread only adds synchronisation. The caller's thread count comes back afterwards.
    one_thread = 1 if args.tiny and env.device.type == "cpu" else None
    lock = None
    try:
        lock = prepare_out(out, args, env)
        with hardware.threads(one_thread):
            setup(seed=preset.seed, device=str(env.device), quiet=not env.is_main)
            summary = run(preset, opts, env)
        if args.measured and env.is_main:
            Path(args.measured).parent.mkdir(parents=True, exist_ok=True)
            Path(args.measured).write_text(json.dumps(measurement(out, args.preset), indent=1))
        return summary
    finally:
        if lock is not None:
            lock.close()  # releases the flock
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(main=main) -> None:
    """``python -m nblib.pretrain``: ``main()``, with what a user can fix said in one line
    instead of a traceback, and the exit status of the signal for an interrupted run
    (lesson 15's stages run their own ``main`` through it)."""
    rank = os.environ.get("RANK", "0")
    who = "" if rank == "0" else f"[rank {rank}] "
    try:
        main()
    except Interrupted as stop:
        if rank == "0":
            print(stop, file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:  # before the steps began (handlers are set around them) or after
        sys.exit(f"{who}interrupted outside the training steps: the checkpoint in --out is as it was")
    except UsageError as err:
        print(f"{who}error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (TrainingDiverged, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"{who}error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    cli()
