"""Shared fixtures: a tiny random Stable Diffusion pipeline saved as a standard diffusers folder."""

from __future__ import annotations

import pytest
import torch


def build_tiny_random_pipeline():
    """The smallest pipeline with SD's exact classes and the real CLIP tokenizer (random weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdhelpers.libraries import quiet_libraries
    from sdhelpers.models import assemble_pipeline

    torch.manual_seed(0)
    with quiet_libraries():
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu",
        ))
    return assemble_pipeline(vae, text_encoder, unet)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the unit tests' tiny models on one thread.

    They gain nothing from a second thread, and when another process shares the cores, OpenMP's
    threads wait on each other: the same test then runs tens of times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_random_pipeline().save_pretrained(folder)
    return folder
