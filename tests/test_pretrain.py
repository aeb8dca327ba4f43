"""nblib.pretrain on the CPU: tiny runs of the real program (in-process, and under torchrun with
2 gloo processes), exact resume, checkpoints of wrapped models, MFU by hand, the float16 path,
the errors a user meets, and the faults a run survives: Ctrl-C and SIGTERM (also under torchrun),
a second run into the same --out, a non-finite loss, a flipped bit, an --out holding a run."""
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nblib import checkpoint, presets, pretrain, processes, runlog, shards
from nblib.checkpoint import ConfigMismatchError
from nblib.llama import Llama, LlamaConfig, resize_vocab
from nblib.train import Trainer, configure_optimizer, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def rows(log, kind):
    return [r for r in log if r["kind"] == kind]


def losses(log) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(log, "train")}


def run(out, data_dir, *extra, preset="shakespeare-char"):
    """The program's tiny form, in this process; returns the log rows."""
    pretrain.main(["--preset", preset, "--tiny", "--out", str(out), "--data-dir", str(data_dir), *extra])
    return read_log(out)


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    return shards.ensure_prepared("shakespeare-char", tmp_path_factory.mktemp("data") / "shakespeare-char")


@pytest.fixture(scope="module")
def straight(char_data, tmp_path_factory):
    """One uninterrupted tiny run: 8 steps of 16 rows (1 process: 2 micro-batches of 8)."""
    out = tmp_path_factory.mktemp("straight")
    return out, run(out, char_data, "--debug")


# ---------------------------------------------------------------------------- presets

def test_presets_are_the_runs_they_claim():
    c = presets.PRESETS["shakespeare-char"]
    assert (c.n_layer, c.n_head, c.n_embd, c.seq_len) == (6, 6, 384, 256)  # nanoGPT's shakespeare-char
    assert (c.batch_size, c.global_batch, c.max_steps, c.lr, c.beta2) == (64, 64, 5000, 1e-3, 0.99)
    g = presets.PRESETS["gpt2-124m"]
    assert g.tokens_per_step == 524_288 and abs(g.max_steps * g.tokens_per_step - 10e9) < 1e6
    assert (g.lr, g.warmup_steps, g.data) == (6e-4, 715, "fineweb-edu")
    assert [presets.accum_steps(g, n) for n in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(ValueError, match="not a multiple of batch_size x processes"):
        presets.accum_steps(g, 16)
    config = presets.preset_model(g, 50257)
    assert config.vocab_size == 50304  # padded to a multiple of 128
    with torch.device("meta"):
        assert 123e6 < Llama(config).num_params() < 125e6
    assert presets.PRESETS["colab-t4"].dtype == "float16"
    for name, preset in presets.PRESETS.items():
        small = presets.tiny(preset)
        assert small.max_steps <= 10 and small.data in shards.PACKAGED_SOURCES, name
        with torch.device("meta"):
            n = Llama(presets.preset_model(small, 65 if small.data == "shakespeare-char" else 50257)).num_params()
        assert n < (300_000 if small.data == "shakespeare-char" else 3_500_000), name


# ---------------------------------------------------------------------------- one process

def test_tiny_run_writes_its_log_config_checkpoint_and_sample(straight):
    out, log = straight
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "ckpt.safetensors", "config.json", "log.jsonl",
                                                  "run.lock"]
    assert [r["step"] for r in rows(log, "train")] == list(range(1, 9))
    assert [r["step"] for r in rows(log, "eval")] == [0, 4, 8]
    first, last = rows(log, "eval")[0], rows(log, "eval")[-1]
    assert abs(first["val_loss"] - math.log(128)) < 0.1 and last["val_loss"] < first["val_loss"] - 0.3
    for r in rows(log, "train"):
        assert r["tokens_per_s"] > 0 and r["memory_bytes"] > 0 and r["grad_norm"] > 0 and 0 < r["mfu"] < 1
        assert r["tokens"] == r["step"] * 16 * 64
    config = json.loads((out / "config.json").read_text())
    assert config["accum_steps"] == 2 and config["world_size"] == 1 and config["model"]["vocab_size"] == 128
    assert config["data"]["vocab_size"] == 65 and config["dtype"] == "float32" and config["compile"] is False
    summary = rows(log, "summary")[0]
    assert summary["finished"] and summary["step"] == 8 and summary["val_loss"] == last["val_loss"]
    sample = rows(log, "sample")[0]
    chars = shards.read_manifest(config["data"]["folder"])["chars"]
    assert len(sample["text"]) == 32 and set(sample["text"]) <= set(chars)  # no padding token sampled
    model = checkpoint.load_model(out / "ckpt.safetensors")  # a plain Llama, no program needed
    assert isinstance(model, Llama) and model.config.vocab_size == 128
    assert checkpoint.read_metadata(out / "ckpt.safetensors")["extra"]["rows_done"] == 8 * 16


