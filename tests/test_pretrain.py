"""nblib.pretrain on the CPU: tiny runs of the real program (in-process, and under torchrun with
2 gloo processes), exact resume, checkpoints of wrapped models, MFU by hand, the float16 path,
and the errors a user meets."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nblib import checkpoint, pretrain, shards
from nblib.checkpoint import ConfigMismatchError
from nblib.llama import Llama, LlamaConfig
from nblib.train import Trainer

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
    c = pretrain.PRESETS["shakespeare-char"]
    assert (c.n_layer, c.n_head, c.n_embd, c.seq_len) == (6, 6, 384, 256)  # nanoGPT's shakespeare-char
    assert (c.batch_size, c.global_batch, c.max_steps, c.lr, c.beta2) == (64, 64, 5000, 1e-3, 0.99)
    g = pretrain.PRESETS["gpt2-124m"]
    assert g.tokens_per_step == 524_288 and abs(g.max_steps * g.tokens_per_step - 10e9) < 1e6
    assert (g.lr, g.warmup_steps, g.data) == (6e-4, 715, "fineweb-edu")
    assert [pretrain.accum_steps(g, n) for n in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(ValueError, match="not a multiple of batch_size x processes"):
        pretrain.accum_steps(g, 16)
    config = pretrain.model_config(g, 50257)
    assert config.vocab_size == 50304  # padded to a multiple of 128
    with torch.device("meta"):
        assert 123e6 < Llama(config).num_params() < 125e6
    assert pretrain.PRESETS["colab-t4"].dtype == "float16"
    for name, preset in pretrain.PRESETS.items():
        small = pretrain.tiny(preset)
        assert small.max_steps <= 10 and small.data in shards.PACKAGED_SOURCES, name
        with torch.device("meta"):
            n = Llama(pretrain.model_config(small, 65 if small.data == "shakespeare-char" else 50257)).num_params()
        assert n < (300_000 if small.data == "shakespeare-char" else 3_500_000), name


# ---------------------------------------------------------------------------- one process

def test_tiny_run_writes_its_log_config_checkpoint_and_sample(straight):
    out, log = straight
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "ckpt.safetensors", "config.json", "log.jsonl"]
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
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "ckpt.safetensors", "config.json", "log.jsonl"]
    assert proc.stdout.count("step      1 | loss") == 1 and proc.stdout.count("summary:") == 1


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
    assert pretrain.unwrap(compiled) is model
    naive = checkpoint.save_checkpoint(tmp_path / "naive.safetensors", compiled)  # what unwrap prevents
    with pytest.raises(RuntimeError, match="_orig_mod"):
        checkpoint.load_checkpoint(naive, Llama(model.config))
    ddp = DDP(compiled)
    assert all(k.startswith("module._orig_mod.") for k in ddp.state_dict())
    assert pretrain.unwrap(ddp) is model and pretrain.unwrap_ddp(ddp) is compiled
    path = checkpoint.save_checkpoint(tmp_path / "ck.safetensors", pretrain.unwrap(ddp))
    plain = checkpoint.load_model(path)
    assert type(plain) is Llama
    torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_unpadded_keeps_the_real_rows(tie):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=128, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tie))
    small = pretrain.unpadded(model, 65)
    x = torch.randint(0, 65, (2, 8))
    assert small.config.vocab_size == 65 and (small.lm_head.weight is small.model.embed_tokens.weight) == tie
    torch.testing.assert_close(small(x)[0], model(x)[0][..., :65], rtol=0, atol=0)


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
    preset = pretrain.tiny(pretrain.PRESETS["colab-t4"])
    assert pretrain.run_dtype(torch.device("cpu"), preset.dtype) == "float16"
    assert pretrain.run_dtype(torch.device("cpu"), "auto") == "float32"
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
        resume_with("--max_steps", "20")
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
