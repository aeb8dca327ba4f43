"""Tokenizers the lessons share. Lesson 04 builds BPE from scratch; this is the real thing."""
from __future__ import annotations

from functools import lru_cache

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from nblib import data

# GPT-2's pre-tokenization regex, as tiktoken writes it (possessive quantifiers are a
# speed-up; the splits are those of GPT-2's original `'s|'t|...| ?\p{L}+|...` pattern).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


@lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The real GPT-2 tokenizer (tiktoken's ``gpt2``), built from the data module's files.

    Unlike ``tiktoken.get_encoding("gpt2")`` this needs no network when the files are in
    ``NBLIB_DATA_DIR`` or the cache, and it checks their sha256 first.
    """
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data.path("gpt2-vocab")),
        encoder_json_file=str(data.path("gpt2-encoder")),
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )
