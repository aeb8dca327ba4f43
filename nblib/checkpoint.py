"""Checkpoints in one safetensors file: model, optimizer, step, RNG states, config (lesson 06).

safetensors stores named tensors plus a dictionary of strings, and nothing executable,
unlike a pickle (``torch.save``), which runs code when loaded. One file holds:

- ``model.<name>``: the model's state dict. Tied weights (GPT-2's ``lm_head`` is ``wte``)
  are stored once; the metadata records which names are aliases.
- ``optimizer.<param index>.<name>``: the optimizer's per-parameter tensors (AdamW's
  moments and step); its hyper-parameters (param_groups) go in the metadata as JSON.
- ``rng.torch``, ``rng.cuda.<i>``: torch's RNG states; Python's and NumPy's go in JSON.
- metadata ``config``: the model config as JSON, with its class name, so that loading
  into a model of another shape fails early with the fields that differ.
- metadata ``step`` and ``extra`` (any JSON-able dict, e.g. the training history).

Files are written to a temporary name, flushed to the disk and renamed, so a run killed
while saving never leaves a half-written checkpoint behind (and a save that fails removes
its temporary file). The metadata ``sha256`` is a checksum of every tensor's bytes and of
the other metadata: ``load_checkpoint`` recomputes it, so a bit flipped on a disk or in a
copy is an error that names the file instead of weights that load silently wrong.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nblib.hf_dir import why_unreadable

FORMAT = "nblib-checkpoint-1"


class ConfigMismatchError(ValueError):
    """The checkpoint was saved from a model with another config; the message lists the fields."""


class CorruptCheckpointError(ValueError):
    """The checkpoint's contents do not match the checksum saved with it."""


