"""The processes of a training run (lesson 14): which one this is, DDP, signals, the run lock.

- ``Env`` / ``init_distributed``: under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
  in the environment) join the process group (NCCL on GPUs, gloo on CPUs); otherwise one
  process on the best device. ``barrier`` waits for the others (a no-op alone).
- ``wrap`` / ``unwrap``: the model compiled and in DDP for the training step, and back.
- ``StopSignals``: Ctrl-C and SIGTERM recorded, so the loop stops after a step and saves.
- ``lock_out``: one run per output folder (``run.lock``, an ``fcntl.flock`` the operating
  system drops when the process ends, however it ends).
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nblib.presets import UsageError
from nblib.runmode import pick_device

try:
    import fcntl  # file locks; not on Windows, where runs into one --out are not prevented
except ImportError:
    fcntl = None


LOCK = "run.lock"                # held by the run using the folder (its pid inside)


@dataclass
class Env:
    """Which process this is: rank among ``world_size`` processes, ``local_rank`` on its machine."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1       # processes on this machine

    @property
    def devices(self) -> int:
        """How many devices' peaks the run has: one per GPU process; CPU processes share their
        machine's cores, so one per machine."""
        return self.world_size if self.device.type == "cuda" else max(1, self.world_size // self.local_world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Env:
    """Join torchrun's process group if torchrun started us (NCCL on GPUs, gloo on CPUs);
    otherwise a single process on the best device. Each GPU process takes GPU ``LOCAL_RANK``."""
    if "RANK" not in os.environ:
        return Env(pick_device(device))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", device_id=where)
    else:
        where = torch.device(device or "cpu")
        dist.init_process_group("gloo")
    return Env(where, rank, local, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def unwrap(model: torch.nn.Module, keep_compiled: bool = False) -> torch.nn.Module:
    """The model inside the DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Their state dicts prefix every name (``module._orig_mod.lm_head.weight``); a checkpoint
    saved from the plain model loads into a plain model, compiled or not, on any number of GPUs.
    ``keep_compiled``: take off DDP only. Rank 0 evaluates with that alone, compiled (fast),
    since DDP's forward would wait for the other processes."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif not keep_compiled and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def wrap(model: torch.nn.Module, env: Env, use_compile: bool, ddp: bool = True) -> torch.nn.Module:
    """The model as the training step calls it: compiled (``torch.compile``), then in DDP when
    there are several processes (nanoGPT's order). ``ddp=False``: never in DDP (the
    gradients are then averaged some other way, e.g. by a function of the learner's)."""
    runner = torch.compile(model) if use_compile else model
    if env.world_size > 1 and ddp:
        # DDP also re-sends rank 0's buffers (here only the RoPE tables) about once a step: 2 x T x head_dim
        # floats, too few to be worth an option whose name changes between torch versions
        runner = DDP(runner, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return runner


class StopSignals:
    """While training, SIGINT (Ctrl-C, a notebook's stop button) and SIGTERM (``kill``, a
    cluster's scheduler, torchrun passing either on) only record that a stop was asked for:
    the loop stops after the step it is in and saves. Outside the main thread, where Python
    cannot catch signals, it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.record)
        return self

    def record(self, signum, _frame) -> None:
        self.signum = signum

    def __exit__(self, *_) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def lock_out(out: Path):
    """Hold ``out/run.lock`` until the returned file is closed (or the process ends, however it
    ends: the operating system drops a dead process's locks, so a crash leaves no stale lock)."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK, "a+", encoding="utf-8")
    if fcntl is not None:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise UsageError(f"another run is using {out} (process {holder} holds {out / LOCK}): wait for it to "
                             "end or stop it, or pass another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock

