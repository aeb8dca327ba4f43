"""The data module: the mirror, the cache, downloads, and every error a learner can hit."""
import shutil
import urllib.error
from pathlib import Path

import pytest

from nblib import data

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty mirror folder and an empty cache; the real network is never used."""
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(mirror))
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(cache))
    monkeypatch.delenv(data.OFFLINE_ENV, raising=False)

    def no_network(url, timeout=None):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    return mirror, cache


def real_copy(name: str) -> Path:
    """A genuine copy of a registered file: the shared mirror, else the network."""
    candidate = MIRROR / data.REGISTRY[name].filename
    if candidate.exists():
        return candidate
    return data.path(name)


def test_mirror_file_is_used_and_verified(sandbox):
    mirror, cache = sandbox
    shutil.copy(real_copy("names"), mirror / "names.txt")
    path = data.path("names")
    assert path == mirror / "names.txt"
    assert len(data.read_text("names").split()) == 32_033
    assert not cache.exists()  # nothing downloaded, nothing copied


def test_every_registered_file_checks_out():
    for name, entry in data.REGISTRY.items():
        assert data.sha256_of(real_copy(name)) == entry.sha256, name


def test_unknown_name_lists_the_known_ones(sandbox):
    with pytest.raises(data.DataError) as err:
        data.path("shakespear")
    message = str(err.value)
    assert "'shakespear'" in message
    for name in data.REGISTRY:
        assert name in message


def test_corrupt_mirror_file_says_which_expected_and_got(sandbox):
    mirror, _ = sandbox
    bad = mirror / "names.txt"
    bad.write_text("emma\nolivia\n")
    with pytest.raises(data.DataError) as err:
        data.path("names")
    message = str(err.value)
    assert str(bad) in message
    assert data.REGISTRY["names"].sha256 in message
    assert data.sha256_of(bad) in message
    assert "Replace it" in message


def test_corrupt_cache_file_says_to_delete_it(sandbox, monkeypatch):
    _, cache = sandbox
    monkeypatch.delenv(data.DATA_DIR_ENV)
    cache.mkdir()
    (cache / "names.txt").write_text("truncated")
    with pytest.raises(data.DataError, match="Delete .*names.txt"):
        data.path("names")


def test_offline_without_a_copy_names_the_url_and_the_variable(sandbox, monkeypatch):
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    with pytest.raises(data.DataError) as err:
        data.path("tinyshakespeare")
    message = str(err.value)
    assert data.REGISTRY["tinyshakespeare"].url in message
    assert data.DATA_DIR_ENV in message


def test_unreachable_network_names_the_url_and_the_variable(sandbox):
    with pytest.raises(data.DataError) as err:
        data.path("tinyshakespeare")
    message = str(err.value)
    assert data.REGISTRY["tinyshakespeare"].url in message
    assert data.DATA_DIR_ENV in message
    assert "network is unreachable" in message


def test_download_lands_in_the_cache_once(sandbox, monkeypatch):
    mirror, cache = sandbox
    source = real_copy("names")
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return open(source, "rb")

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    first = data.path("names")
    second = data.path("names")
    assert first == second == cache / "names.txt"
    assert calls == [data.REGISTRY["names"].url]
    assert not list(cache.glob("*.part"))


def test_corrupt_download_is_refused_and_not_cached(sandbox, monkeypatch, tmp_path):
    _, cache = sandbox
    fake = tmp_path / "fake.txt"
    fake.write_text("not the real file")
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=None: open(fake, "rb"))
    with pytest.raises(data.DataError, match="Checksum mismatch"):
        data.path("names")
    assert not (cache / "names.txt").exists()


def test_availability_reports_without_downloading(sandbox, monkeypatch):
    mirror, _ = sandbox
    shutil.copy(real_copy("names"), mirror / "names.txt")
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    report = data.availability()
    assert report["names"].startswith("local folder")
    assert report["tinyshakespeare"].startswith("MISSING")