def test_mfu_by_hand(straight):
    # the tiny model: 2 layers, 64 wide, SwiGLU hidden int(8 * 64 / 3) = 170, vocabulary 65 -> 128
    per_layer = 4 * 64 * 64 + 3 * 64 * 170 + 2 * 64  # q k v o, gate up down, two RMSNorm gains
    n = 2 * per_layer + 64 + 128 * 64  # + the final norm + lm_head (the input embedding does no matmul)
    flops_per_token = 6 * n + 12 * 2 * 64 * 64  # + attention's scores and weighted sum, at T = 64
    assert flops_per_token == 737_664
    assert pretrain.run_mfu(flops_per_token, 1000.0, 1e9, 2) == pytest.approx(737_664 * 1000 / 2e9)
    assert pretrain.run_mfu(flops_per_token, 1000.0, None, 1) is None
    out, log = straight
    config = json.loads((out / "config.json").read_text())
    assert config["flops_per_token"] == flops_per_token
    for r in rows(log, "train"):
        assert r["mfu"] == pytest.approx(flops_per_token * r["tokens_per_s"] / config["peak_flops_per_device"])
    assert config["devices_in_peak"] == 1


def test_resume_equals_the_uninterrupted_run(straight, char_data, tmp_path):
    _, uninterrupted = straight
    first = run(tmp_path, char_data, "--stop-at", "3")
    assert max(losses(first)) == 3 and not rows(first, "summary")[0]["finished"] and not rows(first, "sample")
    log = run(tmp_path, char_data, "--resume")
    assert rows(log, "start")[-1] == {**rows(log, "start")[-1], "step": 3, "resumed": True}
    got, want = losses(log), losses(uninterrupted)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])
    val = {r["step"]: r["val_loss"] for r in rows(log, "eval")}
    assert val == pytest.approx({r["step"]: r["val_loss"] for r in rows(uninterrupted, "eval")}, rel=1e-6)


# ---------------------------------------------------------------------------- two processes (DDP, gloo)

def torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nblib.pretrain", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NBLIB_FAST": "1", "NBLIB_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(char_data, tmp_path):
    # 32 rows a step: one process does 4 micro-batches of 8; two do 2 each, the first under no_sync
    args = ["--preset", "shakespeare-char", "--tiny", "--data-dir", str(char_data), "--debug", "--global_batch", "32",
            "--max_steps", "6", "--eval_interval", "3"]
    pretrain.main(args + ["--out", str(tmp_path / "one")])
    single = read_log(tmp_path / "one")
    out = tmp_path / "ddp"
    proc = torchrun(args + ["--out", str(out)])
    log = read_log(out)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["accum_steps"] == 2
    assert config["devices_in_peak"] == 1  # two CPU processes share one machine's cores
    # the same global batches give the same losses (up to the order of float additions)
    got, want = losses(log), losses(single)
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-4), step
    val = [r["val_loss"] for r in rows(log, "eval")]
    assert val == pytest.approx([r["val_loss"] for r in rows(single, "eval")], rel=1e-4)
    # the ranks read different rows, which together are the single process's step
    debug = rows(log, "debug")[0]
    rank0, rank1 = debug["rows"]
    assert not set(rank0) & set(rank1) and set(debug["window_starts"][0]) != set(debug["window_starts"][1])
    assert sorted(rank0 + rank1) == list(range(16))  # the first micro-step of both: rows 0-15 of step 0's 32
    one = rows(single, "debug")[0]
    assert one["rows"] == [list(range(8))] and one["window_starts"][0] == debug["window_starts"][0]
    # only rank 0 wrote: one row per step, one start, the three files, each line printed once
    assert len(rows(log, "train")) == 6 and len(rows(log, "start")) == 1 and len(rows(log, "summary")) == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "ckpt.safetensors", "config.json", "log.jsonl",
                                                  "run.lock"]
    assert proc.stdout.count("step      1 | loss") == 1 and proc.stdout.count("summary:") == 1


