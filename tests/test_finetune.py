"""Tests of sdhelpers.finetune: decoder-only fine-tuning on a tiny random AutoencoderKL."""

from __future__ import annotations

import math

import pytest
import torch

from sdhelpers.finetune import DecoderFinetune, finetune_decoder, pipeline_with_vae, trainable_parameters


def tiny_vae():
    from diffusers import AutoencoderKL

    from sdhelpers.libraries import quiet_libraries

    torch.manual_seed(0)
    with quiet_libraries():
        return AutoencoderKL(
            block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        )


def tiny_dataset(count: int = 12, size: int = 16):
    """Smooth two-colour images in [-1, 1]: a bright square on a dark background."""
    generator = torch.Generator().manual_seed(1)
    items = []
    for _ in range(count):
        colours = torch.rand(2, 3, 1, 1, generator=generator) * 2 - 1
        image = colours[0].expand(3, size, size).clone()
        top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        image[:, top : top + size // 2, left : left + size // 2] = colours[1].view(3, 1, 1)
        items.append({"image": image, "text": "a square"})
    return items


def encoder_state(vae) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}


def test_loss_decreases():
    result = finetune_decoder(tiny_vae(), steps=30, batch_size=4, learning_rate=3e-3, dataset=tiny_dataset(4))
    assert isinstance(result, DecoderFinetune)
    assert len(result.losses) == 30 and all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-5:]) / 5 < 0.6 * sum(result.losses[:5]) / 5


def test_only_the_decoder_changes():
    vae = tiny_vae()
    result = finetune_decoder(vae, steps=3, batch_size=2, learning_rate=1e-3, dataset=tiny_dataset())
    before, after = vae.state_dict(), result.vae.state_dict()
    for name, value in encoder_state(vae).items():
        assert torch.equal(after[name], value), name
    changed = [k for k in before if k.startswith(("decoder.", "post_quant_conv.")) and not torch.equal(before[k], after[k])]
    assert any(k.startswith("decoder.") for k in changed)
    assert any(k.startswith("post_quant_conv.") for k in changed)
    # the same image gives the very same latent through both encoders
    image = tiny_dataset(1)[0]["image"][None]
    with torch.no_grad():
        assert torch.equal(vae.encode(image).latent_dist.mean, result.vae.encode(image).latent_dist.mean)


def test_caller_vae_untouched():
    vae = tiny_vae()
    vae.train()
    snapshot = {k: v.clone() for k, v in vae.state_dict().items()}
    grads = {name: p.requires_grad for name, p in vae.named_parameters()}
    result = finetune_decoder(vae, steps=2, batch_size=2, dataset=tiny_dataset())
    assert result.vae is not vae
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in snapshot.items())
    assert {name: p.requires_grad for name, p in vae.named_parameters()} == grads
    assert vae.training
    assert all(p.grad is None for p in vae.parameters())
    # the copy comes back ready for inference
    assert not result.vae.training
    assert not any(p.requires_grad for p in result.vae.parameters())


def test_deterministic_with_same_seed():
    data = tiny_dataset()
    a = finetune_decoder(tiny_vae(), steps=4, batch_size=3, seed=7, dataset=data)
    b = finetune_decoder(tiny_vae(), steps=4, batch_size=3, seed=7, dataset=data)
    c = finetune_decoder(tiny_vae(), steps=4, batch_size=3, seed=8, dataset=data)
    assert a.losses == b.losses
    assert all(torch.equal(x, y) for x, y in zip(a.vae.state_dict().values(), b.vae.state_dict().values()))
    assert a.losses != c.losses


def test_restores_flush_denormal():
    torch.set_flush_denormal(False)
    finetune_decoder(tiny_vae(), steps=1, batch_size=1, dataset=tiny_dataset(2))
    assert torch.tensor(1e-40).item() != 0.0  # denormals are not flushed any more


def test_keeps_dtype_and_default_dataset():
    vae = tiny_vae().to(torch.float64)
    result = finetune_decoder(vae, steps=1, batch_size=2)  # 64x64 shapes-world images
    assert {p.dtype for p in result.vae.parameters()} == {torch.float64}
    assert result.steps == 1 and result.batch_size == 2 and result.seed == 0


def test_trainable_parameters_are_decoder_side():
    vae = tiny_vae()
    ids = {id(p) for p in trainable_parameters(vae)}
    expected = {id(p) for p in vae.decoder.parameters()} | {id(p) for p in vae.post_quant_conv.parameters()}
    assert ids == expected
    assert not ids & {id(p) for p in vae.encoder.parameters()}


def test_smoothed_losses():
    result = DecoderFinetune(vae=None, losses=[4.0, 2.0, 0.0, 2.0], steps=4, batch_size=1, learning_rate=1.0, seed=0)
    assert result.smoothed_losses(2) == [4.0, 3.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="window"):
        result.smoothed_losses(0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 1, "batch_size": 0}, "batch_size"),
        ({"steps": 1, "learning_rate": 0}, "learning_rate"),
        ({"steps": 1, "learning_rate": -1e-4}, "learning_rate"),
        ({"steps": 1, "learning_rate": float("nan")}, "learning_rate"),
        ({"steps": 1, "seed": -1}, "seed"),
        ({"steps": 1, "dataset": []}, "dataset"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        finetune_decoder(tiny_vae(), **kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="vae"):
        finetune_decoder(torch.nn.Linear(2, 2), steps=1)
    with pytest.raises(TypeError, match="dataset"):
        finetune_decoder(tiny_vae(), steps=1, dataset=[torch.zeros(3, 8, 8)])


def test_pipeline_with_vae_shares_everything_else(tiny_pipeline_dir):
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir, device="cpu")
    old_vae = pipe.vae
    result = finetune_decoder(pipe.vae, steps=1, batch_size=1, dataset=tiny_dataset(2))
    new = pipeline_with_vae(pipe, result.vae)
    assert new.vae is result.vae and pipe.vae is old_vae
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(new, name) is getattr(pipe, name), name
    image = new("a red circle on a blue background", num_inference_steps=2, height=16, width=16,
                generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    with pytest.raises(TypeError, match="pipe"):
        pipeline_with_vae(object(), result.vae)
    with pytest.raises(TypeError, match="vae"):
        pipeline_with_vae(pipe, pipe.unet)
