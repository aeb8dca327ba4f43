"""Shared by every test file: each pytest-xdist worker runs torch on one thread.

The workers already keep every core busy (``-n auto``), and a second torch thread per worker on
shared cores makes small tensor ops many times slower: they wait for each other (a speculative
decoding test took 82 s under xdist with torch's default threads, 5 s with one). Lessons in FAST
mode do the same (``nblib.setup``); a test run alone (``-n 0``) keeps torch's default.
"""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