AVERAGE_BY_HAND = """
def average_gradients(model):
    for weight in model.parameters():
        if weight.grad is not None:
            dist.all_reduce(weight.grad)
            weight.grad /= dist.get_world_size()
"""


@pytest.mark.slow
def test_gradients_averaged_by_hand_train_what_ddp_trains(char_data, tmp_path):
    # lesson 14: --average-gradients FILE replaces DDP with the learner's function; same losses, same weights
    from nblib import checkpoint
    from nblib.checks.pretrain import _HEADER
    args = ["--preset", "shakespeare-char", "--tiny", "--data-dir", str(char_data), "--global_batch", "32",
            "--max_steps", "4", "--eval_interval", "4"]
    torchrun(args + ["--out", str(tmp_path / "ddp")])
    by_hand = tmp_path / "yours.py"
    by_hand.write_text(_HEADER + AVERAGE_BY_HAND)
    torchrun(args + ["--out", str(tmp_path / "yours"), "--average-gradients", str(by_hand)])
    ddp, yours = read_log(tmp_path / "ddp"), read_log(tmp_path / "yours")
    assert rows(ddp, "start")[0]["gradient_sync"] == "DDP"
    assert rows(yours, "start")[0]["gradient_sync"] == f"average_gradients from {by_hand}"
    got, want = losses(yours), losses(ddp)
    assert sorted(got) == list(range(1, 5))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    a = checkpoint.load_model(tmp_path / "ddp" / "ckpt.safetensors", "cpu")
    b = checkpoint.load_model(tmp_path / "yours" / "ckpt.safetensors", "cpu")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    # without the all-reduce each process steps on its own half of the batch: the run goes on, the losses differ
    # (forgetting the division would not show here: AdamW's step does not change when every gradient doubles)
    by_hand.write_text(_HEADER + AVERAGE_BY_HAND.replace("dist.all_reduce(weight.grad)", "pass"))
    torchrun(args + ["--out", str(tmp_path / "sum"), "--average-gradients", str(by_hand)])
    summed = losses(read_log(tmp_path / "sum"))
    assert any(abs(summed[s] - want[s]) > 1e-4 * abs(want[s]) for s in (2, 3, 4))


def test_a_missing_average_gradients_file_is_refused_before_anything_starts(char_data, tmp_path):
    with pytest.raises(pretrain.UsageError, match="--average-gradients .*no such file"):
        pretrain.main(["--preset", "shakespeare-char", "--tiny", "--data-dir", str(char_data),
                       "--out", str(tmp_path / "x"), "--average-gradients", str(tmp_path / "nope.py")])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_run_begun_on_one_process_resumes_on_two(straight, char_data, tmp_path):
    _, uninterrupted = straight
    args = ["--preset", "shakespeare-char", "--tiny", "--data-dir", str(char_data), "--out", str(tmp_path)]
    pretrain.main(args + ["--stop-at", "5"])
    torchrun(args + ["--resume"])
    log = read_log(tmp_path)
    assert [r["world_size"] for r in rows(log, "start")] == [1, 2]
    assert losses(log) == pytest.approx(losses(uninterrupted), rel=1e-4)


# ---------------------------------------------------------------------------- wrapped models

