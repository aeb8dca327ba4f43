"""The course's byte-level BPE (nblib.bpe) against hand-computed values and tiktoken's real gpt2 encoding."""
from __future__ import annotations

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from nblib import bpe, checks, data
from nblib.checks import tokenizer as tok_checks
from nblib.tokenizers import ENDOFTEXT, gpt2_tokenizer

# Prose, code, numbers, whitespace runs, emoji (with skin tone and ZWJ sequences), non-Latin scripts.
VARIED_TEXT = """The quick brown fox jumps over the lazy dog. I'm sure they'll say "you've won", won't they?
def merge(ids, pair, new_id):\n    return [x for x in ids if x != pair]  # TODO: fix  \t\r\n
Numbers: 0 7 42 1234567890 3.14159 -2.5e-10 1,000,000 $19.99 12:30pm 2026-11-21 ٣٤٥ ൧൨
Whitespace:   three spaces,\t\ttabs, trailing   \n\n\n   \n leading and    internal
Emoji: 🙂 👋🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🤖🤖
Русский текст, 中文字符, 日本語のテキスト, 한국어, العربية, עברית, हिन्दी, ελληνικά, Ünïcödé àccénts
SHOUTING CONTRACTIONS: DON'T, I'LL, WE'RE; mixed 's 'S 't 'T
"""


@pytest.fixture(scope="module")
def gpt2():
    return bpe.load_gpt2()


@pytest.fixture(scope="module")
def small():
    """A small BPE trained on a slice of Shakespeare, with a special token."""
    text = data.read_text("tinyshakespeare")[:50_000]
    return bpe.train(text, 256 + 40, special_tokens=[ENDOFTEXT])


# --- the two primitives, by hand -------------------------------------------------------------------

def test_get_stats_by_hand():
    assert bpe.get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert bpe.get_stats([7, 7, 7]) == {(7, 7): 2}
    assert bpe.get_stats([]) == {}
    # weights add up across calls (training counts each distinct chunk once, weighted)
    assert bpe.get_stats([1, 2], bpe.get_stats([1, 2, 1], weight=3), weight=2) == {(1, 2): 5, (2, 1): 3}


def test_merge_by_hand():
    assert bpe.merge([5, 6, 6, 7, 9, 1], (6, 7), 99) == [5, 6, 99, 9, 1]
    assert bpe.merge([7, 7, 7], (7, 7), 256) == [256, 7]
    assert bpe.merge([7, 7, 7, 7], (7, 7), 256) == [256, 256]
    assert bpe.merge([1, 2], (2, 1), 256) == [1, 2]


def test_train_by_hand():
    # "aaabdaaabac": aa is most frequent (4) -> 256; then (256, a) and (a, b) tie at 2, and
    # (256, a) is seen first -> 257; then (257, b) -> 258. So the text becomes [258, d, 258, a, c].
    tok = bpe.train("aaabdaaabac", 259, pattern=None)
    a, b = ord("a"), ord("b")
    assert tok.merges == {(a, a): 256, (256, a): 257, (257, b): 258}
    assert tok.vocab[258] == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]


@pytest.mark.parametrize("pattern", [None, bpe.GPT2_SPLIT_PATTERN])
def test_incremental_equals_naive_on_shakespeare(pattern):
    text = data.read_text("tinyshakespeare")[:20_000]
    naive = bpe.train(text, 256 + 120, pattern=pattern, method="naive")
    fast = bpe.train(text, 256 + 120, pattern=pattern, method="incremental")
    assert fast.merges == naive.merges and fast.vocab == naive.vocab


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab \né🙂", min_size=1, max_size=120), st.integers(256, 340), st.booleans())
def test_incremental_equals_naive_on_any_text(s, vocab_size, split):
    # Tiny alphabets make many ties: the tie-break (first occurrence) must match too, and both stop together.
    words = [list(w.encode()) for w in (regex.findall(bpe.GPT2_SPLIT_PATTERN, s) if split else [s])]
    weights = [1 + (i * 7) % 3 for i in range(len(words))]  # uneven weights, as distinct chunks have
    assert (bpe.learn_merges_incremental(words, weights, vocab_size - 256)
            == bpe.learn_merges_naive(words, weights, vocab_size - 256))


def test_train_method_names():
    with pytest.raises(ValueError, match="method"):
        bpe.train("hello", 260, method="fast")


