"""Tests of the source's training loop as small functions (sdhelpers.loop, with the shared sdhelpers.fit,
sdhelpers.latents and sdhelpers.objectives), on tiny random networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from torch.utils.data import DataLoader

from sdhelpers import fit, loop, train
from sdhelpers.architectures import build_unet, build_vae
from sdhelpers.latents import LatentCache, encode_captions
from sdhelpers.objectives import diffusion_loss
from sdhelpers.recipe import SMOKE_RECIPE, TINYSD_NOISE_SCHEDULER_CONFIG
from sdhelpers.checkpoint import CheckpointError, load_state, save_state
from sdhelpers.data import ShapesDataset
from sdhelpers.models import load_tokenizer

SMOKE = SMOKE_RECIPE


@pytest.fixture(scope="module")
def parts():
    """A random tiny VAE, text encoder and tokenizer, and the DDPM training schedule."""
    torch.manual_seed(0)
    vae = build_vae(SMOKE.vae_config).eval().requires_grad_(False)
    text_encoder = train.build_clip(SMOKE).text_model.eval().requires_grad_(False)
    return vae, text_encoder, load_tokenizer(), DDPMScheduler(**TINYSD_NOISE_SCHEDULER_CONFIG)


def _unet(seed=0):
    torch.manual_seed(seed)
    return build_unet(SMOKE.unet_config)


@pytest.fixture(scope="module")
def cached(parts):
    vae, text_encoder, tokenizer, _ = parts
    return LatentCache.encode(vae, text_encoder, tokenizer, ShapesDataset(12, seed=2), batch_size=5)


# --------------------------------------------------------------------------- data


def test_transform_gives_minus_one_to_one_and_resizes():
    image = Image.new("RGB", (100, 80), (255, 0, 128))
    out = loop.ImageTextTransform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)
    assert float(out.min()) >= -1 and float(out.max()) <= 1


def test_transform_leaves_a_right_sized_image_untouched():
    data = ShapesDataset(3, seed=1)
    default, ours = data[0]["image"], ShapesDataset(3, seed=1, transform=loop.ImageTextTransform(64))[0]["image"]
    assert torch.equal(default, ours)


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        loop.ImageTextTransform(0)
    with pytest.raises(TypeError, match="image"):
        loop.ImageTextTransform()(np.zeros((4, 4, 3)))


def test_image_text_dataset_reads_files_like_the_shapes_dataset(tmp_path):
    shapes = ShapesDataset(4, seed=5, transform=lambda image: image)
    paths, texts = [], []
    for i in range(4):
        item = shapes[i]
        item["image"].save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
        texts.append(item["text"])
    files = loop.ImageTextDataset(paths, texts)
    assert len(files) == 4
    for i in range(4):
        assert torch.equal(files[i]["image"], ShapesDataset(4, seed=5)[i]["image"]) and files[i]["text"] == texts[i]
    batch = next(iter(DataLoader(files, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["text"] == texts


def test_image_text_dataset_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="text_descriptions: 1 captions for 2 images"):
        loop.ImageTextDataset(["a.png", "b.png"], ["x"])
    with pytest.raises(TypeError, match="image_paths"):
        loop.ImageTextDataset("a.png", ["x"])
    with pytest.raises(ValueError, match=r"image_paths\[0\]"):
        loop.ImageTextDataset([tmp_path / "missing.png"], ["x"])[0]


def test_drop_captions_rate_and_determinism():
    texts = [f"caption {i}" for i in range(4000)]
    dropped = loop.drop_captions(texts, 0.1, torch.Generator().manual_seed(0))
    rate = sum(t == "" for t in dropped) / len(texts)
    assert 0.08 < rate < 0.12
    assert all(t in ("", texts[i]) for i, t in enumerate(dropped))
    assert dropped == loop.drop_captions(texts, 0.1, torch.Generator().manual_seed(0))
    assert loop.drop_captions(texts[:10], 0.0, torch.Generator()) == texts[:10]
    assert loop.drop_captions(texts[:10], 1.0, torch.Generator()) == [""] * 10
    with pytest.raises(ValueError, match="probability: 1.5"):
        loop.drop_captions(texts, 1.5, torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        loop.drop_captions(texts, 0.1, 0)


# --------------------------------------------------------------------------- the loss


def test_diffusion_loss_is_mse_against_add_noise(parts):
    """Recompute the loss by hand from the same draws: noise first, then timesteps."""
    *_, scheduler = parts
    unet = _unet()
    latents = torch.randn(3, 4, 8, 8)
    text = torch.randn(3, 77, SMOKE.unet_config["cross_attention_dim"])
    loss = diffusion_loss(unet, scheduler, latents, text, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        expected = ((unet(noisy, t, encoder_hidden_states=text).sample - noise) ** 2).mean()
    assert torch.allclose(loss.detach(), expected, atol=1e-6)
    assert loss.requires_grad


def test_diffusion_loss_rejects_mismatched_batches(parts):
    *_, scheduler = parts
    with pytest.raises(ValueError, match="text_embeddings: 2 embeddings for 3 latents"):
        diffusion_loss(_unet(), scheduler, torch.randn(3, 4, 8, 8), torch.randn(2, 77, 16), torch.Generator())


def test_training_step_runs_the_source_loop_body(parts):
    vae, text_encoder, tokenizer, scheduler = parts
    batch = next(iter(DataLoader(ShapesDataset(4, seed=1), batch_size=4)))
    unet = _unet()
    args = (unet, vae, text_encoder, tokenizer, scheduler, batch)
    a = loop.training_step(*args, torch.Generator().manual_seed(1), caption_dropout=0.1)
    b = loop.training_step(*args, torch.Generator().manual_seed(1), caption_dropout=0.1)
    c = loop.training_step(*args, torch.Generator().manual_seed(2), caption_dropout=0.1)
    assert a.ndim == 0 and torch.isfinite(a) and torch.equal(a, b) and not torch.equal(a, c)
    a.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    assert all(p.grad is None for p in vae.parameters()) and all(p.grad is None for p in text_encoder.parameters())
    with pytest.raises(ValueError, match="batch"):
        loop.training_step(*args[:5], {"image": batch["image"]}, torch.Generator())


def test_encode_text_is_the_last_hidden_state_of_77_tokens(parts):
    _, text_encoder, tokenizer, _ = parts
    states = loop.encode_text(text_encoder, tokenizer, ["a red circle on a blue background", ""])
    assert states.shape == (2, 77, text_encoder.config.hidden_size)
    assert torch.equal(states, encode_captions(text_encoder, tokenizer, ["a red circle on a blue background", ""]))


def test_cached_latents_sample_like_the_posterior(parts, cached):
    vae, text_encoder, tokenizer, _ = parts
    assert len(cached) == 12 and cached.mean.shape == (12, 4, 8, 8)
    assert torch.equal(cached.embeddings[cached.empty_id], loop.encode_text(text_encoder, tokenizer, [""])[0])
    latents, text = cached.sample(6, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 12, (6,), generator=g)
    eps = torch.randn((6, 4, 8, 8), generator=g)
    assert torch.allclose(latents, (cached.mean[index] + cached.std[index] * eps) * vae.config.scaling_factor)
    assert torch.equal(text, cached.embeddings[cached.caption_ids[index]])
    _, all_dropped = cached.sample(5, torch.Generator(), caption_dropout=1.0)
    assert torch.equal(all_dropped, cached.embeddings[cached.empty_id].expand(5, -1, -1))
    with pytest.raises(ValueError, match="caption_dropout"):
        cached.sample(2, torch.Generator(), caption_dropout=-0.1)


# --------------------------------------------------------------------------- optimisation and resume


def _loss_fn(unet, cached, scheduler, generator):
    return lambda step: diffusion_loss(unet, scheduler, *cached.sample(4, generator, 0.1), generator)


def test_train_steps_lowers_the_loss(parts, cached):
    *_, scheduler = parts
    unet = _unet()
    optimizer, lr_scheduler = fit.make_optimizer(unet, 3e-3, steps=30, warmup_steps=2)
    losses = fit.train_steps(unet, optimizer, lr_scheduler, _loss_fn(unet, cached, scheduler, torch.Generator().manual_seed(0)), 30)
    assert len(losses) == 30 and np.mean(losses[-6:]) < np.mean(losses[:6])
    assert lr_scheduler.last_epoch == 30 and not unet.training


def test_make_optimizer_rejects_bad_settings():
    with pytest.raises(ValueError, match="learning_rate"):
        fit.make_optimizer(_unet(), 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        fit.make_optimizer(_unet(), 1e-3, steps=5, warmup_steps=5)


def test_resume_is_bitwise_exact_and_needs_the_optimizer_state(parts, cached, tmp_path):
    *_, scheduler = parts

    def fresh(seed):
        unet = _unet(seed)
        return (unet, *fit.make_optimizer(unet, 3e-3, steps=6, warmup_steps=1), torch.Generator().manual_seed(seed))

    def run(objects, steps):
        unet, optimizer, lr_scheduler, generator = objects
        return fit.train_steps(unet, optimizer, lr_scheduler, _loss_fn(unet, cached, scheduler, generator), steps)

    straight = fresh(0)
    straight_losses = run(straight, 6)

    first = fresh(0)
    first_losses = run(first, 3)
    path = fit.save_training_state(tmp_path / "state.safetensors", *first, step=3, losses=first_losses)
    resumed = fresh(99)  # other weights, other generator: the file must restore everything
    step, losses = fit.load_training_state(path, *resumed)
    assert step == 3 and losses == first_losses
    losses += run(resumed, 3)
    assert losses == straight_losses
    assert all(torch.equal(a, b) for a, b in zip(straight[0].parameters(), resumed[0].parameters()))

    weights_only = fresh(99)
    weights_only[0].load_state_dict(load_state(path)["model"])
    weights_only[3].set_state(load_state(path)["generator"])
    run(weights_only, 3)  # a fresh AdamW: its moments and step count start over
    assert not all(torch.equal(a, b) for a, b in zip(straight[0].parameters(), weights_only[0].parameters()))


def test_load_training_state_refuses_foreign_or_unfitting_files(tmp_path):
    unet = _unet()
    objects = (unet, *fit.make_optimizer(unet), torch.Generator())
    save_state(tmp_path / "other.safetensors", {"kind": "something else"})
    with pytest.raises(CheckpointError, match="other.safetensors.*not written by save_training_state"):
        fit.load_training_state(tmp_path / "other.safetensors", *objects)
    fit.save_training_state(tmp_path / "small.safetensors", *objects, step=0)
    bigger = build_unet({**SMOKE.unet_config, "block_out_channels": (32, 32)})
    with pytest.raises(CheckpointError, match="does not fit"):
        fit.load_training_state(tmp_path / "small.safetensors", bigger, *fit.make_optimizer(bigger), torch.Generator())
    with pytest.raises(ValueError, match="step"):
        fit.save_training_state(tmp_path / "x.safetensors", *objects, step=-1)


def test_consistent_loss_is_sd_loss_plus_a_pull_on_the_dropped_items(parts, cached):
    from sdhelpers.objectives import consistent_diffusion_loss

    *_, scheduler = parts
    unet = _unet()
    latents, text, captions, dropped = cached.sample(6, torch.Generator().manual_seed(4), 0.5, with_captions=True)
    plain = diffusion_loss(unet, scheduler, latents, text, torch.Generator().manual_seed(5))
    args = (unet, scheduler, latents, text, captions, dropped)
    same = consistent_diffusion_loss(*args, torch.Generator().manual_seed(5), weight=0.0, below_timestep=1000)
    assert torch.equal(plain, same)
    pulled = consistent_diffusion_loss(*args, torch.Generator().manual_seed(5), weight=1.0, below_timestep=1000)
    assert bool(dropped.any()) and pulled > plain
    none = torch.zeros_like(dropped)
    assert torch.equal(consistent_diffusion_loss(unet, scheduler, latents, text, captions, none,
                                                 torch.Generator().manual_seed(5), 1.0, 1000), plain)
    again, again_text = cached.sample(6, torch.Generator().manual_seed(4), 0.5)
    assert torch.equal(again, latents) and torch.equal(again_text, text)  # the same draws either way
    swapped = consistent_diffusion_loss(unet, scheduler, latents, text, captions, none,
                                        torch.Generator().manual_seed(5), 1.0, 1000, swap=1.0)
    assert swapped != plain  # every item shown the next one's caption, and pulled back
    assert torch.equal(consistent_diffusion_loss(unet, scheduler, latents, text, captions, none,
                                                 torch.Generator().manual_seed(5), 0.0, 1000, swap=1.0), plain)



def _half_dropped_batch(scheduler, cached):
    """A fresh UNet, six cached items with some captions dropped and some kept, and SD's loss on them."""
    unet = _unet()
    latents, text, captions, dropped = cached.sample(6, torch.Generator().manual_seed(4), 0.5, with_captions=True)
    empty = cached.embeddings[cached.empty_id][None]
    assert bool(dropped.any()) and not bool(dropped.all())
    plain = diffusion_loss(unet, scheduler, latents, text, torch.Generator().manual_seed(5))
    return unet, latents, text, captions, empty, dropped, plain


