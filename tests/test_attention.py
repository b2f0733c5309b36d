"""Cross-attention capture: same outputs as diffusers, real probabilities, processors restored."""

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
