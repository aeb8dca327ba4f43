"""A cache of the models the course trains for later lessons (the base model, the SFT model).

A model lives in a folder ``<cache>/models/<name>-<key>/``, where ``<key>`` is a hash of
everything that decides its weights (its spec, its tokenizer, the data's sha256, the
models it starts from), so a change to any of them trains a new model under a new key.
``load_or_build`` returns the cached model, or builds (trains) it and saves it:

- writing goes to a temporary folder renamed into place, so an interrupted run never
  leaves a half-written model behind;
- a folder that cannot be read (a truncated file, broken JSON, another key's files) is
  reported in one printed line and built again: it is a cache, nothing is lost.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from nblib import data

T = TypeVar("T")


def key_of(blob: dict) -> str:
    """16 hex digits of a hash of ``blob`` (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def models_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, or ``nblib.data.cache_dir() / "models"`` (``NBLIB_CACHE_DIR`` or ``~/.cache/nblib``)."""
    return Path(cache_dir) if cache_dir is not None else data.cache_dir() / "models"


shown = data.shown  # a path for a printed line, naming no one's machine


def load_or_build(path: Path, load: Callable[[Path], T], build: Callable[[], T], save: Callable[[T, Path], None],
                  *, retrain: bool = False, say: Callable[[str], None] = print, what: str = "model") -> tuple[T, bool]:
    """``(model, from_cache)``: ``load(path)`` if that works (and not ``retrain``), else ``build()`` saved by ``save(model, folder)``."""
    if path.exists() and not retrain:
        try:
            result = load(path)
            say(f"{what} loaded from the cache: {shown(path)}")
            return result, True
        except Exception as err:  # noqa: BLE001 (a cache: whatever is wrong, building again fixes it)
            say(f"the cached {what} in {shown(path)} is unreadable ({type(err).__name__}: {str(err)[:200]}); training it again")
    result = build()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(result, tmp)
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process put one there meanwhile: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return result, False