def test_calibrated_loss_teaches_a_step_of_one_over_the_scale_from_the_empty_branch(parts, cached):
    from sdhelpers.objectives import calibrated_diffusion_loss, noised

    *_, scheduler = parts
    unet, latents, text, _, empty, dropped, plain = _half_dropped_batch(scheduler, cached)
    args = (unet, scheduler, latents, text, empty, dropped)
    assert torch.allclose(calibrated_diffusion_loss(*args, torch.Generator().manual_seed(5), 1.0, 1000), plain)
    assert torch.allclose(calibrated_diffusion_loss(*args, torch.Generator().manual_seed(5), 7.5, 0), plain)
    all_dropped = (*args[:-1], torch.ones_like(dropped))
    assert torch.allclose(calibrated_diffusion_loss(*all_dropped, torch.Generator().manual_seed(5), 7.5, 1000), plain)
    with torch.no_grad():
        noisy, noise, timesteps = noised(scheduler, latents, torch.Generator().manual_seed(5))
        pred = unet(noisy, timesteps, encoder_hidden_states=text).sample
        e_empty = unet(noisy, timesteps, encoder_hidden_states=empty.expand_as(text)).sample
        kept = (~dropped)[:, None, None, None]
        target = torch.where(kept, e_empty + (noise - e_empty) / 7.5, noise)
        weight = torch.where(~dropped, 7.5, 1.0)
        by_hand = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        calibrated = calibrated_diffusion_loss(*args, torch.Generator().manual_seed(5), 7.5, 1000)
        assert torch.allclose(calibrated, by_hand, rtol=1e-5) and not torch.allclose(calibrated, plain)
        # what the loss teaches is what guidance at 7.5 turns back into SD's target
        guided = e_empty + 7.5 * (target - e_empty)
        assert torch.allclose(guided[~dropped], noise[~dropped], atol=1e-5)


