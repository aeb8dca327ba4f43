"""Lesson 13's nblib.profiling and its checks: peaks, MFU, activation counting, the profiler, the ladder."""
import json

import pytest
import torch

from nblib import hardware, llama, profiling
from nblib.checks import CheckFailed
from nblib.checks import profiling as checks


def tiny(**sizes):
    torch.manual_seed(0)
    return llama.Llama(llama.LlamaConfig(**{**dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16),
                                            **sizes}))


def test_mfu_by_hand():
    # 1e9 FLOPs per token at 2,000 tokens/s is 2e12 FLOP/s; on a 4e12 peak, half
    assert hardware.mfu(1e9, 2000, 4e12) == pytest.approx(0.5)
    model = tiny()
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    assert model.flops_per_token(8) == 6 * n + 12 * 2 * 16 * 8
    assert hardware.mfu(model.flops_per_token(8), 4 * 8 / 0.5, 1e9) == pytest.approx(model.flops_per_token(8) * 64 / 1e9)


def test_peak_table_on_real_names():
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 494.7e12
    assert hardware.peak_flops("NVIDIA H200", "float32") == 66.9e12
    assert hardware.peak_flops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312e12
    assert hardware.peak_flops("NVIDIA A100 80GB PCIe", "tf32") == 156e12
    assert hardware.peak_flops("Tesla T4", "float16") == 65e12
    assert hardware.peak_flops("Tesla T4", "float32") == 8.1e12
    assert hardware.lookup_peak("NVIDIA L4").device == "NVIDIA L4"
    assert hardware.lookup_peak("NVIDIA L40S") is None          # not an L4
    assert hardware.lookup_peak("NVIDIA H100 PCIe") is None     # not the SXM part
    assert hardware.lookup_peak("NVIDIA GeForce RTX 4090").flops["bfloat16"] == 165.2e12
    with pytest.raises(ValueError, match="no bfloat16"):
        hardware.peak_flops("Tesla T4", "bfloat16")
    with pytest.raises(KeyError, match="no peak FLOP/s known for 'Some GPU 9000'"):
        hardware.peak_flops("Some GPU 9000")
    assert hardware.lookup_peak("Some GPU 9000") is None
    assert all(p.source for p in hardware.PEAKS)


def test_cpu_peak_arithmetic():
    zen4 = hardware.CpuInfo("AMD EPYC", 2, 2.6, frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}), "AuthenticAMD", 25)
    assert hardware.fp32_flops_per_cycle(zen4) == 32 and zen4.has_bf16
    xeon = hardware.CpuInfo("Xeon", 4, 2.0, frozenset({"avx2", "fma", "avx512f"}), "GenuineIntel", 6)
    assert hardware.fp32_flops_per_cycle(xeon) == 64 and not xeon.has_bf16
    assert hardware.cpu_peak_flops(2, 2.6, 32) == pytest.approx(166.4e9)
    assert hardware.cpu_info().cores >= 1


def test_saved_tensor_counter_by_hand():
    w = torch.randn(3, 5, requires_grad=True)
    x = torch.randn(4, 3)
    with profiling.SavedTensors(exclude=[w]) as saved:
        h = x @ w                      # saves x (and w, excluded)
        y = h.sin()                    # saves h
        (y * 2.0).sum()                # a constant factor: nothing saved
    assert saved.nbytes == (4 * 3 + 4 * 5) * 4
    with profiling.SavedTensors() as saved:
        a = torch.randn(6, requires_grad=True)
        a.view(2, 3).exp().sum()       # exp saves its output
        (a * a).sum()                  # saves a twice: one storage
    assert saved.nbytes == 6 * 4 + 6 * 4


@pytest.mark.parametrize("sizes,B,T", [({}, 2, 8), (dict(n_layer=1, n_head=4, n_embd=32, vocab_size=65), 3, 16)])
def test_activation_formula_matches_the_count(sizes, B, T):
    model = tiny(**sizes)
    x = torch.randint(0, model.config.vocab_size, (B, T))
    measured = profiling.saved_activation_bytes(model, x, x.roll(-1, dims=1))
    assert abs(profiling.activation_bytes(model.config, B, T) - measured) <= 8  # one scalar (4 bytes) the formula leaves out


