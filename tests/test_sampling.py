"""The hand-written loops must give what the diffusers pipelines give, for PNDM and DDIM."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)

from sdhelpers import sampling
from sdhelpers.data import Scene, render
from sdhelpers.masks import box_mask
from sdhelpers.models import load_pipeline

SIZE = 16  # the tiny test pipeline's VAE downsamples 2x: 8x8 latents at 16x16
PROMPTS = ["a red circle on a blue background", "a white square on a black background"]


@pytest.fixture(scope="module")
def pipes(tiny_pipeline_dir):
    base = load_pipeline(tiny_pipeline_dir, device="cpu")
    return {
        "txt2img": base,
        "img2img": StableDiffusionImg2ImgPipeline.from_pipe(base),
        "inpaint": StableDiffusionInpaintPipeline.from_pipe(base),
    }


def with_scheduler(pipe, kind):
    cls = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}[kind]
    extra = {"clip_sample": False} if kind == "ddim" else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipe


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def source_image():
    return render(Scene("yellow", "triangle", "gray", centre=(32.0, 32.0), size=40.0)).resize((SIZE, SIZE))


def assert_same(ours, theirs):
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
def test_txt2img_matches_pipeline(pipes, kind):
    pipe = with_scheduler(pipes["txt2img"], kind)
    kwargs = dict(negative_prompt=None, guidance_scale=7.5, height=SIZE, width=SIZE, num_images_per_prompt=2)
    theirs = pipe(PROMPTS, num_inference_steps=6, generator=gen(), output_type="latent", **kwargs).images
    ours = sampling.txt2img(pipe, PROMPTS, steps=6, generator=gen(), output_type="latent", **kwargs)
    assert_same(ours, theirs)


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
def test_txt2img_pixels_match(pipes, kind):
    pipe = with_scheduler(pipes["txt2img"], kind)
    theirs = pipe("a blue square", num_inference_steps=4, height=SIZE, width=SIZE, generator=gen(3),
                  negative_prompt="red", output_type="np").images
    ours = sampling.txt2img(pipe, "a blue square", steps=4, height=SIZE, width=SIZE, generator=gen(3),
                            negative_prompt="red", output_type="np")
    assert np.abs(ours - theirs).max() <= 1 / 255


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_pipeline(pipes, kind, strength):
    pipe = with_scheduler(pipes["img2img"], kind)
    theirs = pipe(PROMPTS[0], image=source_image(), strength=strength, num_inference_steps=8, generator=gen(1),
                  output_type="latent").images
    ours = sampling.img2img(pipe, PROMPTS[0], source_image(), strength=strength, steps=8, generator=gen(1),
                            output_type="latent")
    assert_same(ours, theirs)


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpaint_matches_pipeline(pipes, kind, strength):
    pipe = with_scheduler(pipes["inpaint"], kind)
    mask = box_mask((SIZE, SIZE), (4, 4, 12, 12))
    theirs = pipe(PROMPTS[1], image=source_image(), mask_image=mask, strength=strength, num_inference_steps=8,
                  height=SIZE, width=SIZE, generator=gen(2), output_type="latent").images
    ours = sampling.inpaint(pipe, PROMPTS[1], source_image(), mask, strength=strength, steps=8, generator=gen(2),
                            output_type="latent")
    assert_same(ours, theirs)


def test_inpaint_keeps_the_latents_outside_the_mask(pipes):
    pipe = with_scheduler(pipes["inpaint"], "ddim")
    mask = box_mask((SIZE, SIZE), (0, 0, SIZE // 2, SIZE))  # repaint the left half only
    out = sampling.inpaint(pipe, "a red circle", source_image(), mask, steps=4, generator=gen(), output_type="latent")
    known = sampling.encode_image(pipe, pipe.image_processor.preprocess(source_image()), gen())
    # right half of the latent (columns 4..7) is exactly the image's own latent; the left half is new
    assert torch.allclose(out[..., 4:], known[..., 4:], atol=1e-5)
    assert not torch.allclose(out[..., :4], known[..., :4], atol=1e-2)


def test_img2img_runs_int_steps_times_strength(pipes):
    pipe = with_scheduler(pipes["img2img"], "ddim")
    seen = []
    sampling.img2img(pipe, "x", source_image(), strength=0.6, steps=10, generator=gen(),
                     callback=lambda i, t, lat: seen.append(int(t)), output_type="latent")
    assert len(seen) == int(10 * 0.6)
    assert seen == pipe.scheduler.timesteps[10 - 6:].tolist()


def test_callback_sees_every_step(pipes):
    pipe = with_scheduler(pipes["txt2img"], "ddim")
    shapes = []
    sampling.txt2img(pipe, "x", steps=3, height=SIZE, width=SIZE, generator=gen(),
                     callback=lambda i, t, lat: shapes.append((i, tuple(lat.shape))), output_type="latent")
    assert shapes == [(0, (1, 4, 8, 8)), (1, (1, 4, 8, 8)), (2, (1, 4, 8, 8))]


# --- input checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("height, width, bad", [(15, 16, "height"), (16, 0, "width"), (16, 12.5, "width")])
def test_size_must_be_a_multiple_of_the_vae_factor(pipes, height, width, bad):
    with pytest.raises(ValueError, match=rf"^{bad}: .* multiple of 2"):
        sampling.txt2img(pipes["txt2img"], "x", steps=1, height=height, width=width)


@pytest.mark.parametrize("strength", [-0.1, 1.5, "high"])
def test_strength_outside_0_1(pipes, strength):
    with pytest.raises(ValueError, match="^strength: "):
        sampling.img2img(pipes["img2img"], "x", source_image(), strength=strength, steps=4)


def test_strength_too_small_for_one_step(pipes):
    with pytest.raises(ValueError, match="leaves 0 denoising steps"):
        sampling.img2img(pipes["img2img"], "x", source_image(), strength=0.05, steps=4)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_at_least_one(pipes, steps):
    with pytest.raises(ValueError, match="^steps: "):
        sampling.txt2img(pipes["txt2img"], "x", steps=steps, height=SIZE, width=SIZE)


def test_negative_prompt_count_must_match(pipes):
    with pytest.raises(ValueError, match=r"^negative_prompt: 3 given for 2 prompts"):
        sampling.encode_prompt(pipes["txt2img"], PROMPTS, ["a", "b", "c"])


def test_prompt_type_is_checked(pipes):
    with pytest.raises(TypeError, match="^prompt: "):
        sampling.encode_prompt(pipes["txt2img"], 42)


def test_long_prompt_warns_and_truncates(pipes):
    long_prompt = " ".join(["red circle"] * 60)
    with pytest.warns(UserWarning, match="truncated to 77 tokens"):
        cond, _ = sampling.encode_prompt(pipes["txt2img"], long_prompt)
    assert cond.shape[1] == 77


def test_mask_of_another_size_is_resized_nearest(pipes):
    pipe = with_scheduler(pipes["inpaint"], "ddim")
    small = box_mask((SIZE // 2, SIZE // 2), (2, 2, 6, 6))
    big = box_mask((SIZE, SIZE), (4, 4, 12, 12))
    a = sampling.inpaint(pipe, "x", source_image(), small, steps=2, generator=gen(), output_type="latent")
    b = sampling.inpaint(pipe, "x", source_image(), big, steps=2, generator=gen(), output_type="latent")
    assert torch.equal(a, b)


def test_mask_is_binarised_at_one_half(pipes):
    pipe = pipes["inpaint"]
    from PIL import Image
    gray = Image.new("L", (SIZE, SIZE), 127)
    assert sampling.latent_mask_from(pipe, gray, (SIZE, SIZE)).max() == 0
    gray = Image.new("L", (SIZE, SIZE), 128)
    assert sampling.latent_mask_from(pipe, gray, (SIZE, SIZE)).min() == 1


def test_use_scheduler_keeps_the_training_schedule(pipes):
    pipe = pipes["txt2img"]
    before = pipe.scheduler.betas.clone()
    for name in sampling.SCHEDULERS:
        scheduler = sampling.use_scheduler(pipe, name)
        assert torch.allclose(scheduler.betas, before)
    assert sampling.use_scheduler(pipe, "ddim").config.clip_sample is False
    assert sampling.use_scheduler(pipe, "ddim-clipped").config.clip_sample is True
    assert sampling.use_scheduler(pipe, "dpm++").config.algorithm_type == "dpmsolver++"
    sampling.use_scheduler(pipe, "pndm")
    with pytest.raises(ValueError, match="^name: 'magic'"):
        sampling.use_scheduler(pipe, "magic")


# --- SDEdit's start, the step count rule, the trajectory collector -------------------------------

def test_sdedit_start_is_the_image_latent_plus_noise(pipes):
    pipe = with_scheduler(pipes["img2img"], "ddim")
    start = sampling.sdedit_start(pipe, source_image(), strength=0.5, steps=10, generator=gen(4), batch=2)
    assert start.latents.shape == start.image_latents.shape == start.noise.shape == (2, 4, 8, 8)
    assert start.timesteps.tolist() == pipe.scheduler.timesteps[5:].tolist()
    abar = pipe.scheduler.alphas_cumprod[int(start.timesteps[0])]
    by_hand = abar.sqrt() * start.image_latents + (1 - abar).sqrt() * start.noise
    assert torch.allclose(start.latents, by_hand, atol=1e-6)
    known = sampling.encode_image(pipe, pipe.image_processor.preprocess(source_image()), gen(4))
    assert torch.allclose(start.image_latents[1], known[0])  # the generator is drawn in the pipeline's order
    with pytest.raises(ValueError, match="^batch: "):
        sampling.sdedit_start(pipe, source_image(), 0.5, 10, batch=0)


@pytest.mark.parametrize("kind, extra", [("ddim", 0), ("pndm", 1)])
@pytest.mark.parametrize("strength", [0.3, 0.55, 1.0])
def test_unet_calls_are_int_steps_times_strength_plus_pndm_warmup(pipes, kind, extra, strength):
    pipe = with_scheduler(pipes["img2img"], kind)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        trajectory = sampling.Trajectory()
        pipe("x", image=source_image(), strength=strength, num_inference_steps=10, generator=gen(),
             output_type="latent", callback_on_step_end=trajectory.on_step_end)
    finally:
        hook.remove()
    assert len(calls) == len(trajectory) == int(10 * strength) + extra
    assert len(sampling.strength_timesteps(pipe.scheduler, 10, strength, "cpu")) == int(10 * strength) + extra


def test_trajectory_records_every_step_and_decodes_previews(pipes):
    pipe = with_scheduler(pipes["txt2img"], "ddim")
    trajectory = sampling.Trajectory()
    final = sampling.txt2img(pipe, PROMPTS, steps=5, height=SIZE, width=SIZE, generator=gen(),
                             callback=trajectory, output_type="latent")
    assert trajectory.steps == [0, 1, 2, 3, 4]
    assert trajectory.timesteps == pipe.scheduler.timesteps.tolist()
    assert torch.equal(trajectory.latents[-1], final) and trajectory.latents[0].shape == (2, 4, 8, 8)
    previews = trajectory.previews(pipe, index=1, every=2)  # after steps 2, 4 and the last (5)
    assert [p.size for p in previews] == [(SIZE, SIZE)] * 3
    assert np.array_equal(np.asarray(previews[-1]), np.asarray(sampling.decode(pipe, final)[1]))
    with pytest.raises(ValueError, match="^index: 2 "):
        trajectory.previews(pipe, index=2)
    with pytest.raises(ValueError, match="^trajectory: no step"):
        sampling.Trajectory().previews(pipe)


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
def test_the_loop_written_out_is_txt2img(pipes, kind):
    """The steps a chapter writes in cells (initial_latents, denoise_step) are txt2img's."""
    pipe = with_scheduler(pipes["txt2img"], kind)
    expected = sampling.txt2img(pipe, PROMPTS, steps=4, height=SIZE, width=SIZE,
                                generator=gen(3), output_type="latent")
    cond, uncond = sampling.encode_prompt(pipe, PROMPTS)
    pipe.scheduler.set_timesteps(4)
    latents = sampling.initial_latents(pipe, len(PROMPTS), SIZE, SIZE, gen(3))
    for t in pipe.scheduler.timesteps:
        latents = sampling.denoise_step(pipe, latents, t, cond, uncond, 7.5)
    assert torch.equal(latents, expected)


def test_initial_latents_refuses_an_empty_batch(pipes):
    with pytest.raises(ValueError, match="batch"):
        sampling.initial_latents(pipes["txt2img"], 0, SIZE, SIZE)
