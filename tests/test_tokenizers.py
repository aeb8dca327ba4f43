"""The real GPT-2 tokenizer, built offline from the data module's files."""
import urllib.error

import pytest

from nblib import data
from nblib.tokenizers import GPT2_SPLIT_PATTERN, gpt2_tokenizer


@pytest.fixture
def offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own cache must not be needed
    gpt2_tokenizer.cache_clear()
    yield
    gpt2_tokenizer.cache_clear()


def test_known_gpt2_ids(offline):
    enc = gpt2_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.eot_token == 50256


def test_round_trip_of_varied_text(offline):
    enc = gpt2_tokenizer()
    text = "Déjà vu! 123 + 4.56 = x;\n\n\tdef f(): return 'ok'  🙂 日本語"
    assert enc.decode(enc.encode(text)) == text


def test_split_pattern_is_tiktokens():
    import tiktoken_ext.openai_public as tiktoken_ext
    assert GPT2_SPLIT_PATTERN == tiktoken_ext.r50k_pat_str