@pytest.fixture
def process_group():
    """A gloo process group of this one process, so that DDP can wrap a model here."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_no_sync_until_the_last_micro_batch(process_group):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    ddp = DDP(model)
    all_reduces = []

    def count(_state, bucket):  # a communication hook in place of DDP's all-reduce of a gradient bucket
        all_reduces.append(bucket.index())
        done = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    ddp.register_comm_hook(None, count)
    loss_fn = pretrain.train_loss(ddp)
    x = torch.randint(0, 32, (2, 8))
    loss_fn(model, (x, x, False)).backward()
    loss_fn(model, (x, x, False)).backward()
    assert all_reduces == []  # gradients accumulate locally
    loss_fn(model, (x, x, True)).backward()
    assert all_reduces  # the last micro-batch all-reduces the sum


def test_checkpoint_of_a_compiled_ddp_model_loads_into_a_plain_one(process_group, tmp_path):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    compiled = torch.compile(model, backend="eager")  # Dynamo's wrapper, without Inductor's slow CPU compile
    x = torch.randint(0, 32, (2, 16))
    compiled(x)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert processes.unwrap(compiled) is model
    naive = checkpoint.save_checkpoint(tmp_path / "naive.safetensors", compiled)  # what unwrap prevents
    with pytest.raises(RuntimeError, match="_orig_mod"):
        checkpoint.load_checkpoint(naive, Llama(model.config))
    ddp = DDP(compiled)
    assert all(k.startswith("module._orig_mod.") for k in ddp.state_dict())
    assert processes.unwrap(ddp) is model and processes.unwrap(ddp, keep_compiled=True) is compiled
    path = checkpoint.save_checkpoint(tmp_path / "ck.safetensors", processes.unwrap(ddp))
    plain = checkpoint.load_model(path)
    assert type(plain) is Llama
    torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_resize_vocab_unpadding_keeps_the_real_rows(tie):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=128, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tie))
    small = resize_vocab(model, 65)
    x = torch.randint(0, 65, (2, 8))
    assert small.config.vocab_size == 65 and (small.lm_head.weight is small.model.embed_tokens.weight) == tie
    torch.testing.assert_close(small(x)[0], model(x)[0][..., :65], rtol=0, atol=0)
    padded = resize_vocab(small, 128)  # and back up: new rows, the real ones unchanged
    assert padded.config.vocab_size == 128 and (padded.lm_head.weight is padded.model.embed_tokens.weight) == tie
    torch.testing.assert_close(padded(x)[0][..., :65], small(x)[0], rtol=0, atol=0)


def test_the_run_fuses_adamw_on_the_cpu():
    """One kernel per parameter instead of several: the whole step about 5% faster on a CPU
    (tools/bench_train_step.py); the lessons' TrainConfig leaves it off on the CPU, the program asks for it."""
    preset = presets.tiny(presets.PRESETS["shakespeare-char"])
    cfg = pretrain.train_config(preset, 1, Path("x"))
    assert cfg.fused_adamw is True and configure_optimizer(Llama(presets.preset_model(preset, 65)), cfg).defaults["fused"]


# ---------------------------------------------------------------------------- float16

def test_float16_run_with_its_grad_scaler(char_data, tmp_path):
    # CPU autocast has float16 in this torch; the GradScaler is torch.amp's, on the CPU
    log = run(tmp_path, char_data, "--dtype", "float16", "--max_steps", "4")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    train = rows(log, "train")
    assert all(r["grad_scale"] == 2.0 ** 16 for r in train)  # no overflow, so never lowered
    assert all(math.isfinite(r["loss"]) for r in train) and train[-1]["loss"] < train[0]["loss"]
    meta = checkpoint.read_metadata(tmp_path / "ckpt.safetensors")
    assert meta["extra"]["grad_scaler"]["scale"] == 2.0 ** 16


def test_grad_scaler_skips_an_overflowing_step():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    preset = presets.tiny(presets.PRESETS["colab-t4"])
    assert resolve_dtype(torch.device("cpu"), preset.dtype) == "float16"
    assert resolve_dtype(torch.device("cpu"), "auto") == "float32"
    trainer = Trainer(model, pretrain.train_config(preset, 1, Path("unused"), "float16"), "cpu")
    assert trainer.scaler is not None and trainer.scaler.get_scale() == 2.0 ** 16
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 32, (2, 8))
    trainer.step([(x, x)], lambda m, b: m(*b)[1] * float("inf"))  # an overflowing gradient
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # step skipped
    assert trainer.scaler.get_scale() == 2.0 ** 15  # and the scale halved
    trainer.step([(x, x)], lambda m, b: m(*b)[1])
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------------- GPT-2 tokens

def test_gpt2_preset_tiny_form_runs(tmp_path):
    log = run(tmp_path / "out", tmp_path / "data", "--max_steps", "2", "--eval_batches", "1", preset="gpt2-124m")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"]["vocab_size"] == 50304
    assert rows(log, "summary")[0]["finished"] and rows(log, "sample")[0]["prompt"] == "<|endoftext|>"


# ---------------------------------------------------------------------------- errors

