"""Headline numbers: the few results a lesson exists to produce, recorded as it prints them.

A lesson calls ``headline("dev loss", dev_loss)`` where it reaches a result worth
comparing with the public reference numbers. It always prints the value; when
``NBLIB_RECORD`` names a file (``python tools/course.py record`` sets it), it also appends
one JSON line there, which the record report puts beside the reference numbers.
"""
from __future__ import annotations

import json
import os
from numbers import Real

RECORD_ENV = "NBLIB_RECORD"


def headline(name: str, value, fmt: str = "{:.4f}", note: str = "") -> None:
    """Print ``name = value`` (numbers through ``fmt``) and record it if a record file is set."""
    if isinstance(value, bool) or not isinstance(value, Real):
        shown = str(value)
    else:
        value = float(value)
        shown = fmt.format(value)
    print(f"headline | {name} = {shown}" + (f"  ({note})" if note else ""))
    target = os.environ.get(RECORD_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value if isinstance(value, (float, int, bool)) else shown,
                                "shown": shown, "note": note}) + "\n")
