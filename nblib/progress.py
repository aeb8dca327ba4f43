"""Progress bars for any loop longer than a few seconds.

A thin wrapper around ``tqdm.auto`` (a widget in Jupyter, text elsewhere). Set
``NBLIB_PROGRESS=0`` to silence every bar, e.g. in logs, or ``NBLIB_PROGRESS=text`` for
plain-text bars that update rarely: executed copies of the lessons keep those, since a
widget saved in a notebook file shows nothing on GitHub.
"""
from __future__ import annotations

import os
import sys


def progress(iterable=None, **kwargs):
    """``tqdm`` with the course's defaults: quiet when ``NBLIB_PROGRESS=0``, text when ``text``."""
    mode = os.environ.get("NBLIB_PROGRESS", "1").strip().lower()
    kwargs.setdefault("disable", mode == "0")
    if mode == "text":
        from tqdm.std import tqdm

        kwargs.setdefault("mininterval", 30.0)  # a few lines per loop, not hundreds
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("ascii", True)
        return tqdm(iterable, **kwargs)
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
