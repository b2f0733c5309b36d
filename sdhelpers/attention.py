"""Cross-attention maps: where in the image each word of the prompt is looked at.

In every ``CrossAttn*Block2D`` of the UNet, the queries come from the image features and the keys and
values from the 77 text embeddings, so ``softmax(Q K^T / sqrt(d))`` holds, for each latent pixel, a
distribution over the prompt's tokens. diffusers computes attention with fused SDPA kernels that never
materialise that matrix, so :func:`capture_cross_attention` swaps in a processor that computes it
explicitly, records it, and otherwise does exactly what diffusers' ``AttnProcessor`` does. The original
processors are always put back, even if generation fails.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor


@dataclass
class AttentionStore:
    """The recorded cross-attention probabilities: one ``(batch, heads, pixels, tokens)`` tensor per call."""

    records: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def add(self, layer: str, probs: torch.Tensor) -> None:
        self.records.append((layer, probs.detach().float().cpu()))

    def token_maps(self, latent_hw: tuple[int, int], batch_index: int = -1) -> torch.Tensor:
        """Average over heads, layers and steps: one ``(tokens, H, W)`` map at latent resolution.

        ``batch_index=-1`` takes the last image of the batch; with classifier-free guidance the batch is
        ``[unconditional, conditional]``, so that is the conditional prediction of the last prompt.
        """
        if not self.records:
            raise ValueError("store: nothing was recorded; generate inside `with capture_cross_attention(unet)`")
        height, width = latent_hw
        total = None
        for _, probs in self.records:
            maps = probs[batch_index].mean(0)  # (pixels, tokens), averaged over heads
            factor = math.sqrt(height * width / maps.shape[0])
            h, w = round(height / factor), round(width / factor)
            maps = maps.T.reshape(1, -1, h, w)
            maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)[0]
            total = maps if total is None else total + maps
        return total / len(self.records)


class CrossAttentionRecorder:
    """An attention processor that records cross-attention probabilities and computes the same output.

    Self-attention (no ``encoder_hidden_states``) is delegated to diffusers' plain ``AttnProcessor``.
    """

    def __init__(self, store: AttentionStore, layer: str) -> None:
        self.store, self.layer = store, layer
        self.plain = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.norm_cross or attn.group_norm:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, tokens, _ = encoder_hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        probs = attn.get_attention_scores(query, key, mask)  # softmax(Q K^T * scale), (batch*heads, pixels, tokens)
        self.store.add(self.layer, probs.view(batch, attn.heads, -1, tokens))
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def capture_cross_attention(unet):
    """``with capture_cross_attention(pipe.unet) as store: pipe(...)`` records every cross-attention call.

    The UNet's own processors are restored on exit, whatever happens inside the block.
    """
    original = unet.attn_processors
    store = AttentionStore()
    recorders = {
        name: CrossAttentionRecorder(store, name.removesuffix(".processor")) if ".attn2." in name else proc
        for name, proc in original.items()
    }
    unet.set_attn_processor(recorders)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions in the 77-token sequence of the tokens that spell ``word`` (index 0 is ``<|startoftext|>``)."""
    ids = tokenizer(prompt).input_ids
    target = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(target) + 1):
        if ids[start : start + len(target)] == target:
            return list(range(start, start + len(target)))
    raise ValueError(f"word: {word!r} does not occur in the prompt {prompt!r}")


