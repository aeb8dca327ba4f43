"""Token shards: a corpus tokenised once, stored as flat uint16 files, read memory-mapped (lesson 14).

A pre-training run reads billions of tokens. Tokenising them on the fly would keep the
CPU busy while the GPU waits, so the corpus is tokenised once (``prepare``) into shards:
plain files of little-endian uint16 token ids (GPT-2's 50,257 ids fit in 2 bytes), which
``np.memmap`` reads without loading them. A folder of shards looks like this::

    manifest.json       {"format": "nblib-shards-1", "tokenizer": "gpt2", "vocab_size": 50257,
                         "eot_token": 50256, "chars": null, "source": "fineweb-edu",
                         "shards": [{"file": "val_000000.bin", "split": "val", "tokens": ..., "sha256": ...},
                                    {"file": "train_000000.bin", "split": "train", ...}, ...]}
    val_000000.bin      the first val_tokens tokens of the stream
    train_000000.bin    the rest, shard_tokens tokens per file
    ...

The manifest is written last: a folder without one is an unfinished ``prepare``. The
reader (``TokenShards``) checks every shard against it (present, the right size, the
right sha256) and says what is wrong and what to do. ``prepare`` writes into a temporary
folder beside ``--out`` and puts it in place only once it is complete and checked: a
failed prepare (a typo in ``--source``, no network, Ctrl-C) leaves the shards already
there as they were, and no temporary folder.

**The order of the training windows** (``Windows``) is a fixed function of a row number,
so that any process can compute its own rows without talking to the others, and a
resumed run reads exactly what the uninterrupted one would have. Row ``k`` (counting the
rows of every step, micro-step and process) is window ``k mod n_windows`` of ``seq_len + 1``
tokens; with a seed the windows of each pass over the data are a seeded permutation,
and each pass after the first is shifted by a seeded offset so that it cuts the text
elsewhere. ``rank_rows`` says which rows a process reads: a step reads rows
``[step * G, (step + 1) * G)`` of ``G`` = global batch rows, whatever the number of
processes, so one process with gradient accumulation and N processes with DDP see the
same data, and different processes see different rows.

From the command line::

    python -m nblib.shards prepare --source shakespeare-char --out data/shakespeare-char
    python -m nblib.shards prepare --source fineweb-edu --out data/fineweb-edu --tokens 10_000_000_000
    python -m nblib.shards prepare --source my_texts/ --out data/mine --val-tokens 100000   # .txt .jsonl .parquet
    python -m nblib.shards check data/fineweb-edu
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from nblib import data
from nblib.runmode import env_flag

FORMAT = "nblib-shards-1"
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u2")  # uint16, little-endian on every machine
SPLITS = ("train", "val")
FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")  # (dataset, config) streamed by prepare_hf
PACKAGED_SOURCES = {"shakespeare-char": "char", "shakespeare-gpt2": "gpt2"}  # tinyshakespeare, offline
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _prepare_hint(folder: Path, source: str | None = None) -> str:
    return (f"re-run `python -m nblib.shards prepare --source {source or 'SOURCE'} --out {folder}` "
            "to write the shards afresh")


# ---------------------------------------------------------------------------- writing

class ShardWriter:
    """Write token ids into the shards of each split, then the manifest.

    ``add(split, ids)`` appends ids to a split; every ``shard_tokens`` tokens become a file.
    ``close()`` writes what is left and then ``manifest.json`` (atomically, last). Use it as
    a context manager: on an exception no manifest is written, so the folder reads as
    unfinished instead of as a shorter corpus.
    """

    def __init__(self, folder: str | Path, tokenizer: str, vocab_size: int, shard_tokens: int = 100_000_000,
                 source: str = "", eot_token: int | None = None, chars: list[str] | None = None):
        if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
            raise ValueError(f"vocab_size={vocab_size} does not fit in uint16 shards (at most 65,536 tokens)")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # unfinished until close() writes a new one
        for split in SPLITS:  # files of an earlier prepare would not be listed, only confusing
            for old in self.folder.glob(f"{split}_*.bin"):
                old.unlink()
        self.manifest = dict(format=FORMAT, tokenizer=tokenizer, vocab_size=vocab_size, eot_token=eot_token,
                             chars=chars, dtype="uint16", source=source, shards=[])
        self.shard_tokens = shard_tokens
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)
        self.written = dict.fromkeys(SPLITS, 0)

    def count(self, split: str) -> int:
        """Tokens added to ``split`` so far."""
        return self.written[split] + self.buffered[split]

    def add(self, split: str, ids: Iterable[int]) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        if ids.min() < 0 or ids.max() >= self.manifest["vocab_size"]:
            raise ValueError(f"token ids must be in 0..{self.manifest['vocab_size'] - 1}, "
                             f"got {ids.min()}..{ids.max()}")
        self.buffers[split].append(ids.astype(TOKEN_DTYPE))
        self.buffered[split] += ids.size
        while self.buffered[split] >= self.shard_tokens:
            self._flush(split, self.shard_tokens)

    def _flush(self, split: str, n: int) -> None:
        """Write the first ``n`` buffered tokens of ``split`` as its next shard."""
        tokens = np.concatenate(self.buffers[split])
        rest = tokens[n:]
        self.buffers[split] = [rest] if rest.size else []
        self.buffered[split] = int(rest.size)
        body = tokens[:n].tobytes()
        name = f"{split}_{sum(s['split'] == split for s in self.manifest['shards']):06d}.bin"
        (self.folder / name).write_bytes(body)
        self.manifest["shards"].append(dict(file=name, split=split, tokens=n,
                                             sha256=hashlib.sha256(body).hexdigest()))
        self.written[split] += n

    def close(self) -> dict:
        """Write the remaining tokens and the manifest; return the manifest."""
        for split in SPLITS:
            if self.buffered[split]:
                self._flush(split, self.buffered[split])
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.folder / MANIFEST)
        return self.manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()


# ---------------------------------------------------------------------------- reading

def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shard folder; a clear error if there is none or it is not one."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {folder}: these are not prepared shards, or `prepare` did not finish; "
            + _prepare_hint(folder))
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); " + _prepare_hint(folder)) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not an nblib shard manifest (format {got!r}, expected {FORMAT!r}); "
                         + _prepare_hint(folder))
    return manifest


def check_shards(folder: str | Path, manifest: dict | None = None, split: str | None = None,
                 checksums: bool = True) -> None:
    """Check every shard (of ``split``, or all) against the manifest: present, the right size,
    and (``checksums``) the right sha256. Hashing reads every byte: ~1 s per GB."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    hint = _prepare_hint(folder, manifest.get("source"))
    for shard in manifest["shards"]:
        if split is not None and shard["split"] != split:
            continue
        path = folder / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard['file']} (listed in {folder / MANIFEST}) is missing; {hint}")
        if not isinstance(shard.get("tokens"), int) or shard["tokens"] < 1:
            raise ValueError(f"shard {shard['file']} is listed in {folder / MANIFEST} with {shard.get('tokens')!r} "
                             f"tokens; every shard holds at least one; {hint}")
        size, want = path.stat().st_size, shard["tokens"] * TOKEN_DTYPE.itemsize
        if size != want:
            what = "truncated" if size < want else "longer than written"
            raise ValueError(f"shard {path} is {what}: {size} bytes, the manifest says {want} "
                             f"({shard['tokens']} tokens of 2 bytes); {hint}")
        if checksums:
            got = data.sha256_of(path)
            if got != shard["sha256"]:
                raise ValueError(f"shard {path} is corrupt: its sha256 is {got}, the manifest says "
                                 f"{shard['sha256']}; {hint}")


