"""Device choice, dtype, seeding, timing and memory tracking (on the CPU, as CI has no GPU)."""

import time

import pytest
import torch

from sdhelpers import device as dev


def test_cpu_is_chosen_without_a_gpu(monkeypatch):
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.get_device() == torch.device("cpu")
    assert dev.get_dtype() == torch.float32


def test_cuda_then_mps_order(monkeypatch):
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.get_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.get_device().type == "mps"
    assert dev.get_dtype("mps") == torch.float16


def test_environment_variable_and_argument_override(monkeypatch):
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")
    assert dev.get_device() == torch.device("cpu")
    monkeypatch.setenv(dev.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="SDHELPERS_DEVICE: 'tpu'"):
        dev.get_device()
    assert dev.get_device("cpu") == torch.device("cpu")  # the argument wins over the variable


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_invalid_device_string_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"^device: ") as err:
        dev.get_device(bad)
    assert "\n" not in str(err.value)


def test_unavailable_cuda_is_an_error_not_a_silent_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        dev.get_device("cuda")


def test_seeding_makes_torch_and_numpy_repeat():
    import numpy as np

    dev.seed_everything(123)
    a = (torch.randn(3), np.random.rand(3))
    dev.seed_everything(123)
    b = (torch.randn(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all()
    with pytest.raises(ValueError, match="seed: -1"):
        dev.seed_everything(-1)


def test_generator_is_on_the_device_and_seeded():
    g1, g2 = dev.make_generator(42, "cpu"), dev.make_generator(42, "cpu")
    assert g1.device.type == "cpu"
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    with pytest.raises(ValueError, match="seed: 'a'"):
        dev.make_generator("a")


def test_hardware_summary_is_one_line():
    line = dev.hardware_summary("cpu")
    assert "\n" not in line and line.startswith("CPU") and "torch " in line and "dtype float32" in line


def test_timer_measures_elapsed_time():
    with dev.Timer("cpu") as t:
        time.sleep(0.05)
    assert 0.04 < t.seconds < 1.0


def test_memory_tracker_sees_a_large_allocation():
    with dev.MemoryTracker("cpu") as m:
        block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB of float32, touched
        block += 1
        time.sleep(0.05)
    del block
    assert m.peak_bytes - m.start_rss > 200 * 2**20
    assert m.summary().startswith("peak RSS")