def foreground_mask(image, border: int = 2, min_contrast: float = 40.0) -> np.ndarray:
    """Where the shape is: pixels whose colour is far from the background's, as a boolean ``(H, W)`` array.

    The background colour is the median of the ``border``-pixel frame (a shapes-world shape never
    touches it). A pixel is foreground when its RGB distance from that colour is above half the
    typical distance of the clearly different pixels (those beyond ``min_contrast``), i.e. where an
    anti-aliased edge is half covered. An image with no clearly different pixel gives an empty mask.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image, got {type(image).__name__}")
    if not isinstance(border, int) or isinstance(border, bool) or border < 1 or 4 * border > min(image.size):
        raise ValueError(f"border: {border!r} is not allowed; use a whole number of pixels from 1 to a quarter of the side")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    frame = np.ones(rgb.shape[:2], dtype=bool)
    frame[border:-border, border:-border] = False
    distance = np.linalg.norm(rgb - np.median(rgb[frame], axis=0), axis=2)
    clear = distance > min_contrast
    if not clear.any():
        return np.zeros(rgb.shape[:2], dtype=bool)
    return distance > float(np.median(distance[clear])) / 2


def map_mask_correlation(token_map: torch.Tensor, mask) -> float:
    """Pearson correlation between an attention map and a mask, after resizing the map to the mask's size.

    ``token_map`` is one ``(h, w)`` map (e.g. ``store.token_maps(...)[position]``), ``mask`` an
    ``(H, W)`` boolean or 0/1 array. +1: the map is high exactly on the mask; 0: unrelated.
    """
    if not isinstance(token_map, torch.Tensor) or token_map.ndim != 2:
        raise ValueError("token_map: expected one 2-D (h, w) tensor, e.g. store.token_maps(hw)[position]")
    target = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if target.ndim != 2:
        raise ValueError(f"mask: expected a 2-D (H, W) array, got shape {tuple(target.shape)}")
    resized = F.interpolate(token_map[None, None].float(), size=tuple(target.shape), mode="bilinear",
                            align_corners=False)[0, 0]
    a, b = resized.flatten() - resized.mean(), target.flatten() - target.mean()
    denominator = float(a.norm() * b.norm())
    if denominator == 0:
        raise ValueError("mask: the map or the mask is constant, so their correlation is undefined")
    return float((a @ b) / denominator)


def heat_image(token_map: torch.Tensor):
    """One attention map as a picture, from its lowest (black) to its highest value (yellow).

    Each map is stretched to its own range: the figures compare *where* tokens look, not how much.
    """
    from matplotlib import colormaps
    from PIL import Image

    if not isinstance(token_map, torch.Tensor) or token_map.ndim != 2:
        raise ValueError("token_map: expected one 2-D (h, w) tensor, e.g. store.token_maps(hw)[position]")
    m = token_map.detach().float().cpu().numpy()
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    return Image.fromarray((colormaps["inferno"](m)[..., :3] * 255).astype(np.uint8))


def token_labels(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens after ``<|startoftext|>``, as a reader would write them (``<end>`` last)."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)[1:]
    return [t.removesuffix("</w>").replace("<|endoftext|>", "<end>") for t in tokens]


def token_figure(tokenizer, image, token_maps: torch.Tensor, prompt: str, cols: int = 5):
    """The image, then one labelled heat map per token of ``prompt`` (its words and the end token)."""
    from sdhelpers.images import labelled_grid

    labels = token_labels(tokenizer, prompt)
    tiles = [image] + [heat_image(token_maps[p]) for p in range(1, len(labels) + 1)]
    h, w = token_maps.shape[-2:]
    title = f"Figure: where each token of “{prompt}” is looked at ({h}×{w} maps)"
    return labelled_grid(tiles, cols=cols, labels=["image"] + labels, title=title)


@dataclass
class BlockTrace:
    """One stage of a UNet forward pass: its output shape and the skip connections it adds or uses.

    ``skips_out``: shapes of the tensors a down stage (``conv_in`` included) saves for the way up.
    ``skips_in``: shapes of the saved tensors an up block concatenates to its input, in use order.
    """

    name: str
    kind: str
    output: tuple[int, ...]
    skips_out: list[tuple[int, ...]] = field(default_factory=list)
    skips_in: list[tuple[int, ...]] = field(default_factory=list)


def trace_unet(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> list[BlockTrace]:
    """Run one forward pass with hooks and return the shapes along the U, stage by stage.

    Works on the meta device too (``sd15_architecture().unet`` with meta inputs): shapes, no compute.
    """
    stages = [("conv_in", unet.conv_in)]
    stages += [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)]
    stages += [("mid_block", unet.mid_block)]
    stages += [(f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks)]
    stages += [("conv_out", unet.conv_out)]
    traces: list[BlockTrace] = []

    def hook(name, module):
        def record(_module, args, kwargs, output):
            main = output[0] if isinstance(output, tuple) else output
            trace = BlockTrace(name, type(module).__name__, tuple(main.shape))
            if name == "conv_in":
                trace.skips_out = [tuple(main.shape)]
            elif name.startswith("down_blocks"):
                trace.skips_out = [tuple(t.shape) for t in output[1]]
            elif name.startswith("up_blocks"):
                used = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
                trace.skips_in = [tuple(t.shape) for t in reversed(used)]  # an up block pops from the end
            traces.append(trace)
        return record

    handles = [module.register_forward_hook(hook(name, module), with_kwargs=True) for name, module in stages]
    try:
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
    finally:
        for handle in handles:
            handle.remove()
    return traces