class TokenShards:
    """One split of a shard folder as one long, read-only, memory-mapped stream of token ids."""

    def __init__(self, folder: str | Path, split: str = "train", checksums: bool = True):
        self.folder, self.split = Path(folder), split
        self.manifest = read_manifest(folder)
        entries = [s for s in self.manifest["shards"] if s["split"] == split]
        if not entries:
            raise ValueError(f"{self.folder} has no {split!r} shards; "
                             + _prepare_hint(self.folder, self.manifest.get("source")))
        check_shards(self.folder, self.manifest, split, checksums)
        self.maps = [np.memmap(self.folder / s["file"], dtype=TOKEN_DTYPE, mode="r") for s in entries]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])  # where each shard begins in the stream

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as int64, across shard boundaries."""
        if length < 1:
            raise ValueError(f"read({start}, {length}) of {self.folder}'s {self.split!r} split asks for no tokens: "
                             "the length must be >= 1 (a window of seq_len + 1 tokens, with seq_len >= 1)")
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) are outside 0..{len(self)}")
        pieces, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[i])
            piece = self.maps[i][offset: offset + length]
            pieces.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return np.concatenate(pieces).astype(np.int64)


def tokenizer_for(manifest: dict):
    """The tokenizer the shards were written with (``encode(str)`` and ``decode(ids)``)."""
    if manifest["tokenizer"] == "char":
        from nblib.text import CharTokenizer
        return CharTokenizer("".join(manifest["chars"]))
    if manifest["tokenizer"] == "gpt2":
        from nblib.tokenizers import gpt2_tokenizer
        return gpt2_tokenizer()
    raise ValueError(f"unknown tokenizer {manifest['tokenizer']!r} in the manifest (known: char, gpt2)")


# ---------------------------------------------------------------------------- the order of the windows

def rank_rows(step: int, micro: int, rank: int, batch_size: int, world_size: int, accum_steps: int) -> range:
    """The global row numbers process ``rank`` reads at micro-step ``micro`` of optimizer step ``step``.

    One micro-step of all processes together reads ``batch_size * world_size`` consecutive
    rows; rank r takes the r-th block of ``batch_size``. So step s reads rows
    ``[s * G, (s + 1) * G)``, G = batch_size * world_size * accum_steps, however G is split.
    """
    first = (step * accum_steps + micro) * batch_size * world_size + rank * batch_size
    return range(first, first + batch_size)


class Windows:
    """Windows of ``seq_len + 1`` tokens of a ``TokenShards`` stream, in a fixed order of row numbers.

    Window ``w`` starts at token ``w * seq_len + shift``; there are ``n_windows`` of them,
    which leaves room for any shift below ``seq_len``. Row ``k`` is pass ``k // n_windows``,
    position ``i = k % n_windows`` in it:

    - ``seed=None``: window ``i``, shift 0 (plain sequential order, every pass the same);
    - a seed: window ``perm[i]`` of a seeded permutation of this pass, and from the second
      pass on a seeded shift in ``[0, seq_len)``, so a small corpus read many times is
      not always cut at the same places (the shakespeare-char preset reads its 3,920
      windows 82 times; without the shifts they would be the same 3,920 every time).
    """

    def __init__(self, tokens: TokenShards, seq_len: int, seed: int | None = None):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = len(tokens) // seq_len - 1
        if self.n_windows < 1:
            raise ValueError(f"the {tokens.split!r} split of {tokens.folder} has {len(tokens)} tokens, too few for "
                             f"windows of seq_len={seq_len}: it needs at least {2 * seq_len}; prepare more data "
                             "or use a shorter seq_len")
        self._perms: dict[int, np.ndarray] = {}

    def _pass(self, n: int) -> tuple[np.ndarray | None, int]:
        """(permutation, shift) of pass ``n``."""
        if self.seed is None:
            return None, 0
        if n not in self._perms:
            if len(self._perms) > 1:  # a step straddles at most two passes
                self._perms.pop(min(self._perms))
            self._perms[n] = np.random.default_rng([self.seed, n]).permutation(self.n_windows)
        shift = 0 if n == 0 else int(np.random.default_rng([self.seed, n, 1]).integers(self.seq_len))
        return self._perms[n], shift

    def start(self, row: int) -> int:
        """The first token of row ``row``'s window."""
        n, i = divmod(row, self.n_windows)
        perm, shift = self._pass(n)
        return int(perm[i] if perm is not None else i) * self.seq_len + shift

    def rows(self, rows: Iterable[int]) -> np.ndarray:
        """The windows of ``rows`` as an int64 array [len(rows), seq_len + 1]."""
        windows = [self.tokens.read(self.start(k), self.seq_len + 1) for k in rows]
        if not windows:
            raise ValueError("rows() needs at least one row number (a batch of 0 rows reads nothing)")
        return np.stack(windows)

    def batch(self, rows: Iterable[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` for ``rows`` on ``device``: inputs and the same windows shifted by one."""
        return windows_to_tensors(self.rows(rows), device)


def windows_to_tensors(windows: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows [B, T + 1] -> (x, y) [B, T] on ``device``. On CUDA the host copies are pinned
    (page-locked) and sent with ``non_blocking``: the CPU goes on preparing the next batch
    while the copy runs, and the GPU does not wait for a pageable staging copy."""
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ---------------------------------------------------------------------------- preparing

def prepare_text(text: str, folder: str | Path, tokenizer: str = "char", val_fraction: float = 0.1,
                 shard_tokens: int = 100_000_000, source: str = "text") -> dict:
    """Tokenise one text and write its shards: the first ``1 - val_fraction`` for training,
    the rest for validation (nanoGPT's split of tinyshakespeare). ``tokenizer``: "char"
    (one token per character of the text's alphabet) or "gpt2". Returns the manifest."""
    from nblib.text import train_val_split

    if tokenizer == "char":
        from nblib.text import CharTokenizer
        tok = CharTokenizer(text)
        ids, vocab, eot, chars = np.array(tok.encode(text)), tok.vocab_size, None, tok.chars
    elif tokenizer == "gpt2":
        from nblib.tokenizers import gpt2_tokenizer
        enc = gpt2_tokenizer()
        ids, vocab, eot, chars = np.array(enc.encode_ordinary(text)), enc.n_vocab, enc.eot_token, None
    else:
        raise ValueError(f"tokenizer must be 'char' or 'gpt2', got {tokenizer!r}")
    train, val = train_val_split(ids, 1 - val_fraction)
    with ShardWriter(folder, tokenizer, vocab, shard_tokens, source, eot, chars) as writer:
        writer.add("train", train)
        writer.add("val", val)
    return writer.manifest


def _require_datasets(why: str):
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{why} needs Hugging Face's `datasets` library: `pip install datasets` "
                          "(local .txt and .jsonl files work without it)") from err
    return datasets


def _fineweb_documents() -> Iterator[str]:
    """FineWeb-edu's 10B-token sample, streamed (nothing is stored but what we tokenise)."""
    datasets = _require_datasets("streaming FineWeb-edu")
    name, config = FINEWEB_EDU
    try:
        for row in datasets.load_dataset(name, name=config, split="train", streaming=True):
            yield row["text"]
    except Exception as err:  # the network, the Hub, or offline mode: all end the same way for the user
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if env_flag(v)]
        raise RuntimeError(
            f"could not stream {name} ({config}): {type(err).__name__}: {err}"
            + (f" ({' and '.join(offline)} forbid the network)" if offline else "")
            + ". Without a network, download its parquet files on another machine "
            f"(https://huggingface.co/datasets/{name}/tree/main/{config.replace('-', '/')}) and pass their "
            "folder as --source PATH") from err


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: each line must be a JSON object with a string 'text' field")
            yield row["text"]


def _parquet_documents(paths: list[Path]) -> Iterator[str]:
    datasets = _require_datasets("reading .parquet files")
    stream = datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train", streaming=True)
    for row in stream:
        yield row["text"]


def local_files(path: str | Path) -> list[Path]:
    """The .txt, .jsonl and .parquet files of ``path`` (a file, or a folder searched recursively)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass 'fineweb-edu', 'shakespeare-char', "
                                "'shakespeare-gpt2', or a file or folder of .txt, .jsonl or .parquet files")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .txt, .jsonl or .parquet files in {path}")
    for f in files:
        if f.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"{f}: unknown kind of file; use .txt (one document per file), "
                             ".jsonl (a 'text' field per line) or .parquet (a 'text' column)")
    return files


def documents(source: str | Path) -> Iterator[str]:
    """The texts of ``source``: "fineweb-edu" (streamed), or local files (``local_files``):
    a .txt file is one document, a .jsonl line or a .parquet row is one."""
    if str(source) == "fineweb-edu":
        yield from _fineweb_documents()
        return
    files = local_files(source)
    parquet = [f for f in files if f.suffix == ".parquet"]
    for f in files:
        if f.suffix == ".txt":
            yield f.read_text(encoding="utf-8")
        elif f.suffix == ".jsonl":
            yield from _jsonl_documents(f)
    if parquet:
        yield from _parquet_documents(parquet)


def prepare_hf(folder: str | Path, source: str | Path = "fineweb-edu", tokens: int | None = None,
               val_tokens: int = 10_000_000, shard_tokens: int = 100_000_000, batch_docs: int = 256) -> dict:
    """Tokenise documents (``documents(source)``) with GPT-2's tokenizer into shards.

    Each document starts with <|endoftext|>, so the model learns where one ends (as GPT-2
    and build-nanogpt). The first ``val_tokens`` tokens of the stream are the validation
    split (build-nanogpt keeps its first shard for that); then ``tokens`` training tokens
    (None: all there are). Returns the manifest.
    """
    from nblib.tokenizers import gpt2_tokenizer

    enc = gpt2_tokenizer()
    source = str(source)
    docs = documents(source)
    with ShardWriter(folder, "gpt2", enc.n_vocab, shard_tokens, source, enc.eot_token) as writer:
        while tokens is None or writer.count("train") < tokens:
            texts = list(islice(docs, batch_docs))
            if not texts:
                break
            # tiktoken's batch encoding runs on several threads, outside Python's GIL
            stream = np.concatenate([np.array([enc.eot_token] + ids) for ids in enc.encode_ordinary_batch(texts)])
            to_val = max(0, min(len(stream), val_tokens - writer.count("val")))
            writer.add("val", stream[:to_val])
            train = stream[to_val:]
            if tokens is not None:
                train = train[: tokens - writer.count("train")]
            writer.add("train", train)
        if writer.count("train") == 0:
            raise ValueError(f"{source} gave {writer.count('val')} tokens, all of them for validation "
                             f"(val_tokens={val_tokens}): lower --val-tokens")
    return writer.manifest


def prepare(source: str, folder: str | Path, tokens: int | None = None, val_tokens: int | None = None,
            shard_tokens: int = 100_000_000) -> dict:
    """Prepare ``source`` into ``folder``: "shakespeare-char" / "shakespeare-gpt2" (packaged, 90/10
    split), "fineweb-edu" or a local path (``prepare_hf``). Returns the manifest.

    The shards are written into a temporary folder beside ``folder`` and checked (both splits
    there, every size and sha256 as the manifest says); only then do they replace the shards
    ``folder`` held. On any failure the temporary folder is removed and ``folder`` is untouched.
    A ``folder`` holding anything but shards is refused before any work: nothing else is replaced."""
    folder = Path(folder)
    _check_only_shards(folder)
    tmp, manifest = _prepare_beside(source, folder, tokens, val_tokens, shard_tokens)
    try:
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already, unless the swap failed
    return manifest


def _prepare_beside(source: str, folder: Path, tokens: int | None, val_tokens: int | None,
                    shard_tokens: int) -> tuple[Path, dict]:
    """(temporary folder beside ``folder``, manifest): ``source``'s shards, complete and checked.
    Beside, so that the final rename stays on one filesystem (and so is atomic)."""
    if val_tokens is not None and val_tokens < 1:
        raise ValueError(f"--val-tokens must be >= 1 (the run evaluates on them), got {val_tokens}")
    if tokens is not None and tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a stale one of an earlier process with our pid
    try:
        if source in PACKAGED_SOURCES:
            if tokens is not None or val_tokens is not None:
                raise ValueError(f"{source} is tinyshakespeare, all of it (90% train, 10% val): "
                                 "--tokens and --val-tokens do not apply")
            manifest = prepare_text(data.read_text("tinyshakespeare"), tmp, PACKAGED_SOURCES[source],
                                    shard_tokens=shard_tokens, source=source)
        else:
            manifest = prepare_hf(tmp, source, tokens, 10_000_000 if val_tokens is None else val_tokens,
                                  shard_tokens)
        for split in SPLITS:  # read back from the disk: both splits there, sizes and sha256 right
            TokenShards(tmp, split)
    except BaseException:  # an error or Ctrl-C: no half-written folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, manifest


def _is_shard_file(name: str) -> bool:
    split, _, rest = name.partition("_")
    return name in (MANIFEST, MANIFEST + ".tmp") or (split in SPLITS and rest[:-4].isdigit()
                                                     and rest.endswith(".bin"))


def _check_only_shards(folder: Path) -> None:
    """Refuse a ``folder`` that holds anything but shards: replacing it would lose those files."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {folder} is a file; pass a folder (new or holding shards)")
    others = sorted(p.name for p in folder.iterdir() if not _is_shard_file(p.name)) if folder.is_dir() else []
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(f"{folder} holds files that are not shards ({shown}); prepare into a new or empty "
                              "folder (--out), so that nothing of yours is replaced")


def _swap_in(tmp: Path, folder: Path) -> None:
    """Put the finished shards ``tmp`` in place of ``folder``. The old shards are moved aside
    first and deleted only once the new ones are in place."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if not folder.exists():
        os.rename(tmp, folder)
        return
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(old, folder)  # put the old ones back
        raise
    shutil.rmtree(old)


def ensure_prepared(source: str, folder: str | Path) -> Path:
    """``folder`` with shards of ``source``, preparing them first if it has none.

    Prepared into a temporary sibling and renamed, so that two processes doing this at
    once (two machines sharing a disk) never read or write a half-written folder: the
    first to finish wins, the other's copy is thrown away."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return folder
    _check_only_shards(folder)
    tmp, _ = _prepare_beside(source, folder, None, None, 100_000_000)
    try:
        os.rename(tmp, folder)  # replaces an empty folder; fails on a full one
    except OSError:
        if not (folder / MANIFEST).is_file():  # not another process's shards: an unfinished prepare's files
            _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, if another process got there first
    read_manifest(folder)
    return folder


# ---------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nblib.shards", description="Token shards for nblib.pretrain.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise a corpus into shards")
    p.add_argument("--source", required=True,
                   help="fineweb-edu | shakespeare-char | shakespeare-gpt2 | a file or folder of .txt/.jsonl/.parquet")
    p.add_argument("--out", required=True, help="the shard folder to write")
    p.add_argument("--tokens", type=lambda s: int(s.replace("_", "")), default=None,
                   help="training tokens to write (default: all the source has)")
    p.add_argument("--val-tokens", type=lambda s: int(s.replace("_", "")), default=None,
                   help="validation tokens, taken first (default 10,000,000)")
    p.add_argument("--shard-tokens", type=lambda s: int(s.replace("_", "")), default=100_000_000,
                   help="tokens per shard file (default 100,000,000: 200 MB)")
    c = sub.add_parser("check", help="verify a shard folder against its manifest (sizes and sha256)")
    c.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        manifest = prepare(args.source, args.out, args.tokens, args.val_tokens, args.shard_tokens)
    else:
        manifest = read_manifest(args.folder)
        check_shards(args.folder, manifest)
    counts = {s: sum(x["tokens"] for x in manifest["shards"] if x["split"] == s) for s in SPLITS}
    print(f"{args.out if args.command == 'prepare' else args.folder}: {manifest['tokenizer']} tokens "
          f"(vocab {manifest['vocab_size']}), train {counts['train']:,}, val {counts['val']:,}, "
          f"{len(manifest['shards'])} shards" + (", all verified" if args.command == "check" else ""))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: the shards in --out (if any) are as they were")
    except (OSError, ValueError, ImportError, RuntimeError) as err:  # what a user can fix: one line, no traceback
        sys.exit(f"error: {err}")
