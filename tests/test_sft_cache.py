"""The cached SFT model (lessons 09-11 start from it): trained once, loaded after, retrained when its inputs change."""
import dataclasses

import pytest
import torch

from nblib import base, sft

BASE = dataclasses.replace(base.FAST, n_layer=1, n_head=2, n_embd=16, steps=4, warmup_steps=1, eval_interval=2,
                           eval_batches=1, batch_size=2, block_size=64)
TINY = dataclasses.replace(sft.FAST, steps=4, batch_size=2, eval_interval=2, eval_batches=1)


@pytest.fixture
def counted(monkeypatch):
    """sft.finetune, counting its calls."""
    calls = []
    real = sft.finetune

    def finetune(base_model, tokenizer, spec, text, device=None, show_progress=True):
        calls.append(spec)
        return real(base_model, tokenizer, spec, text, device, show_progress=False)

    monkeypatch.setattr(sft, "finetune", finetune)
    return calls


def load(tmp_path, spec=TINY, base_spec=BASE, **kw):
    return sft.load_or_train(spec, base_spec, cache_dir=tmp_path, verbose=False, show_progress=False, **kw)


def test_second_call_loads_the_same_weights(tmp_path, counted):
    first = load(tmp_path)
    assert len(counted) == 1 and not first.from_cache
    second = load(tmp_path)
    assert len(counted) == 1 and second.from_cache and second.path == first.path
    assert second.base.key == first.base.key and second.history.val == first.history.val
    ids = torch.tensor([first.tokenizer.encode("What is 1+2?")])
    torch.testing.assert_close(second.model(ids)[0], first.model(ids)[0], rtol=0, atol=0)


def test_fine_tuning_moves_the_weights_and_the_base_stays(tmp_path, counted):
    tuned = load(tmp_path)
    ids = torch.tensor([tuned.tokenizer.encode("What is 1+2?")])
    assert not torch.equal(tuned.model(ids)[0], tuned.base.model(ids)[0])
    again = base.load_or_train(BASE, cache_dir=tmp_path, verbose=False, show_progress=False)
    torch.testing.assert_close(again.model(ids)[0], tuned.base.model(ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("change", [dict(seed=1), dict(steps=5), dict(drop_carries=True), dict(weights=(1,) * 6)])
def test_a_changed_spec_retrains(tmp_path, counted, change):
    first = load(tmp_path)
    other = load(tmp_path, dataclasses.replace(TINY, **change))
    assert other.key != first.key and len(counted) == 2 and not other.from_cache


def test_another_base_model_retrains(tmp_path, counted):
    first = load(tmp_path)
    other = load(tmp_path, base_spec=dataclasses.replace(BASE, seed=2))
    assert other.key != first.key and other.base.key != first.base.key and len(counted) == 2


def test_a_damaged_cache_is_trained_again(tmp_path, counted, capsys):
    first = load(tmp_path)
    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    again = sft.load_or_train(TINY, BASE, cache_dir=tmp_path, show_progress=False)
    assert "unreadable" in capsys.readouterr().out
    assert not again.from_cache and len(counted) == 2 and load(tmp_path).from_cache


def test_a_printed_cache_path_names_no_ones_home(monkeypatch, tmp_path):
    from pathlib import Path

    from nblib import modelcache

    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    assert modelcache.shown(tmp_path / ".cache" / "nblib" / "models" / "sft-1") == "~/.cache/nblib/models/sft-1"
    assert modelcache.shown(Path("/elsewhere/models")) == "/elsewhere/models"
