"""Byte-level byte-pair encoding (BPE), the tokenizer of GPT-2, written out in Python (lesson 04).

The idea in four lines:

1. text -> UTF-8 bytes, so 256 base tokens cover every string and nothing is "unknown";
2. training: count adjacent pairs, give the most frequent pair a new id, replace it
   everywhere, repeat until the vocabulary is as large as wanted;
3. encoding: apply the learned merges to new text, earliest-learned (lowest id) first;
4. decoding: concatenate each token's bytes and decode them as UTF-8.

GPT-2 adds a regex pre-split (merges never cross a chunk boundary, so " dog", "dog." and
"dog!" share the token " dog") and special tokens such as ``<|endoftext|>`` that bypass
the merges. ``load_gpt2()`` reads GPT-2's own merges, and ``to_tiktoken()`` hands any
trained merges to tiktoken's fast Rust encoder.

The real GPT-2 encoding (tiktoken's, built offline) is ``nblib.tokenizers.gpt2_tokenizer``.
"""
from __future__ import annotations

import heapq
import json
from collections import Counter

import regex
import tiktoken

from nblib import data
from nblib.progress import progress
from nblib.tokenizers import ENDOFTEXT, GPT2_SPLIT_PATTERN

Pair = tuple[int, int]


# ----------------------------------------------------------------------------- the two primitives

