"""Using a contrastively trained CLIP: similarity matrices and zero-shot classification.

CLIP learns one embedding space for images and texts: a matching image–caption pair has a high
cosine similarity, a mismatched one a low similarity (:class:`sdhelpers.objectives.ContrastiveCLIP`
is the book's mini version). Two uses follow directly:

- a **similarity matrix**, images × captions, whose diagonal should stand out;
- **zero-shot classification**: write one text per class, embed it, and give each image the class
  whose text embedding is most similar. No classifier is trained; the classes are just words. As
  in the CLIP paper, a class may be described by several texts ("prompt ensembling"): their
  normalised embeddings are averaged into one class embedding.

In the shapes world every caption is ``"a {colour} {shape} on a {background} background"``, so the
classes of one attribute (say ``shape``) are described by all the world's captions that name it
(:func:`attribute_classes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdhelpers.data import ShapesDataset, held_out_scenes, parse_caption, training_scenes
from sdhelpers.images import pil_to_tensor

ATTRIBUTES = ("caption", "colour", "shape", "background")
"""What :func:`attribute_classes` can group the world's captions by."""


def world_captions() -> list[str]:
    """Every caption the shapes world can write: training and held-out compositions (87 in all: 75 + 12)."""
    return [scene.caption for scene in training_scenes() + held_out_scenes()]


def attribute_classes(attribute: str = "shape", captions: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The world's captions grouped by one attribute: ``{"circle": [every caption with a circle], ...}``.

    ``attribute="caption"`` makes every caption its own class (classification among all captions).
    """
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute: {attribute!r} is not known; allowed: {', '.join(ATTRIBUTES)}")
    classes: dict[str, list[str]] = {}
    for text in captions if captions is not None else world_captions():
        scene = parse_caption(text)
        if scene is None:
            raise ValueError(f"captions: {text!r} is not a shapes-world caption like 'a red circle on a blue background'")
        key = text if attribute == "caption" else getattr(scene, attribute)
        classes.setdefault(key, []).append(text)
    return classes


def _check_clip(clip: Any) -> Any:
    if not (hasattr(clip, "embed_text") and hasattr(clip, "embed_images")):
        raise TypeError(f"clip: expected a ContrastiveCLIP (embed_text and embed_images), got {type(clip).__name__}")
    return clip


def _as_batch(images: Any) -> torch.Tensor:
    """Images as a float batch (N, 3, H, W) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: a tensor must have shape (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        return images.float()
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, Sequence) or not images or not all(isinstance(i, Image.Image) for i in images):
        raise TypeError("images: expected a tensor (N, 3, H, W) in [-1, 1] or a non-empty list of PIL images")
    return pil_to_tensor(list(images))


def _check_texts(texts: Any, name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise TypeError(f"{name}: expected a non-empty list of strings, got {type(texts).__name__}")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{name}: every item must be a string")
    return list(texts)


def _tokenize(texts: Sequence[str], tokenizer=None) -> torch.Tensor:
    from sdhelpers.models import load_tokenizer, tokenize

    return tokenize(tokenizer or load_tokenizer(), texts)


@torch.no_grad()
def embed_texts(clip: Any, texts: Sequence[str], tokenizer=None) -> torch.Tensor:
    """Unit-length text embeddings ``(len(texts), d)`` in CLIP's joint space."""
    clip = _check_clip(clip)
    texts = _check_texts(texts, "texts")
    device = next(clip.parameters()).device
    return clip.embed_text(_tokenize(texts, tokenizer).to(device)).float().cpu()


@torch.no_grad()
def embed_images(clip: Any, images: Any) -> torch.Tensor:
    """Unit-length image embeddings ``(N, d)`` in CLIP's joint space."""
    clip = _check_clip(clip)
    device = next(clip.parameters()).device
    return clip.embed_images(_as_batch(images).to(device)).float().cpu()


def similarity_matrix(clip: Any, images: Any, captions: Sequence[str], tokenizer=None) -> torch.Tensor:
    """Cosine similarities, one row per image and one column per caption, each in [-1, 1]."""
    captions = _check_texts(captions, "captions")
    return embed_images(clip, images) @ embed_texts(clip, captions, tokenizer).T


def class_embeddings(clip: Any, classes: Mapping[str, Sequence[str]], tokenizer=None) -> torch.Tensor:
    """One unit vector per class: the normalised mean of the embeddings of the texts describing it."""
    if not isinstance(classes, Mapping) or not classes:
        raise TypeError("classes: expected a non-empty dict {class name: [texts describing it]}")
    texts, owner = [], []
    for k, (name, described) in enumerate(classes.items()):
        described = _check_texts(described, f"classes[{name!r}]")
        texts += described
        owner += [k] * len(described)
    embedded = embed_texts(clip, texts, tokenizer)
    owner_t = torch.tensor(owner)
    means = torch.stack([embedded[owner_t == k].mean(0) for k in range(len(classes))])
    return F.normalize(means, dim=-1)


def zero_shot_classify(clip: Any, images: Any, classes: Mapping[str, Sequence[str]], tokenizer=None) -> list[str]:
    """The class of each image: the one whose (ensembled) text embedding is most similar to it."""
    names = list(classes)
    scores = embed_images(clip, images) @ class_embeddings(clip, classes, tokenizer).T
    return [names[int(i)] for i in scores.argmax(dim=1)]


def zero_shot_accuracy(clip: Any, attribute: str = "shape", count: int = 64, seed: int = 0,
                       split: str = "train", tokenizer=None) -> float:
    """How often :func:`zero_shot_classify` gets ``attribute`` right on ``count`` shapes-world images.

    The images come from :class:`~sdhelpers.data.ShapesDataset` with ``seed`` and ``split``; the
    classes are :func:`attribute_classes` over every caption of the world, held-out ones included.
    """
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count <= 0:
        raise ValueError(f"count: {count!r} is not allowed; use a positive integer")
    classes = attribute_classes(attribute)
    data = ShapesDataset(int(count), seed=seed, split=split)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    truth = [data.scene(i).caption if attribute == "caption" else getattr(data.scene(i), attribute)
             for i in range(len(data))]
    predicted = zero_shot_classify(clip, images, classes, tokenizer)
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))
