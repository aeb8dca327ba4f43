"""What the machine can do, and how long things take on it (lessons 13 and 14).

- **Peak FLOP/s** per GPU (``PEAKS``, ``lookup_peak``, ``peak_flops``), each figure with its
  source, and the CPU's theoretical peak from its vector units (``cpu_info``,
  ``cpu_peak_flops``) beside a measured matmul ceiling (``matmul_flops``); ``device_peak``
  picks the right one for a device. **MFU** (``mfu``) is achieved FLOP/s over that peak.
- **Timing** that waits for the device (``synchronize``, ``time_steps``): CUDA runs
  asynchronously, so a clock read without a synchronize measures how fast work was
  *queued*, not done; ``threads`` runs a block on a given number of CPU threads.

Its own module so that the training program (``nblib.pretrain``, lesson 14) reads the table
without importing lesson 13's profiler and ladder (``nblib.profiling``).
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# ---------------------------------------------------------------------------- peak FLOP/s

NVIDIA_DENSE = "dense (non-sparse) Tensor Core figure; the datasheet's headline is 2x this, with 2:4 sparsity"


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s per dtype (None: the device has no fast path for it)."""

    device: str
    model: tuple[str, ...]      # the words of the model in torch's device name, e.g. ("rtx", "4090")
    forms: tuple[str, ...]      # the form-factor words that may come with them and name the same part
    flops: dict[str, float | None]
    source: str