def test_pre_split_keeps_merges_inside_chunks():
    # Without the split, "e t" across the word boundary is the most frequent pair.
    # Without the split, BPE glues words to the spaces after them, even across words.
    text = "the cat the hat the mat"
    no_split = bpe.train(text, 262, pattern=None)
    assert [no_split.vocab[i] for i in range(256, 262)] == [b"th", b"the", b"the ", b"at", b"at ", b"at the "]
    # With GPT-2's split a space can only start a token: " the", " cat".
    split = bpe.train(text, 262)
    assert [split.vocab[i] for i in range(256, 262)] == [b"th", b"the", b"at", b" the", b" c", b" cat"]


# --- GPT-2's merges reproduce tiktoken exactly -----------------------------------------------------

def test_gpt2_hand_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(ENDOFTEXT, allowed_special="all") == [50256]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("!") == [0]  # GPT-2's byte tokens are not in byte order: "!" (0x21) is id 0
    assert gpt2.n_vocab == 50257


def test_gpt2_matches_tiktoken_on_varied_text(gpt2):
    ref = gpt2_tokenizer()
    ids = gpt2.encode(VARIED_TEXT)
    assert ids == ref.encode(VARIED_TEXT)
    assert len(ids) > 300
    assert gpt2.decode(ids) == VARIED_TEXT


def test_gpt2_matches_tiktoken_on_shakespeare(gpt2):
    text = data.read_text("tinyshakespeare")[:200_000]
    assert gpt2.encode_ordinary(text) == gpt2_tokenizer().encode_ordinary(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_gpt2_matches_tiktoken_on_any_text(gpt2, s):
    assert gpt2.encode_ordinary(s) == gpt2_tokenizer().encode_ordinary(s)


def test_special_tokens(gpt2):
    ref = gpt2_tokenizer()
    text = f"one{ENDOFTEXT}two {ENDOFTEXT}"
    assert gpt2.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    assert gpt2.encode(text, allowed_special={ENDOFTEXT}).count(50256) == 2
    assert gpt2.encode_ordinary(text) == ref.encode_ordinary(text)  # as plain text: many tokens
    assert 50256 not in gpt2.encode_ordinary(text)
    with pytest.raises(ValueError, match="special token"):
        gpt2.encode(text)  # not allowed: an error, as in tiktoken
    with pytest.raises(ValueError, match="not special tokens"):
        gpt2.encode(text, allowed_special={"<|im_start|>"})
    assert gpt2.decode([50256]) == ENDOFTEXT


def test_bytes_to_unicode_by_hand():
    table = bpe.bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord("!")] == "!"
    assert table[0x20] == "Ġ" and table[0x0A] == "Ċ" and table[0x00] == "Ā"  # shifted to 256 + n
    # the 68 shifted bytes: 0x00-0x20 (33), 0x7F-0xA0 (34), then the soft hyphen 0xAD, the last one
    assert table[0x7F] == chr(256 + 33) and table[0xAD] == chr(256 + 67) == "Ń"


# --- the property test: decode(encode(s)) == s for any Unicode string --------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_gpt2(gpt2, s):
    assert gpt2.decode(gpt2.encode_ordinary(s)) == s


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_trained(small, s):
    assert small.decode(small.encode_ordinary(s)) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.just(ENDOFTEXT)), max_size=6).map("".join))
def test_roundtrip_with_specials(small, s):
    assert small.decode(small.encode(s, allowed_special="all")) == s


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_roundtrip_no_split(s):
    tok = bpe.train("abracadabra, banana bandana " * 4 + "héhé 🙂🙂", 280, pattern=None)
    assert tok.decode(tok.encode(s)) == s


# --- our merges inside tiktoken ------------------------------------------------------------------------

def test_to_tiktoken_gives_same_ids(small):
    enc = bpe.to_tiktoken(small)
    held_out = data.read_text("tinyshakespeare")[-20_000:] + VARIED_TEXT
    assert enc.encode_ordinary(held_out) == small.encode_ordinary(held_out)
    assert enc.encode(ENDOFTEXT, allowed_special="all") == small.encode(ENDOFTEXT, allowed_special="all")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_to_tiktoken_same_ids_on_any_text(small, s):
    assert bpe.to_tiktoken(small).encode_ordinary(s) == small.encode_ordinary(s)


def test_to_tiktoken_on_gpt2_merges(gpt2):
    enc = bpe.to_tiktoken(gpt2, "gpt2-again")
    assert enc.encode(VARIED_TEXT) == gpt2_tokenizer().encode(VARIED_TEXT)


# --- bad input gets a clear error ---------------------------------------------------------------------

def test_bad_input():
    with pytest.raises(ValueError, match="at least 256"):
        bpe.train("hello", 100)
    with pytest.raises(ValueError, match="non-empty"):
        bpe.train("", 300)
    tok = bpe.train("hello hello", 258)
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        tok.decode([99999])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="vocab"):
        bpe.Tokenizer({(1, 2): 256}, {i: bytes([i]) for i in range(256)} | {256: b"xy"})


