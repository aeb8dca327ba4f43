import random

import numpy as np
import pytest
import torch

import nblib
from nblib import runmode


@pytest.mark.parametrize("value, fast", [("1", True), ("true", True), ("0", False), ("", False), ("off", False)])
def test_fast_switch_reads_the_environment(monkeypatch, value, fast):
    monkeypatch.setenv("NBLIB_FAST", value)
    assert runmode.is_fast() is fast


@pytest.mark.parametrize("value, on", [
    ("1", True), ("true", True), ("yes", True), ("on", True), (" TRUE ", True),
    ("0", False), ("", False), ("false", False), ("no", False), ("off", False), (" Off ", False),
])
def test_env_flag_reads_on_and_off_values(monkeypatch, value, on):
    monkeypatch.setenv("NBLIB_TEST_FLAG", value)
    assert runmode.env_flag("NBLIB_TEST_FLAG") is on


def test_env_flag_is_off_when_unset(monkeypatch):
    monkeypatch.delenv("NBLIB_TEST_FLAG", raising=False)
    assert runmode.env_flag("NBLIB_TEST_FLAG") is False


def test_fast_is_off_when_unset(monkeypatch):
    monkeypatch.delenv("NBLIB_FAST", raising=False)
    assert runmode.is_fast() is False


def test_seed_everything_makes_every_generator_repeat():
    def draw():
        runmode.seed_everything(123)
        return random.random(), np.random.rand(), torch.rand(3)

    a, b = draw(), draw()
    assert a[0] == b[0] and a[1] == b[1]
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)


def test_seed_everything_returns_an_independent_generator():
    g1 = runmode.seed_everything(7)
    g2 = torch.Generator().manual_seed(7)
    torch.testing.assert_close(torch.rand(4, generator=g1), torch.rand(4, generator=g2), rtol=0, atol=0)


def test_pick_device_honours_a_preference(monkeypatch):
    assert runmode.pick_device("cpu").type == "cpu"
    monkeypatch.setenv("NBLIB_DEVICE", "cpu")
    assert runmode.pick_device().type == "cpu"


def test_setup_returns_mode_and_device(monkeypatch, capsys):
    monkeypatch.setenv("NBLIB_FAST", "1")
    fast, device = nblib.setup(seed=1, device="cpu")
    assert fast is True and device.type == "cpu"
    out = capsys.readouterr().out
    assert "FAST mode" in out and "torch" in out
