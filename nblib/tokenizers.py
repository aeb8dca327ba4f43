"""Tokenizers the lessons share. Lesson 04 builds BPE from scratch; this is the real thing."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import tiktoken

from nblib import data

# GPT-2's pre-tokenization regex, as tiktoken writes it (possessive quantifiers are a
# speed-up; the splits are those of GPT-2's original `'s|'t|...| ?\p{L}+|...` pattern).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


def gpt2_mergeable_ranks(vocab_bpe_file: Path, encoder_json_file: Path) -> dict[bytes, int]:
    """GPT-2's merges as tiktoken's ``mergeable_ranks``: token bytes -> rank.

    What ``tiktoken.load.data_gym_to_mergeable_bpe_ranks`` computes, read here directly:
    tiktoken before 0.12 reads local paths only through the optional ``blobfile``
    package. GPT-2's files write bytes as printable characters: the printable bytes stand
    for themselves, the others were shifted to 256 and up, in order. The first 256 ranks
    are single bytes in that order; each merge adds the next rank. ``encoder.json`` must
    agree with the merges, token for token.
    """
    rank_to_byte = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in rank_to_byte}
    shifted = [b for b in range(256) if b not in char_to_byte.values()]
    for n, b in enumerate(shifted):
        rank_to_byte.append(b)
        char_to_byte[chr(256 + n)] = b

    def to_bytes(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    ranks = {bytes([b]): rank for rank, b in enumerate(rank_to_byte)}
    lines = Path(vocab_bpe_file).read_text(encoding="utf-8").split("\n")[1:-1]  # a version line first
    for first, second in (line.split() for line in lines):
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)

    encoder = json.loads(Path(encoder_json_file).read_text(encoding="utf-8"))
    from_encoder = {to_bytes(token): rank for token, rank in encoder.items()
                    if token not in (ENDOFTEXT, "<|startoftext|>")}
    if from_encoder != ranks:
        raise ValueError(f"{encoder_json_file} and {vocab_bpe_file} disagree: not GPT-2's tokenizer files")
    return ranks


@lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The real GPT-2 tokenizer (tiktoken's ``gpt2``), built from the data module's files.

    Unlike ``tiktoken.get_encoding("gpt2")`` this needs no network: GPT-2's two files ship
    with nblib (``NBLIB_DATA_DIR`` can stand in for them), and their sha256 is checked first.
    """
    ranks = gpt2_mergeable_ranks(data.path("gpt2-vocab"), data.path("gpt2-encoder"))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )
