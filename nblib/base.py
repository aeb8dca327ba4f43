"""The base model that the post-training lessons (08-11) share, pretrained by the course and cached.

A small Llama-style model (``nblib.llama``) trained on tinyshakespeare at the character
level with the chat tokenizer (``nblib.chat.ChatTokenizer``: characters plus the chat's
special tokens, which pretraining never sees) by the course's training loop
(``nblib.train``). ``load_or_train(spec)`` returns it from the cache, training it first
when it is absent, so every post-training lesson runs on its own and in any order.

**The cache key** is a hash of everything that determines the weights: the ``BaseSpec``
(model sizes, training settings, seed, data set name), the tokenizer (its JSON) and the
sha256 of the training text. Change any of them and the key changes, so the model is
trained afresh; the old one stays until you delete it. The model lives in
``<cache>/models/base-<key>/`` (``<cache>`` is ``nblib.data.cache_dir()``, i.e.
``NBLIB_CACHE_DIR`` or ``~/.cache/nblib``): ``model.safetensors`` (an ``nblib.checkpoint``
with the config and the training history), ``tokenizer.json`` and ``spec.json``.

**A damaged cache retrains.** If the files are missing, unreadable (a truncated
safetensors file, broken JSON) or were written for another key, ``load_or_train`` says
so in one printed line and trains the model again; it is a cache, so nothing is lost.
Writing goes to a temporary folder that is renamed into place, so an interrupted run
never leaves a half-written model behind.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nblib import checkpoint, data, llama, modelcache, train
from nblib.chat import ChatTokenizer
from nblib.text import train_val_split

VERSION = 1  # bump when the training recipe changes in a way the spec does not capture


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines the base model's weights (besides the tokenizer and the data's bytes)."""

    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 96
    block_size: int = 128        # the model's context; pretraining windows are this long
    steps: int = 1500
    batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_interval: int = 250
    eval_batches: int = 20
    seed: int = 1337             # model initialisation and batches
    data: str = "tinyshakespeare"
    val_fraction: float = 0.1    # the end of the text is held out

    def model_config(self, tokenizer: ChatTokenizer) -> llama.LlamaConfig:
        return llama.LlamaConfig(vocab_size=tokenizer.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                                 n_head=self.n_head, n_embd=self.n_embd, eos_token_id=tokenizer.end_id)

    def train_config(self) -> train.TrainConfig:
        return train.TrainConfig(max_steps=self.steps, batch_size=self.batch_size, block_size=self.block_size,
                                 lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                                 weight_decay=self.weight_decay, eval_interval=self.eval_interval,
                                 eval_batches=self.eval_batches, seed=self.seed, dtype="float32")


# ~0.35M parameters; full mode: val ~1.74 after 1500 steps, about a minute on 2 CPU cores.
FULL = BaseSpec()
# FAST mode (CI starts with an empty cache): a few seconds of training, a model that is only a stand-in.
FAST = BaseSpec(n_layer=2, n_head=2, n_embd=32, steps=120, batch_size=8, warmup_steps=20, eval_interval=60,
                eval_batches=4)


def default_spec(fast: bool) -> BaseSpec:
    """``FAST`` in FAST mode, else ``FULL``: pass the lesson's ``FAST`` (its config cell reads ``NBLIB_FAST``)."""
    return FAST if fast else FULL


@dataclass
class Base:
    """What ``load_or_train`` returns: the model, its tokenizer, and facts about its training."""

    model: llama.Llama
    tokenizer: ChatTokenizer
    spec: BaseSpec
    key: str
    path: Path
    from_cache: bool
    history: train.History

    @property
    def val_loss(self) -> float:
        return self.history.val[-1]

    @property
    def train_seconds(self) -> float:
        """Wall time of the training steps when the model was trained (also when it was loaded from the cache)."""
        return self.history.seconds


def data_sha256(name: str) -> str:
    return data.sha256_of(data.path(name))


