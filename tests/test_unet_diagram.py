"""sdhelpers.unet_diagram: what the diagrams say must be what the configs build.

The labels are compared with the modules of the same config built on the meta device and with a
traced forward pass, so a diagram cannot drift from the model it claims to draw; and the text is
checked for legibility: nothing overlaps, nothing spills out of its box or the figure.
"""

from __future__ import annotations

import itertools

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.backends.backend_agg import FigureCanvasAgg
import pytest
import torch
from matplotlib.patches import FancyBboxPatch
from matplotlib.text import Text

from sdhelpers import unet_diagram as ud
from sdhelpers.architectures import (
    SD15_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    TINYSD_UNET_CONFIG,
    build_unet,
)
from sdhelpers.attention import trace_unet

matplotlib.use("Agg")
CONFIGS = {"sd15": SD15_UNET_CONFIG, "tinysd": TINYSD_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


@pytest.fixture(scope="module")
def meta_unets():
    with torch.device("meta"):
        return {name: build_unet(CONFIGS[name]) for name in ("sd15", "tinysd")}


def test_sd15_blocks_are_labelled_with_their_types_channels_and_sizes():
    labels = texts(ud.unet_block_diagram(SD15_UNET_CONFIG))
    for i, channels in enumerate((320, 640, 1280)):
        assert f"down_blocks.{i} · CrossAttnDownBlock2D" in labels
        side = 64 >> i
        assert f"{channels} ch · {side}×{side} → {side // 2}×{side // 2}" in labels
    assert "down_blocks.3 · DownBlock2D" in labels and "1280 ch · 8×8" in labels
    assert "mid_block · UNetMidBlock2DCrossAttn" in labels
    assert "up_blocks.0 · UpBlock2D" in labels and "3 × ResNet + Upsample2D" in labels
    assert [f"up_blocks.{i} · CrossAttnUpBlock2D" in labels for i in (1, 2, 3)] == [True] * 3
    assert labels.count("3 × (ResNet + Transformer) + Upsample2D") == 2
    assert "3 × (ResNet + Transformer)" in labels  # the last up block: no upsampler
    assert "4 → 320 ch · 64×64" in labels and "320 → 4 ch · 64×64" in labels
    assert labels.count("2 maps, 1280×8×8") == 1 and "1 map, 320×64×64" in labels


def test_tinysd_blocks_are_labelled_with_their_types_channels_and_sizes():
    labels = texts(ud.unet_block_diagram(TINYSD_UNET_CONFIG))
    assert "down_blocks.0 · CrossAttnDownBlock2D" in labels
    assert "64 ch · 8×8 → 4×4" in labels and "128 ch · 4×4" in labels
    assert "1 × (ResNet + Transformer) + Downsample2D" in labels
    assert "2 × (ResNet + Transformer) + Upsample2D" in labels  # layers_per_block + 1
    assert not any("DownBlock2D" in t and "CrossAttn" not in t for t in labels)
    assert "The UNet's blocks, for a 4×8×8 latent" in labels


@pytest.mark.parametrize("name", ["sd15", "tinysd"])
def test_layout_agrees_with_the_built_model(name, meta_unets):
    unet = meta_unets[name]
    stages, _ = ud.unet_layout(unet)
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks |= {f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)}
    blocks["mid_block"] = unet.mid_block
    for stage in stages[1:-1]:
        block = blocks[stage.name]
        assert stage.kind == type(block).__name__
        assert stage.channels == block.resnets[-1].out_channels
        assert stage.resnets == len(block.resnets)
        assert stage.attentions == len(getattr(block, "attentions", []))
        sampler = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None)
        assert (stage.resample is not None) == (sampler is not None)
    assert stages[0].channels == unet.conv_in.out_channels
    assert stages[-1].channels == unet.conv_out.out_channels


@pytest.mark.parametrize("name, side", [("sd15", 64), ("sd15", 100), ("tinysd", 8)])
def test_sizes_and_skips_agree_with_a_traced_forward_pass(name, side, meta_unets):
    unet, meta = meta_unets[name], dict(device="meta")
    width = unet.config.cross_attention_dim
    trace = trace_unet(unet, torch.empty(1, 4, side, side, **meta), torch.tensor(1, **meta),
                       torch.empty(1, 77, width, **meta))
    stages, skips = ud.unet_layout(unet, sample_size=side)
    assert [s.name for s in stages] == [t.name for t in trace]
    assert [(s.channels, *s.size_out) for s in stages] == [t.output[1:] for t in trace]
    for t in trace:
        if t.name.startswith("up_blocks"):
            drawn = [(s.channels, *s.size) for s in skips if s.target == t.name for _ in range(s.count)]
            assert drawn == [shape[1:] for shape in t.skips_in]


