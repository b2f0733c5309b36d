"""Textual inversion and LoRA on the tiny random pipeline: what trains, what is saved, what diffusers loads back."""

import pytest
import torch

from sdhelpers import concepts
from sdhelpers.lora import LORA_FILE, add_lora, check_lora_file, load_lora, save_lora, train_lora
from sdhelpers.models import load_pipeline
from sdhelpers.textual_inversion import (check_new_token, learnt_embedding, save_textual_inversion,
                                         train_textual_inversion)


@pytest.fixture
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir, device="cpu")


@pytest.fixture(scope="module")
def examples():
    return concepts.example_set(count=2)


def _image(pipe, prompt, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, height=64, width=64, num_inference_steps=2, generator=generator, output_type="pt").images


def test_textual_inversion_trains_one_row_and_diffusers_loads_it(pipe, examples, tmp_path, tiny_pipeline_dir):
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = train_textual_inversion(pipe, list(examples.images), examples.prompts("<cross>"), steps=3)
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == table.shape[0] + 1 and torch.equal(after[:-1], table)
    assert not torch.equal(after[-1], table[pipe.tokenizer.convert_tokens_to_ids("shape")])
    assert all(torch.equal(v, unet[k]) for k, v in pipe.unet.state_dict().items())
    assert result.trainable_parameters == table.shape[1] and len(result.losses) == 3
    path = save_textual_inversion(pipe, "<cross>", tmp_path / "learned_embeds.safetensors")
    fresh = load_pipeline(tiny_pipeline_dir, device="cpu")
    fresh.load_textual_inversion(str(path), token="<cross>")
    assert torch.equal(learnt_embedding(fresh, "<cross>"), learnt_embedding(pipe, "<cross>"))
    prompt = "a red <cross> on a white background"
    assert torch.equal(_image(fresh, prompt), _image(pipe, prompt))


def test_lora_trains_adapters_only_and_diffusers_loads_them(pipe, examples, tmp_path, tiny_pipeline_dir):
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = train_lora(pipe, list(examples.images), examples.prompts("cross"), rank=2, steps=3)
    state = pipe.unet.state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in base.items())
    assert result.trainable_parameters == sum(v.numel() for k, v in state.items() if "lora_" in k) > 0
    file = save_lora(pipe, tmp_path / "lora")
    assert file.name == LORA_FILE and not list((tmp_path / "lora").glob(".lora-*"))
    fresh = load_pipeline(tiny_pipeline_dir, device="cpu")
    load_lora(fresh, tmp_path / "lora")
    prompt = "a red cross on a white background"
    assert torch.allclose(_image(fresh, prompt), _image(pipe, prompt), atol=1e-5)
    plain = load_pipeline(tiny_pipeline_dir, device="cpu")
    plain.load_lora_weights(str(tmp_path / "lora"))  # the stock call reads the same folder
    assert torch.allclose(_image(plain, prompt), _image(pipe, prompt), atol=1e-5)


def test_lora_scale_zero_and_unfuse_give_back_the_base_model(pipe, examples, tmp_path, tiny_pipeline_dir):
    prompt = "a red cross on a white background"
    before = _image(pipe, prompt)
    train_lora(pipe, list(examples.images), examples.prompts("cross"), rank=2, steps=2, learning_rate=1e-2)
    assert not torch.allclose(_image(pipe, prompt), before, atol=1e-4)
    off = pipe(prompt, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt", cross_attention_kwargs={"scale": 0.0}).images
    assert torch.allclose(off, before, atol=1e-5)
    save_lora(pipe, tmp_path)
    fresh = load_pipeline(tiny_pipeline_dir, device="cpu")
    load_lora(fresh, tmp_path)
    fresh.fuse_lora()
    fresh.unfuse_lora()
    fresh.unload_lora_weights()
    assert torch.allclose(_image(fresh, prompt), before, atol=1e-5)


def test_prior_preservation_trains_on_both_sets(pipe, examples):
    prompts = concepts.class_prompts()[:2]
    result = train_lora(pipe, list(examples.images), examples.prompts("sks shape"), rank=2, steps=2,
                        prior_images=list(examples.images), prior_prompts=prompts)
    assert len(result.losses) == 2 and all(v > 0 for v in result.losses)


def test_a_token_already_in_the_vocabulary_is_refused(pipe):
    for token in ("star", "Shape", "two words"):
        with pytest.raises(ValueError, match="token"):
            check_new_token(pipe.tokenizer, token)
    assert check_new_token(pipe.tokenizer, "<cross>") == "<cross>"


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_a_lora_rank_of_zero_or_less_is_refused(pipe, rank):
    with pytest.raises(ValueError, match="rank"):
        add_lora(pipe.unet, rank)


def test_an_empty_example_set_is_refused(pipe):
    with pytest.raises(ValueError, match="empty"):
        train_lora(pipe, [], [])
    with pytest.raises(ValueError, match="empty"):
        train_textual_inversion(pipe, [], [])


def test_a_lora_for_another_architecture_is_refused_before_loading(pipe, examples, tmp_path):
    from sdhelpers.models import load_pipeline as load

    train_lora(pipe, list(examples.images), examples.prompts("cross"), rank=2, steps=1)
    save_lora(pipe, tmp_path)
    tinysd = load(device="cpu")
    with pytest.raises(ValueError, match="another architecture"):
        check_lora_file(tinysd.unet, tmp_path)
    with pytest.raises(ValueError, match="path"):
        load_lora(tinysd, tmp_path)
    assert not getattr(tinysd.unet, "peft_config", None)  # nothing was half-loaded
    with pytest.raises(FileNotFoundError, match="path"):
        check_lora_file(tinysd.unet, tmp_path / "missing")


def test_lora_parameter_count_matches_peft(pipe):
    from sdhelpers.lora import lora_parameter_count
    from sdhelpers.teach import SHAPE_TARGETS

    expected = lora_parameter_count(pipe.unet, 3, SHAPE_TARGETS)
    assert len(add_lora(pipe.unet, 3, targets=SHAPE_TARGETS)) > 0
    assert sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad) == expected > 0
