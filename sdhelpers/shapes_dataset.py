"""The shapes world as a PyTorch dataset: image–caption pairs drawn on demand from a seed.

:mod:`sdhelpers.data` holds the world's rules (scenes, captions, splits); this module serves them
to a training loop in the form fine-tuning scripts expect. ``sdhelpers.data.ShapesDataset`` is
the same class, the name the chapters use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sdhelpers import checks
from sdhelpers.data import OPEN_ATTRIBUTES, SPLITS, Scene, _check_split, open_caption, render, sample_scene
from sdhelpers.images import pil_to_tensor


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL → float tensor (3, H, W) in [-1, 1], the range the VAE is trained on."""
    return pil_to_tensor(image)[0]


class ShapesDataset(Dataset):
    """``size`` image–caption pairs of the shapes world, in the shape of a custom image–text dataset.

    It answers like the usual ``CustomImageTextDataset`` of fine-tuning scripts, a dict
    ``{"image": tensor (3, 64, 64) in [-1, 1], "text": caption}``, but images are drawn on demand
    instead of read from paths. Item ``i`` depends only on ``(seed, split, i)``, so it is the same in
    any order, in any DataLoader worker and on any machine; :meth:`scene` tells what it shows.
    ``transform`` replaces the default PIL → [-1, 1] tensor conversion.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        open_captions: float = 0.0,
    ) -> None:
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"size: {size!r} is not allowed; use a positive integer number of items")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected a callable or None, got {type(transform).__name__}")
        self.size = int(size)
        self.seed = checks.seed(seed)
        self.split = _check_split(split)
        self.transform = transform if transform is not None else _to_tensor
        self.open_captions = checks.probability(open_captions, "open_captions")

    def __len__(self) -> int:
        return self.size

    def _index(self, idx: int) -> int:
        if not isinstance(idx, (int, np.integer)) or isinstance(idx, bool):
            raise TypeError(f"idx: expected an integer, got {type(idx).__name__}")
        i = int(idx) + self.size if idx < 0 else int(idx)
        if not 0 <= i < self.size:
            raise IndexError(f"idx: {idx} is out of range for a dataset of {self.size} items")
        return i

    def scene(self, idx: int) -> Scene:
        """The scene behind item ``idx``: seeded by ``(seed, split, idx)`` alone."""
        i = self._index(idx)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        return sample_scene(rng, self.split)

    def text(self, idx: int) -> str:
        """Item ``idx``'s caption: the full one, or with ``open_captions`` probability one attribute unsaid.

        Which captions are open, and what they leave out, is seeded by ``(seed, split, idx)`` too.
        """
        scene = self.scene(idx)
        if not self.open_captions:
            return scene.caption
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), self._index(idx), 7])
        if rng.random() >= self.open_captions:
            return scene.caption
        unsaid = OPEN_ATTRIBUTES[int(rng.integers(len(OPEN_ATTRIBUTES)))]
        said = {"colour": scene.colour, "shape": scene.shape, "background": scene.background}
        return open_caption(**{k: (None if k == unsaid else v) for k, v in said.items()})

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"image": self.transform(render(self.scene(idx))), "text": self.text(idx)}

    def __repr__(self) -> str:
        extra = f", open_captions={self.open_captions}" if self.open_captions else ""
        return f"ShapesDataset(size={self.size}, seed={self.seed}, split={self.split!r}{extra})"
