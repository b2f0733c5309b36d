"""Cross-attention capture: same outputs as diffusers, real probabilities, processors restored."""

import numpy as np
import pytest
import torch

from sdhelpers.attention import capture_cross_attention, word_positions
from sdhelpers.models import load_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir, device="cpu")


def unet_inputs(pipe):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["a red circle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
    return latents, torch.tensor(500), context


def test_recording_does_not_change_the_unet_output(pipe):
    latents, t, context = unet_inputs(pipe)
    with torch.no_grad():
        before = pipe.unet(latents, t, encoder_hidden_states=context).sample
        with capture_cross_attention(pipe.unet) as store:
            during = pipe.unet(latents, t, encoder_hidden_states=context).sample
    assert torch.allclose(before, during, atol=1e-5)
    cross_layers = [name for name in pipe.unet.attn_processors if ".attn2." in name]
    assert len(store.records) == len(cross_layers) == 4  # one each in the down and mid blocks, two in the up block


def test_probabilities_sum_to_one_over_tokens(pipe):
    latents, t, context = unet_inputs(pipe)
    with torch.no_grad(), capture_cross_attention(pipe.unet) as store:
        pipe.unet(latents, t, encoder_hidden_states=context)
    for _, probs in store.records:
        assert probs.shape[0] == 2 and probs.shape[-1] == 77
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    maps = store.token_maps((8, 8))
    assert maps.shape == (77, 8, 8)


def test_processors_are_restored_even_after_an_error(pipe):
    before = {name: type(proc) for name, proc in pipe.unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with capture_cross_attention(pipe.unet):
            assert any(type(p).__name__ == "CrossAttentionRecorder" for p in pipe.unet.attn_processors.values())
            raise RuntimeError("boom")
    assert {name: type(proc) for name, proc in pipe.unet.attn_processors.items()} == before


def test_word_positions(pipe):
    assert word_positions(pipe.tokenizer, "a red circle on a blue background", "circle") == [3]
    with pytest.raises(ValueError, match="^word: 'square'"):
        word_positions(pipe.tokenizer, "a red circle", "square")


def test_empty_store_is_a_clear_error():
    from sdhelpers.attention import AttentionStore
    with pytest.raises(ValueError, match="nothing was recorded"):
        AttentionStore().token_maps((8, 8))


def test_foreground_mask_finds_the_shape():
    from sdhelpers.attention import foreground_mask
    from sdhelpers.data import Scene, render

    scene = Scene("red", "square", "blue", centre=(20.0, 30.0), size=24.0)
    mask = foreground_mask(render(scene))
    assert mask.shape == (64, 64) and mask.dtype == bool
    expected = np.zeros((64, 64), dtype=bool)
    expected[18:42, 8:32] = True  # rows y 18..42, columns x 8..32
    assert (mask == expected).mean() > 0.99
    from PIL import Image
    assert not foreground_mask(Image.new("RGB", (64, 64), (128, 128, 128))).any()
    with pytest.raises(TypeError, match="^image"):
        foreground_mask(np.zeros((64, 64, 3)))
    with pytest.raises(ValueError, match="^border"):
        foreground_mask(render(scene), border=0)


def test_map_mask_correlation():
    from sdhelpers.attention import map_mask_correlation

    mask = np.zeros((64, 64), dtype=bool)
    mask[:32] = True
    top = torch.zeros(8, 8)
    top[:4] = 1.0
    assert map_mask_correlation(top, mask) > 0.95
    assert map_mask_correlation(1.0 - top, mask) < -0.95
    assert map_mask_correlation(torch.zeros(8, 8) + torch.arange(8.0)[None], mask) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="^token_map"):
        map_mask_correlation(torch.zeros(77, 8, 8), mask)
    with pytest.raises(ValueError, match="constant"):
        map_mask_correlation(torch.ones(8, 8), mask)


def test_trace_unet_follows_the_u(pipe):
    from sdhelpers.attention import trace_unet

    latents, t, context = unet_inputs(pipe)
    traces = trace_unet(pipe.unet, latents, t, context)
    names = [trace.name for trace in traces]
    assert names == ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "conv_out"]
    assert traces[-1].output == (2, 4, 8, 8)
    assert [trace.output[-1] for trace in traces[1:3]] == [4, 4]  # the first down block halves 8 -> 4
    pushed = [shape for trace in traces for shape in trace.skips_out]
    popped = [shape for trace in traces for shape in trace.skips_in]
    assert len(pushed) == 1 + 2 + 1  # conv_in, (resnet + downsampler), resnet
    assert popped == pushed[::-1]  # last in, first out
    assert not pipe.unet._forward_hooks and all(not b._forward_hooks for b in pipe.unet.down_blocks)


def test_trace_unet_on_the_meta_device():
    from sdhelpers.attention import trace_unet
    from sdhelpers.architectures import sd15_architecture

    unet = sd15_architecture().unet
    meta = dict(device="meta")
    traces = trace_unet(unet, torch.empty(1, 4, 64, 64, **meta), torch.tensor(1, **meta), torch.empty(1, 77, 768, **meta))
    assert [t.output[-1] for t in traces if t.name.startswith("down")] == [32, 16, 8, 8]
    assert sum(len(t.skips_out) for t in traces) == sum(len(t.skips_in) for t in traces) == 12


def test_heat_image_runs_from_black_to_yellow():
    from sdhelpers.attention import heat_image

    ramp = torch.arange(64.0).reshape(8, 8)
    pixels = np.asarray(heat_image(ramp))
    assert pixels.shape == (8, 8, 3)
    assert pixels[0, 0].sum() < 30 and pixels[-1, -1].sum() > 500  # lowest black, highest pale yellow
    flat = np.asarray(heat_image(torch.ones(8, 8))).reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) == 1  # a flat map is one colour, not an error
    with pytest.raises(ValueError, match="^token_map"):
        heat_image(torch.zeros(77, 8, 8))


def test_token_figure_has_one_tile_per_token(pipe):
    import matplotlib.pyplot as plt
    from PIL import Image

    from sdhelpers.attention import token_figure, token_labels

    prompt = "a red circle"
    assert token_labels(pipe.tokenizer, prompt) == ["a", "red", "circle", "<end>"]
    figure = token_figure(pipe.tokenizer, Image.new("RGB", (64, 64)), torch.rand(77, 8, 8), prompt)
    assert len(figure.axes) == 5  # the image, then a, red, circle, <end>
    assert "a red circle" in figure._suptitle.get_text()
    plt.close(figure)