def test_cross_attention_block_numbers_agree_with_the_built_model(meta_unets):
    block = meta_unets["sd15"].down_blocks[1]
    labels = texts(ud.cross_attn_block_diagram(SD15_UNET_CONFIG, block=1))
    resnet, attn = block.resnets[0], block.attentions[0].transformer_blocks[0]
    temb = resnet.time_emb_proj.in_features
    assert f"{resnet.conv1.in_channels} → {resnet.out_channels} ch · 32×32 · + timestep ({temb})" in labels
    assert "640 → 640 ch · 32×32 · + timestep (1280)" in labels  # the second ResNet
    assert attn.attn2.heads == 8 and attn.attn2.to_k.in_features == 768
    assert labels.count("640 ch · 8 heads × 80 · text 77×768") == 2
    assert "Q from 640 ch · K, V from text 77×768" in labels and "77 × 768" in labels
    assert attn.ff.net[2].in_features == 2560 and "640 → 2560 → 640" in labels
    assert "stride-2 conv · 32×32 → 16×16" in labels and "output: 640×16×16" in labels
    assert "BasicTransformerBlock × 1" in labels and labels.count("skip") == 3


def test_tinysd_last_block_has_no_downsampler_and_sdxl_shows_its_depth():
    labels = texts(ud.cross_attn_block_diagram(TINYSD_UNET_CONFIG, block=1))
    assert "64 → 128 ch · 4×4 · + timestep (256)" in labels
    assert "128 ch · 4 heads × 32 · text 77×64" in labels
    assert "Downsample2D" not in labels and "output: 128×4×4" in labels
    labels = texts(ud.cross_attn_block_diagram(SDXL_UNET_CONFIG, block=2))
    assert "BasicTransformerBlock × 10" in labels and "1280 ch · 20 heads × 64 · text 77×2048" in labels
    assert "1280 → 1280 (linear) · 1024 tokens" in labels


def test_a_built_model_and_its_config_draw_the_same(meta_unets):
    assert texts(ud.unet_block_diagram(meta_unets["tinysd"])) == texts(
        ud.unet_block_diagram(TINYSD_UNET_CONFIG))


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("draw", ["blocks", "inside"])
def test_text_is_legible(name, draw):
    """No two texts overlap; each text lies inside the figure and inside the box it is written in."""
    config = CONFIGS[name]
    fig = (ud.unet_block_diagram(config) if draw == "blocks"
           else ud.cross_attn_block_diagram(config, block=config["down_block_types"].index(
               "CrossAttnDownBlock2D")))
    assert fig.get_size_inches()[0] == 10 and not plt.fignum_exists(fig.number)
    canvas = FigureCanvasAgg(fig)  # a closed figure has no drawing canvas of its own
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [p.get_window_extent(renderer) for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)]
    extents = [t.get_window_extent(renderer) for t in fig.findobj(Text) if t.get_text()]
    for a, b in itertools.combinations(extents, 2):
        assert not _overlaps(a, b), (a, b)
    for extent in extents:
        assert fig.bbox.x0 <= extent.x0 and extent.x1 <= fig.bbox.x1
        centre = ((extent.x0 + extent.x1) / 2, (extent.y0 + extent.y1) / 2)
        holders = [b for b in boxes if b.contains(*centre)]
        if holders:
            box = min(holders, key=lambda b: b.width * b.height)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, extent


@pytest.mark.parametrize("unet, match", [
    ("sd15", "unet: expected a UNet2DConditionModel"),
    ({**SD15_UNET_CONFIG, "layers": 2}, r"unet: \['layers'\] are not"),
    ({**SD15_UNET_CONFIG, "down_block_types": ("DownBlock2D",) * 3}, "unet: down_block_types has 3"),
    ({**SD15_UNET_CONFIG, "up_block_types": ("SimpleCrossAttnUpBlock2D",) * 4}, "unet: up_block_types"),
    ({**SD15_UNET_CONFIG, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({**SD15_UNET_CONFIG, "sample_size": None}, "sample_size: None is not allowed"),
])
def test_bad_unets_are_refused(unet, match):
    with pytest.raises(ValueError, match=match):
        ud.unet_block_diagram(unet)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block=3), "block: down_blocks.3 is a DownBlock2D, without attention; use one of"),
    (dict(block=4), "block: 4 is not allowed; use 0 to 3"),
    (dict(block=True), "block: True"),
    (dict(sample_size=0), "sample_size: 0 is not allowed"),
    (dict(sample_size="64"), "sample_size"),
    (dict(text_tokens=0), "text_tokens: 0 is not allowed"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ud.cross_attn_block_diagram(SD15_UNET_CONFIG, **kwargs)
