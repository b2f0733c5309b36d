"""The published configs of Stable Diffusion's networks (SD 1.5, SD 2.1, SDXL) and TinySD's own.

Why a module of its own: these dictionaries are data, the same keyword arguments each model's
``config.json`` holds, and every other module reads them: :mod:`sdhelpers.architectures` builds
networks from them, :mod:`sdhelpers.recipe` trains TinySD's, the chapters print their sizes.
Nothing here needs weights or a download.
"""

from __future__ import annotations

from typing import Any

# --- SD 1.5's architecture, from its published configs (no weights needed) -----------------------

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
# The dedicated inpainting UNet: 4 noisy-latent + 1 mask + 4 masked-image-latent input channels.
SD15_INPAINT_UNET_CONFIG = {**SD15_UNET_CONFIG, "in_channels": 9}

SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    # SD 1.5's text_encoder/config.json really says 0/2/1 here (a quirk of the original export):
    # with eos_token_id == 2, CLIPTextModel pools at the highest token id, i.e. the first 49407.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SD15_SCHEDULER_CONFIG = {
    # SD 1.5's published scheduler_config.json: PNDM, plus ``clip_sample: false``, which PNDM
    # ignores but a DDIM built ``from_config`` inherits (latents are not pixels in [-1, 1]).
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "trained_betas": None,
    "clip_sample": False,
}


# --- SD 2.1 and SDXL: what came after SD 1.5, from their published configs -----------------------
# The fields that shape the networks, transcribed from the diffusers-format config.json files of
# stabilityai/stable-diffusion-2-1 (unet/, text_encoder/, vae/) and
# stabilityai/stable-diffusion-xl-base-1.0 (unet/, text_encoder/, text_encoder_2/, vae/). Token ids,
# dropout and initialisation settings, which change no parameter, are left out. The parameter counts
# these give are those of the published weights (asserted in tests/test_models.py).

SD21_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,  # 768 px / 8: SD 2.1 (768-v) is trained at 768x768
    "cross_attention_dim": 1024,  # the width of its OpenCLIP ViT-H text encoder
    # diffusers' historical name: these are numbers of heads per block, each head 64 wide
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,  # the transformer blocks' proj_in/proj_out are Linear, not 1x1 Conv
    "upcast_attention": True,  # attention scores in fp32, against fp16 overflow
}

SD21_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 768}

# OpenCLIP ViT-H/14's text tower less its last layer: SD 2.x conditions on the penultimate layer's
# output, so the exported text encoder keeps 23 of the 24 layers.
SD21_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}

SDXL_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "sample_size": 128,  # 1024 px / 8
    # three levels instead of four, no attention at the highest resolution
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10),  # most of the 2.6B parameters sit in the 10-deep level
    "attention_head_dim": (5, 10, 20),  # numbers of heads again, 64 wide each
    "cross_attention_dim": 2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG), concatenated
    "use_linear_projection": True,
    # micro-conditioning: the pooled bigG text embedding (1280) and six size/crop numbers, each
    # embedded in 256 sinusoidal features (6 x 256 = 1536), are added to the timestep embedding
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 + 6 x 256
    "norm_eps": 1e-5,
}

# SDXL's VAE has SD's architecture, retrained: a different latent scale, and fp32 decoding advised.
SDXL_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# text_encoder: the same CLIP ViT-L/14 text tower as SD 1.x (CLIPTextModel).
SDXL_TEXT_ENCODER_CONFIG = {
    k: v for k, v in SD15_TEXT_ENCODER_CONFIG.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")
}

# text_encoder_2: OpenCLIP ViT-bigG/14's text tower with its projection (CLIPTextModelWithProjection):
# its pooled, projected 1280-d embedding is the "text_embeds" of the micro-conditioning.
SDXL_TEXT_ENCODER_2_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
}

# --- TinySD: the book's own model ------------------------------------------------------------------
TINYSD_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "block_out_channels": (16, 32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 1,
    "sample_size": 64,
    "mid_block_add_attention": True,
    "scaling_factor": 1.0,  # replaced by 1/std of the training latents before the UNet stage
}
"""SD's VAE layout (4 levels, 3 downsamplings: 8×) at 1/8 of its width and one ResNet per level.

``norm_num_groups`` is 1 where SD has 32. GroupNorm removes each group's mean and spread per image;
in a flat-colour image that is most of what there is to say about the colours, and with small
groups the network must smuggle absolute colour through the ratios between a group's few
channels. One group (a LayerNorm over all channels) keeps those ratios across all channels. Same
recipe otherwise (batch 16, 600 of 900 steps): 27.4 dB held-out PSNR with one group, 23.7 with 8.
"""

TINYSD_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
"""CLIP's text transformer with SD's tokenizer, vocabulary and context, 12× narrower and 4× shallower.

Unlike SD 1.5's exported config (eos id 2, see ``SD15_TEXT_ENCODER_CONFIG``), the token ids here are
the tokenizer's real ones; either way the pooled output is read at the first end-of-text token.
"""

TINYSD_IMAGE_TOWER_CONFIG: dict[str, Any] = {"channels": (32, 64, 128, 128), "embed_dim": 64}
"""The CNN that stands in for CLIP's vision transformer during contrastive training (not shipped)."""

TINYSD_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (64, 128),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,  # diffusers' historical name: this is the number of heads, like SD's 8
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
"""SD's UNet (cross-attention down/up blocks around a cross-attention middle) on 8×8 latents.

Two levels (8×8 and 4×4) instead of SD's four: an 8×8 latent has nothing left to halve after that.
Unlike SD, both levels cross-attend to the text (7 attention blocks in all): with so few pixels the
attention is cheap, and the prompt is the whole point. 4.2M parameters; 64 channels at 8×8 rather
than 128 halve the cost of a training step. ``cross_attention_dim`` must equal the text encoder's
``hidden_size``.
"""
