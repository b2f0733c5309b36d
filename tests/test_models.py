"""Registry and loader (sdhelpers.models), and the architectures built from configs (sdhelpers.architectures):
sizes must match the real models' exactly."""

import pytest
import torch

from sdhelpers import architectures, models

SD15_SIZES = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}


@pytest.fixture(scope="module")
def sd15():
    return architectures.sd15_architecture()


def test_sd15_sizes_are_exact(sd15):
    assert sd15.parameter_counts() == SD15_SIZES


def test_sd15_is_built_without_weights(sd15):
    assert {p.device.type for p in sd15.unet.parameters()} == {"meta"}


def test_sd15_block_structure(sd15):
    assert [type(b).__name__ for b in sd15.unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in sd15.unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert type(sd15.unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert sd15.vae.config.scaling_factor == 0.18215
    assert sd15.text_encoder.config.num_hidden_layers == 12 and sd15.text_encoder.config.hidden_size == 768


def test_inpainting_unet_takes_nine_channels():
    arch = architectures.sd15_architecture(inpainting=True)
    assert arch.unet.conv_in.in_channels == 9
    # only conv_in grows: 5 extra input channels x 320 filters x 3 x 3
    assert arch.parameter_counts()["unet"] - SD15_SIZES["unet"] == 5 * 320 * 9


def test_registry_names_the_mirror_of_the_deleted_repo():
    assert models.REGISTRY["sd15"].repo_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert models.REMOVED_IDS["runwayml/stable-diffusion-v1-5"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    for name in ("sd15-inpainting", "sd-vae-ft-mse", "clip-vit-large-patch14"):
        assert name in models.REGISTRY


def test_deleted_id_resolves_to_mirror_with_a_warning():
    with pytest.warns(UserWarning, match="deleted"):
        source, entry = models.resolve_model("runwayml/stable-diffusion-v1-5")
    assert source == "stable-diffusion-v1-5/stable-diffusion-v1-5" and entry.name == "sd15"


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^model: 'sd99' is not a registry name"):
        models.load_pipeline("sd99")


def test_non_pipeline_entry_is_refused():
    with pytest.raises(ValueError, match="is a vae, not a pipeline"):
        models.load_pipeline("sd-vae-ft-mse")


def test_bad_task_is_refused():
    with pytest.raises(ValueError, match=r"^task: 'upscale'"):
        models.load_pipeline(task="upscale")


def test_unreachable_hub_id_gives_one_offline_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelUnavailableError) as err:
        models.load_pipeline("sd15", device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert "offline" in message and "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "runwayml/stable-diffusion-v1-5" in message and "load_pipeline('DIR')" in message


def test_hub_probe_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert models.hub_reachable(timeout=2) is False


@pytest.mark.parametrize("task, cls", [
    ("txt2img", "StableDiffusionPipeline"),
    ("img2img", "StableDiffusionImg2ImgPipeline"),
    ("inpaint", "StableDiffusionInpaintPipeline"),
])
def test_local_folder_loads_for_every_task(tiny_pipeline_dir, task, cls):
    pipe = models.load_pipeline(tiny_pipeline_dir, task=task, device="cpu")
    assert type(pipe).__name__ == cls
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe.tokenizer.model_max_length == 77


def test_local_folder_generates_an_image(tiny_pipeline_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir, device="cpu")
    out = pipe("a red circle", num_inference_steps=2, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 16, 16, 3)


def test_missing_folder_like_path_is_not_a_hub_id():
    with pytest.raises(ValueError, match="existing folder"):
        models.load_pipeline("./no/such/folder")


def test_wrong_type_for_model():
    with pytest.raises(TypeError, match="^model: "):
        models.load_pipeline(3)


# --- SD 2.1 and SDXL, built on the meta device -----------------------------------------------------
# The parameter counts of the published weights of stabilityai/stable-diffusion-2-1 and
# stabilityai/stable-diffusion-xl-base-1.0.
FAMILY_SIZES = {
    "sd15": SD15_SIZES,
    "sd21": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
             "vae": 83_653_863},
}


@pytest.fixture(scope="module")
def families():
    return {family: architectures.family_architecture(family) for family in architectures.FAMILIES}


@pytest.mark.parametrize("family", architectures.FAMILIES)
def test_family_sizes_are_exact(families, family):
    counts = {name: architectures.count_parameters(module) for name, module in families[family].items()}
    assert counts == FAMILY_SIZES[family]
    assert list(counts) == list(FAMILY_SIZES[family])  # pipeline order


def test_architecture_sizes_counts_the_same(families):
    assert architectures.architecture_sizes("sd21") == FAMILY_SIZES["sd21"]


def test_families_are_built_on_meta_with_buffers(families):
    for networks in families.values():
        for module in networks.values():
            tensors = list(module.parameters()) + list(module.buffers())
            assert {t.device.type for t in tensors} == {"meta"}


def test_sd21_and_sdxl_attention_heads_are_64_wide(families):
    for family in ("sd21", "sdxl"):
        for block in families[family]["unet"].down_blocks:
            for transformer in getattr(block, "attentions", []):
                attention = transformer.transformer_blocks[0].attn1
                assert attention.inner_dim // attention.heads == 64


def test_sdxl_micro_conditioning_width(families):
    unet = families["sdxl"]["unet"]
    pooled = families["sdxl"]["text_encoder_2"].config.projection_dim
    assert unet.add_embedding.linear_1.in_features == pooled + 6 * unet.config.addition_time_embed_dim == 2816
    assert unet.config.cross_attention_dim == (
        families["sdxl"]["text_encoder"].config.hidden_size + families["sdxl"]["text_encoder_2"].config.hidden_size
    )
    depths = [len(block.attentions[0].transformer_blocks) for block in unet.down_blocks if hasattr(block, "attentions")]
    assert depths == [2, 10]


def test_sd21_text_encoder_is_openclip_h_less_one_layer(families):
    config = families["sd21"]["text_encoder"].config
    assert (config.hidden_size, config.num_hidden_layers, config.hidden_act) == (1024, 23, "gelu")
    assert families["sd21"]["unet"].config.cross_attention_dim == config.hidden_size


def test_prediction_types_cover_the_families():
    assert set(architectures.PREDICTION_TYPES) == set(architectures.FAMILIES)
    assert architectures.PREDICTION_TYPES["sd21"] == "v_prediction"


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^family: 'sd3' is not allowed; use one of sd15, sd21, sdxl$"):
        architectures.family_architecture("sd3")
