"""Where a training step spends its time and memory, and how fast it could go (lesson 13).

The device's peak FLOP/s, MFU and the step timer are ``nblib.hardware``'s (lesson 14 uses
them too); this module is the rest of lesson 13:

- **Activation memory** (``SavedTensors``): the bytes autograd keeps for the backward pass,
  counted with ``saved_tensors_hooks``; ``activation_bytes`` is the formula for our Llama.
- **Profiler helpers** (``profile_step``, ``categorise``, ``category_shares``): a
  ``torch.profiler`` run of one training step, its ops grouped into matmuls, attention,
  memory-bound ops, the optimizer and the rest.
- The **speed ladder** (``cpu_ladder``, ``gpu_ladder``, ``run_ladder``): one change at a
  time, each row timed and its loss checked against the baseline. From the command line::

      python -m nblib.profiling --ladder --out ladder.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nblib import llama
from nblib.hardware import cpu_info, device_peak, mfu, synchronize, time_steps
from nblib.progress import progress
from nblib.text import random_batch
from nblib.train import TrainConfig, autocast_context, configure_optimizer

# ---------------------------------------------------------------------------- activation memory

class SavedTensors:
    """Count the bytes autograd saves for the backward pass inside a ``with`` block.

    Every tensor an op saves goes through the pack hook; several may share one storage
    (a view, or the same tensor saved by two ops), so storages are counted once, by their
    address. Parameters (``exclude``) are saved too but are not activations: left out.
    """

    def __init__(self, exclude=()):
        self.excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str = "float32") -> int:
    """Bytes autograd keeps from one forward pass of ``model(x, y)`` (parameters excluded)."""
    with SavedTensors(exclude=model.parameters()) as saved, autocast_context(x.device, dtype):
        model(x, y)
    return saved.nbytes


def cuda_peak_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """On CUDA: the most memory allocated during forward + backward, minus what was there before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _, loss = model(x, y)
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def activation_bytes(config: llama.LlamaConfig, B: int, T: int, bytes_per_value: int = 4) -> int:
    """What one float32 forward pass of our Llama (SDPA attention) saves for backward, in bytes.

    Per layer, in values: 10 B*T*d (each half of the block saves its input, x * rsqrt and
    the norm's output; attention saves the rotated q and k, v and its output, which the
    output projection reads as a view) + 4 B*T*h (gate, up, silu(gate), their product)
    + 2 B*T (the two norms' rsqrt) + B*H*T (attention's log-sum-exp). Then the final norm
    (3 B*T*d + B*T), the log-softmax (B*T*V), the RoPE cos and sin rows (2 T*head_dim,
    shared by every layer) and the token ids and targets (int64, 8 bytes each).
    Multiplying by a constant (the RoPE tables) saves the constant, not the input.
    """
    c = config
    d, h, H, V = c.n_embd, c.ffn_hidden, c.n_head, c.vocab_size
    per_layer = 10 * B * T * d + 4 * B * T * h + 2 * B * T + B * H * T
    head = 3 * B * T * d + B * T + B * T * V + 2 * T * c.head_dim
    return (c.n_layer * per_layer + head) * bytes_per_value + 2 * B * T * 8


# ---------------------------------------------------------------------------- attention written out

class ManualAttention(llama.Attention):
    """``llama.Attention`` with softmax(QK^T / sqrt(d) + causal mask) V written out: the T x T
    score matrix is materialised (and saved for backward), as before fused attention kernels.
    Only the speed ladder uses it (``use_manual_attention``); training and cache-free only."""

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None, is_causal=True):
        if cache is not None or mask is not None:
            raise ValueError("ManualAttention is for plain causal training steps (no cache, no mask)")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = llama.apply_rope(q, cos, sin), llama.apply_rope(k, cos, sin)
        n_rep = self.n_head // self.n_kv_heads
        k, v = llama.repeat_kv(k, n_rep), llama.repeat_kv(v, n_rep)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)               # [B, H, T, T]
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        y = att @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def use_manual_attention(model: llama.Llama) -> llama.Llama:
    """Switch every block of ``model`` to ``ManualAttention`` (same weights); returns the model."""
    for block in model.model.layers:
        block.self_attn.__class__ = ManualAttention
    return model


