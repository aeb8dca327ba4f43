"""Checks for lesson 04 (tokenizer): the learner's BPE pieces against ``nblib.bpe`` and hand values."""
from __future__ import annotations

from nblib import bpe
from nblib.checks import CheckFailed, call_learner, expect_equal, passed


def _call(what: str, fn, *args):
    """``call_learner``, plus the hint that every BPE decoder needs once."""
    try:
        return call_learner(what, fn, *args)
    except CheckFailed as err:
        if isinstance(err.__cause__, UnicodeDecodeError):
            raise CheckFailed(f"{what}: raised UnicodeDecodeError ({err.__cause__}). Bytes that are not valid "
                              f"UTF-8 must become '\ufffd': decode with errors='replace'") from err.__cause__
        raise


def check_get_stats(get_stats) -> None:
    """``get_stats(ids) -> {(a, b): count}`` counts every adjacent pair, overlaps included."""
    cases = [
        ([1, 2, 3, 1, 2], {(1, 2): 2, (2, 3): 1, (3, 1): 1}),
        ([7, 7, 7], {(7, 7): 2}),  # overlapping pairs both count
        ([5], {}),
        ([], {}),
        ([104, 105, 104, 105, 33], {(104, 105): 2, (105, 104): 1, (105, 33): 1}),
    ]
    for ids, expected in cases:
        got = _call(f"get_stats({ids})", get_stats, list(ids))
        if not isinstance(got, dict):
            raise CheckFailed(f"get_stats({ids}) should return a dict of pair -> count, got {type(got).__name__}")
        expect_equal(f"get_stats({ids})", dict(got), expected)
    passed("get_stats")


def check_merge(merge) -> None:
    """``merge(ids, pair, new_id)`` replaces every occurrence of ``pair``, left to right, without touching ``ids``."""
    cases = [
        ([5, 6, 6, 7, 9, 1], (6, 7), 99, [5, 6, 99, 9, 1]),
        ([6, 7, 6, 7], (6, 7), 256, [256, 256]),
        ([7, 7, 7], (7, 7), 256, [256, 7]),  # overlap: the left pair wins, the third 7 stays
        ([7, 7, 7, 7], (7, 7), 256, [256, 256]),
        ([1, 2, 3], (3, 1), 256, [1, 2, 3]),  # not present: unchanged
        ([3], (3, 3), 256, [3]),
        ([], (1, 2), 256, []),
    ]
    for ids, pair, new_id, expected in cases:
        what = f"merge({ids}, {pair}, {new_id})"
        arg = list(ids)
        got = _call(what, merge, arg, pair, new_id)
        expect_equal(what, list(got), expected)
        if arg != ids:
            raise CheckFailed(f"{what} changed its input list to {arg}; return a new list instead")
    passed("merge")


def _toy_tokenizer() -> bpe.Tokenizer:
    text = "the cat sat on the mat. the hat? that cat! aaaa bbbb " * 3
    return bpe.train(text, 256 + 20)


def check_encode(encode_chunk) -> None:
    """``encode_chunk(chunk_bytes, merges) -> ids``: apply the lowest-id merge first until none applies."""
    tok = _toy_tokenizer()
    for chunk in [" the", " that", " cat!", "aaaa", " bbbbb", "x", "", " mat.", "ébé"]:
        what = f"encode_chunk({chunk.encode()!r}, merges)"
        got = _call(what, encode_chunk, chunk.encode("utf-8"), dict(tok.merges))
        expected = tok.encode_chunk(chunk)
        if list(got) != expected:
            raise CheckFailed(f"{what}: expected {expected}, got {list(got)}")
    # Rank order, not frequency: (2, 3) was learned first, so it wins over the (1, 2) in front of it.
    merges = {(2, 3): 256, (1, 2): 257, (1, 256): 258}
    what = "encode_chunk(bytes([1, 2, 3]), {(2, 3): 256, (1, 2): 257, (1, 256): 258})"
    got = list(_call(what, encode_chunk, bytes([1, 2, 3]), merges))
    if got != [258]:
        raise CheckFailed(f"{what}: expected [258], got {got}. Apply the merge with the smallest new id first "
                          f"(here (2, 3) -> 256), not the leftmost or the most frequent pair")
    passed("encode_chunk")


def check_decode(decode) -> None:
    """``decode(ids, vocab) -> str``: join the tokens' bytes, then decode UTF-8, with U+FFFD for broken bytes."""
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256] = b"he"
    vocab[257] = b"llo"
    vocab[258] = "é".encode("utf-8")  # two bytes, one token
    cases = [
        ([256, 257], "hello"),
        ([104, 105], "hi"),
        ([258, 33], "é!"),
        ([0xC3, 0xA9], "é"),  # é's two bytes as two tokens: decode the bytes together, not one by one
        ([0xF0, 0x9F, 0x99, 0x82], "🙂"),
        ([0xC3], "\ufffd"),  # half a character: replaced, not an exception
        ([], ""),
    ]
    for ids, expected in cases:
        what = f"decode({ids}, vocab)"
        got = _call(what, decode, list(ids), vocab)
        if got != expected and ids == [0xC3]:
            raise CheckFailed(f"{what}: expected {expected!r}, got {got!r}. Hint: bytes.decode('utf-8', errors='replace')")
        if got != expected and ids == [0xC3, 0xA9]:
            raise CheckFailed(f"{what}: expected {expected!r}, got {got!r}. Join all the bytes first, then decode once")
        expect_equal(what, got, expected)
    passed("decode")


def check_bytes_to_unicode(bytes_to_unicode) -> None:
    """``bytes_to_unicode() -> {byte: char}``: GPT-2's printable stand-in for each of the 256 bytes."""
    got = _call("bytes_to_unicode()", bytes_to_unicode)
    expected = bpe.bytes_to_unicode()
    if not isinstance(got, dict) or sorted(got) != list(range(256)):
        raise CheckFailed("bytes_to_unicode() should return a dict with one entry for each byte value 0..255")
    for b in range(256):
        if got[b] != expected[b]:
            raise CheckFailed(
                f"bytes_to_unicode()[{b}] (byte {bytes([b])!r}): expected {expected[b]!r} (U+{ord(expected[b]):04X}), "
                f"got {got[b]!r}" + (f" (U+{ord(got[b]):04X})" if isinstance(got[b], str) and len(got[b]) == 1 else "")
            )
    passed("bytes_to_unicode")
