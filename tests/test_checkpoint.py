"""nblib.checkpoint: safetensors round trips, tied weights, RNG states, config mismatch, checksums
(a flipped bit is an error) and saves that fail without leaving files behind."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nblib.checkpoint import (ConfigMismatchError, CorruptCheckpointError, load_checkpoint, load_model, read_metadata,
                              save_checkpoint)
from nblib.gpt import GPT, GPTConfig
from nblib.train import TrainConfig, configure_optimizer

CFG = GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16)


def trained_a_little(seed=0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = configure_optimizer(model, TrainConfig(lr=1e-2))
    for _ in range(3):
        idx = torch.randint(0, CFG.vocab_size, (2, 8))
        opt.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
    return model, opt


def test_round_trip_model_optimizer_step_extra(tmp_path):
    model, opt = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=3, extra={"note": [1, 2]})
    model2 = GPT(CFG)
    opt2 = configure_optimizer(model2, TrainConfig(lr=1e-2))
    meta = load_checkpoint(path, model2, opt2)
    assert meta["step"] == 3 and meta["extra"] == {"note": [1, 2]}
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert model2.lm_head.weight is model2.transformer.wte.weight  # tying survives
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == [{**g, "betas": tuple(g["betas"])} for g in s2["param_groups"]]
    for i in s1["state"]:
        for name in s1["state"][i]:
            torch.testing.assert_close(s1["state"][i][name], s2["state"][i][name], rtol=0, atol=0)


def test_tied_weight_stored_once_and_no_pickle(tmp_path):
    model, _ = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "model.transformer.wte.weight" in keys and "model.lm_head.weight" not in keys
    assert read_metadata(path)["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert path.read_bytes()[:2] != b"\x80\x04"  # not a pickle


def test_rng_states_are_restored(tmp_path):
    model, _ = trained_a_little()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    path = save_checkpoint(tmp_path / "ck.safetensors", model)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    load_checkpoint(path, GPT(CFG))
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], want[0])
    assert abs(got[1] - want[1]) < 1e-12 and abs(got[2] - want[2]) < 1e-12


def test_config_mismatch_names_the_fields(tmp_path):
    model, _ = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model)
    other = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=3, n_head=2, n_embd=32))
    before = other.state_dict()["transformer.wte.weight"].clone()
    with pytest.raises(ConfigMismatchError) as err:
        load_checkpoint(path, other)
    assert "n_layer: checkpoint has 2, model has 3" in str(err.value)
    assert "n_embd: checkpoint has 16, model has 32" in str(err.value)
    assert "vocab_size" not in str(err.value)
    assert torch.equal(other.state_dict()["transformer.wte.weight"], before)  # untouched


def test_load_model_rebuilds_from_config(tmp_path):
    model, _ = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model)
    again = load_model(path)
    assert isinstance(again, GPT) and again.config == CFG
    idx = torch.randint(0, CFG.vocab_size, (1, 8))
    torch.testing.assert_close(model.eval()(idx)[0], again.eval()(idx)[0], rtol=0, atol=0)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors", GPT(CFG))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors is a safetensors file but not a course checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors", GPT(CFG))
    model, _ = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, GPT(CFG), configure_optimizer(GPT(CFG), TrainConfig()))


def damaged_files(tmp_path):
    """A real checkpoint cut in half and cut inside its header, random bytes, a JSON file."""
    model, _ = trained_a_little()
    whole = save_checkpoint(tmp_path / "ck.safetensors", model).read_bytes()
    files = {"half.safetensors": whole[: len(whole) // 2], "cut_header.safetensors": whole[:100],
             "random.safetensors": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
             "config.safetensors": b'{"n_layer": 2, "n_head": 2, "n_embd": 16}\n', "empty.safetensors": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize("load", [read_metadata, load_model, lambda path: load_checkpoint(path, GPT(CFG))])
def test_a_damaged_file_is_named_and_explained(tmp_path, load):
    files = damaged_files(tmp_path)
    # safetensors itself only says "incomplete metadata, file not fully covered" or "header too large"
    for name in ("half.safetensors", "cut_header.safetensors"):
        with pytest.raises(ValueError, match=rf"{name} is truncated: .*cut short\?\). Copy it again"):
            load(files[name])
    for name in ("random.safetensors", "config.safetensors", "empty.safetensors"):
        with pytest.raises(ValueError, match=rf"{name} is not a safetensors file.*not a course checkpoint"):
            load(files[name])


def test_a_checkpoint_from_before_a_config_field_existed_still_loads(tmp_path):
    # e.g. GPTConfig.bos_token_id / eos_token_id, added later: an older file has no such field
    from safetensors.torch import load_file, save_file

    model, _ = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    for field in ("bos_token_id", "eos_token_id"):
        del config["fields"][field]
    old = tmp_path / "old.safetensors"
    del meta["sha256"]  # older files have no checksum either
    save_file(load_file(str(path)), str(old), metadata={**meta, "config": json.dumps(config)})
    load_checkpoint(old, GPT(CFG))
    assert load_model(old).config == CFG
    with pytest.raises(ConfigMismatchError, match="eos_token_id: checkpoint has None, model has 3"):
        load_checkpoint(old, GPT(GPTConfig(**{**CFG.__dict__, "eos_token_id": 3})))


def test_a_hugging_face_folder_is_pointed_to_load_hf(tmp_path):
    from nblib.gpt import load_hf, save_hf

    model, _ = trained_a_little()
    save_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="load its folder with nblib.gpt.load_hf or nblib.llama.load_hf"):
        load_checkpoint(tmp_path / "hf" / "model.safetensors", GPT(CFG))
    assert load_hf(tmp_path / "hf").config == CFG


def test_a_flipped_bit_anywhere_is_an_error_not_silent_weights(tmp_path):
    model, opt = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=3)
    good = path.read_bytes()
    header = 8 + int.from_bytes(good[:8], "little")
    # bytes spread over the header (names, offsets, metadata) and over the tensors
    positions = list(range(0, header, header // 150)) + list(range(header, len(good), (len(good) - header) // 150))
    silent = []
    for i in positions:
        bad = bytearray(good)
        bad[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(bad))
        try:
            load_checkpoint(path, GPT(CFG), configure_optimizer(GPT(CFG), TrainConfig(lr=1e-2)))
        except ValueError:  # CorruptCheckpointError, or safetensors' own refusal, named and explained
            continue
        silent.append(i)
    assert silent == []
    path.write_bytes(good[: header + 50] + bytes([good[header + 50] ^ 4]) + good[header + 51:])
    with pytest.raises(CorruptCheckpointError, match=r"ck.safetensors is corrupt: .*sha256.*not loaded"):
        load_model(path)


def test_a_failed_save_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    model, _ = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, step=1)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")  # a partial file, as a full disk or Ctrl-C would leave
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nblib.checkpoint.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    assert load_model(tmp_path / "old.safetensors").config == CFG


def test_a_flipped_bit_in_the_checksum_key_itself_is_an_error(tmp_path):
    """Renamed by one bit ("sha256" -> "sha246"), the checksum would vanish and the file pass as one
    written before checksums existed; a metadata key no checkpoint writes is refused instead."""
    model, opt = trained_a_little()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=3)
    good = path.read_bytes()
    at = good.index(b'"sha256"') + 1
    for i in range(at, at + len("sha256")):
        for bit in range(8):
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            path.write_bytes(bytes(bad))
            with pytest.raises(ValueError):
                load_checkpoint(path, GPT(CFG), configure_optimizer(GPT(CFG), TrainConfig(lr=1e-2)))
