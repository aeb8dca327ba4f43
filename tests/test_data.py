"""The data module: packaged copies, the override folder, the cache, downloads, and every
error a learner can hit. Nothing here reads outside the repository or uses the network."""
import hashlib
import io
import shutil
import urllib.error
from pathlib import Path

import pytest

from nblib import data

PACKAGED = sorted(name for name, entry in data.REGISTRY.items() if entry.packaged)

# A stand-in for the larger corpora later lessons register: known bytes, not packaged.
CORPUS_BYTES = b"To be, or not to be, that is the question.\n"
CORPUS = data.DataFile(
    "corpus.txt",
    "https://example.org/corpus.txt",
    hashlib.sha256(CORPUS_BYTES).hexdigest(),
    "a test corpus that is not packaged",
)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty override folder, an empty cache, a registered corpus that is not
    packaged, the network switch unset, and a network that always fails."""
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(mirror))
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(cache))
    monkeypatch.delenv(data.OFFLINE_ENV, raising=False)
    monkeypatch.setitem(data.REGISTRY, "corpus", CORPUS)

    def no_network(url, timeout=None):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    return mirror, cache


def serve(monkeypatch, payload: bytes) -> list:
    """Make every download return ``payload``; returns the list of URLs asked for."""
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    return calls


# --- the packaged copies ---------------------------------------------------------------

def test_the_lessons_data_is_packaged():
    assert PACKAGED == ["gpt2-encoder", "gpt2-vocab", "names", "tinyshakespeare"]


def test_every_packaged_file_is_there_and_checks_out():
    for name in PACKAGED:
        entry = data.REGISTRY[name]
        assert data.packaged_path(name) == data.PACKAGED_DIR / entry.filename
        assert data.sha256_of(data.packaged_path(name)) == entry.sha256, name


def test_the_package_folder_holds_exactly_the_registered_files_and_a_readme():
    on_disk = {p.name for p in data.PACKAGED_DIR.iterdir() if p.name != "__pycache__"}
    registered = {data.REGISTRY[name].filename for name in PACKAGED}
    assert on_disk == registered | {"README.md"}
    readme = (data.PACKAGED_DIR / "README.md").read_text()
    for filename in registered:
        assert filename in readme, f"the datafiles README does not describe {filename}"


def test_packaged_copy_is_used_with_no_folder_no_cache_and_no_network(sandbox, monkeypatch):
    _, cache = sandbox
    monkeypatch.delenv(data.DATA_DIR_ENV)
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    assert data.path("names") == data.PACKAGED_DIR / "names.txt"
    assert len(data.read_text("names").split()) == 32_033
    assert data.read_text("tinyshakespeare").startswith("First Citizen:")
    assert not cache.exists()  # nothing downloaded, nothing copied


def test_a_packaged_copy_is_reported_and_a_corpus_is_not(sandbox):
    assert data.packaged_path("corpus") is None
    assert data.packaged_path("names") is not None


def test_corrupt_packaged_copy_says_to_reinstall(sandbox, monkeypatch, tmp_path):
    damaged = tmp_path / "damaged-install"
    damaged.mkdir()
    (damaged / "names.txt").write_text("emma\nolivia\n")
    monkeypatch.setattr(data, "PACKAGED_DIR", damaged)
    with pytest.raises(data.DataError) as err:
        data.path("names")
    message = str(err.value)
    assert str(damaged / "names.txt") in message
    assert data.REGISTRY["names"].sha256 in message
    assert "reinstall nblib" in message and data.DATA_DIR_ENV in message


def test_missing_packaged_copy_offline_says_to_reinstall(sandbox, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "PACKAGED_DIR", tmp_path / "empty-install")
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    with pytest.raises(data.DataError, match="is missing: reinstall nblib"):
        data.path("names")


# --- the override folder (NBLIB_DATA_DIR) -------------------------------------------------

def test_override_folder_comes_before_the_packaged_copy(sandbox):
    mirror, cache = sandbox
    shutil.copy(data.PACKAGED_DIR / "names.txt", mirror / "names.txt")
    assert data.path("names") == mirror / "names.txt"
    assert not cache.exists()


def test_override_folder_without_the_file_falls_back_to_the_packaged_copy(sandbox):
    assert data.path("names") == data.PACKAGED_DIR / "names.txt"


def test_override_folder_serves_a_corpus_that_is_not_packaged(sandbox):
    mirror, _ = sandbox
    (mirror / "corpus.txt").write_bytes(CORPUS_BYTES)
    assert data.read_text("corpus") == CORPUS_BYTES.decode()


def test_corrupt_override_file_says_which_expected_and_got(sandbox):
    mirror, _ = sandbox
    bad = mirror / "names.txt"
    bad.write_text("emma\nolivia\n")
    with pytest.raises(data.DataError) as err:
        data.path("names")
    message = str(err.value)
    assert str(bad) in message
    assert data.REGISTRY["names"].sha256 in message
    assert data.sha256_of(bad) in message
    assert "Replace it" in message and data.REGISTRY["names"].url in message


# --- the cache and the network -------------------------------------------------------------

def test_unknown_name_lists_the_known_ones(sandbox):
    with pytest.raises(data.DataError) as err:
        data.path("shakespear")
    message = str(err.value)
    assert "'shakespear'" in message
    for name in data.REGISTRY:
        assert name in message


def test_corrupt_cache_file_says_to_delete_it(sandbox):
    _, cache = sandbox
    cache.mkdir()
    (cache / "corpus.txt").write_text("truncated")
    with pytest.raises(data.DataError, match="Delete .*corpus.txt"):
        data.path("corpus")


def test_offline_without_a_copy_names_the_url_and_the_variable(sandbox, monkeypatch):
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    with pytest.raises(data.DataError) as err:
        data.path("corpus")
    message = str(err.value)
    assert "not available offline" in message
    assert CORPUS.url in message
    assert data.DATA_DIR_ENV in message


@pytest.mark.parametrize("value", ["0", "", "false", "no", "off", " Off "])
def test_offline_switch_off_values_allow_the_download(sandbox, monkeypatch, value):
    monkeypatch.setenv(data.OFFLINE_ENV, value)
    calls = serve(monkeypatch, CORPUS_BYTES)
    assert data.read_text("corpus") == CORPUS_BYTES.decode()
    assert calls == [CORPUS.url]


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_offline_switch_on_values_forbid_the_download(sandbox, monkeypatch, value):
    monkeypatch.setenv(data.OFFLINE_ENV, value)
    calls = serve(monkeypatch, CORPUS_BYTES)
    with pytest.raises(data.DataError, match="not available offline"):
        data.path("corpus")
    assert calls == []


def test_unreachable_network_names_the_url_and_the_variable(sandbox):
    with pytest.raises(data.DataError) as err:
        data.path("corpus")
    message = str(err.value)
    assert CORPUS.url in message
    assert data.DATA_DIR_ENV in message
    assert "network is unreachable" in message


def test_download_lands_in_the_cache_once(sandbox, monkeypatch):
    _, cache = sandbox
    calls = serve(monkeypatch, CORPUS_BYTES)
    first = data.path("corpus")
    second = data.path("corpus")
    assert first == second == cache / "corpus.txt"
    assert calls == [CORPUS.url]
    assert not list(cache.glob("*.part"))


def test_corrupt_download_is_refused_and_not_cached(sandbox, monkeypatch):
    _, cache = sandbox
    serve(monkeypatch, b"not the real file")
    with pytest.raises(data.DataError, match="Checksum mismatch"):
        data.path("corpus")
    assert not (cache / "corpus.txt").exists()
    assert not list(cache.glob("*.part"))


# --- the report ------------------------------------------------------------------------------

def test_availability_reports_without_downloading(sandbox, monkeypatch):
    mirror, cache = sandbox
    shutil.copy(data.PACKAGED_DIR / "names.txt", mirror / "names.txt")
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    report = data.availability()
    assert report["names"].startswith("local folder")
    assert report["tinyshakespeare"].startswith("packaged with nblib")
    assert report["corpus"].startswith("MISSING")
    monkeypatch.setenv(data.OFFLINE_ENV, "off")
    assert data.availability()["corpus"] == f"will download from {CORPUS.url}"
    cache.mkdir()
    (cache / "corpus.txt").write_bytes(CORPUS_BYTES)
    assert data.availability()["corpus"].startswith("cache")
    assert not list(Path(mirror).glob("corpus*"))


def test_printed_paths_name_no_machine(monkeypatch, tmp_path):
    # a recorded lesson prints packaged files as nblib/... and the home folder as ~
    assert data.shown(data.PACKAGED_DIR / "names.txt") == "nblib/datafiles/names.txt"
    monkeypatch.setattr(data.Path, "home", classmethod(lambda cls: tmp_path))
    assert data.shown(tmp_path / ".cache" / "nblib") == "~/.cache/nblib"
    assert data.shown("/elsewhere/x") == "/elsewhere/x"
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.availability()["names"] == "packaged with nblib (nblib/datafiles)"
