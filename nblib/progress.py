"""Progress bars for any loop longer than a few seconds.

A thin wrapper around ``tqdm.auto`` (a widget in Jupyter, text elsewhere). Set
``NBLIB_PROGRESS=0`` to silence every bar, e.g. in logs.
"""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    """``tqdm`` with the course's defaults: quiet when ``NBLIB_PROGRESS=0``."""
    kwargs.setdefault("disable", os.environ.get("NBLIB_PROGRESS", "1") == "0")
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