# ---------------------------------------------------------------------------- the profiler

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
              "aten::_mm", "aten::_addmm_activation", "mkldnn", "onednn")
ATTENTION_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
CATEGORIES = ("matmul", "attention", "memory-bound", "optimizer", "other")


def categorise(name: str, region: str | None = None) -> str:
    """The category of a profiler op ``name``; ``region`` is the enclosing ``record_function``
    label ("forward", "backward", "optimizer"), so that AdamW's many small ops count as the optimizer.

    matmul: the dense products. attention: SDPA and its kernels. memory-bound: the other
    ``aten::`` ops (elementwise, softmax, norms, copies, reductions), which move more bytes
    than they compute. other: the Python and autograd bookkeeping around them."""
    low = name.lower()
    if region == "optimizer" or "optimizer" in low or "adam" in low:
        return "optimizer"
    if any(word in low for word in ATTENTION_WORDS):
        return "attention"
    if any(low.startswith(op) or op in low for op in MATMUL_OPS) and not low.startswith("autograd::"):
        return "matmul"
    if low.startswith("aten::"):
        return "memory-bound"
    return "other"


def _region(event) -> str | None:
    """The outermost record_function label among an event's ancestors."""
    found = None
    while event is not None:
        if event.name in ("forward", "backward", "optimizer"):
            found = event.name
        event = event.cpu_parent
    return found


def category_times(prof) -> dict[str, float]:
    """Self CPU time (µs) per category, over every event of a ``torch.profiler.profile`` run."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        if event.name in ("forward", "backward", "optimizer", "step"):
            continue  # the labels' own self time is the Python between ops
        totals[categorise(event.name, _region(event))] += event.self_cpu_time_total
    return totals


def shares(times: dict[str, float]) -> dict[str, float]:
    """Each category's fraction of the total."""
    total = sum(times.values()) or 1.0
    return {k: v / total for k, v in times.items()}


def training_step(model, optimizer, x, y, device, dtype: str = "float32", labels: bool = False) -> torch.Tensor:
    """One optimizer step on the batch (x, y); returns the loss (a tensor: no sync). With
    ``labels`` the forward, backward and optimizer parts are ``record_function`` regions."""
    label = torch.profiler.record_function if labels else (lambda _: contextlib.nullcontext())
    with label("forward"), autocast_context(device, dtype):
        _, loss = model(x, y)
    with label("backward"):
        loss.backward()
    with label("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def profile_step(model, optimizer, x, y, device, dtype: str = "float32", warmup: int = 2, steps: int = 1,
                 trace_path: str | Path | None = None, record_shapes: bool = False):
    """Profile ``steps`` training steps (after ``warmup`` unprofiled ones); optionally write a
    Chrome/Perfetto trace. Returns the ``torch.profiler.profile`` object.

    ``record_shapes`` (each op's input shapes, for ``key_averages(group_by_input_shape=True)``)
    is off by default: on a CPU it slowed a step by half again, which skews the shares."""
    for _ in range(warmup):
        training_step(model, optimizer, x, y, device, dtype)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(steps):
            training_step(model, optimizer, x, y, device, dtype, labels=True)
        synchronize(device)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return prof


# ---------------------------------------------------------------------------- the speed ladder

@dataclass
class Rung:
    """One change on the ladder: its name, the settings it changes, and why it should help."""

    name: str
    change: dict
    why: str


@dataclass
class Row:
    name: str
    settings: dict
    ms_per_step: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    loss: float | None = None
    loss_tol: float | None = None      # None: not compared (a different batch is a different run)
    compile_s: float | None = None
    skipped: str | None = None         # why the row did not run here
    why: str = ""


