"""A ``UNet2DConditionModel``'s layout from its config: its stages, their sizes, its skip connections.

The numbers :mod:`sdhelpers.unet_diagram` draws, computed with the rules diffusers follows when
it builds the model (tests compare them with a model built on the meta device and with a traced
forward pass), so they hold for SD 1.5, TinySD or SDXL alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

from sdhelpers import checks

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


@dataclass(frozen=True)
class Stage:
    """One stage along the U: name, type, output channels, the size its layers work at, the size
    after its Downsample2D/Upsample2D (``resample``), its ResNets and Transformer2DModels."""

    name: str
    kind: str
    channels: int
    size: tuple[int, int]
    size_out: tuple[int, int]
    resnets: int = 0
    attentions: int = 0
    depth: int = 1  # BasicTransformerBlocks in each Transformer2DModel
    resample: str | None = None


@dataclass(frozen=True)
class Skip:
    """``count`` saved maps of ``channels`` × ``size`` that ``source`` hands to ``target``."""

    source: str
    target: str
    count: int
    channels: int
    size: tuple[int, int]


def unet_config(unet) -> dict:
    """The full config of ``unet`` (a UNet2DConditionModel, or a config dict), defaults filled in.

    A dict such as ``architectures.SD15_UNET_CONFIG`` names only what differs from diffusers'
    defaults; the rest comes from UNet2DConditionModel's own signature, so no default is copied.
    """
    from diffusers import UNet2DConditionModel

    if isinstance(getattr(unet, "config", None), Mapping):
        given = dict(unet.config)
    elif isinstance(unet, Mapping):
        given = dict(unet)
    else:
        raise ValueError(f"unet: expected a UNet2DConditionModel or its config (a dict), "
                         f"got {type(unet).__name__}")
    parameters = inspect.signature(UNet2DConditionModel.__init__).parameters
    config = {k: p.default for k, p in parameters.items() if k != "self"}
    unknown = sorted(k for k in given if k not in config and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unet: {unknown} are not UNet2DConditionModel config keys")
    config.update(given)
    n = len(config["block_out_channels"])
    for key, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
        if len(config[key]) != n:
            raise ValueError(f"unet: {key} has {len(config[key])} blocks, block_out_channels {n}")
        if any(kind not in allowed for kind in config[key]):
            raise ValueError(f"unet: {key} {tuple(config[key])}: only {allowed} are drawn")
    checks.choice(config["mid_block_type"], MID_TYPES, "unet: mid_block_type")
    return config


def _per_block(value, n: int) -> tuple:
    """A config value given once for all blocks or once per block, as one value per block."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _sizes(config: dict, sample_size) -> list[tuple[int, int]]:
    """The latent's (height, width) at each level; Downsample2D (stride 2) rounds up if padded."""
    side = config["sample_size"] if sample_size is None else sample_size
    pair = _per_block(side, 2)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                 for v in pair):
        raise ValueError(f"sample_size: {side!r} is not allowed; use the latent's side (a "
                         "positive integer) or (height, width)")
    sizes, pad = [pair], config["downsample_padding"]
    for _ in config["block_out_channels"][1:]:
        sizes.append(tuple((v + 1) // 2 if pad else v // 2 for v in sizes[-1]))
    return sizes


def unet_layout(unet, sample_size=None) -> tuple[list[Stage], list[Skip]]:
    """The stages from ``conv_in`` to ``conv_out`` and the skip connections between them.

    Skips follow diffusers' stack: ``conv_in``, every down ResNet (after its attention) and every
    Downsample2D push a map; each up block has ``layers_per_block + 1`` layers, one per map popped.
    """
    config = unet_config(unet)
    channels, n = tuple(config["block_out_channels"]), len(config["block_out_channels"])
    layers = _per_block(config["layers_per_block"], n)
    depth = _per_block(config["transformer_layers_per_block"], n)
    up_depth = config["reverse_transformer_layers_per_block"] or depth[::-1]
    sizes = _sizes(config, sample_size)
    stages = [Stage("conv_in", "Conv2d", channels[0], sizes[0], sizes[0])]
    saved = [("conv_in", channels[0], sizes[0])]
    for i, kind in enumerate(config["down_block_types"]):
        name, last, cross = f"down_blocks.{i}", i == n - 1, kind.startswith("CrossAttn")
        out = sizes[i] if last else sizes[i + 1]
        stages.append(Stage(name, kind, channels[i], sizes[i], out, layers[i],
                            layers[i] * cross, depth[i], None if last else "Downsample2D"))
        saved += [(name, channels[i], sizes[i])] * layers[i]
        saved += [(name, channels[i], out)] * (not last)
    cross = config["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    stages.append(Stage("mid_block", config["mid_block_type"], channels[-1], sizes[-1],
                        sizes[-1], 1 + cross, int(cross), depth[-1]))
    skips = []
    for i, kind in enumerate(config["up_block_types"]):
        name, last, count = f"up_blocks.{i}", i == n - 1, layers[::-1][i] + 1
        used, saved = saved[-count:][::-1], saved[:-count]
        out = used[-1][2] if last else saved[-1][2]
        stages.append(Stage(name, kind, channels[::-1][i], used[-1][2], out, count,
                            count * kind.startswith("CrossAttn"), max(_per_block(up_depth[i], 1)),
                            None if last else "Upsample2D"))
        skips += [Skip(s[0], name, used.count(s), s[1], s[2]) for s in dict.fromkeys(used)]
    stages.append(Stage("conv_out", "Conv2d", config["out_channels"], out, out))
    return stages, skips