def get_stats(ids: list[int], counts: dict[Pair, int] | None = None, weight: int = 1) -> dict[Pair, int]:
    """How often each adjacent pair occurs in ``ids``: ``[1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}``.

    Pass ``counts`` to add to an existing tally, and ``weight`` to count a chunk that
    occurs ``weight`` times in the text (training counts each distinct chunk once).
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """``ids`` with every occurrence of ``pair`` replaced by ``new_id``, scanning left to right.

    Overlaps go to the left: merging (7, 7) in ``[7, 7, 7]`` gives ``[new_id, 7]``.
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """A byte-level BPE tokenizer: merges, the bytes of every token, a split pattern, specials.

    - ``merges``: ``{(left_id, right_id): new_id}``. A merge learned earlier has a smaller
      ``new_id``, so the id doubles as the merge's priority ("rank") when encoding.
    - ``vocab``: ``{id: bytes}`` for every ordinary token.
    - ``pattern``: the pre-split regex (``None``: the whole text is one chunk).
    - ``special_tokens``: ``{"<|endoftext|>": id, ...}``, matched before any splitting.
    - ``byte_ids``: the id of each of the 256 single-byte tokens. Our own tokenizers use
      ``byte_ids[b] == b``; GPT-2 numbers its byte tokens in another order.
    """

    def __init__(self, merges: dict[Pair, int], vocab: dict[int, bytes], pattern: str | None = GPT2_SPLIT_PATTERN,
                 special_tokens: dict[str, int] | None = None, byte_ids: list[int] | None = None):
        self.merges = dict(merges)
        self.vocab = dict(vocab)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.byte_ids = list(range(256)) if byte_ids is None else list(byte_ids)
        self._check()
        self._split = regex.compile(pattern) if pattern else None
        self._special_ids = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        # Longest first: the regex takes the first alternative that matches, so "<|end|>" listed
        # before "<|end|><|x|>" would otherwise always cut the longer token in two.
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._special_split = (regex.compile("(" + "|".join(regex.escape(s) for s in longest_first) + ")")
                               if self.special_tokens else None)
        self._cache: dict[str, list[int]] = {}  # chunk -> ids: real text repeats its words a lot

    def _check(self) -> None:
        """Refuse an inconsistent tokenizer now rather than return wrong ids later."""
        if len(self.byte_ids) != 256:
            raise ValueError(f"byte_ids needs one id per byte value (256), got {len(self.byte_ids)}")
        for b, i in enumerate(self.byte_ids):
            if self.vocab.get(i) != bytes([b]):
                raise ValueError(f"byte_ids[{b}] = {i}, but vocab[{i}] is {self.vocab.get(i)!r}, not {bytes([b])!r}")
        for (a, b), new_id in self.merges.items():
            if a not in self.vocab or b not in self.vocab or self.vocab.get(new_id) != self.vocab[a] + self.vocab[b]:
                raise ValueError(f"merge ({a}, {b}) -> {new_id}: vocab[{new_id}] must be vocab[{a}] + vocab[{b}]")
        clash = set(self.special_tokens.values()) & self.vocab.keys()
        if clash:
            raise ValueError(f"special token ids {sorted(clash)} are already ordinary tokens")

    def clear_cache(self) -> None:
        """Forget the encoded chunks (e.g. to time encoding from a cold start)."""
        self._cache.clear()

    @property
    def n_vocab(self) -> int:
        """Number of ids the tokenizer can produce (ordinary tokens and special tokens)."""
        return len(self.vocab) + len(self.special_tokens)

    # -- encoding ---------------------------------------------------------------------------------
    def encode_chunk(self, chunk: str) -> list[int]:
        """One pre-split chunk to ids: start from its bytes, apply the lowest-rank merge until none applies."""
        ids = self._cache.get(chunk)
        if ids is not None:
            return ids
        ids = [self.byte_ids[b] for b in chunk.encode("utf-8")]
        while len(ids) >= 2:
            # The pair that was learned first among those present; its new id is its rank.
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, float("inf")))
            if pair not in self.merges:
                break  # no adjacent pair was ever merged: done
            ids = merge(ids, pair, self.merges[pair])
        if len(self._cache) > 200_000:  # bound the memory on huge, varied inputs
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Text to ids, treating special-token strings like any other text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        chunks = self._split.findall(text) if self._split else [text]
        return [i for chunk in chunks for i in self.encode_chunk(chunk)]

    def encode(self, text: str, allowed_special: str | set[str] = frozenset()) -> list[int]:
        """Text to ids. Special tokens become their ids only if allowed (``"all"`` or a set).

        As tiktoken does, a special token in the text that is not allowed is an error:
        text from users must not be able to inject ``<|endoftext|>`` by accident.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}; it has {sorted(self.special_tokens)}")
        if not self._special_split:
            return self.encode_ordinary(text)
        ids = []
        # The capturing group keeps the specials: parts alternate text, special, text, ...
        for k, part in enumerate(self._special_split.split(text)):
            if k % 2 == 0:
                ids.extend(self.encode_ordinary(part))
            elif part in allowed:
                ids.append(self.special_tokens[part])
            else:
                raise ValueError(
                    f"the text contains the special token {part!r}. Pass allowed_special={{{part!r}}} (or 'all') "
                    f"to encode it as one token, or use encode_ordinary() to encode it as plain text."
                )
        return ids

    # -- decoding ---------------------------------------------------------------------------------
    def decode_bytes(self, ids) -> bytes:
        """Ids to the raw bytes they stand for."""
        parts = []
        for i in ids:
            i = int(i)
            if i in self.vocab:
                parts.append(self.vocab[i])
            elif i in self._special_ids:
                parts.append(self._special_ids[i])
            else:
                raise ValueError(f"token id {i} is not in this tokenizer's vocabulary (0..{self.n_vocab - 1})")
        return b"".join(parts)

    def decode(self, ids) -> str:
        """Ids to text. A token sequence can cut a character's UTF-8 bytes in two; those become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- training

def _pairs_in_order(words: list[list[int]], weights: list[int]) -> dict[Pair, int]:
    """Weighted pair counts over all words, in the order the pairs first occur (the tie-break order)."""
    stats: dict[Pair, int] = {}
    for ids, w in zip(words, weights):
        get_stats(ids, stats, w)
    return stats


def learn_merges_naive(words: list[list[int]], weights: list[int], n_merges: int,
                       show_progress: bool = False) -> list[tuple[Pair, int]]:
    """The textbook loop: recount every pair of every word, merge the most frequent one, repeat.

    ``words`` are the distinct chunks as token ids (bytes at first), ``weights`` how often each
    occurs. Returns ``[(pair, count), ...]`` in the order learned; the pair of step k gets id
    ``256 + k``. Ties between equally frequent pairs go to the pair that occurs first (scanning
    the words in order, each left to right). Stops early when no pair is left.
    """
    words = [list(ids) for ids in words]
    learned: list[tuple[Pair, int]] = []
    steps = range(256, 256 + n_merges)
    for new_id in (progress(steps, desc="BPE merges (naive)") if show_progress else steps):
        stats = _pairs_in_order(words, weights)
        if not stats:
            break
        pair = max(stats, key=stats.get)  # max keeps the first of equal counts: the first pair seen
        words = [merge(ids, pair, new_id) if len(ids) > 1 else ids for ids in words]
        learned.append((pair, stats[pair]))
    return learned


