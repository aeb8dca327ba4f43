"""Checks for lesson 04 (tokenizer): the learner's BPE pieces against ``nblib.bpe`` and hand values."""
from __future__ import annotations

import regex

from nblib import bpe, data
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
        given = list(ids)
        got = _call(f"get_stats({ids})", get_stats, given)
        if given != ids:
            raise CheckFailed(f"get_stats({ids}) changed the list it was given to {given}; only read it")
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
        ([11, 2, 1, 21], (1, 2), 256, [11, 2, 1, 21]),  # ids, not digits: 11 and 2 do not hold the pair (1, 2)
    ]
    for ids, pair, new_id, expected in cases:
        what = f"merge({ids}, {pair}, {new_id})"
        arg = list(ids)
        got = _call(what, merge, arg, pair, new_id)
        if not isinstance(got, list):
            raise CheckFailed(f"{what} should return a list, got {type(got).__name__}")
        expect_equal(what, got, expected)
        if arg != ids:
            raise CheckFailed(f"{what} changed its input list to {arg}; return a new list instead")
    passed("merge")


def _first_difference(got: dict, expected: dict) -> str:
    """Where two merge tables part ways, in the order learned (new id 256, 257, ...)."""
    by_id_got = {i: p for p, i in got.items()}
    by_id_exp = {i: p for p, i in expected.items()}
    for i in sorted(set(by_id_got) | set(by_id_exp)):
        if by_id_got.get(i) != by_id_exp.get(i):
            return (f"the first difference is new id {i}: expected pair {by_id_exp.get(i, '(no merge, training stops)')}, "
                    f"got {by_id_got.get(i, '(no merge)')}")
    return "they differ"


def check_train(train_merges) -> None:
    """``train_merges(ids, vocab_size) -> {(a, b): new_id}``: the BPE loop on one sequence, ties to the first pair."""
    a, b, c, d = (ord(ch) for ch in "abcd")
    cases = [
        (list(b"aaabdaaabac"), 259, {(a, a): 256, (256, a): 257, (257, b): 258}),
        ([1, 2, 3, 1, 2, 3], 260, {(1, 2): 256, (256, 3): 257, (257, 257): 258}),  # (1, 2) ties (2, 3): first wins; stops at 259
        ([7, 7, 7, 7], 300, {(7, 7): 256, (256, 256): 257}),  # then a single token: nothing left to merge
        ([a, b, c], 256, {}),  # vocab_size 256: no merges at all
        ([5], 260, {}),
    ]
    for ids, vocab_size, expected in cases:
        what = f"train_merges({ids}, {vocab_size})"
        arg = list(ids)
        got = _call(what, train_merges, arg, vocab_size)
        if not isinstance(got, dict):
            raise CheckFailed(f"{what} should return a dict {{(left, right): new_id}}, got {type(got).__name__}")
        if arg != ids:
            raise CheckFailed(f"{what} changed the list it was given to {arg}; work on a copy")
        if dict(got) != expected:
            hint = ""
            if ids == [1, 2, 3, 1, 2, 3] and got.get((2, 3)) == 256:
                hint = ". (1, 2) and (2, 3) both occur twice: a tie goes to the pair that occurs first"
            elif len(got) > len(expected):
                hint = ". Stop when no adjacent pair is left (a single token has no pairs)"
            raise CheckFailed(f"{what}: expected {expected}, got {dict(got)}{hint}")
    # Text the course's trainer also learns from: a stretch of Shakespeare's held-out part, no pre-split.
    passage = data.read_text("tinyshakespeare")[-2500:]
    expected = bpe.train(passage, 256 + 30, pattern=None).merges
    what = "train_merges(2,500 characters of held-out Shakespeare as UTF-8 bytes, 286)"
    got = _call(what, train_merges, list(passage.encode("utf-8")), 256 + 30)
    if dict(got) != expected:
        raise CheckFailed(f"{what}: your 30 merges differ from the course's: {_first_difference(dict(got), expected)}")
    passed("train_merges")


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
    # A tokenizer trained on the start of Shakespeare, encoding chunks of its held-out end.
    text = data.read_text("tinyshakespeare")
    shakes = bpe.train(text[:30_000], 256 + 80)
    for chunk in dict.fromkeys(regex.findall(bpe.GPT2_SPLIT_PATTERN, text[-1500:])):
        what = f"encode_chunk({chunk.encode()!r}, merges of a BPE trained on Shakespeare)"
        got = _call(what, encode_chunk, chunk.encode("utf-8"), dict(shakes.merges))
        expected = shakes.encode_chunk(chunk)
        if list(got) != expected:
            raise CheckFailed(f"{what}: expected {expected}, got {list(got)}")
    # Rank order, not frequency or the dict's order: (2, 3) was learned first, so it wins over the
    # (1, 2) in front of it, wherever it sits in the dict.
    for merges in ({(2, 3): 256, (1, 2): 257, (1, 256): 258}, {(1, 256): 258, (1, 2): 257, (2, 3): 256}):
        what = f"encode_chunk(bytes([1, 2, 3]), {merges})"
        got = list(_call(what, encode_chunk, bytes([1, 2, 3]), merges))
        if got == [257, 3] and next(iter(merges)) == (1, 256):
            raise CheckFailed(f"{what}: expected [258], got {got}: the merges were applied in the dict's order, "
                              "which need not be the order they were learned. Apply the merge with the smallest "
                              "new id first (here (2, 3) -> 256)")
        if got != [258]:
            raise CheckFailed(f"{what}: expected [258], got {got}. Apply the merge with the smallest new id first "
                              f"(here (2, 3) -> 256), not the leftmost or the most frequent pair")
    # The Shakespeare merges again, the dict built in the opposite order; it must come back unchanged.
    reversed_merges = dict(reversed(shakes.merges.items()))
    for chunk in (" brother", " thee,", "\n\n", "Z"):
        what = f"encode_chunk({chunk.encode()!r}, merges of a BPE trained on Shakespeare, the dict in reverse id order)"
        got = _call(what, encode_chunk, chunk.encode("utf-8"), reversed_merges)
        if reversed_merges != shakes.merges:
            raise CheckFailed(f"{what} changed the merges dict it was given: only read it")
        expected = shakes.encode_chunk(chunk)
        if not isinstance(got, list) or got != expected:
            raise CheckFailed(f"{what}: expected the list {expected}, got {got!r}. Apply the merge with the smallest "
                              "new id first, whatever the dict's order")
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
    again = _call("bytes_to_unicode() a second time", bytes_to_unicode)
    if again != expected:
        raise CheckFailed("bytes_to_unicode() gave another table the second time it was called: keep no state "
                          "between calls (build the lists inside the function, not in a global that grows)")
    passed("bytes_to_unicode")
