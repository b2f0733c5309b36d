"""Presets on the CPU: what applies, what is refused and why, and that every change can be undone.

The GPU-only paths run here too where diffusers allows it: with the accelerator check patched,
model CPU offload installs its real accelerate hooks with the CPU as the "accelerator".
"""

import numpy as np
import pytest
import torch
from conftest import build_tiny_random_pipeline

from sdhelpers import gpu, preset_checks


@pytest.fixture
def pipe():
    pipeline = build_tiny_random_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline) -> np.ndarray:
    return pipeline("a red circle on a blue background", height=16, width=16, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").images


def processors(model) -> set[str]:
    return {type(p).__name__ for p in model.attn_processors.values()}


def channels_last(model) -> bool:
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    return conv.is_contiguous(memory_format=torch.channels_last)


def fused(model) -> bool:
    return any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in model.modules())


def assert_default_state(pipeline, dtype=torch.float32):
    assert processors(pipeline.unet) == processors(pipeline.vae) == {"AttnProcessor2_0"}
    assert not channels_last(pipeline.unet) and not channels_last(pipeline.vae)
    assert not fused(pipeline.unet) and not fused(pipeline.vae)
    assert not pipeline.vae.use_slicing and not pipeline.vae.use_tiling
    assert not any(hasattr(m, "_hf_hook") for m in (pipeline.unet, pipeline.vae, pipeline.text_encoder))
    assert pipeline.dtype == dtype and pipeline.device.type == "cpu"


def test_default_applies_on_the_cpu_and_says_what_it_did(pipe):
    before = generate(pipe)
    report = gpu.apply_preset(pipe, "default", device="cpu")
    assert (report.name, report.device, report.dtype) == ("default", "cpu", "float32")
    assert "dtype float32" in report.changes
    assert any("AttnProcessor2_0" in change for change in report.changes)
    assert "preset 'default' on cpu" in str(report)
    assert_default_state(pipe)
    np.testing.assert_array_equal(generate(pipe), before)  # default is what diffusers does anyway


def test_fast_in_bfloat16_without_compile_applies_on_the_cpu(pipe):
    report = gpu.apply_preset(pipe, "fast", device="cpu", dtype=torch.bfloat16, compile=False)
    assert pipe.dtype == torch.bfloat16 and report.dtype == "bfloat16"
    assert channels_last(pipe.unet) and channels_last(pipe.vae)
    assert processors(pipe.unet) == {"FusedAttnProcessor2_0"} and fused(pipe.unet) and fused(pipe.vae)
    text = " | ".join(report.changes)
    assert "channels_last" in text and "fused QKV" in text and "torch.compile" not in text
    image = generate(pipe)
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    undone = gpu.restore_default(pipe)
    assert "QKV projections unfused" in undone
    assert_default_state(pipe)


def test_preset_block_restores_the_pipeline_exactly(pipe):
    before = generate(pipe)
    with gpu.preset(pipe, "fast", device="cpu", dtype=torch.float32, compile=False) as report:
        assert report.name == "fast" and channels_last(pipe.unet) and fused(pipe.unet)
        np.testing.assert_allclose(generate(pipe), before, atol=1e-3)  # fused matmuls round differently
    assert_default_state(pipe)
    np.testing.assert_array_equal(generate(pipe), before)


def test_restore_brings_back_the_processors_the_pipeline_had():
    from diffusers.models.attention_processor import AttnProcessor

    pipeline = build_tiny_random_pipeline()
    pipeline.unet.set_attn_processor(AttnProcessor())  # a reader's own choice before any preset
    gpu.apply_preset(pipeline, "default")
    assert processors(pipeline.unet) == {"AttnProcessor2_0"}
    gpu.restore_default(pipeline)
    assert processors(pipeline.unet) == {"AttnProcessor"}


def test_presets_do_not_stack(pipe):
    gpu.apply_preset(pipe, "fast", dtype=torch.float32, compile=False)
    gpu.apply_preset(pipe, "default")
    assert_default_state(pipe)