def learn_merges_incremental(words: list[list[int]], weights: list[int], n_merges: int,
                             show_progress: bool = False) -> list[tuple[Pair, int]]:
    """The same merges as ``learn_merges_naive``, recounting only the words a merge changes.

    Keeps, for every pair, its weighted count and the set of words it occurs in. Merging
    (a, b) into c can only change the pairs of the words that contain (a, b): each of those
    is merged, its old pairs are subtracted and its new pairs added. A heap of
    (-count, pair) finds the most frequent pair (entries whose count is out of date are
    skipped); among equally frequent pairs the one occurring first wins, exactly as in the
    naive loop, whose dict of counts is in order of first occurrence.
    """
    words = [list(ids) for ids in words]
    stats: dict[Pair, int] = {}
    where: dict[Pair, set[int]] = {}
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            stats[pair] = stats.get(pair, 0) + weights[w]
            where.setdefault(pair, set()).add(w)
    heap = [(-count, pair) for pair, count in stats.items()]
    heapq.heapify(heap)

    def first_occurrence(pair: Pair) -> tuple[int, int]:
        w = min(where[pair])
        ids = words[w]
        return w, next(i for i in range(len(ids) - 1) if ids[i] == pair[0] and ids[i + 1] == pair[1])

    learned: list[tuple[Pair, int]] = []
    steps = range(256, 256 + n_merges)
    for new_id in (progress(steps, desc="BPE merges (incremental)") if show_progress else steps):
        # The most frequent pair, and every other pair just as frequent (for the tie-break).
        tied: list[Pair] = []
        seen: set[Pair] = set()
        top = None
        while heap:
            neg, pair = heap[0]
            if stats.get(pair) != -neg:  # out of date: its count changed after this entry was pushed
                heapq.heappop(heap)
                continue
            if top is not None and -neg != top:
                break
            top = -neg
            heapq.heappop(heap)
            if pair not in seen:
                seen.add(pair)
                tied.append(pair)
        if not tied:
            break
        pair = min(tied, key=first_occurrence) if len(tied) > 1 else tied[0]
        for other in tied:
            if other != pair:
                heapq.heappush(heap, (-top, other))
        learned.append((pair, top))

        # Merge it in the words that hold it, and update the counts of just those words' pairs.
        for w in list(where[pair]):
            old = words[w]
            new = merge(old, pair, new_id)
            words[w] = new
            weight = weights[w]
            delta: dict[Pair, int] = {}
            for p in zip(old, old[1:]):
                delta[p] = delta.get(p, 0) - weight
            for p in zip(new, new[1:]):
                delta[p] = delta.get(p, 0) + weight
            for p, d in delta.items():
                if d:
                    count = stats.get(p, 0) + d
                    if count:
                        stats[p] = count
                        heapq.heappush(heap, (-count, p))
                    else:
                        del stats[p]
            old_pairs, new_pairs = set(zip(old, old[1:])), set(zip(new, new[1:]))
            for p in old_pairs - new_pairs:
                where[p].discard(w)
                if not where[p]:
                    del where[p]
            for p in new_pairs - old_pairs:
                where.setdefault(p, set()).add(w)
    return learned


TRAINERS = {"incremental": learn_merges_incremental, "naive": learn_merges_naive}


