"""The real GPT-2 tokenizer, built offline from the packaged files, against tiktoken's own."""
import hashlib
import shutil
import urllib.error

import pytest
import regex
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from nblib import data
from nblib.tokenizers import GPT2_SPLIT_PATTERN, gpt2_mergeable_ranks, gpt2_tokenizer

# The pattern of the original GPT-2 release (encoder.py), before tiktoken's speed-ups.
GPT2_ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEXTS = [
    "Hello world",
    "Déjà vu! 123 + 4.56 = x;\n\n\tdef f(): return 'ok'  🙂 日本語",
    "I'm sure they'll say it's fine, we've seen THEY'RE   spaced   out.  \n  \n",
    "trailing spaces   ",
    "   leading spaces and a tab\tand CRLF\r\n",
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no override folder, an empty cache: only the packaged files remain."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own cache must not be needed
    gpt2_tokenizer.cache_clear()
    yield
    gpt2_tokenizer.cache_clear()


@pytest.fixture
def tiktokens_gpt2(monkeypatch, tmp_path):
    """tiktoken's own ``gpt2`` encoding, built by tiktoken's code with no network: its
    download cache (a file named by the sha1 of each URL) is filled with our copies."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    for name in ("gpt2-vocab", "gpt2-encoder"):
        key = hashlib.sha1(data.REGISTRY[name].url.encode()).hexdigest()
        shutil.copy(data.path(name), cache / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("tiktoken tried the network: its cache layout changed")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    return tiktoken.Encoding(**openai_public.gpt2())


def test_known_gpt2_ids(offline):
    enc = gpt2_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.eot_token == 50256


def test_round_trip_of_varied_text(offline):
    enc = gpt2_tokenizer()
    for text in TEXTS:
        assert enc.decode(enc.encode(text)) == text


def test_same_ranks_and_ids_as_tiktokens_own_gpt2(offline, tiktokens_gpt2):
    ranks = gpt2_mergeable_ranks(data.path("gpt2-vocab"), data.path("gpt2-encoder"))
    assert ranks == tiktokens_gpt2._mergeable_ranks
    ours = gpt2_tokenizer()
    for text in TEXTS:
        assert ours.encode(text) == tiktokens_gpt2.encode(text), text


def test_split_pattern_splits_like_gpt2s_original():
    for text in TEXTS:
        assert regex.findall(GPT2_SPLIT_PATTERN, text) == regex.findall(GPT2_ORIGINAL_PATTERN, text), text


def test_files_that_disagree_are_refused(tmp_path):
    vocab = tmp_path / "vocab.bpe"
    lines = data.path("gpt2-vocab").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges swapped: ranks no longer match encoder.json
    vocab.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="disagree"):
        gpt2_mergeable_ranks(vocab, data.path("gpt2-encoder"))