# --- the exercise checks pass the reference and catch typical bugs ------------------------------------

def test_checks_accept_reference():
    # wrapped: a check refuses nblib's own functions passed as they are (the learner must write theirs)
    tok_checks.check_get_stats(lambda ids: bpe.get_stats(ids))
    tok_checks.check_merge(lambda ids, pair, new_id: bpe.merge(ids, pair, new_id))
    tok_checks.check_bytes_to_unicode(lambda: bpe.bytes_to_unicode())
    tok_checks.check_decode(lambda ids, vocab: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace"))

    def encode_chunk(chunk, merges):
        ids = list(chunk)
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            ids = bpe.merge(ids, pair, merges[pair])
        return ids
    tok_checks.check_encode(encode_chunk)
    tok_checks.check_train(_reference_train_merges)


def _reference_train_merges(ids, vocab_size):
    learned = bpe.learn_merges_naive([list(ids)], [1], vocab_size - 256)
    return {pair: 256 + k for k, (pair, _) in enumerate(learned)}


def test_check_train_catches_bugs():
    def most_common_last(ids, vocab_size):  # ties go to the last pair seen
        ids, merges = list(ids), {}
        for new_id in range(256, vocab_size):
            stats = bpe.get_stats(ids)
            if not stats:
                break
            best = max(stats.values())
            pair = [p for p, n in stats.items() if n == best][-1]
            ids, merges[pair] = bpe.merge(ids, pair, new_id), new_id
        return merges

    def never_stops(ids, vocab_size):  # merges a made-up pair when nothing is left
        merges = _reference_train_merges(ids, vocab_size)
        for new_id in range(256 + len(merges), vocab_size):
            merges[(0, 0, new_id)] = new_id
        return merges

    def in_place(ids, vocab_size):
        merges = _reference_train_merges(ids, vocab_size)
        ids.clear()
        return merges

    def off_by_one(ids, vocab_size):  # one merge too many: new ids up to vocab_size
        return _reference_train_merges(ids, vocab_size + 1)

    for fn in [most_common_last, never_stops, in_place, off_by_one]:
        with pytest.raises(checks.CheckFailed):
            tok_checks.check_train(fn)


def test_checks_catch_bugs():
    def stats_no_overlap(ids):  # skips overlapping pairs
        out, i = {}, 0
        while i + 1 < len(ids):
            out[(ids[i], ids[i + 1])] = out.get((ids[i], ids[i + 1]), 0) + 1
            i += 2 if ids[i] == ids[i + 1] else 1
        return out

    def merge_in_place(ids, pair, new_id):
        ids[:] = bpe.merge(ids, pair, new_id)
        return ids

    def merge_overlap_right(ids, pair, new_id):
        return bpe.merge(ids[::-1], pair[::-1], new_id)[::-1]

    def decode_per_token(ids, vocab):  # decodes each token alone: breaks multi-byte characters
        return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)

    def encode_left_first(chunk, merges):  # merges left to right, ignoring rank
        ids = list(chunk)
        changed = True
        while changed:
            changed = False
            for p in zip(ids, ids[1:]):
                if p in merges:
                    ids, changed = bpe.merge(ids, p, merges[p]), True
                    break
        return ids

    def no_shift(): return {b: chr(b) for b in range(256)}

    for check, fn in [(tok_checks.check_get_stats, stats_no_overlap), (tok_checks.check_merge, merge_in_place),
                      (tok_checks.check_merge, merge_overlap_right), (tok_checks.check_decode, decode_per_token),
                      (tok_checks.check_encode, encode_left_first), (tok_checks.check_bytes_to_unicode, no_shift)]:
        with pytest.raises(checks.CheckFailed):
            check(fn)


@pytest.mark.parametrize("specials", [["<|end|>", "<|end|><|x|>", "<|im|>", "<|im|>x"],
                                      ["<|end|><|x|>", "<|end|>", "<|im|>x", "<|im|>"]])
def test_overlapping_special_tokens_match_longest_first(specials):
    tok = bpe.Tokenizer({}, {i: bytes([i]) for i in range(256)}, special_tokens={s: 256 + k for k, s in enumerate(specials)})
    ids = tok.special_tokens
    text = "a<|end|><|x|>b<|end|>c<|im|>xd<|im|>"
    assert tok.encode(text, allowed_special="all") == [
        ord("a"), ids["<|end|><|x|>"], ord("b"), ids["<|end|>"], ord("c"), ids["<|im|>x"], ord("d"), ids["<|im|>"]]
    assert tok.decode(tok.encode(text, allowed_special="all")) == text
