"""Zero-shot classification and similarity matrices of a contrastive CLIP."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdhelpers.clip import (
    attribute_classes,
    class_embeddings,
    similarity_matrix,
    world_captions,
    zero_shot_accuracy,
    zero_shot_classify,
)
from sdhelpers.data import COLOURS, SHAPES, BACKGROUNDS, ShapesDataset, parse_caption
from sdhelpers.judge import judge
from sdhelpers.models import load_tokenizer
from sdhelpers.recipe import SMOKE_RECIPE
from sdhelpers.train import build_clip

NAMES = [*(f"c:{c}" for c in COLOURS), *(f"s:{s}" for s in SHAPES), *(f"b:{b}" for b in BACKGROUNDS)]


def one_hot(colour, shape, background):
    vector = torch.zeros(len(NAMES))
    for name in (f"c:{colour}", f"s:{shape}", f"b:{background}"):
        vector[NAMES.index(name)] = 1.0
    return F.normalize(vector, dim=0)


class OracleCLIP(nn.Module):
    """Reads captions back from token ids and images with the pixel judge: a CLIP that is always right."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tokenizer = load_tokenizer()

    def embed_text(self, input_ids):
        scenes = [parse_caption(self.tokenizer.decode(ids, skip_special_tokens=True)) for ids in input_ids]
        return torch.stack([one_hot(s.colour, s.shape, s.background) for s in scenes])

    def embed_images(self, pixel_values):
        verdicts = [judge(image) for image in pixel_values]
        return torch.stack([one_hot(v.colour, v.shape, v.background) for v in verdicts])


@pytest.fixture(scope="module")
def smoke_clip():
    torch.manual_seed(0)
    return build_clip(SMOKE_RECIPE).eval()


def test_world_captions_and_classes():
    captions = world_captions()
    assert len(captions) == len(set(captions)) == 87
    shapes = attribute_classes("shape")
    assert list(shapes) == list(SHAPES)
    assert sum(len(v) for v in shapes.values()) == 87
    assert all(" circle " in c for c in shapes["circle"])
    assert len(attribute_classes("caption")) == 87
    assert set(attribute_classes("background")) == set(BACKGROUNDS)
    with pytest.raises(ValueError, match="^attribute: 'size'"):
        attribute_classes("size")
    with pytest.raises(ValueError, match="^captions: 'a dog'"):
        attribute_classes("shape", ["a dog"])


def test_similarity_matrix_is_cosine(smoke_clip):
    data = ShapesDataset(5, seed=3)
    images = torch.stack([data[i]["image"] for i in range(5)])
    captions = [data[i]["text"] for i in range(5)] + ["a red circle on a blue background"]
    sims = similarity_matrix(smoke_clip, images, captions)
    assert sims.shape == (5, 6)
    assert sims.abs().max() <= 1 + 1e-5
    with torch.no_grad():
        ids = load_tokenizer()(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        manual = smoke_clip.embed_images(images) @ smoke_clip.embed_text(ids).T
    assert torch.allclose(sims, manual, atol=1e-5)


def test_class_embeddings_are_unit_means(smoke_clip):
    classes = {"one": ["a red circle on a blue background"],
               "two": ["a red square on a blue background", "a red triangle on a blue background"]}
    embedded = class_embeddings(smoke_clip, classes)
    assert embedded.shape == (2, SMOKE_RECIPE.image_tower_config["embed_dim"])
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(TypeError, match="^classes"):
        class_embeddings(smoke_clip, {})


def test_an_oracle_clip_classifies_perfectly():
    oracle = OracleCLIP()
    for attribute in ("shape", "colour", "caption"):
        assert zero_shot_accuracy(oracle, attribute, count=24, seed=5) >= 0.95
    data = ShapesDataset(4, seed=1, split="held_out")
    images = [data[i]["image"] for i in range(4)]
    predicted = zero_shot_classify(oracle, torch.stack(images), attribute_classes("caption"))
    assert predicted == [data.scene(i).caption for i in range(4)]


def test_untrained_clip_gives_valid_names_and_bad_input_is_refused(smoke_clip):
    data = ShapesDataset(3, seed=2)
    images = torch.stack([data[i]["image"] for i in range(3)])
    assert set(zero_shot_classify(smoke_clip, images, attribute_classes("shape"))) <= set(SHAPES)
    with pytest.raises(TypeError, match="^clip"):
        similarity_matrix(object(), images, ["a red circle on a blue background"])
    with pytest.raises(ValueError, match=r"^images: .*\(N, 3, H, W\)"):
        similarity_matrix(smoke_clip, images[0], ["a red circle on a blue background"])
    with pytest.raises(TypeError, match="^captions"):
        similarity_matrix(smoke_clip, images, "a red circle on a blue background")
    with pytest.raises(ValueError, match="^count"):
        zero_shot_accuracy(smoke_clip, count=0)


def test_context_invariance_is_zero_when_no_word_sees_another_and_large_otherwise():
    from dataclasses import replace

    from sdhelpers.models import tokenize
    from sdhelpers.objectives import context_invariance

    captions = world_captions()[:40]
    ids = tokenize(load_tokenizer(), captions)
    torch.manual_seed(0)
    clip = build_clip(SMOKE_RECIPE).eval()
    eos = clip.text_model.config.eos_token_id
    with torch.no_grad():
        mixed = context_invariance(clip.text_model(input_ids=ids).last_hidden_state, ids, eos)
        for layer in clip.text_model.encoder.layers:  # no attention output: each state is its word and place
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
        alone = context_invariance(clip.text_model(input_ids=ids).last_hidden_state, ids, eos)
    assert float(alone) < 1e-6 < 0.05 < float(mixed) < 1.0
    # the recipe's weight reaches the stage's objective, which adds exactly the weighted term
    weighted = build_clip(replace(SMOKE_RECIPE, text_invariance=2.0))
    assert weighted.invariance_weight == 2.0 and build_clip(SMOKE_RECIPE).invariance_weight == 0.0
    images = torch.zeros(len(captions), 3, 64, 64)
    caption_ids = torch.arange(len(captions))
    with torch.no_grad():
        total = weighted(ids, images, caption_ids)
        weighted.invariance_weight = 0.0
        plain = weighted(ids, images, caption_ids)
        term = context_invariance(weighted.text_model(input_ids=ids).last_hidden_state, ids, eos)
    assert torch.allclose(total, plain + 2.0 * term, atol=1e-5)