PEAKS = [
    Peak("NVIDIA H100 SXM", ("h100",), ("sxm", "sxm5"),
         {"bfloat16": 989.4e12, "float16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
         "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column; " + NVIDIA_DENSE),
    Peak("NVIDIA H200", ("h200",), ("sxm",),
         {"bfloat16": 989.4e12, "float16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
         "NVIDIA H200 datasheet, H200 SXM column (the same compute as H100 SXM); " + NVIDIA_DENSE),
    Peak("NVIDIA A100", ("a100",), ("sxm", "sxm4", "pcie"),
         {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12},
         "NVIDIA A100 Tensor Core GPU datasheet (40GB and 80GB, SXM and PCIe alike); " + NVIDIA_DENSE),
    Peak("NVIDIA L4", ("l4",), (),
         {"bfloat16": 121e12, "float16": 121e12, "tf32": 60e12, "float32": 30.3e12},
         "NVIDIA L4 Tensor Core GPU datasheet; " + NVIDIA_DENSE),
    Peak("NVIDIA T4", ("t4",), (),
         {"bfloat16": None, "float16": 65e12, "tf32": None, "float32": 8.1e12},
         "NVIDIA T4 datasheet (Turing: float16 Tensor Cores, no bfloat16 or TF32)"),
    Peak("NVIDIA GeForce RTX 4090", ("rtx", "4090"), (),
         {"bfloat16": 165.2e12, "float16": 165.2e12, "tf32": 82.6e12, "float32": 82.6e12},
         "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: Tensor Core with float32 accumulate, dense"),
]
# A10G (AWS) is left out: NVIDIA publishes no datasheet for it, and we quote no number we cannot source.

VENDOR_WORDS = {"nvidia", "tesla", "geforce"}
MEMORY_WORD = re.compile(r"\d+gb|hbm\d*e?")   # "80GB", "HBM3": the same compute with more or other memory


def name_words(device_name: str) -> list[str]:
    """The words of a device name that say which part it is: lower case, split at spaces, hyphens
    and underscores, without the vendor's brands and the memory ("NVIDIA A100-SXM4-80GB" -> a100, sxm4)."""
    words = re.split(r"[\s_-]+", device_name.lower().strip())
    return [w for w in words if w and w not in VENDOR_WORDS and not MEMORY_WORD.fullmatch(w)]


def lookup_peak(device_name: str) -> Peak | None:
    """The ``PEAKS`` row for a device name as ``torch.cuda.get_device_name`` spells it, or None.

    A row matches when the name's words (``name_words``) are its model's words plus only form
    factors it lists: a word it does not know makes another card, which gets None, never a
    neighbour's number ("NVIDIA T400" is not a T4, "NVIDIA H100 PCIe" not the SXM part,
    "NVIDIA GeForce RTX 4090 D" or "... Laptop GPU" not the desktop RTX 4090)."""
    words = name_words(device_name)
    for peak in PEAKS:
        rest = list(words)
        for w in peak.model:
            if w not in rest:
                break
            rest.remove(w)
        else:
            if all(w in peak.forms for w in rest):
                return peak
    return None


def peak_flops(device_name: str, dtype: str = "bfloat16") -> float:
    """Peak FLOP/s of a known GPU for ``dtype`` ("bfloat16", "float16", "tf32", "float32").

    Raises KeyError naming the device when it is not in ``PEAKS``, and ValueError when the
    device has no figure for that dtype (a T4 has no bfloat16): better no MFU than a wrong one."""
    peak = lookup_peak(device_name)
    if peak is None:
        known = sorted({p.device for p in PEAKS})
        raise KeyError(f"no peak FLOP/s known for {device_name!r} (known: {known}; a name matches only as "
                       "torch spells that very part). Look up its dense (non-sparse) figure in the datasheet and "
                       "pass the peak yourself, e.g. nblib.hardware.mfu(flops_per_token, tokens_per_second, peak=...), "
                       "or add a row to nblib.hardware.PEAKS with its datasheet source.")
    if dtype not in peak.flops:
        raise ValueError(f"dtype must be one of {sorted(peak.flops)}, got {dtype!r}")
    value = peak.flops[dtype]
    if value is None:
        raise ValueError(f"{peak.device} has no {dtype} fast path ({peak.source})")
    return value


@dataclass
class CpuInfo:
    model: str
    cores: int            # logical CPUs the OS gives this process
    ghz: float            # the clock, from /proc/cpuinfo's "cpu MHz" (nominal in a VM; turbo may be higher)
    flags: frozenset
    vendor: str
    family: int

    @property
    def has_bf16(self) -> bool:
        """AVX-512 BF16 (or AMX): bfloat16 matmuls run natively, not emulated."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags


CPU_GHZ_ENV = "NBLIB_CPU_GHZ"  # the clock to use for the CPU's peak, when you know it better than /proc/cpuinfo


def cpu_info() -> CpuInfo:
    """What /proc/cpuinfo says about this CPU (Linux); elsewhere a best guess with no flags.

    The clock is ``NBLIB_CPU_GHZ`` if set, else /proc/cpuinfo's "cpu MHz". In a virtual
    machine that is the nominal clock: a CPU that boosts above it beats the "peak"."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's values
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model=fields.get("model name", platform.processor() or "unknown CPU"), cores=cores,
                   ghz=float(os.environ.get(CPU_GHZ_ENV) or float(fields.get("cpu MHz", "nan")) / 1000), flags=frozenset(fields.get("flags", "").split()),
                   vendor=fields.get("vendor_id", ""), family=int(fields.get("cpu family", "0") or 0))


def fp32_flops_per_cycle(info: CpuInfo) -> int:
    """float32 FLOPs per cycle per core from the vector ISA: lanes x 2 (an FMA is 2 FLOPs) x FMA pipes.

    - AMD Zen 4 (family 25 with AVX-512): AVX-512 instructions run as two 256-bit halves on
      2 FMA pipes, so 2 pipes x 8 lanes x 2 = 32, the same as AVX2 with FMA.
    - Intel with AVX-512: 2 pipes x 16 lanes x 2 = 64 (server parts; some have one 512-bit pipe).
    - AVX2 with FMA: 2 x 8 x 2 = 32. Otherwise SSE: 4 lanes, add and mul pipes: 8.
    """
    flags = info.flags
    if "avx512f" in flags and info.vendor != "AuthenticAMD":
        return 64
    if "avx2" in flags and "fma" in flags:
        return 32
    return 8


def cpu_peak_flops(cores: int, ghz: float, flops_per_cycle: int) -> float:
    """Theoretical peak: cores x clock x FLOPs per cycle per core (float32)."""
    return cores * ghz * 1e9 * flops_per_cycle


def matmul_flops(n: int = 2048, repeats: int = 3, device="cpu", dtype=torch.float32) -> float:
    """FLOP/s of the best of ``repeats`` n x n matmuls (2 n^3 FLOPs each): the practical ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up (allocations, thread pool)
    best = min(time_steps(lambda: a @ b, device, repeats))
    return 2 * n ** 3 / best


def device_peak(device, dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for ``device`` and ``dtype``: the datasheet on a GPU,
    the vector ISA on a CPU.

    On a CPU with AVX-512 BF16 the bfloat16 peak is twice float32's: its dot-product
    instruction (VDPBF16PS) does two multiply-adds per float32 lane. Without it, bfloat16 is
    emulated and float32's peak is the honest ceiling for both."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return peak_flops(name, dtype), lookup_peak(name).source
    info = cpu_info()
    per_cycle = fp32_flops_per_cycle(info)
    clock = CPU_GHZ_ENV if os.environ.get(CPU_GHZ_ENV) else "/proc/cpuinfo"
    how = f"{info.cores} cores x {info.ghz:.2f} GHz ({clock}) x {per_cycle} fp32 FLOP/cycle/core"
    fp32 = cpu_peak_flops(info.cores, info.ghz, per_cycle)
    if dtype == "bfloat16" and info.has_bf16:
        return 2 * fp32, how + " x 2 (AVX-512 BF16)"
    return fp32, how


def mfu(flops_per_token: float, tokens_per_second: float, peak: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the model's arithmetic needs at this speed, over the peak."""
    return flops_per_token * tokens_per_second / peak


# ---------------------------------------------------------------------------- timing

@contextlib.contextmanager
def threads(n: int | None):
    """Run the block with torch on ``n`` CPU threads (None: leave it), then restore the old count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def synchronize(device) -> None:
    """Wait until the device has finished its queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device, n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn()``, synchronising the device around each."""
    times = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times