def test_manual_attention_matches_sdpa():
    model = tiny()
    x = torch.randint(0, 32, (2, 16))
    logits, loss = model(x, x)
    profiling.use_manual_attention(model)
    logits2, loss2 = model(x, x)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=1e-5)
    assert isinstance(model.model.layers[0].self_attn, profiling.ManualAttention)


@pytest.mark.parametrize("name,category", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"), ("aten::linear", "matmul"),
    ("aten::scaled_dot_product_attention", "attention"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"), ("aten::mul", "memory-bound"),
    ("aten::_softmax", "memory-bound"), ("aten::copy_", "memory-bound"), ("aten::silu_backward", "memory-bound"),
    ("Optimizer.step#AdamW.step", "optimizer"), ("autograd::engine::evaluate_function: MmBackward0", "other"),
])
def test_categorise(name, category):
    assert profiling.categorise(name) == category


def test_categorise_uses_the_region():
    assert profiling.categorise("aten::mul", "optimizer") == "optimizer"
    assert profiling.categorise("aten::mul", "backward") == "memory-bound"


def test_profile_step_categories(tmp_path):
    from nblib.train import TrainConfig, configure_optimizer
    model = tiny()
    opt = configure_optimizer(model, TrainConfig())
    x = torch.randint(0, 32, (2, 16))
    prof = profiling.profile_step(model, opt, x, x, "cpu", warmup=1, trace_path=tmp_path / "t.json")
    share = profiling.shares(profiling.category_times(prof))
    assert set(share) == set(profiling.CATEGORIES) and abs(sum(share.values()) - 1) < 1e-9
    assert share["matmul"] > 0 and share["attention"] > 0 and share["optimizer"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]


def test_tiny_ladder_runs_and_round_trips(tmp_path):
    config = llama.LlamaConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)
    ids = torch.randint(0, 32, (2000,), generator=torch.Generator().manual_seed(0))
    rungs = profiling.cpu_ladder(2, threads=1, compile=False)
    rows = profiling.run_ladder(rungs, config, ids, "cpu", 3, 2, 16, peak=1e11,
                                skip={"bf16 autocast": "test: skipped on purpose"})
    assert [r.name for r in rows] == [r.name for r in rungs]
    assert rows[3].skipped and rows[3].ms_per_step is None
    ran = [r for r in rows if not r.skipped]
    assert all(r.ms_per_step > 0 and 0 < r.mfu <= 1 for r in ran)
    assert all(abs(r.loss - rows[0].loss) <= r.loss_tol for r in ran if r.loss_tol is not None)
    assert ran[-1].loss_tol is None  # the larger batch is not compared
    path = tmp_path / "ladder_cpu.json"
    path.write_text(json.dumps(profiling.ladder_json(rows, "cpu", config)))
    back = json.loads(path.read_text())
    assert back["torch"] == torch.__version__ and back["config"]["n_embd"] == 16 and back["date"]
    assert profiling.rows_from_json(back) == rows
    assert profiling.measured_ladders(tmp_path) == [back]
    assert profiling.measured_ladders(tmp_path / "absent") == []


def test_the_bfloat16_rungs_take_the_learners_step():
    # lesson 13: run_ladder(bf16_step=...) trains every rung from bf16 autocast on with the learner's step
    config = llama.LlamaConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)
    ids = torch.randint(0, 32, (2000,), generator=torch.Generator().manual_seed(0))
    rungs = [r for r in profiling.cpu_ladder(2, threads=1, compile=False) if "thread" in r.name or "bf16" in r.name
             or "fused" in r.name]
    calls = []

    def bf16_step(model, opt, x, y):
        calls.append(model)
        return profiling.training_step(model, opt, x, y, x.device, "bfloat16")

    rows = profiling.run_ladder(rungs, config, ids, "cpu", 2, 2, 16, peak=1e11, bf16_step=bf16_step)
    bf16_rows = [r for r in rows if r.settings["dtype"] == "bfloat16"]
    assert len(bf16_rows) == 2 and len(calls) == 2 * 2  # two rungs of two steps, each with the learner's step
    assert abs(bf16_rows[0].loss - rows[0].loss) <= bf16_rows[0].loss_tol