BASE_SETTINGS = dict(threads=None, attention="sdpa", dtype="float32", compile=False, fused=False,
                     vocab_multiple=1, batch_size=None)


def cpu_ladder(batch_size: int, threads: int | None = None, compile: bool = True) -> list[Rung]:
    """The rungs that apply on a CPU, cheapest first."""
    threads = threads or cpu_info().cores
    rungs = [
        Rung("baseline: 1 thread, attention written out, fp32", dict(threads=1, attention="manual"),
             "the starting point: one core, the T x T score matrix materialised"),
        Rung(f"all threads ({threads})", dict(threads=threads),
             "matmuls split across cores; small elementwise ops gain little"),
        Rung("SDPA attention", dict(attention="sdpa"),
             "one fused kernel: the T x T scores are never written to memory, nor saved for backward"),
        Rung("bf16 autocast", dict(dtype="bfloat16"),
             "matmuls in bfloat16 (AVX-512 BF16): half the bytes, twice the FMAs per instruction; "
             "the casts around them cost time"),
        Rung("torch.compile", dict(compile=True),
             "fuses chains of elementwise ops into one loop: fewer passes over memory, less Python"),
        Rung("fused AdamW", dict(fused=True),
             "one kernel updates every parameter instead of several ops per tensor"),
        Rung(f"larger batch ({2 * batch_size})", dict(batch_size=2 * batch_size),
             "bigger matmuls use the cores better and the fixed per-step costs are shared by more tokens"),
    ]
    return rungs if compile else [r for r in rungs if not r.change.get("compile")]


def gpu_ladder(batch_size: int) -> list[Rung]:
    """build-nanogpt's ladder (on an A100) for whichever GPU is present."""
    return [
        Rung("baseline: fp32, attention written out", dict(attention="manual"), "the starting point"),
        Rung("TF32 matmuls", dict(dtype="tf32"), "Tensor Cores take float32 inputs rounded to 10 mantissa bits"),
        Rung("bf16 autocast", dict(dtype="bfloat16"), "bfloat16 Tensor Cores: twice TF32's rate, half the bytes"),
        Rung("SDPA (flash) attention", dict(attention="sdpa"),
             "never writes the T x T scores to HBM: attention becomes compute-bound"),
        Rung("torch.compile", dict(compile=True), "fuses elementwise ops: fewer round trips to HBM, fewer launches"),
        Rung("fused AdamW", dict(fused=True), "one kernel launch for the whole update"),
        Rung("vocab padded to 128", dict(vocab_multiple=128), "matmul tiles fit the output dimension exactly"),
        Rung(f"larger batch ({2 * batch_size})", dict(batch_size=2 * batch_size), "more work per kernel launch"),
    ]


def ladder_for(device, batch_size: int, compile: bool = True) -> list[Rung]:
    return gpu_ladder(batch_size) if torch.device(device).type == "cuda" else cpu_ladder(batch_size, compile=compile)


# Published reference: Karpathy's build-nanogpt (video "Let's reproduce GPT-2 (124M)"), on one
# A100, B=16, T=1024: ms per step as each change was added. Their numbers, on their machine.
BUILD_NANOGPT_A100 = [("fp32", 1000), ("TF32", 333), ("bf16 autocast", 300), ("torch.compile", 130),
                      ("flash attention", 96), ("vocab 50304", 93), ("fused AdamW", 90)]


def _batches(ids, n, B, T, seed, device):
    return [random_batch(ids, B, T, torch.Generator().manual_seed(seed + i), device) for i in range(n)]