@pytest.mark.parametrize("name, kwargs, expected, unexpected", [
    ("fast", {}, ["dtype: float16", "compile: torch.compile"], []),
    ("fast", {"dtype": torch.bfloat16}, ["compile: torch.compile", "compile=False"], ["dtype"]),
    ("default", {"dtype": torch.float16}, ["dtype: float16", "bfloat16"], ["compile"]),
    ("low-memory", {}, ["device:", "accelerator"], []),
    ("lowest-memory", {"dtype": torch.float32}, ["device:", "accelerator"], ["dtype"]),
])
def test_what_the_cpu_cannot_do_is_refused_in_one_line(pipe, name, kwargs, expected, unexpected):
    with pytest.raises(gpu.PresetError) as info:
        gpu.apply_preset(pipe, name, device="cpu", **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith(f"preset {name!r} can't apply on cpu")
    for word in expected:
        assert word in message
    for word in unexpected:
        assert word not in message
    assert_default_state(pipe)  # refused before anything was touched


def test_unknown_names_and_arguments():
    with pytest.raises(gpu.PresetError, match="'turbo' is not a preset; allowed: default, fast, low-memory, lowest-memory"):
        gpu.check_preset("turbo")
    with pytest.raises(gpu.PresetError, match="compile: 'fastest' is not allowed"):
        gpu.check_preset("fast", device="cpu", compile="fastest")
    with pytest.raises(gpu.PresetError, match="dtype: torch.int8 is not allowed"):
        gpu.check_preset("default", device="cpu", dtype=torch.int8)
    with pytest.raises(gpu.PresetError, match="device"):
        gpu.check_preset("default", device="tpu")


def test_model_offload_with_an_accelerator(pipe, monkeypatch):
    # Offload to the CPU itself: the real accelerate hooks run, the values can't change.
    monkeypatch.setattr(preset_checks, "_can_offload", lambda device: True)
    before = generate(pipe)
    report = gpu.apply_preset(pipe, "low-memory", device="cpu", dtype=torch.float32)
    assert hasattr(pipe.unet, "_hf_hook") and pipe.vae.use_slicing and pipe.vae.use_tiling
    text = " | ".join(report.changes)
    assert "enable_model_cpu_offload" in text and "vae.enable_slicing" in text and "vae.enable_tiling" in text
    np.testing.assert_array_equal(generate(pipe), before)
    assert "CPU offload hooks removed" in gpu.restore_default(pipe)
    assert_default_state(pipe)
    np.testing.assert_array_equal(generate(pipe), before)


def test_sequential_offload_is_undone(pipe, monkeypatch):
    # accelerate can't run sequential offload with the CPU as execution device, so this checks the
    # hooks and the restore only: the weights leave for the meta device and come back intact.
    monkeypatch.setattr(preset_checks, "_can_offload", lambda device: True)
    before = generate(pipe)
    report = gpu.apply_preset(pipe, "lowest-memory", device="cpu", dtype=torch.float32)
    assert any("enable_sequential_cpu_offload" in change for change in report.changes)
    assert {p.device.type for p in pipe.unet.parameters()} == {"meta"} and pipe.vae.use_slicing
    gpu.restore_default(pipe)
    assert_default_state(pipe)
    np.testing.assert_array_equal(generate(pipe), before)


def test_compile_is_applied_and_undone(pipe, monkeypatch):
    from diffusers.utils.torch_utils import is_compiled_module

    monkeypatch.setattr(preset_checks, "_can_compile", lambda device: True)
    report = gpu.apply_preset(pipe, "fast", device="cpu", dtype=torch.float32)  # torch.compile is lazy
    assert is_compiled_module(pipe.unet)
    assert "torch.compile(unet, mode='reduce-overhead', fullgraph=True)" in report.changes[-1]
    assert "torch.compile undone (original UNet back)" in gpu.restore_default(pipe)
    assert not is_compiled_module(pipe.unet) and pipe.config.unet[1] == "UNet2DConditionModel"
    assert_default_state(pipe)


def test_free_memory_reports_bytes():
    freed = gpu.free_memory()
    assert isinstance(freed, int) and freed >= 0
    if not torch.cuda.is_available():
        assert freed == 0


@pytest.mark.parametrize("name, expected", [
    ("default", "try preset 'low-memory'"),
    ("fast", "try preset 'low-memory'"),
    ("low-memory", "try preset 'lowest-memory'"),
    ("lowest-memory", "smaller height/width"),
])
def test_oom_advice_points_to_the_next_preset(name, expected):
    advice = gpu.oom_advice(name)
    assert expected in advice and name in advice
    with pytest.raises(gpu.PresetError, match="preset_name: 'huge'"):
        gpu.oom_advice("huge")


def test_explain_oom_appends_the_advice():
    original = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError) as info:
        with gpu.explain_oom("fast"):
            raise original
    message = str(info.value)
    assert "Tried to allocate 2.00 GiB" in message and "try preset 'low-memory'" in message
    assert info.value.__cause__ is original
    with pytest.raises(KeyError):  # anything else passes through untouched
        with gpu.explain_oom("fast"):
            raise KeyError("not memory")
    with pytest.raises(gpu.PresetError):
        with gpu.explain_oom("huge"):
            pass
