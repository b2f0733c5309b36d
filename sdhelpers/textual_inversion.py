"""Textual inversion: a new word whose embedding alone is learnt (Gal et al., 2022).

The tokenizer gains one token (``<cross>``); the text encoder's embedding table gains one row,
started from a related word's (``shape``). Training changes that one row, a 64-number vector
for TinySD (768 for SD 1.5), and nothing else: the UNet, the VAE and every other embedding stay
frozen. So the method can only find a *word* for something the frozen UNet can already draw.

The learnt vector is saved as ``{token: vector}`` in a safetensors file, the format diffusers'
``pipe.load_textual_inversion(path, token=...)`` loads (diffusers' ``textual_inversion.py``
writes the same).

How only one row trains: a forward hook on the embedding layer puts a trainable vector wherever
the new token's id appears; the table itself never gets a gradient, so no other row can move.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from sdhelpers.adapters import ExampleLatents, TeachResult, check_examples, example_loss, noise_scheduler, teach
from sdhelpers.checkpoint import atomic_write_bytes
from sdhelpers.models import tokenize

DEFAULT_TOKEN = "<cross>"


class LearntToken(nn.Module):
    """A trainable embedding for one token id, spliced into a frozen embedding layer by a hook."""

    def __init__(self, embedding: nn.Embedding, token_id: int, init: torch.Tensor) -> None:
        super().__init__()
        self.token_id = int(token_id)
        self.vector = nn.Parameter(init.detach().clone().float())
        self._handle = embedding.register_forward_hook(self._splice)

    def _splice(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        where = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(where, self.vector.to(output.dtype), output)

    def remove(self) -> None:
        """Unhook; the vector stays where :func:`train_textual_inversion` wrote it, in the table."""
        self._handle.remove()


def check_new_token(tokenizer: Any, token: Any) -> str:
    """``token`` must be one new word: not in the vocabulary, no spaces."""
    if not isinstance(token, str) or not token or token != token.strip() or " " in token:
        raise ValueError(f"token: {token!r} is not allowed; use one word without spaces, such as '<cross>'")
    vocabulary = tokenizer.get_vocab()
    for form in (token, token.lower(), f"{token.lower()}</w>"):
        if form in vocabulary:
            raise ValueError(
                f"token: {token!r} is already in the tokenizer's vocabulary (id {vocabulary[form]}); "
                "choose a new one such as '<cross>'"
            )
    return token


def _single_id(tokenizer: Any, word: str, name: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{name}: {word!r} is {len(ids)} tokens; use a word that is one token, such as 'shape'")
    return int(ids[0])


def add_token(pipe: Any, token: str, init_word: str = "shape") -> int:
    """Add ``token`` to the pipeline's tokenizer and a row for it, copied from ``init_word``'s, to the encoder."""
    token = check_new_token(pipe.tokenizer, token)
    init_id = _single_id(pipe.tokenizer, init_word, "init_word")
    pipe.tokenizer.add_tokens([token])
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)  # the row is set below
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[token_id] = table[init_id]
    return int(token_id)


def train_textual_inversion(pipe: Any, images: Sequence[Image.Image], prompts: Sequence[str], *,
                            token: str = DEFAULT_TOKEN, init_word: str = "shape", steps: int = 400,
                            learning_rate: float = 5e-3, seed: int = 0) -> TeachResult:
    """Learn ``token``'s embedding from ``images`` and their ``prompts`` (which contain ``token``).

    ``pipe`` is changed in place: its tokenizer knows ``token`` afterwards and its embedding
    table holds the learnt vector, so it generates with the new word at once.
    """
    images, prompts = check_examples(images, prompts)
    if not all(token in prompt for prompt in prompts):
        raise ValueError(f"prompts: every caption must contain the token {token!r}, e.g. 'a red {token} ...'")
    token_id = add_token(pipe, token, init_word)
    embedding = pipe.text_encoder.get_input_embeddings()
    learnt = LearntToken(embedding, token_id, embedding.weight[token_id]).to(embedding.weight.device)
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
    latents, scheduler = ExampleLatents(pipe.vae, images), noise_scheduler(pipe)
    ids = tokenize(pipe.tokenizer, prompts).to(embedding.weight.device)

    def loss(generator: torch.Generator) -> torch.Tensor:
        return example_loss(pipe.unet, scheduler, latents, pipe.text_encoder(ids)[0], generator)

    try:
        result = teach("textual inversion", pipe.text_encoder, [learnt.vector], loss, steps=steps,
                       learning_rate=learning_rate, seed=seed)
    finally:
        learnt.remove()
    with torch.no_grad():
        embedding.weight[token_id] = learnt.vector.to(embedding.weight.dtype)
    return result


def learnt_embedding(pipe: Any, token: str) -> torch.Tensor:
    """The row of ``token`` in the pipeline's embedding table."""
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    if token_id == pipe.tokenizer.unk_token_id and token != pipe.tokenizer.unk_token:
        raise ValueError(f"token: {token!r} is not in this pipeline's tokenizer; train or load it first")
    return pipe.text_encoder.get_input_embeddings().weight[token_id].detach()


def save_textual_inversion(pipe: Any, token: str, path: str | os.PathLike) -> Path:
    """Write ``{token: vector}`` to ``path`` as safetensors, atomically, for ``load_textual_inversion``."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path: {str(path)!r} must end in .safetensors")
    vector = learnt_embedding(pipe, token).float().cpu().contiguous()
    return atomic_write_bytes(path, save({token: vector}))
