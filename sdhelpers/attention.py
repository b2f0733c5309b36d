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