def train(text: str, vocab_size: int, pattern: str | None = GPT2_SPLIT_PATTERN,
          special_tokens: dict[str, int] | list[str] | None = None, verbose: bool = False,
          show_progress: bool = False, method: str = "incremental") -> Tokenizer:
    """Learn ``vocab_size - 256`` merges from ``text``.

    Merges never cross a pre-split chunk, so training only needs each *distinct* chunk and
    how often it occurs: Shakespeare's 1.1M characters are ~15k distinct chunks.
    ``method="naive"`` recounts every pair after each merge (``learn_merges_naive``);
    ``"incremental"`` (the default) updates only the counts a merge changes
    (``learn_merges_incremental``); both learn exactly the same merges.
    Ties between equally frequent pairs go to the pair seen first, so training is
    deterministic. Special tokens (a list of strings, or a dict with their ids) get ids
    after the merges and are never learned from text.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    if not isinstance(text, str) or not text:
        raise ValueError("train needs a non-empty str")
    if method not in TRAINERS:
        raise ValueError(f"method must be one of {sorted(TRAINERS)}, got {method!r}")
    chunk_counts = Counter(regex.findall(pattern, text) if pattern else [text])
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    weights = list(chunk_counts.values())

    learned = TRAINERS[method](words, weights, vocab_size - 256, show_progress=show_progress)
    merges: dict[Pair, int] = {}
    vocab = {i: bytes([i]) for i in range(256)}
    for new_id, (pair, count) in enumerate(learned, start=256):
        merges[pair] = new_id
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        if verbose:
            print(f"merge {new_id - 255}: {pair} -> {new_id} {vocab[new_id]!r} ({count} times)")
    if len(learned) < vocab_size - 256:
        print(f"stopped at {256 + len(learned)} tokens: every chunk is already a single token")

    if isinstance(special_tokens, (list, tuple)):
        special_tokens = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
    return Tokenizer(merges, vocab, pattern, special_tokens)


# ----------------------------------------------------------------------------- GPT-2's own merges

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte value to a printable character, as in its encoder.json and vocab.bpe.

    GPT-2 stores tokens as text, one character per byte. Bytes that already print as a
    visible character ("!".."~", "¡".."¬", "®".."ÿ": 188 of them) stand for themselves;
    the other 68 (controls, space, DEL, ...) are shifted to code points 256, 257, ... in
    byte order. So the space byte 0x20 is written "Ġ" (U+0120) and newline 0x0A "Ċ" (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def load_gpt2(encoder_file=None, vocab_file=None) -> Tokenizer:
    """Our ``Tokenizer`` with GPT-2's 50,000 merges, read from GPT-2's encoder.json and vocab.bpe.

    The files default to the data module's verified copies. Both write tokens in the
    ``bytes_to_unicode`` alphabet; we undo it to get each token's real bytes.
    """
    encoder_file = encoder_file or data.path("gpt2-encoder")
    vocab_file = vocab_file or data.path("gpt2-vocab")
    with open(encoder_file, encoding="utf-8") as f:
        encoder: dict[str, int] = json.load(f)  # token written as text -> id
    with open(vocab_file, encoding="utf-8") as f:
        merge_lines = [ln for ln in f.read().split("\n")[1:] if ln]  # line 0 is "#version: 0.2"

    char_to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    special = {ENDOFTEXT: encoder[ENDOFTEXT]}
    vocab = {i: bytes(char_to_byte[ch] for ch in tok) for tok, i in encoder.items() if tok not in special}
    merges = {}
    for rank, line in enumerate(merge_lines):
        left, right = line.split(" ")
        new_id = encoder[left + right]
        if new_id != 256 + rank:  # our encoder uses the new id as the merge's rank
            raise ValueError(f"{vocab_file}: merge {rank} ({line!r}) has id {new_id}, expected {256 + rank}")
        merges[(encoder[left], encoder[right])] = new_id
    byte_ids = [encoder[ch] for ch in bytes_to_unicode().values()]
    return Tokenizer(merges, vocab, GPT2_SPLIT_PATTERN, special, byte_ids)


# ----------------------------------------------------------------------------- hand it to tiktoken

def to_tiktoken(tok: Tokenizer, name: str = "course-bpe") -> tiktoken.Encoding:
    """The same tokenizer as a ``tiktoken.Encoding``: same ids, encoded in Rust.

    tiktoken wants ``{token bytes: rank}``; our ids are ranks already (a merge's id
    grows with the order it was learned in), so the table is just ``vocab`` inverted.
    """
    if tok.pattern is None:
        raise ValueError("tiktoken needs a split pattern; train with pattern=GPT2_SPLIT_PATTERN")
    ranks = {b: i for i, b in tok.vocab.items()}
    if len(ranks) != len(tok.vocab):
        dup = Counter(tok.vocab.values()).most_common(1)[0][0]
        raise ValueError(f"two token ids share the bytes {dup!r}; tiktoken needs one id per byte string")
    return tiktoken.Encoding(name=name, pat_str=tok.pattern, mergeable_ranks=ranks,
                             special_tokens=dict(tok.special_tokens))
