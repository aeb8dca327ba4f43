"""The shared base model's cache: trained once, loaded after, retrained when its inputs change or it is damaged."""
import dataclasses

import pytest
import torch

from nblib import base, chat

TINY = dataclasses.replace(base.FAST, n_layer=1, n_head=2, n_embd=16, steps=6, warmup_steps=2, eval_interval=3,
                           eval_batches=1, batch_size=2, block_size=32)


@pytest.fixture
def counted(monkeypatch):
    """base.pretrain, counting its calls."""
    calls = []
    real = base.pretrain

    def pretrain(spec, tokenizer, text, device=None, show_progress=True):
        calls.append(spec)
        return real(spec, tokenizer, text, device, show_progress=False)

    monkeypatch.setattr(base, "pretrain", pretrain)
    return calls


def test_second_call_loads_without_training(tmp_path, counted):
    first = base.load_or_train(TINY, cache_dir=tmp_path, verbose=False)
    assert len(counted) == 1 and not first.from_cache
    second = base.load_or_train(TINY, cache_dir=tmp_path, verbose=False)
    assert len(counted) == 1 and second.from_cache and second.path == first.path
    assert second.tokenizer == first.tokenizer and second.val_loss == first.val_loss
    assert second.train_seconds == first.train_seconds > 0
    ids = torch.tensor([first.tokenizer.encode("ROMEO:\nWhat")])
    torch.testing.assert_close(second.model(ids)[0], first.model(ids)[0], rtol=0, atol=0)
    assert sorted(p.name for p in first.path.iterdir()) == ["model.safetensors", "spec.json", "tokenizer.json"]


def test_training_is_reproducible_and_learns(tmp_path, counted):
    a = base.load_or_train(TINY, cache_dir=tmp_path / "a", verbose=False)
    b = base.load_or_train(TINY, cache_dir=tmp_path / "b", verbose=False)
    assert a.key == b.key and a.history.val == b.history.val
    assert a.history.val[-1] < a.history.val[0]
    assert a.model.config.vocab_size == chat.ChatTokenizer().vocab_size
    assert a.model.config.eos_token_id == a.tokenizer.end_id


@pytest.mark.parametrize("change", [dict(seed=1), dict(steps=7), dict(n_embd=24), dict(lr=1e-3)])
def test_a_changed_spec_is_another_key_and_retrains(tmp_path, counted, change):
    first = base.load_or_train(TINY, cache_dir=tmp_path, verbose=False)
    other = base.load_or_train(dataclasses.replace(TINY, **change), cache_dir=tmp_path, verbose=False)
    assert other.key != first.key and len(counted) == 2 and not other.from_cache
    assert base.load_or_train(TINY, cache_dir=tmp_path, verbose=False).from_cache  # the first one is still there


def test_the_key_depends_on_tokenizer_and_data():
    tok = chat.ChatTokenizer()
    key = base.cache_key(TINY, tok, "a" * 64)
    assert key == base.cache_key(TINY, chat.ChatTokenizer(), "a" * 64)
    assert key != base.cache_key(TINY, tok, "b" * 64)
    assert key != base.cache_key(TINY, chat.ChatTokenizer(chars=chat.CHARS[:-1]), "a" * 64)


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "delete_tokenizer", "wrong_key"])
def test_a_damaged_cache_is_trained_again(tmp_path, counted, capsys, damage):
    first = base.load_or_train(TINY, cache_dir=tmp_path)
    weights = first.path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage_json":
        (first.path / "spec.json").write_text("{oops")
    elif damage == "delete_tokenizer":
        (first.path / "tokenizer.json").unlink()
    else:
        (first.path / "spec.json").write_text('{"key": "0000000000000000"}')
    capsys.readouterr()
    again = base.load_or_train(TINY, cache_dir=tmp_path)
    assert "unreadable" in capsys.readouterr().out
    assert len(counted) == 2 and not again.from_cache
    assert base.load_or_train(TINY, cache_dir=tmp_path, verbose=False).from_cache  # repaired
    assert not list(tmp_path.glob("*.tmp-*"))


def test_retrain_forces_training(tmp_path, counted):
    base.load_or_train(TINY, cache_dir=tmp_path, verbose=False)
    assert not base.load_or_train(TINY, cache_dir=tmp_path, verbose=False, retrain=True).from_cache
    assert len(counted) == 2


def test_fast_is_read_in_the_lessons_config_cell_not_in_the_library(monkeypatch):
    """The config cell reads NBLIB_FAST once and passes FAST down: base, sft and chat never read it."""
    import inspect

    from nblib import sft

    monkeypatch.setenv("NBLIB_FAST", "1")
    assert base.default_spec(False) == base.FULL and base.default_spec(True) == base.FAST
    assert sft.default_spec(False) == sft.FULL and sft.default_spec(True) == sft.FAST
    with pytest.raises(TypeError):
        base.default_spec()   # no hidden default from the environment
    for module in (base, sft, chat):
        assert "is_fast" not in inspect.getsource(module) and "NBLIB_FAST=" not in inspect.getsource(module), module


def test_full_spec_is_the_lesson_size():
    model = base.llama.Llama(base.FULL.model_config(chat.ChatTokenizer()))
    assert 300_000 < model.num_params() < 400_000