def cache_key(spec: BaseSpec, tokenizer: ChatTokenizer, sha256: str) -> str:
    """16 hex digits of a hash of the spec, the tokenizer, the data's sha256 and the recipe version."""
    return modelcache.key_of({"spec": dataclasses.asdict(spec), "tokenizer": tokenizer.to_dict(),
                              "data_sha256": sha256, "version": VERSION})


models_dir = modelcache.models_dir


def pretrain(spec: BaseSpec, tokenizer: ChatTokenizer, text: str, device=None,
             show_progress: bool = True) -> tuple[llama.Llama, train.History]:
    """Train a fresh base model: ``nblib.train.train`` on random windows of ``text``."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = train_val_split(ids, 1 - spec.val_fraction)
    torch.manual_seed(spec.seed)
    model = llama.Llama(spec.model_config(tokenizer))
    if device is not None:
        model = model.to(device)
    history = train.train(model, train_ids, val_ids, spec.train_config(), device=device, show_progress=show_progress)
    return model.eval(), history


def _load(path: Path, key: str, spec: BaseSpec, tokenizer: ChatTokenizer, device) -> tuple[llama.Llama, train.History]:
    """Read a cached model; any problem is an exception whose message says what is wrong."""
    saved_spec = json.loads((path / "spec.json").read_text())
    if saved_spec.get("key") != key:
        raise ValueError(f"spec.json names key {saved_spec.get('key')!r}, not {key!r}")
    if ChatTokenizer.load(path / "tokenizer.json") != tokenizer:
        raise ValueError("tokenizer.json differs from this tokenizer")
    model = llama.Llama(spec.model_config(tokenizer))
    meta = checkpoint.load_checkpoint(path / "model.safetensors", model, restore_rng=False)
    history = train.History.from_dict(meta["extra"]["history"])
    return model.to(device).eval(), history


def load_or_train(spec: BaseSpec, tokenizer: ChatTokenizer | None = None, *, device=None,
                  cache_dir: str | Path | None = None, retrain: bool = False, show_progress: bool = True,
                  verbose: bool = True) -> Base:
    """The base model for ``spec`` (``FULL``, ``FAST`` or your own), from the cache or trained now.

    - ``cache_dir``: where models are kept (default ``nblib.data.cache_dir() / "models"``);
    - ``retrain=True``: train even if a cached model exists (and replace it);
    - a cached model that cannot be read is trained again (the printed line says why).
    """
    tokenizer = ChatTokenizer() if tokenizer is None else tokenizer
    device = torch.device(device) if device is not None else torch.device("cpu")
    say = print if verbose else (lambda *a, **k: None)
    key = cache_key(spec, tokenizer, data_sha256(spec.data))
    path = models_dir(cache_dir) / f"base-{key}"

    def build():
        say(f"training the base model (key {key}): {spec.steps} steps; it is cached for next time")
        t0 = time.perf_counter()
        model, history = pretrain(spec, tokenizer, data.read_text(spec.data), device, show_progress)
        say(f"trained in {time.perf_counter() - t0:.0f} s, val loss {history.val[-1]:.4f}; "
            f"saved to {modelcache.shown(path)}")
        return model, history

    def save(result, folder: Path):
        model, history = result
        checkpoint.save_checkpoint(folder / "model.safetensors", model, step=spec.steps, rng=False,
                                   extra={"history": history.to_dict(), "key": key})
        tokenizer.save(folder / "tokenizer.json")
        (folder / "spec.json").write_text(json.dumps({"key": key, "spec": dataclasses.asdict(spec), "version": VERSION,
                                                      "data_sha256": data_sha256(spec.data)}, indent=1))

    (model, history), from_cache = modelcache.load_or_build(
        path, lambda p: _load(p, key, spec, tokenizer, device), build, save, retrain=retrain, say=say,
        what="base model")
    return Base(model, tokenizer, spec, key, path, from_cache, history)