def run_rung(settings: dict, config: llama.LlamaConfig, ids: torch.Tensor, device, n_steps: int,
             batch_size: int, block_size: int, seed: int = 0, lr: float = 1e-3, make_step=None,
             cold_compile: bool = False) -> dict:
    """Train a fresh model (seed ``seed``) for ``n_steps`` steps with ``settings``; time each step.

    Every rung starts from the same weights and sees the same batches (unless the batch size
    changes), so the final loss must match the baseline's up to rounding. ``make_step(model,
    optimizer, device, dtype)`` may replace ``training_step`` (the lesson's exercise).
    ``cold_compile`` turns Inductor's on-disk cache off, so the compile time is a first compile's."""
    device = torch.device(device)
    B = settings.get("batch_size") or batch_size
    old_threads = torch.get_num_threads()
    old_precision = torch.get_float32_matmul_precision()
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    torch.set_float32_matmul_precision("high" if settings["dtype"] == "tf32" else "highest")
    try:
        torch.manual_seed(seed)
        model = llama.Llama(config).to(device)
        flops_per_token = model.flops_per_token(block_size)
        if settings["vocab_multiple"] > 1:
            model = llama.resize_vocab(model, llama.padded_vocab_size(model.config.vocab_size, settings["vocab_multiple"]))
        if settings["attention"] == "manual":
            use_manual_attention(model)
        optimizer = configure_optimizer(model, TrainConfig(lr=lr, weight_decay=0.1, fused_adamw=settings["fused"]))
        runner = torch.compile(model) if settings["compile"] else model
        dtype = "float32" if settings["dtype"] == "tf32" else settings["dtype"]
        step = (make_step(runner, optimizer, device, dtype) if make_step else
                (lambda x, y: training_step(runner, optimizer, x, y, device, dtype)))
        batches = _batches(ids, n_steps, B, block_size, seed, device)
        times, losses = [], []
        for i, (x, y) in enumerate(batches):
            with _no_compile_cache() if cold_compile and i == 0 else contextlib.nullcontext():
                times.extend(time_steps(lambda: losses.append(step(x, y)), device, 1))
        warm = 2 if n_steps > 4 else 1
        ms = 1000 * statistics.median(times[warm:])
        return dict(ms_per_step=ms, tokens_per_s=B * block_size / (ms / 1000), loss=float(losses[-1]),
                    flops_per_token=flops_per_token, compile_s=sum(times[:warm]) - warm * ms / 1000
                    if settings["compile"] else None)
    finally:
        torch.set_num_threads(old_threads)
        torch.set_float32_matmul_precision(old_precision)


@contextlib.contextmanager
def _no_compile_cache():
    """Inductor without its on-disk caches (a private switch; a no-op where it is missing)."""
    try:
        import torch._inductor.config as inductor_config
        switch = inductor_config.patch(force_disable_caches=True)
    except (ImportError, AttributeError, RuntimeError):
        switch = contextlib.nullcontext()
    with switch, warnings.catch_warnings():
        # torch then warns that its profile-guided compile cache is off: here that is the point
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
        yield


def run_ladder(rungs: list[Rung], config: llama.LlamaConfig, ids: torch.Tensor, device, n_steps: int,
               batch_size: int, block_size: int, peak: float, seed: int = 0, fp32_tol: float = 2e-3,
               bf16_tol: float = 0.05, skip: dict[str, str] | None = None, bf16_step=None) -> list[Row]:
    """Climb the ladder: each rung adds its change to the previous settings. ``skip`` maps a
    rung name to why it does not run here; its row is kept with the reason and no numbers.
    ``bf16_step(model, optimizer, x, y) -> loss`` (lesson 13's exercise) takes the steps of every
    rung that runs in bfloat16, instead of ``training_step``."""
    settings, rows, base_loss = dict(BASE_SETTINGS), [], None
    skip = skip or {}
    for rung in progress(rungs, desc="ladder"):
        if rung.name in skip:
            rows.append(Row(rung.name, {**settings, **rung.change}, skipped=skip[rung.name], why=rung.why))
            continue  # the change is not applied: later rows go on without it
        settings = {**settings, **rung.change}
        by_learner = bf16_step is not None and settings["dtype"] == "bfloat16"
        r = run_rung(settings, config, ids, device, n_steps, batch_size, block_size, seed,
                     make_step=_step_maker(bf16_step) if by_learner else None,
                     cold_compile=bool(rung.change.get("compile")))
        same_batches = (settings["batch_size"] or batch_size) == batch_size
        tol = None if not same_batches else (bf16_tol if settings["dtype"] == "bfloat16" else fp32_tol)
        if settings["vocab_multiple"] > 1 and tol is not None:
            tol = max(tol, 0.1)  # extra logits join the softmax: a slightly different run
        row = Row(rung.name, dict(settings), r["ms_per_step"], r["tokens_per_s"],
                  mfu(r["flops_per_token"], r["tokens_per_s"], peak), r["loss"], tol, r["compile_s"], why=rung.why)
        if base_loss is None:
            base_loss = row.loss
        elif tol is not None and abs(row.loss - base_loss) > tol:
            raise AssertionError(f"ladder row {rung.name!r}: loss {row.loss:.4f} differs from the baseline's "
                                 f"{base_loss:.4f} by more than {tol}")
        rows.append(row)
    return rows