def test_calibration_share_is_one_over_the_scale_where_the_picture_is_fixed_and_one_above():
    from sdhelpers.objectives import calibration_share

    t = torch.tensor([0, 299, 300, 450, 599, 600, 999])
    step = calibration_share(t, 7.5, 600)
    assert torch.allclose(step, torch.tensor([1 / 7.5] * 5 + [1.0, 1.0]))
    ramp = calibration_share(t, 7.5, 600, full_below=300)
    half_way = 1 / 7.5 + (1 - 1 / 7.5) * 0.5
    expected = torch.tensor([1 / 7.5, 1 / 7.5, 1 / 7.5, half_way, 1 / 7.5 + (1 - 1 / 7.5) * 299 / 300, 1.0, 1.0])
    assert torch.allclose(ramp, expected)
    assert torch.equal(calibration_share(t, 1.0, 600), torch.ones(len(t)))


def test_extra_pass_loss_is_sd_loss_whole_plus_a_pull_of_the_other_branches(parts, cached):
    from sdhelpers.objectives import extra_pass_consistency_loss, noised

    *_, scheduler = parts
    unet, latents, text, captions, empty, dropped, plain = _half_dropped_batch(scheduler, cached)
    args = (unet, scheduler, latents, text, captions, empty, dropped)
    assert torch.equal(extra_pass_consistency_loss(*args, torch.Generator().manual_seed(5), 0.0, 1000), plain)
    assert torch.equal(extra_pass_consistency_loss(*args, torch.Generator().manual_seed(5), 1.0, 0), plain)
    all_dropped = (*args[:-1], torch.ones_like(dropped))
    assert torch.equal(extra_pass_consistency_loss(*all_dropped, torch.Generator().manual_seed(5), 1.0, 1000), plain)

    def by_hand(other: torch.Tensor) -> torch.Tensor:
        noisy, noise, timesteps = noised(scheduler, latents, torch.Generator().manual_seed(5))
        pred = unet(noisy, timesteps, encoder_hidden_states=text).sample
        kept = ~dropped
        second = unet(noisy[kept], timesteps[kept], encoder_hidden_states=other[kept]).sample
        pull = (second - pred[kept]).pow(2).sum() / pred[0].numel() / len(latents)
        return torch.nn.functional.mse_loss(pred, noise) + 2.0 * pull

    with torch.no_grad():
        pulled = extra_pass_consistency_loss(*args, torch.Generator().manual_seed(5), 2.0, 1000)
        swapped = extra_pass_consistency_loss(*args, torch.Generator().manual_seed(5), 2.0, 1000, swap=1.0)
        assert pulled > plain and torch.allclose(pulled, by_hand(empty.expand_as(captions)), rtol=1e-5)
        assert torch.allclose(swapped, by_hand(captions.roll(1, 0)), rtol=1e-5)