def test_command_line_tiny(tmp_path):
    out = tmp_path / "l.json"
    profiling.main(["--ladder", "--tiny", "--no-compile", "--steps", "2", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["rows"] and d["device_type"] == "cpu" and d["peak_flops"] > 0


def test_gpu_ladder_rungs():
    names = [r.name for r in profiling.gpu_ladder(16)]
    assert names[0].startswith("baseline") and "TF32 matmuls" in names and "vocab padded to 128" in names


# --- the checks accept the reference implementations and reject wrong ones

def ref_mfu(model, seconds, B, T, peak):
    return model.flops_per_token(T) * B * T / seconds / peak


def ref_bytes(config, B, T):
    return profiling.activation_bytes(config, B, T)


def ref_step(model, opt, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_checks_accept_references():
    checks.check_mfu(ref_mfu)
    checks.check_activation_bytes(ref_bytes)
    checks.check_bf16_step(ref_step)

    def zeroing_step(model, opt, x, y):  # zero_grad(set_to_none=False) leaves zero tensors: also right
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.detach()

    checks.check_bf16_step(zeroing_step)


def test_checks_reject_wrong_answers():
    with pytest.raises(CheckFailed, match="measured_mfu"):
        checks.check_mfu(lambda m, s, B, T, p: m.flops_per_token(T) * B * T * s / p)  # multiplies by the time
    with pytest.raises(CheckFailed, match="activation_bytes"):
        checks.check_activation_bytes(lambda c, B, T: 4 * c.n_layer * B * T * (10 * c.n_embd + 4 * c.ffn_hidden))
    with pytest.raises(CheckFailed, match="course's own"):
        checks.check_activation_bytes(profiling.activation_bytes)

    def fp32_step(model, opt, x, y):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    with pytest.raises(CheckFailed, match="bfloat16"):
        checks.check_bf16_step(fp32_step)

    def converted_step(model, opt, x, y):
        model.bfloat16()
        _, loss = model(x, y)
        return loss.detach()

    with pytest.raises(CheckFailed, match="float32"):
        checks.check_bf16_step(converted_step)

    def no_update(model, opt, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        return loss.detach()

    with pytest.raises(CheckFailed):
        checks.check_bf16_step(no_update)


@pytest.mark.parametrize("name", ["NVIDIA T400", "NVIDIA T400 4GB", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
                                  "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4090 Laptop GPU",
                                  "NVIDIA H100 NVL", "NVIDIA L40", "NVIDIA A100X", "NVIDIA H100 PCIe"])
def test_a_card_whose_name_contains_a_known_one_is_not_that_card(name):
    """Today's substring match gave these the peak of the card named inside them (a T400 got a T4's)."""
    assert hardware.lookup_peak(name) is None
    with pytest.raises(KeyError, match="pass the peak yourself"):
        hardware.peak_flops(name)


KNOWN_NAMES = [("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"), ("NVIDIA H100 SXM", "NVIDIA H100 SXM"),
               ("NVIDIA H100 SXM5 94GB", "NVIDIA H100 SXM"), ("NVIDIA H200", "NVIDIA H200"),
               ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"), ("NVIDIA A100-PCIE-40GB", "NVIDIA A100"),
               ("Tesla T4", "NVIDIA T4"), ("NVIDIA L4", "NVIDIA L4"), ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090")]


@pytest.mark.parametrize("name,device", KNOWN_NAMES)
def test_known_cards_under_the_names_torch_gives_them(name, device):
    assert hardware.lookup_peak(name).device == device
