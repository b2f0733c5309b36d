"""The guidance diagnostics (sdhelpers.guidance) on a tiny random pipeline with SD's exact classes."""

from __future__ import annotations

import math

import pytest
import torch

from sdhelpers.guidance import branch_gap, empty_prompt_below, interval_guidance
from sdhelpers.models import load_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir, device="cpu", dtype=torch.float32)


def test_branch_gap_reports_both_errors_and_their_gap(pipe):
    report = branch_gap(pipe, (10, 500), count=4)
    assert list(report) == [10, 500]
    for row in report.values():
        assert set(row) == {"prompted_mse", "empty_mse", "gap"}
        assert all(math.isfinite(v) and v >= 0 for v in row.values())
    assert report == branch_gap(pipe, (10, 500), count=4)  # seeded: the same numbers again
    with pytest.raises(ValueError, match="timesteps"):
        branch_gap(pipe, (1000,), count=2)


def test_the_gap_is_zero_when_the_prompt_changes_nothing(pipe, monkeypatch):
    import sdhelpers.sampling as sampling

    monkeypatch.setattr(sampling, "encode_prompt", lambda p, prompts: (torch.zeros(len(prompts), 77, 32),) * 2)
    assert all(row["gap"] == 0 for row in branch_gap(pipe, (200,), count=2).values())


def test_interval_guidance_stops_guiding_below_the_threshold(pipe):
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: batches.append(args[0].shape[0]),
                                               with_kwargs=True)
    try:
        def run(**kwargs):
            batches.clear()
            image = pipe("a red circle on a blue background", num_inference_steps=4, guidance_scale=7.5,
                         height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="np",
                         **kwargs).images
            return image, list(batches)

        plain, plain_batches = run()
        never, never_batches = run(callback_on_step_end=interval_guidance(pipe, from_timestep=1e-3),
                                   callback_on_step_end_tensor_inputs=["prompt_embeds"])
        early, early_batches = run(callback_on_step_end=interval_guidance(pipe, from_timestep=1e6),
                                   callback_on_step_end_tensor_inputs=["prompt_embeds"])
    finally:
        hook.remove()
    assert plain_batches == never_batches == [2] * len(plain_batches) and (plain == never).all()
    assert early_batches == [2] + [1] * (len(plain_batches) - 1) and not (early == plain).all()
    with pytest.raises(ValueError, match="from_timestep"):
        interval_guidance(pipe, from_timestep=0)


def test_one_interval_callback_serves_calls_of_any_step_count(pipe):
    def run(steps, callback):
        return pipe("a red circle on a blue background", num_inference_steps=steps, guidance_scale=7.5,
                    height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="np",
                    callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images

    callback = interval_guidance(pipe, from_timestep=500)
    run(3, callback)
    assert (run(8, callback) == run(8, interval_guidance(pipe, from_timestep=500))).all()


def test_empty_prompt_below_denoises_the_late_steps_without_the_prompt(pipe):
    empty = pipe.encode_prompt([""], "cpu", 1, False)[0]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        def run(below, guidance):
            seen.clear()
            return pipe("a red circle on a blue background", num_inference_steps=4, guidance_scale=guidance,
                        height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="np",
                        callback_on_step_end=empty_prompt_below(pipe, below),
                        callback_on_step_end_tensor_inputs=["prompt_embeds"]).images

        plain = run(1e-3, 1.0)
        assert not any(torch.equal(states, empty) for states in seen)
        late = run(1e6, 1.0)
        assert not torch.equal(seen[0], empty) and all(torch.equal(states, empty) for states in seen[1:])
        assert not (late == plain).all()
        run(1e6, 7.5)  # guided: both halves become the empty prompt's
        assert seen[1].shape[0] == 2 and all(torch.equal(half[None], empty) for half in seen[1])
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="below_timestep"):
        empty_prompt_below(pipe, below_timestep=-1)
