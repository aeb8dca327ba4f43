"""Run mode, device and seeding: the three things every notebook sets up first.

Every lesson starts with the same config cell::

    FAST, device = nblib.setup(seed=1337)
    steps = 200 if FAST else 5_000

FAST mode (``NBLIB_FAST=1``, set by the test suite) shrinks every lesson to tiny sizes
so that it runs in well under a minute on two CPU cores; full mode is the real lesson.
"""
from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

FAST_ENV = "NBLIB_FAST"


def env_flag(name: str) -> bool:
    """An on/off environment variable: unset, "", "0", "false", "no" and "off" are off.

    Case and surrounding spaces do not matter; any other value is on. Every ``NBLIB_*``
    switch (``NBLIB_FAST``, ``NBLIB_OFFLINE``) is read this way.
    """
    value = os.environ.get(name, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def is_fast() -> bool:
    """True when the environment asks for the tiny CI-sized version of a lesson."""
    return env_flag(FAST_ENV)


def pick_device(prefer: str | None = None) -> torch.device:
    """The best device this machine has: CUDA, then Apple's MPS, then the CPU.

    ``prefer`` (or the environment variable ``NBLIB_DEVICE``) forces one, e.g. "cpu".
    """
    prefer = prefer or os.environ.get("NBLIB_DEVICE")
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator with that seed.

    The returned generator is for code that wants its own random stream, e.g.
    ``torch.multinomial(p, 1, generator=g)``, independent of anything else that runs.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def describe(device: torch.device) -> str:
    """A one-line summary of the run: versions, device and mode."""
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        where = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    else:
        where = device.type
    mode = f"FAST mode ({FAST_ENV}=1)" if is_fast() else "full mode"
    return f"python {platform.python_version()} | torch {torch.__version__} | device {where} | {mode}"


def setup(seed: int = 1337, device: str | None = None, quiet: bool = False) -> tuple[bool, torch.device]:
    """The config cell's one call: seed everything, pick the device, report the mode.

    In FAST mode on the CPU it also runs torch on one thread (see the comment below).

    Returns ``(FAST, device)``.
    """
    seed_everything(seed)
    dev = pick_device(device)
    if is_fast() and dev.type == "cpu":
        # FAST models are tiny: a second thread only adds synchronisation, and on a busy
        # machine far more (lessons 05-07 measured 10-25x slower with 2 threads under load).
        # One thread keeps FAST timings stable; full mode keeps torch's default.
        torch.set_num_threads(1)
    if not quiet:
        print(describe(dev))
    return is_fast(), dev