def test_clear_errors(straight, char_data, tmp_path):
    ckpt = straight[0] / "ckpt.safetensors"

    def resume_with(*extra):
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        shutil.copy(ckpt, out / "ckpt.safetensors")
        return run(out, char_data, "--resume", *extra)

    with pytest.raises(ConfigMismatchError, match="n_layer: checkpoint has 2, model has 3"):
        resume_with("--n_layer", "3")
    with pytest.raises(ValueError, match="another data order"):
        resume_with("--global_batch", "32")
    with pytest.raises(ValueError, match="another TrainConfig"):
        resume_with("--lr", "3e-4")
    with pytest.raises(ValueError, match="is at step 8 and --max_steps is 8: nothing to train"):
        resume_with()
    out = tmp_path / "truncated"
    out.mkdir()
    (out / "ckpt.safetensors").write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is truncated"):
        run(out, char_data, "--resume")
    with pytest.raises(FileNotFoundError, match="python -m nblib.shards prepare --source fineweb-edu"):
        run(tmp_path / "x", char_data.parent / "absent", "--data", "fineweb-edu")
    broken = tmp_path / "broken"
    shutil.copytree(char_data, broken)
    (broken / "val_000000.bin").unlink()
    with pytest.raises(FileNotFoundError, match="val_000000.bin .* is missing"):
        run(tmp_path / "y", broken)
    with pytest.raises(ValueError, match="not a multiple"):
        run(tmp_path / "z", char_data, "--global_batch", "12")


# ---------------------------------------------------------------------------- faults: signals, NaN, bits, folders

