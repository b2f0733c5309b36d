"""Tests of the TinySD trainer (sdhelpers.train, .export, .latents) and its checkpoints, on tiny networks
(the 'smoke' recipe)."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from sdhelpers import checkpoint as ckpt
from sdhelpers import export, train
from sdhelpers.architectures import build_unet, build_vae
from sdhelpers.latents import compute_scaling_factor, encode_images
from sdhelpers.recipe import SMOKE_RECIPE, STAGES, TINYSD_RECIPE
from sdhelpers.data import ShapesDataset

SMOKE = SMOKE_RECIPE


@pytest.fixture(scope="module")
def frozen_parts():
    """A random tiny VAE and text encoder, as the UNet stage receives them."""
    torch.manual_seed(0)
    vae = build_vae(SMOKE.vae_config)
    text_encoder = train.build_clip(SMOKE).text_model
    return vae, text_encoder


def _mean(curve, part):
    values = [v for _, v in curve]
    return float(np.mean(values[:3] if part == "head" else values[-3:]))


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- losses go down


def test_vae_loss_decreases(tmp_path):
    recipe = SMOKE.with_stage("vae", steps=15, learning_rate=3e-3)
    result = train.train_vae(tmp_path, recipe=recipe, dataset=ShapesDataset(2, seed=1), progress=False)
    assert len(result.curve) == 15 and result.finished
    assert _mean(result.curve, "tail") < 0.8 * _mean(result.curve, "head")
    assert (tmp_path / "vae" / "final" / "config.json").is_file()
    report = json.loads((tmp_path / "vae" / "report.json").read_text())
    assert report["steps"] == 15 and np.isfinite(report["psnr"]["held_out"])


def test_clip_loss_decreases(tmp_path):
    recipe = SMOKE.with_stage("clip", steps=15, learning_rate=3e-3)
    result = train.train_clip(tmp_path, recipe=recipe, dataset=ShapesDataset(8, seed=1), progress=False)
    assert _mean(result.curve, "tail") < 0.8 * _mean(result.curve, "head")
    text_encoder = export.load_component(tmp_path, "clip")
    assert text_encoder.config.vocab_size == 49408 and text_encoder.config.max_position_embeddings == 77


def test_unet_loss_decreases(tmp_path, frozen_parts):
    vae, text_encoder = frozen_parts
    recipe = SMOKE.with_stage("unet", steps=15, learning_rate=3e-3)
    result = train.train_unet(tmp_path, vae, text_encoder, recipe=recipe, dataset=ShapesDataset(4, seed=1),
                              progress=False)
    assert _mean(result.curve, "tail") < 0.8 * _mean(result.curve, "head")
    assert result.ema is not None


def test_loss_curve_is_saved_as_json(tmp_path):
    result = train.train_vae(tmp_path, recipe=SMOKE, progress=False)
    curve = json.loads((tmp_path / "vae" / "loss.json").read_text())
    assert curve == result.curve and [step for step, _ in curve] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- scaling factor


def test_compute_scaling_factor_is_one_over_std():
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5.0 + 1.0
    assert compute_scaling_factor(latents) == pytest.approx(0.2, rel=0.02)
    with pytest.raises(ValueError, match="latents"):
        compute_scaling_factor(torch.zeros(8))


def test_unet_stage_sets_scaling_factor_from_the_data(tmp_path, frozen_parts):
    vae, text_encoder = frozen_parts
    vae = build_vae(SMOKE.vae_config)
    data = ShapesDataset(16, seed=2)
    train.train_unet(tmp_path, vae, text_encoder, recipe=SMOKE.with_stage("unet", steps=1), dataset=data,
                     progress=False)
    mean, std, _ = encode_images(vae, data)
    # the stage draws latent_dist.sample() for every image with a generator seeded by the seed (0)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert vae.config.scaling_factor == pytest.approx(1 / float(sampled.std()), rel=1e-4)
    assert vae.config.scaling_factor != 1.0
    wider = copy.deepcopy(vae)  # the same weights, so the same latents
    recipe = dataclasses.replace(SMOKE, latent_std=2.0).with_stage("unet", steps=1)
    train.train_unet(tmp_path / "wider", wider, text_encoder, recipe=recipe, dataset=data, progress=False)
    assert wider.config.scaling_factor == pytest.approx(2 * vae.config.scaling_factor, rel=1e-4)
    assert json.loads((tmp_path / "wider" / "unet" / "report.json").read_text())["latent_std"] == 2.0


@pytest.mark.parametrize("latent_std", [0, -1.0, float("nan"), "2"])
def test_unet_refuses_a_latent_std_that_is_not_positive(tmp_path, frozen_parts, latent_std):
    vae, text_encoder = frozen_parts
    recipe = dataclasses.replace(SMOKE, latent_std=latent_std)
    with pytest.raises(ValueError, match="latent_std"):
        train.train_unet(tmp_path, vae, text_encoder, recipe=recipe, progress=False)
    assert not (tmp_path / "unet").exists()


# --------------------------------------------------------------------------- checkpoints


def test_state_round_trip_keeps_types_and_tensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"step": 7, "optimizer": optimizer.state_dict(), "curve": [[0, 1.5], [1, float("nan")]], "none": None}
    path = ckpt.save_state(tmp_path / "c.safetensors", state)
    back = ckpt.load_state(path)
    assert back["step"] == 7 and back["none"] is None and back["curve"][0] == [0, 1.5]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(back["optimizer"]["state"]) == {0, 1}
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(back["optimizer"]["state"][0][key], optimizer.state_dict()["state"][0][key])
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    fresh.load_state_dict(back["optimizer"])
    assert fresh.param_groups[0]["lr"] == 1e-3


def test_state_refuses_what_would_need_pickle(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        ckpt.save_state(tmp_path / "c.safetensors", {"bad": object()})
    assert not (tmp_path / "c.safetensors").exists()


def test_checkpoint_holds_everything_to_resume(tmp_path):
    train.train_unet(tmp_path, *_fresh_parts(), recipe=SMOKE, dataset=ShapesDataset(8, seed=3), progress=False,
                     stop_at=2)
    state = ckpt.load_state(tmp_path / "unet" / "checkpoint.safetensors")
    assert state["step"] == 2 and len(state["losses"]) == 2
    assert set(state) >= {"model", "optimizer", "lr_scheduler", "ema", "rng", "info", "seconds"}
    assert state["info"]["stage"] == "unet" and isinstance(state["rng"]["torch"], torch.Tensor)
    assert len(state["ema"]["shadow_params"]) == len(list(build_unet(SMOKE.unet_config).parameters()))
    assert state["lr_scheduler"]["last_epoch"] == 2


def _fresh_parts():
    torch.manual_seed(0)
    return build_vae(SMOKE.vae_config), train.build_clip(SMOKE).text_model


@pytest.mark.parametrize("stage", ["vae", "clip", "unet", "refine"])
def test_resume_is_bitwise_exact(tmp_path, stage):
    """N steps straight == N/2, checkpoint, a fresh load (new objects, new generators), N/2 more."""
    recipe = SMOKE.with_stage(stage, steps=4, warmup_steps=1)
    data = ShapesDataset(8, seed=4)

    def run(work, **kwargs):
        torch.manual_seed(123)  # the global RNG state must not matter: the checkpoint restores it
        if stage == "vae":
            return train.train_vae(work, recipe=recipe, dataset=data, progress=False, **kwargs)
        if stage == "clip":
            return train.train_clip(work, recipe=recipe, dataset=data, progress=False, **kwargs)
        if stage == "refine":
            unet = _unet_to_refine()
            return train.train_refine(work, *_fresh_parts(), unet, recipe=recipe, dataset=data, progress=False,
                                      **kwargs)
        return train.train_unet(work, *_fresh_parts(), recipe=recipe, dataset=data, progress=False, **kwargs)

    straight = run(tmp_path / "a")
    half = run(tmp_path / "b", stop_at=2)
    assert half.step == 2 and not half.finished
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.finished and resumed.curve == straight.curve
    assert _states_equal(straight.objective.state_dict(), resumed.objective.state_dict())
    if stage in ("unet", "refine"):
        assert all(torch.equal(a, b) for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params))


def _unet_to_refine():
    torch.manual_seed(7)
    return build_unet(SMOKE.unet_config)


def test_refine_trains_on_from_the_given_unet_with_the_pull(tmp_path, monkeypatch):
    from sdhelpers import objectives, unet_stages

    unet = _unet_to_refine()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    pulls = []
    real = objectives.extra_pass_consistency_loss
    monkeypatch.setattr(unet_stages, "extra_pass_consistency_loss", lambda *a, **k: pulls.append(a[8]) or real(*a, **k))
    result = train.train_refine(tmp_path, *_fresh_parts(), unet, recipe=SMOKE, dataset=ShapesDataset(8, seed=3),
                                progress=False)
    assert result.finished and pulls == [SMOKE.branch_consistency] * SMOKE.refine.steps
    assert _states_equal(unet.state_dict(), before)  # the UNet stage's model is left as it was
    trained = result.objective.state_dict()
    assert not _states_equal(trained, before) and set(trained) == set(before)
    report = json.loads((tmp_path / "refine" / "report.json").read_text())
    assert report["branch_consistency"] == 3.0 and report["consistency_swaps"] == 0.5
    assert (tmp_path / "refine" / "final" / "config.json").is_file()


def test_refine_with_guidance_calibration_uses_the_calibrated_loss(tmp_path, monkeypatch):
    import dataclasses

    from sdhelpers import objectives, unet_stages

    recipe = dataclasses.replace(SMOKE, branch_consistency=0.0, guidance_calibration=7.5)
    scales = []
    real = objectives.calibrated_diffusion_loss
    monkeypatch.setattr(unet_stages, "calibrated_diffusion_loss", lambda *a, **k: scales.append(a[7]) or real(*a, **k))
    monkeypatch.setattr(unet_stages, "extra_pass_consistency_loss", None)  # must not be called
    result = train.train_refine(tmp_path, *_fresh_parts(), _unet_to_refine(), recipe=recipe,
                                dataset=ShapesDataset(8, seed=3), progress=False)
    assert result.finished and scales == [7.5] * SMOKE.refine.steps
    report = json.loads((tmp_path / "refine" / "report.json").read_text())
    assert report["guidance_calibration"] == 7.5 and report["branch_consistency"] == 0.0


def test_the_calibrated_preset_is_the_first_recipe_then_a_calibrated_refine_stage():
    from sdhelpers.recipe import CALIBRATED_RECIPE, PRESETS, TINYSD1_RECIPE

    assert PRESETS["calibrated"] is CALIBRATED_RECIPE and CALIBRATED_RECIPE.pull_stage == "refine"
    assert CALIBRATED_RECIPE.unet == TINYSD1_RECIPE.unet and CALIBRATED_RECIPE.caption_dropout == 0.1
    assert (CALIBRATED_RECIPE.guidance_calibration, CALIBRATED_RECIPE.consistency_below_timestep) == (7.5, 600)
    assert CALIBRATED_RECIPE.open_captions == CALIBRATED_RECIPE.branch_consistency == 0


def test_the_first_recipe_is_a_preset_with_sds_plain_loss():
    from sdhelpers.recipe import PRESETS, TINYSD1_RECIPE, TINYSD_RECIPE

    assert PRESETS["tinysd1"] is TINYSD1_RECIPE and train._parser().parse_args(
        ["all", "--out", "x", "--preset", "tinysd1"]).preset == "tinysd1"
    assert TINYSD1_RECIPE.caption_dropout == 0.1 and TINYSD1_RECIPE.refine is None
    assert TINYSD1_RECIPE.open_captions == TINYSD1_RECIPE.branch_consistency == TINYSD1_RECIPE.guidance_calibration == 0
    assert (TINYSD1_RECIPE.vae, TINYSD1_RECIPE.clip) == (TINYSD_RECIPE.vae, TINYSD_RECIPE.clip)  # shared stages


def test_a_recipe_without_a_refine_stage_refuses_one(tmp_path):
    from sdhelpers.recipe import TINYSD1_RECIPE

    with pytest.raises(ValueError, match="no 'refine' stage"):
        train.train_refine(tmp_path, *_fresh_parts(), _unet_to_refine(), recipe=TINYSD1_RECIPE, progress=False)
    assert not (tmp_path / "refine").exists()
    assert (TINYSD_RECIPE.pull_stage, SMOKE.pull_stage) == ("unet", "refine")  # TinySD 2 pulls in the UNet stage


def test_corrupt_checkpoint_raises_and_is_left_alone(tmp_path):
    train.train_vae(tmp_path, recipe=SMOKE, progress=False, stop_at=2)
    path = tmp_path / "vae" / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # break the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.safetensors"):
        train.train_vae(tmp_path, recipe=SMOKE, progress=False, resume=True)
    assert path.read_bytes() == bytes(data)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_state(path)


def test_mismatched_checkpoint_raises_and_is_left_alone(tmp_path):
    train.train_vae(tmp_path, recipe=SMOKE, progress=False, stop_at=2)
    path = tmp_path / "vae" / "checkpoint.safetensors"
    before = path.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.safetensors.*settings\.batch_size: checkpoint has 4"):
        train.train_vae(tmp_path, recipe=SMOKE, batch_size=2, progress=False, resume=True)
    other = dataclasses.replace(SMOKE, vae_config={**SMOKE.vae_config, "latent_channels": 8})
    with pytest.raises(ckpt.CheckpointError, match="different run.*latent_channels"):
        train.train_vae(tmp_path, recipe=other, progress=False, resume=True)
    assert path.read_bytes() == before


def test_checkpoint_that_does_not_fit_the_model_raises(tmp_path):
    train.train_vae(tmp_path, recipe=SMOKE, progress=False, stop_at=2)
    path = tmp_path / "vae" / "checkpoint.safetensors"
    state = ckpt.load_state(path)
    state["model"].pop(next(iter(state["model"])))
    ckpt.save_state(path, state)
    with pytest.raises(ckpt.CheckpointError, match="does not fit"):
        train.train_vae(tmp_path, recipe=SMOKE, progress=False, resume=True)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train.train_vae(tmp_path, recipe=SMOKE, progress=False, stop_at=2)
    path = tmp_path / "vae" / "checkpoint.safetensors"
    before = path.read_bytes()

    def write_half_then_fail(handle, data):
        handle.write(memoryview(data)[: len(data) // 2])
        raise KeyboardInterrupt("simulated crash in the middle of a save")

    monkeypatch.setattr(ckpt, "_write_chunks", write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        train.train_vae(tmp_path, recipe=SMOKE, progress=False, resume=True)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()
    assert ckpt.load_state(path)["step"] == 2
    assert train.train_vae(tmp_path, recipe=SMOKE, progress=False, resume=True).finished


# --------------------------------------------------------------------------- bad input


def test_empty_dataset_and_zero_batch_size_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dataset: is empty"):
        train.train_vae(tmp_path, recipe=SMOKE, dataset=[], progress=False)
    with pytest.raises(ValueError, match="batch_size: 0"):
        train.train_clip(tmp_path, recipe=SMOKE, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="steps: -1"):
        train.train_vae(tmp_path, recipe=SMOKE, steps=-1, progress=False)
    with pytest.raises(ValueError, match="seed"):
        train.train_vae(tmp_path, recipe=SMOKE, seed=-3, progress=False)
    assert not (tmp_path / "vae").exists()


def test_unet_refuses_a_text_encoder_of_the_wrong_width(tmp_path):
    vae, _ = _fresh_parts()
    wide = train.build_clip(TINYSD_RECIPE).text_model
    with pytest.raises(ValueError, match="cross_attention_dim"):
        train.train_unet(tmp_path, vae, wide, recipe=SMOKE, progress=False)


def test_cli_rejects_steps_with_all(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["all", "--out", str(tmp_path / "m"), "--steps", "3"])


# --------------------------------------------------------------------------- the whole recipe


def test_all_writes_a_pipeline_that_loads_offline_and_generates(tmp_path, monkeypatch):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = train.main(["all", "--out", str(tmp_path / "tinysd"), "--preset", "smoke", "--seed", "5", "--no-progress"])
    assert out == tmp_path / "tinysd"
    names = {p.name for p in out.iterdir()}
    assert {"model_index.json", "vae", "text_encoder", "tokenizer", "unet", "scheduler", "training.json",
            "loss_vae.json", "loss_clip.json", "loss_unet.json", "loss_refine.json"} <= names
    assert (tmp_path / "tinysd.work" / "unet" / "checkpoint.safetensors").is_file()  # checkpoints stay outside
    training = json.loads((out / "training.json").read_text())
    assert training["seed"] == 5 and set(training["stages"]) == set(STAGES)
    assert {"torch", "diffusers", "transformers"} <= set(training["versions"])
    assert all(training["stages"][s]["seconds"] >= 0 for s in STAGES)

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    refined = export.load_component(tmp_path / "tinysd.work", "refine").state_dict()
    assert _states_equal(pipe.unet.state_dict(), refined)  # the pipeline ships the refine stage's UNet
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert isinstance(pipe.scheduler, PNDMScheduler)
    config = pipe.scheduler.config
    assert (config.skip_prk_steps, config.steps_offset, config.set_alpha_to_one) == (True, 1, False)
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    assert pipe.vae.config.scaling_factor == pytest.approx(training["scaling_factor"])
    ids = pipe.tokenizer("a red circle on a blue background").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(pipe.tokenizer.get_vocab()) == 49408
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_stage_commands_write_the_pipeline_after_the_last_stage(tmp_path):
    out, common = tmp_path / "tinysd", ["--preset", "smoke", "--no-progress"]
    for stage in ("vae", "clip", "unet"):
        assert train.main([stage, "--out", str(out), *common]) == tmp_path / "tinysd.work"
    assert not out.exists()  # the smoke recipe has a refine stage still to run
    assert train.main(["refine", "--out", str(out), *common]) == out
    assert set(json.loads((out / "training.json").read_text())["stages"]) == set(STAGES)
    (out / "levers.json").write_text('[{"name": "an earlier recipe"}]')
    export.finish(out, tmp_path / "tinysd.work", seed=0, preset="smoke")  # a rebuild keeps the record
    assert json.loads((out / "levers.json").read_text()) == [{"name": "an earlier recipe"}]


def test_export_uses_fp16_only_when_needed_and_still_loads_fp32(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    vae, text_encoder = _fresh_parts()
    unet = build_unet(SMOKE.unet_config)
    fp32_megabytes = export.parameter_megabytes([vae, text_encoder, unet], 4)
    small = export.export_pipeline(tmp_path / "fp16", vae, text_encoder, unet, max_megabytes=fp32_megabytes)
    with safe_open(str(small / "text_encoder" / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16
    pipe = StableDiffusionPipeline.from_pretrained(small, local_files_only=True)
    assert pipe.text_encoder.dtype == torch.float32 and pipe.unet.dtype == torch.float32
    unet.save_pretrained(tmp_path / "loaded_unet")
    unet = type(unet).from_pretrained(tmp_path / "loaded_unet")  # its config now names that folder
    assert "_name_or_path" in unet.config
    roomy = export.export_pipeline(tmp_path / "fp32", vae, text_encoder, unet, max_megabytes=100.0)
    assert all("_name_or_path" not in json.loads(p.read_text()) for p in roomy.glob("*/config.json"))
    with safe_open(str(roomy / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float32
    with pytest.raises(ValueError, match="out: .* not a diffusers pipeline folder"):
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "keep.txt").write_text("mine")
        export.export_pipeline(tmp_path / "notes", vae, text_encoder, unet)