def _step_maker(step):
    """``run_rung``'s ``make_step`` for a step function ``step(model, optimizer, x, y)``."""
    def make_step(model, optimizer, device, dtype):
        return lambda x, y: step(model, optimizer, x, y)
    return make_step


def ladder_json(rows: list[Row], device, config: llama.LlamaConfig, extra: dict | None = None) -> dict:
    """What a ladder run saves: the device, torch, the date, the config and the rows."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info().model
    return dict(device=name, device_type=device.type, torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                config=dataclasses.asdict(config), **(extra or {}), rows=[dataclasses.asdict(r) for r in rows])


def rows_from_json(d: dict) -> list[Row]:
    return [Row(**r) for r in d["rows"]]


def measured_ladders(folder: str | Path | None = None) -> list[dict]:
    """Ladder JSONs committed under ``nblib/measured/`` (``ladder_*.json``, GPU runs someone made), if any."""
    folder = Path(folder) if folder else Path(__file__).resolve().parent / "measured"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("ladder_*.json"))] if folder.is_dir() else []


def default_setup(device) -> tuple[llama.LlamaConfig, int, int]:
    """(config, batch size, block size) for a command-line run: nanoGPT's shakespeare-char model
    on a GPU, a small one on a CPU."""
    if torch.device(device).type == "cuda":
        return llama.LlamaConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 64, 256
    return llama.LlamaConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128), 16, 128


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Lesson 13's speed ladder on this machine's device.")
    parser.add_argument("--ladder", action="store_true", help="run the speed ladder")
    parser.add_argument("--out", default="ladder.json", help="where to write the JSON (commit it as nblib/measured/ladder_<gpu>.json for lesson 13 to show)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per rung")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile time)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a smoke test)")
    args = parser.parse_args(argv)
    if not args.ladder:
        parser.error("nothing to do: pass --ladder")
    from nblib import data
    from nblib.text import CharTokenizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = data.read_text("tinyshakespeare")
    ids = torch.tensor(CharTokenizer(text).encode(text), dtype=torch.long)
    config, B, T = default_setup(device)
    if args.tiny:
        config, B, T = llama.LlamaConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16), 2, 16
    rungs = ladder_for(device, B, compile=not args.no_compile)
    skip = {}
    if device.type == "cpu" and not cpu_info().has_bf16:
        skip["bf16 autocast"] = "this CPU has no AVX-512 BF16: bfloat16 would be emulated"
    peak, source = device_peak(device)
    rows = run_ladder(rungs, config, ids, device, args.steps, B, T, peak, skip=skip)
    out = ladder_json(rows, device, config, dict(batch_size=B, block_size=T, steps=args.steps,
                                                 peak_flops=peak, peak_source=source))
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in rows:
        print(f"{r.name:45s} " + (f"skipped: {r.skipped}" if r.skipped else
                                  f"{r.ms_per_step:9.1f} ms/step {r.tokens_per_s:10.0f} tok/s MFU {r.mfu:.2%} loss {r.loss:.4f}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