def test_ctrl_c_saves_and_resuming_with_the_command_it_gives_equals_the_uninterrupted_run(
        straight, char_data, tmp_path, monkeypatch):
    _, uninterrupted = straight
    real = pretrain.TrainingRun.micro_batches

    def ctrl_c_during_step_4(self, step):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C: the handler only records it
        return real(self, step)

    monkeypatch.setattr(pretrain.TrainingRun, "micro_batches", ctrl_c_during_step_4)
    argv = ["--preset", "shakespeare-char", "--tiny", "--out", str(tmp_path), "--data-dir", str(char_data)]
    with pytest.raises(pretrain.Interrupted) as stop:
        pretrain.main(argv)
    monkeypatch.undo()
    assert stop.value.signum == signal.SIGINT and isinstance(stop.value, KeyboardInterrupt)
    message = str(stop.value)
    assert message.startswith(f"SIGINT: stopped after step 4 of 8, saved in {tmp_path / 'ckpt.safetensors'}")
    command = shlex.split(message.split("To go on: ")[1])
    assert command[1:3] == ["-m", "nblib.pretrain"] and command[3:] == argv + ["--resume"]
    assert checkpoint.read_metadata(tmp_path / "ckpt.safetensors")["step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    log = run(tmp_path, char_data, "--resume")  # what the message says to run
    assert rows(log, "stopped")[0]["step"] == 4 and losses(log) == losses(uninterrupted)  # bit for bit
    assert not list(tmp_path.glob("*.tmp"))


def wait_for_step(out, proc, step, seconds=120):
    """Wait until the run in ``proc`` has logged a train row at ``step`` or later."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (out / "log.jsonl").is_file():
            done = [r["step"] for r in read_log_partial(out) if r["kind"] == "train"]
            if done and done[-1] >= step:
                return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {seconds} s")


def read_log_partial(out):
    lines = (out / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


LONG = ["--preset", "shakespeare-char", "--tiny", "--max_steps", "3000", "--eval_interval", "1000", "--ckpt_interval",
        "1000"]  # minutes at full speed: time enough to be interrupted


def test_sigterm_and_a_second_run_into_the_same_out(char_data, tmp_path):
    out = tmp_path / "run"
    args = [*LONG, "--data-dir", str(char_data), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "nblib.pretrain", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NBLIB_PROGRESS": "0"})
    try:
        wait_for_step(out, proc, 3)
        with pytest.raises(presets.UsageError, match=r"another run is using .*run.lock"):
            pretrain.main(args)  # a second run into the same --out, while the first runs
        with pytest.raises(presets.UsageError, match="another run is using"):
            pretrain.main([*args, "--overwrite"])
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped = rows(read_log(out), "stopped")[0]["step"]
    assert stderr.splitlines() == [stderr.strip()] and "Traceback" not in stderr + stdout
    assert stderr.startswith(f"SIGTERM: stopped after step {stopped} of 3000") and "--resume" in stderr
    assert checkpoint.read_metadata(out / "ckpt.safetensors")["step"] == stopped
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.safetensors", "config.json", "log.jsonl", "run.lock"]
    # resumed for two more steps, it equals a run that was never stopped
    log = run(out, char_data, *LONG[3:], "--resume", "--stop-at", str(stopped + 2))
    straight = run(tmp_path / "straight", char_data, *LONG[3:], "--stop-at", str(stopped + 2))
    assert losses(log) == losses(straight)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_once_and_resumes(char_data, tmp_path):
    out = tmp_path / "ddp"
    args = [*LONG, "--data-dir", str(char_data), "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nblib.pretrain"]
    proc = subprocess.Popen(cmd + args, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "NBLIB_PROGRESS": "0"})
    try:
        wait_for_step(out, proc, 3)
        proc.send_signal(signal.SIGINT)  # torchrun passes it on to both processes
        output, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    log = read_log(out)
    stopped = rows(log, "stopped")
    assert len(stopped) == 1 and "SIGINT: stopped after step" in output, output[-3000:]
    step = stopped[0]["step"]
    assert checkpoint.read_metadata(out / "ckpt.safetensors")["step"] == step
    assert output.count("To go on: torchrun --standalone --nproc_per_node=2 -m nblib.pretrain") == 1
    resumed = run(out, char_data, *LONG[3:], "--resume", "--stop-at", str(step + 1))  # on one process
    straight = run(tmp_path / "one", char_data, *LONG[3:], "--stop-at", str(step + 1))
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-4)


def test_a_non_finite_loss_or_weight_stops_without_saving_it(char_data, tmp_path, monkeypatch):
    real = pretrain.train_loss

    def poisoned_from(step):
        def train_loss(runner):
            loss_fn = real(runner)

            def poisoned(model, batch):
                loss = loss_fn(model, batch)
                return loss * float("nan") if calls.append(1) or len(calls) > 2 * step else loss
            calls = []
            return poisoned
        return train_loss

    monkeypatch.setattr(pretrain, "train_loss", poisoned_from(4))  # steps 1-4 fine (2 micro-batches each)
    with pytest.raises(pretrain.TrainingDiverged, match=r"the training loss is nan at step 5 .*"
                       r"ckpt.safetensors keeps the weights of step 4, all finite.*lower --lr"):
        run(tmp_path / "a", char_data)
    model = checkpoint.load_model(tmp_path / "a" / "ckpt.safetensors")
    assert checkpoint.read_metadata(tmp_path / "a" / "ckpt.safetensors")["step"] == 4
    assert all(torch.isfinite(w).all() for w in model.parameters())
    monkeypatch.setattr(pretrain, "train_loss", poisoned_from(2))  # logged every 8 steps: the weights show it
    with pytest.raises(pretrain.TrainingDiverged, match="weights are no longer finite after step 4: .*no checkpoint"):
        run(tmp_path / "b", char_data, "--log_interval", "8")
    assert not (tmp_path / "b" / "ckpt.safetensors").exists()


def test_a_flipped_bit_in_the_checkpoint_is_named(straight, char_data, tmp_path):
    good = (straight[0] / "ckpt.safetensors").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 8  # inside the weights
    (tmp_path / "ckpt.safetensors").write_bytes(bytes(bad))
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"ckpt.safetensors is corrupt.*sha256"):
        run(tmp_path, char_data, "--resume", "--max_steps", "9")


def test_out_holding_a_run_is_refused_overwrite_moves_it_aside(straight, char_data, tmp_path, capsys):
    out = tmp_path / "out"
    run(out, char_data, "--stop-at", "2")
    (out / "notes.txt").write_text("mine")
    (out / "ckpt.safetensors.tmp").write_bytes(b"left by a save that was killed")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(presets.UsageError, match=r"holds a run \(ckpt.safetensors, config.json, "
                                                  r"log.jsonl, at step 2\): pass --resume .* --overwrite"):
        run(out, char_data)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    with pytest.raises(presets.UsageError, match="pass one of them"):
        run(out, char_data, "--resume", "--overwrite")
    log = run(out, char_data, "--overwrite")
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and "moved to" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == {
        k: v for k, v in before.items() if k in pretrain.RUN_FILES}
    assert (out / "notes.txt").read_text() == "mine" and not (out / "ckpt.safetensors.tmp").exists()
    assert losses(log) == losses(straight[1])  # a new run from step 0
    fresh = tmp_path / "fresh"
    run(fresh, char_data, "--resume", "--max_steps", "2")
    assert "--resume: no checkpoint in" in capsys.readouterr().out
    with pytest.raises(presets.UsageError, match="is a file"):
        run(out / "notes.txt", char_data)


def test_resume_with_a_larger_max_steps_trains_longer_at_min_lr(straight, char_data, tmp_path):
    shutil.copy(straight[0] / "ckpt.safetensors", tmp_path / "ckpt.safetensors")
    log = run(tmp_path, char_data, "--resume", "--max_steps", "12")
    train = rows(log, "train")
    assert [r["step"] for r in train] == [9, 10, 11, 12] and rows(log, "summary")[0]["finished"]
    assert all(r["lr"] == pytest.approx(presets.tiny(presets.PRESETS["shakespeare-char"]).min_lr) for r in train)
    assert json.loads((tmp_path / "config.json").read_text())["schedule_steps"] == 8
    assert checkpoint.read_metadata(tmp_path / "ckpt.safetensors")["step"] == 12
    log = run(tmp_path, char_data, "--resume", "--max_steps", "14")  # and again
    assert [r["step"] for r in rows(log, "train")][-2:] == [13, 14]


def test_a_long_cpu_run_is_estimated_and_never_silent(char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "LONG_RUN_S", 0.0)
    monkeypatch.setattr(runlog, "PROGRESS_S", 0.0)
    run(tmp_path, char_data, "--max_steps", "2", "--log_interval", "2")
    out = capsys.readouterr().out
    assert re.search(r"estimate: 2 steps of about [0-9.e-]+ s on this CPU and 1 evaluations .*: about \d+ s\. .*"
                     "--tiny", out)
    assert "evaluating at step 0: train batch 2 of 2" in out
    assert re.search(r"step      1 of 2 \| [0-9.e-]+ s a step \| about \d+ s left", out)
    assert pretrain.duration(2 * 86400 + 3 * 3600 + 5) == "2 d 3 h" and pretrain.duration(3900) == "1 h 5 min"


BAD_FLAGS = [  # (arguments, what the error must say)
    *[(["--" + name, "0"], f"--{name} must be >= 1") for name in presets.POSITIVE],
    *[(["--" + name, "-1"], f"--{name} must be >= 0") for name in presets.NON_NEGATIVE],
    (["--max_steps", "-5"], "--max_steps must be >= 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"), (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"), (["--lr=-1e-3"], "--lr must be a finite number > 0"),
    (["--min_lr", "-1"], "--min_lr must be between 0 and --lr"), (["--min_lr", "1"], "--min_lr must be between 0"),
    (["--weight_decay", "-0.1"], "--weight_decay must be"), (["--weight_decay", "nan"], "--weight_decay must be"),
    (["--beta1", "1"], "--beta1 must be in"), (["--beta2", "-0.5"], "--beta2 must be in"),
    (["--grad_clip", "-1"], "--grad_clip must be a finite number >= 0"), (["--grad_clip", "inf"], "--grad_clip must"),
    (["--dtype", "float64"], "--dtype must be one of"), (["--data", " "], "--data must name"),
    (["--n_embd", "60", "--n_head", "7"], "n_embd=60 must be divisible by n_head=7"),
    (["--n_kv_heads", "3", "--n_head", "2"], "must be a multiple of n_kv_heads=3"),
    (["--n_embd", "66", "--n_head", "2"], "RoPE"),
    (["--stop-at", "0"], "--stop-at must be >= 1"), (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--resume", "--overwrite"], "pass one of them"),
]
ARGPARSE_BAD = [(["--max_steps", "1.5"], "expected a whole number"), (["--lr", "fast"], "expected a number"),
                (["--shuffle", "maybe"], "expected true or false"), (["--preset", "gpt5"], "invalid choice"),
                (["--max_steps"], "expected one argument")]


@pytest.mark.parametrize("args, message", BAD_FLAGS)
def test_every_flag_is_checked_before_anything_starts(args, message, tmp_path):
    with pytest.raises(presets.UsageError, match=re.escape(message)):
        pretrain.main(["--preset", "shakespeare-char", "--tiny", "--out", str(tmp_path / "o"), *args])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", ARGPARSE_BAD)
def test_unparseable_flags_name_themselves(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--preset", "shakespeare-char", "--tiny", "--out", str(tmp_path), *args])
    assert message in capsys.readouterr().err


def test_the_command_line_says_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nblib.pretrain", "--preset", "shakespeare-char", "--tiny",
                           "--out", str(tmp_path), "--lr", "inf", "--ckpt_interval", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "--lr must be a finite number > 0" in proc.stderr and "--ckpt_interval must be >= 1" in proc.stderr


def test_ctrl_c_during_the_first_evaluation_stops_before_any_step(char_data, tmp_path, monkeypatch):
    real = pretrain.eval_batches

    def ctrl_c_in_eval(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "eval_batches", ctrl_c_in_eval)
    with pytest.raises(pretrain.Interrupted, match="stopped after step 0 of 8, before the first step: nothing to save"):
        run(tmp_path, char_data)
    assert not rows(read_log(tmp_path), "eval") and not (tmp_path / "ckpt.safetensors").exists()
    monkeypatch.undo()
    log = run(tmp_path, char_data, "--resume")  # the command it gives: starts afresh (no checkpoint)
    assert rows(log, "summary")[0]["finished"]


def test_the_resume_command_drops_stop_at_and_overwrite():
    one, two = processes.Env(torch.device("cpu")), processes.Env(torch.device("cpu"), world_size=2, local_world_size=2)
    argv = ["--preset", "gpt2-124m", "--stop-at", "5", "--overwrite", "--out", "my runs/a", "--stop-at=7"]
    assert pretrain.resume_command(argv, one).endswith(
        " -m nblib.pretrain --preset gpt2-124m --out 'my runs/a' --resume")
    assert pretrain.resume_command(argv, two) == ("torchrun --standalone --nproc_per_node=2 -m nblib.pretrain "
                                                  "--preset gpt2-124m --out 'my runs/a' --resume")


# ---------------------------------------------------------------------------- FAST, and the benchmark

def test_nblib_fast_is_read_at_the_command_line_only(monkeypatch):
    """NBLIB_FAST=1 means --tiny where the command line is read (``main``), nowhere deeper:
    a caller that builds the arguments itself gets the preset it asked for."""
    monkeypatch.setenv("NBLIB_FAST", "1")
    args = pretrain.parser().parse_args(["--preset", "shakespeare-char"])
    assert pretrain.preset_from_args(args) == presets.PRESETS["shakespeare-char"]
    args.tiny = True
    assert pretrain.preset_from_args(args) == presets.tiny(presets.PRESETS["shakespeare-char"])


def test_benchmark_writes_nanogpts_data_and_reads_its_log(tmp_path):
    """tools/bench_train_step.py: nanoGPT's shakespeare_char files without the network (the
    sizes its prepare.py prints), and the per-iteration times of its log, evaluations left out."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_train_step as bench
    finally:
        sys.path.remove(str(ROOT / "tools"))
    folder = bench.prepare_nanogpt_data(tmp_path)
    meta = pickle.loads((folder / "meta.pkl").read_bytes())
    assert meta["vocab_size"] == 65 and meta["itos"][0] == "\n"
    assert (folder / "train.bin").stat().st_size == 2 * 1_003_854 and (folder / "val.bin").stat().st_size == 2 * 111_540
    assert bench.NANO_ITER.match("iter 7: loss 2.5113, time 41.52ms, mfu 0.10%").groups() == ("7", "41.52")
    assert bench.NANO_EVAL.match("step 2000: train loss 1.7520, val loss 1.8900")[3] == "1.8900"
    assert bench.tokens_per_s([9.0, 0.5, 0.5], warmup=1) == 2 * bench.TOKENS_PER_STEP / 1.0


def test_a_notebook_pass_sets_an_earlier_run_aside_and_deletes_nothing(tmp_path, capsys):
    run = tmp_path / "runs" / "base"
    assert runlog.set_aside(run) == run and not run.exists()  # nothing there: nothing to move
    run.mkdir(parents=True)
    assert runlog.set_aside(run) == run and run.is_dir()  # an empty folder stays
    for n in range(2):
        run.mkdir(exist_ok=True)
        (run / "ckpt.safetensors").write_bytes(bytes([n]) * 10)
        runlog.set_aside(run)
        assert not run.exists()
    kept = sorted(tmp_path.joinpath("runs").glob("base-previous-*"))
    assert [p.joinpath("ckpt.safetensors").read_bytes() for p in kept] == [b"\0" * 10, b"\1" * 10]
    assert "kept in" in capsys.readouterr().out
