"""Data sets by name: a verified local copy, with no download when one can be avoided.

Every file the course reads is registered here with the URL it comes from and the
sha256 of its bytes. The small ones the lessons use (names, tinyshakespeare, GPT-2's
tokenizer files; about 3 MB) ship inside this package, in ``nblib/datafiles/``, so
the lessons run offline out of the box. ``path(name)`` returns a verified local copy,
looking in order at:

1. ``NBLIB_DATA_DIR``, a folder of your own copies (an override: offline mirrors of
   the larger corpora that are not packaged, or a replacement for a packaged file);
2. the copy packaged with nblib, if the file is one of those;
3. the cache (``NBLIB_CACHE_DIR``, default ``~/.cache/nblib``);
4. the network, into the cache, unless ``NBLIB_OFFLINE`` is on.

Every copy is checked against its sha256 before use, and every failure says what went
wrong and what to do about it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nblib.runmode import env_flag

DATA_DIR_ENV = "NBLIB_DATA_DIR"
CACHE_DIR_ENV = "NBLIB_CACHE_DIR"
OFFLINE_ENV = "NBLIB_OFFLINE"

# Where the packaged copies live (declared as package data in pyproject.toml).
PACKAGED_DIR = Path(__file__).resolve().parent / "datafiles"


@dataclass(frozen=True)
class DataFile:
    filename: str
    url: str
    sha256: str
    about: str
    packaged: bool = False  # shipped in nblib/datafiles; larger corpora are not


REGISTRY: dict[str, DataFile] = {
    "names": DataFile(
        "names.txt",
        "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt",
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
        "32,033 lowercase first names, one per line",
        packaged=True,
    ),
    "tinyshakespeare": DataFile(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "1,115,394 characters of Shakespeare plays",
        packaged=True,
    ),
    "gpt2-encoder": DataFile(
        "gpt2-encoder.json",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        "GPT-2 BPE token-to-id map (50,257 entries)",
        packaged=True,
    ),
    "gpt2-vocab": DataFile(
        "gpt2-vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        "GPT-2 BPE merges (50,000 merges)",
        packaged=True,
    ),
}


class DataError(RuntimeError):
    """A data file is unknown, corrupt, or cannot be had; the message says what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "nblib")


def is_offline() -> bool:
    """True when ``NBLIB_OFFLINE`` forbids downloads (read like ``NBLIB_FAST``: "0", "off"... are off)."""
    return env_flag(OFFLINE_ENV)


def packaged_path(name: str) -> Path | None:
    """Where the packaged copy of ``name`` is, or None if that data set is not packaged."""
    entry = _entry(name)
    return PACKAGED_DIR / entry.filename if entry.packaged else None


def _entry(name: str) -> DataFile:
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise DataError(f"Unknown data set {name!r}. Known data sets: {known}.")
    return REGISTRY[name]


def _verified(path: Path, entry: DataFile, fix: str) -> Path:
    got = sha256_of(path)
    if got != entry.sha256:
        raise DataError(
            f"Checksum mismatch for {path}:\n  expected sha256 {entry.sha256}\n  got      sha256 {got}\n"
            f"The file is corrupt or a different version. {fix}"
        )
    return path


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` atomically (a half-written file never looks finished)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while block := response.read(1 << 20):
                out.write(block)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_REINSTALL = (
    "This copy ships inside the nblib package, so the installation is damaged: reinstall nblib "
    "(`pip install --force-reinstall --no-deps` with the same source you installed it from; in a "
    "clone of the course, `git checkout nblib/datafiles` restores the files), or set "
    f"{DATA_DIR_ENV} to a folder holding a good copy."
)


def path(name: str) -> Path:
    """A verified local copy of the registered data file ``name``."""
    entry = _entry(name)

    mirror = os.environ.get(DATA_DIR_ENV)
    if mirror:
        candidate = Path(mirror) / entry.filename
        if candidate.exists():
            return _verified(candidate, entry, f"Replace it with a fresh copy from {entry.url}"
                             + (f", or unset {DATA_DIR_ENV} to use the copy packaged with nblib." if entry.packaged else "."))

    packaged = packaged_path(name)
    if packaged is not None and packaged.exists():
        return _verified(packaged, entry, _REINSTALL)

    cached = cache_dir() / entry.filename
    if cached.exists():
        return _verified(cached, entry, f"Delete {cached} and run again to download it afresh.")

    where = f" (it is not in {DATA_DIR_ENV}={mirror})" if mirror else ""
    if packaged is not None:  # should have been there: say so rather than only "offline"
        where += f" (the copy packaged with nblib, {packaged}, is missing: reinstall nblib)"
    if is_offline():
        raise DataError(
            f"Data set {name!r} is not available offline{where} and {OFFLINE_ENV} forbids the network.\n"
            f"Download {entry.url} on a machine with internet access, put it in a folder as "
            f"{entry.filename!r}, and set {DATA_DIR_ENV} to that folder."
        )
    try:
        _download(entry.url, cached)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"Could not download data set {name!r} from {entry.url}{where}: {err}.\n"
            f"If this machine is offline, download that file elsewhere, put it in a folder as "
            f"{entry.filename!r}, and set {DATA_DIR_ENV} to that folder."
        ) from err
    try:
        return _verified(cached, entry, f"The download from {entry.url} was corrupt; run again.")
    except DataError:
        cached.unlink(missing_ok=True)  # never leave a bad file in the cache
        raise


def read_text(name: str) -> str:
    """The registered text file ``name``, decoded as UTF-8."""
    return path(name).read_text(encoding="utf-8")


def shown(path: str | Path) -> str:
    """``path`` for a printed line, so that a recorded lesson names no one's machine: a file of the
    installed package as ``nblib/...``, one under the home folder as ``~/...``, any other as it is."""
    path, package, home = Path(path), Path(__file__).resolve().parent, Path.home()
    if path.is_relative_to(package):
        return f"nblib/{path.relative_to(package)}"
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def availability() -> dict[str, str]:
    """Where each data set would come from right now, without downloading anything."""
    mirror = os.environ.get(DATA_DIR_ENV)
    report = {}
    for name, entry in REGISTRY.items():
        packaged = packaged_path(name)
        if mirror and (Path(mirror) / entry.filename).exists():
            report[name] = f"local folder {mirror}"
        elif packaged is not None and packaged.exists():
            report[name] = f"packaged with nblib ({shown(PACKAGED_DIR)})"
        elif (cache_dir() / entry.filename).exists():
            report[name] = f"cache {shown(cache_dir())}"
        elif is_offline():
            report[name] = f"MISSING: offline; set {DATA_DIR_ENV} to a folder holding {entry.filename}"
        else:
            report[name] = f"will download from {entry.url}"
    return report