def config_dict(config) -> dict:
    """A dataclass config as JSON-able data, with the qualified name of its class."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"model.config must be a dataclass, got {type(config).__name__}")
    cls = type(config)
    fields = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as they come back
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}


def check_config(saved: dict, config) -> None:
    """Raise ``ConfigMismatchError`` naming every field where ``saved`` and ``config`` differ."""
    ours = config_dict(config)
    problems = []
    if saved["class"] != ours["class"]:
        problems.append(f"config class: checkpoint has {saved['class']}, model has {ours['class']}")
    # A field added to the config class after the checkpoint was saved had its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    a, b = {**json.loads(json.dumps(defaults)), **saved["fields"]}, ours["fields"]
    for name in sorted(set(a) | set(b)):
        if a.get(name, "<absent>") != b.get(name, "<absent>"):
            problems.append(f"{name}: checkpoint has {a.get(name, '<absent>')!r}, model has {b.get(name, '<absent>')!r}")
    if problems:
        raise ConfigMismatchError("checkpoint does not fit this model's config:\n  " + "\n  ".join(problems))


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of tensors that share memory; return (tensors, {alias: kept name})."""
    kept, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t
    return kept, aliases


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [version, list(mt), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[-1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    step: int = 0, extra: dict | None = None, rng: bool = True) -> Path:
    """Save model (+ optimizer, step, RNG states, ``extra``) to one safetensors file."""
    path = Path(path)
    model_state, aliases = _dedupe(model.state_dict())
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    meta = {"format": FORMAT, "config": json.dumps(config_dict(model.config)), "step": str(int(step)),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "aliases": json.dumps(aliases), "extra": json.dumps(extra or {})}
    if optimizer is not None:
        opt = optimizer.state_dict()
        scalars = {}
        for index, per_param in opt["state"].items():
            for name, value in per_param.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        meta["optimizer"] = json.dumps({"param_groups": opt["param_groups"], "scalars": scalars})
    if rng:
        rng_tensors, rng_meta = _rng_state()
        tensors.update(rng_tensors)
        meta["rng"] = json.dumps(rng_meta)
    meta["sha256"] = checksum(tensors, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on the disk before the rename: a crash then leaves the old file or the new
        os.replace(tmp, path)
    except BaseException:  # an error, a full disk, Ctrl-C: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 of the metadata (but its own ``sha256``) and of each tensor's name, dtype, shape and
    bytes, in name order: the same for the tensors saved and the tensors loaded back."""
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k != "sha256"):
        h.update(f"{key}={meta[key]}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype (bfloat16 too)
    return h.hexdigest()


# every key save_checkpoint writes (an old file lacks "sha256"; one without an optimizer or RNG lacks those)
METADATA_KEYS = {"format", "config", "step", "model_class", "aliases", "extra", "optimizer", "rng", "sha256"}


def verify(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Raise ``CorruptCheckpointError`` if ``tensors`` and ``meta`` (read from ``path``) do not
    match the checksum saved with them. Files written before checksums existed have none."""
    unknown = sorted(set(meta) - METADATA_KEYS)
    if unknown:  # e.g. a bit flipped in the key "sha256" itself, which would otherwise pass as an old file
        raise CorruptCheckpointError(
            f"{path} is corrupt: its metadata has keys no course checkpoint writes ({', '.join(map(repr, unknown))}). "
            "Copy it again from where it came, or, for a training run, move it away and resume from another copy "
            "or train again; its weights were not loaded")
    if "sha256" in meta and checksum(tensors, meta) != meta["sha256"]:
        raise CorruptCheckpointError(
            f"{path} is corrupt: its contents do not match the sha256 checksum saved in it (a bit changed on "
            "the disk or in a copy). Copy it again from where it came, or, for a training run, move it away "
            "and resume from another copy or train again; its weights were not loaded")


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's metadata, decoded: format, config, model_class, step, extra, ..."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header against the file's size
            meta = f.metadata() or {}
    except SafetensorError as err:
        expected = "a course checkpoint (nblib.checkpoint.save_checkpoint writes those)"
        raise ValueError(f"{path} {why_unreadable(path, err, expected)}") from err
    if meta.get("format") != FORMAT:
        hint = (" It looks like a Hugging Face model.safetensors: load its folder with nblib.gpt.load_hf "
                "or nblib.llama.load_hf." if meta.get("format") == "pt" else "")
        raise ValueError(f"{path} is a safetensors file but not a course checkpoint: its metadata has format "
                         f"{meta.get('format')!r}, not {FORMAT!r} (written by nblib.checkpoint.save_checkpoint).{hint}")
    out = dict(meta)
    try:
        for key in ("config", "aliases", "extra", "optimizer", "rng"):
            if key in out:
                out[key] = json.loads(out[key])
        out["step"] = int(out["step"])
        out["config"]["class"], out["config"]["fields"], out["aliases"], out["extra"]  # noqa: B018 (must exist)
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(
            f"{path} is corrupt: its metadata cannot be read ({type(err).__name__}: {err}). Copy it again from "
            "where it came, or, for a training run, move it away and resume from another copy or train again"
        ) from err
    return out


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint into ``model`` (and ``optimizer``); return its metadata (``step``, ``extra``, ...).

    The config is checked first: a checkpoint from a model of another config raises
    ``ConfigMismatchError`` naming the fields that differ, before any weight is touched; then
    the checksum: a damaged file raises ``CorruptCheckpointError`` (a ``ValueError``).
    """
    meta = read_metadata(path)
    check_config(meta["config"], model.config)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        verify(path, tensors, f.metadata())  # before any weight is touched
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for alias, name in meta["aliases"].items():
        state[alias] = state[name]
    model.load_state_dict(state, strict=True)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"{path} holds no optimizer state (it was saved without an optimizer)")
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        for index, scalars in meta["optimizer"]["scalars"].items():
            opt_state.setdefault(int(index), {}).update(scalars)
        groups = meta["optimizer"]["param_groups"]
        for group in groups:  # JSON turned tuples into lists
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if restore_rng and "rng" in meta:
        _set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, meta["rng"])
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu", model_class=None) -> torch.nn.Module:
    """Build the model a checkpoint was saved from and load its weights.

    The classes are found from their names in the metadata; only classes inside
    ``nblib`` are imported that way (a file should not choose what code runs). For a
    model defined elsewhere, e.g. in a notebook, pass ``model_class``.
    """
    meta = read_metadata(path)

    def find(qualified: str):
        module, _, name = qualified.rpartition(".")
        if not module.startswith("nblib."):
            raise ValueError(f"{qualified} is not an nblib class; pass model_class= to load this checkpoint")
        return getattr(importlib.import_module(module), name)

    config_cls = find(meta["config"]["class"]) if model_class is None else None
    cls = model_class or find(meta["model_class"])
    if config_cls is None:  # the model class's own module holds its config class
        module = importlib.import_module(cls.__module__)
        config_cls = getattr(module, meta["config"]["class"].rpartition(".")[2])
    model = cls(config_cls(**meta["config"]["fields"]))
    load_checkpoint(path, model, restore_rng=False)
    return model.to(device)
