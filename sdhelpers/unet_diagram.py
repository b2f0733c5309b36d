"""Diagrams of a ``UNet2DConditionModel`` drawn from its config: the U of blocks, one block inside.

Why generated rather than drawn by hand: a hand-drawn figure of SD's UNet is true of one config
and silently wrong for every other. Every label here (block types, channels, sizes, layer counts,
skip connections) is computed from the config with the rules diffusers follows when it builds
the model, so one call draws SD 1.5, TinySD or SDXL, and the tests compare the labels with the
modules of a model built on the meta device. Figures come back closed, like
:func:`sdhelpers.images.labelled_grid`: as the last line of a cell they are shown once.
"""

from __future__ import annotations

import textwrap

from sdhelpers import checks
from sdhelpers.unet_layout import (  # noqa: F401  (re-exported)
    DOWN_TYPES,
    MID_TYPES,
    UP_TYPES,
    Skip,
    Stage,
    _per_block,
    _sizes,
    unet_config,
    unet_layout,
)

COLOURS = {"cross": "#fbdcbf", "plain": "#d3e4f4", "conv": "#e4e4e4", "text": "#dcefd0"}
SKIP_COLOUR = "#b4461f"
LINE = 0.17  # inches from one text line to the next at 8.5 pt


def _hw(size) -> str:
    return f"{size[0]}×{size[1]}"


def _figure(width: float, height: float):
    """A figure whose data coordinates are inches from the top left, so layouts read as inches."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1), xlim=(0, width), ylim=(height, 0))
    ax.axis("off")
    return fig, ax


def _box(ax, x, y, w, h, lines, colour, ls="-"):
    """A box centred at (x, y): the first line bold (the module), the others its numbers."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, fc=colour, ec="#555555", lw=0.8,
                                ls=ls, boxstyle="round,pad=0,rounding_size=0.08"))
    for i, line in enumerate(lines):
        ax.text(x, y + (i - (len(lines) - 1) / 2) * LINE, line, ha="center", va="center",
                fontsize=8.5, weight="bold" if i == 0 else "normal")


def _arrow(ax, start, end, label=None, colour="#444444"):
    """An arrow from ``start`` to ``end``, its label on a white patch half way."""
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(
        arrowstyle="-|>", color=colour, lw=1.0, shrinkA=0, shrinkB=0, mutation_scale=9))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, label, ha="center",
                va="center", fontsize=8, color=colour, bbox=dict(fc="white", ec="none", pad=1))


def _finish(fig, ax, title: str, note: str):
    """Title on top, the wrapped note at the bottom, then close the figure (shown once)."""
    import matplotlib.pyplot as plt

    width, height = fig.get_size_inches()
    ax.text(width / 2, 0.3, title, ha="center", va="center", fontsize=10.5, weight="bold")
    ax.text(0.2, height - 0.15, textwrap.fill(note, 140), ha="left", va="bottom", fontsize=8)
    plt.close(fig)
    return fig


def _stage_lines(stage: Stage, config: dict) -> list[str]:
    """A stage's box text: name and type, channels and sizes, what it is made of."""
    sizes = _hw(stage.size) + (f" → {_hw(stage.size_out)}" if stage.resample else "")
    if stage.kind == "Conv2d":
        first = stage.name == "conv_in"
        outer = config["in_channels"] if first else config["block_out_channels"][0]
        after = [] if first else [f"after GroupNorm, {config['act_fn']}"]
        return [f"{stage.name} · Conv2d", f"{outer} → {stage.channels} ch · {sizes}", *after]
    transformer = "Transformer" if stage.depth == 1 else f"{stage.depth}-layer Transformer"
    if stage.name == "mid_block":
        made = f"ResNet + {transformer} + ResNet" if stage.attentions else "ResNet"
    else:
        made = f"(ResNet + {transformer})" if stage.attentions else "ResNet"
        made = f"{stage.resnets} × {made}"
    made += f" + {stage.resample}" if stage.resample else ""
    return [f"{stage.name} · {stage.kind}", f"{stage.channels} ch · {sizes}", made]


def unet_block_diagram(unet, sample_size=None, *, title: str | None = None):
    """The U, 10 inches wide: conv_in and the down blocks on the left, the middle block below,
    the up blocks on the right, and the skip connections as arrows across, each labelled.

    ``unet``: a UNet2DConditionModel (e.g. built on the meta device) or its config dict;
    ``sample_size``: the latent's side (default: the config's ``sample_size``).
    """
    config = unet_config(unet)
    stages, skips = unet_layout(config, sample_size)
    n, w, h, gap = len(config["block_out_channels"]), 3.6, 0.72, 1.05
    row = lambda r: 0.7 + h / 2 + r * gap
    place = {"conv_in": (2.0, row(0)), "conv_out": (8.0, row(0)), "mid_block": (5.0, row(n + 1))}
    place.update({f"down_blocks.{i}": (2.0, row(i + 1)) for i in range(n)})
    place.update({f"up_blocks.{i}": (8.0, row(n - i)) for i in range(n)})
    fig, ax = _figure(10.0, row(n + 1) + h / 2 + 0.85)
    for stage in stages:
        colour = "conv" if stage.kind == "Conv2d" else "cross" if stage.attentions else "plain"
        _box(ax, *place[stage.name], w, h, _stage_lines(stage, config), COLOURS[colour])
    for a, b in zip(stages, stages[1:]):  # down the left, across the middle, up the right
        (xa, ya), (xb, yb) = place[a.name], place[b.name]
        sign, nudge = (1 if yb > ya else -1), (w / 2 - 0.4) * (1 if xb > xa else -1)
        _arrow(ax, (xa + nudge * (a.name == "mid_block"), ya + sign * h / 2),
               (xb - nudge * (b.name == "mid_block"), yb - sign * h / 2))
    for skip in skips:  # from the lower part of a box to the upper part of the one below
        (xa, ya), (xb, yb) = place[skip.source], place[skip.target]
        port = 0.3 * h * ((yb > ya) - (yb < ya))
        label = f"{skip.count} map{'s' * (skip.count > 1)}, {skip.channels}×{_hw(skip.size)}"
        _arrow(ax, (xa + w / 2, ya + port), (xb - w / 2, yb - port), label, SKIP_COLOUR)
    note = (f"Skip connections (across, channels × height × width): the maps saved on the way "
            f"down that each up block concatenates to its input, one per layer. Orange blocks "
            f"cross-attend to the text (width {config['cross_attention_dim']}); every ResNet also "
            f"reads the timestep embedding.")
    latent = f"{config['in_channels']}×{_hw(stages[0].size)}"
    return _finish(fig, ax, title or f"The UNet's blocks, for a {latent} latent", note)


def _block_numbers(config: dict, block: int) -> dict:
    """What the layers of ``down_blocks[block]`` are built with, by diffusers' rules."""
    channels, n = config["block_out_channels"], len(config["block_out_channels"])
    fourier = config["time_embedding_type"] == "fourier"
    heads = config["num_attention_heads"] or config["attention_head_dim"]
    return dict(c_in=channels[max(block - 1, 0)], out=channels[block],
                heads=_per_block(heads, n)[block],
                text=_per_block(config["cross_attention_dim"], n)[block],
                depth=_per_block(config["transformer_layers_per_block"], n)[block],
                layers=_per_block(config["layers_per_block"], n)[block],
                temb=config["time_embedding_dim"] or channels[0] * (2 if fourier else 4))


def _block_rows(k: dict, sizes, block: int, tokens: int) -> list[list[str]]:
    """The layers of ``down_blocks[block]`` in order, each as box lines (module, numbers)."""
    rows, c_in, size = [], k["c_in"], _hw(sizes[block])
    for _ in range(k["layers"]):
        rows.append(["ResnetBlock2D",
                     f"{c_in} → {k['out']} ch · {size} · + timestep ({k['temb']})"])
        rows.append(["Transformer2DModel", f"{k['out']} ch · {k['heads']} heads × "
                     f"{k['out'] // k['heads']} · text {tokens}×{k['text']}"])
        c_in = k["out"]
    if block < len(sizes) - 1:
        rows.append(["Downsample2D", f"stride-2 conv · {size} → {_hw(sizes[block + 1])}"])
    return rows


def _transformer_rows(k: dict, size, tokens: int, linear: bool) -> list[list[str]]:
    """The inside of one Transformer2DModel, in order; the feed-forward is 4× wide in diffusers."""
    out, pixels, proj = k["out"], size[0] * size[1], "linear" if linear else "1×1 conv"
    return [
        ["GroupNorm, proj_in", f"{out} → {out} ({proj}) · {pixels} tokens"],
        ["self-attention (attn1)", f"Q, K, V from the {pixels} pixels · {k['heads']} heads"],
        ["cross-attention (attn2)", f"Q from {out} ch · K, V from text {tokens}×{k['text']}"],
        ["feed-forward (ff)", f"{out} → {4 * out} → {out}"],
        ["proj_out, + input", f"{out} → {out}, added to the block's input"],
    ]


def _draw_transformer(ax, rows, k: dict, tokens: int, top: float):
    """The inside of a Transformer2DModel in a dashed frame, the text entering attn2 from the
    right, a bracket on the BasicTransformerBlock that repeats ``depth`` times.

    Returns the frame's top and bottom, where the zoom lines from the left column end."""
    x, w, h, gap = 6.65, 2.9, 0.5, 0.72
    frame = (top - h / 2 - 0.2, top + (len(rows) - 1) * gap + h / 2 + 0.2)
    _box(ax, x, sum(frame) / 2, 3.5, frame[1] - frame[0], [], "none", ls="--")
    ax.text(x, frame[0] - 0.06, "inside each Transformer2DModel", ha="center", va="bottom",
            fontsize=8.5, style="italic")
    for r, lines in enumerate(rows):
        _box(ax, x, top + r * gap, w, h, lines, COLOURS["cross" if "attn" in lines[0] else "plain"])
        if r:
            _arrow(ax, (x, top + (r - 1) * gap + h / 2), (x, top + r * gap - h / 2))
    y1, y3 = top + gap - h / 2, top + 3 * gap + h / 2
    ax.plot([5.14, 5.06, 5.06, 5.14], [y1, y1, y3, y3], color="#555555", lw=0.8)
    ax.text(5.02, (y1 + y3) / 2, f"BasicTransformerBlock × {k['depth']}", rotation=90,
            ha="right", va="center", fontsize=8)
    _box(ax, 9.2, top + 2 * gap, 1.38, h + 0.17,
         ["text embeddings", f"{tokens} × {k['text']}", "K and V"], COLOURS["text"])
    _arrow(ax, (9.2 - 0.69, top + 2 * gap), (x + w / 2, top + 2 * gap))
    return frame


def cross_attn_block_diagram(unet, block: int = 0, sample_size=None, *, text_tokens: int = 77,
                             title: str | None = None):
    """One ``CrossAttnDownBlock2D`` (``down_blocks[block]``) layer by layer, 10 inches wide,
    beside the inside of its Transformer2DModel, where the text enters the cross-attention.

    ``text_tokens`` is the text encoder's sequence length (77 for CLIP), which the UNet's config
    does not fix; the text's width is the config's ``cross_attention_dim``.
    """
    config = unet_config(unet)
    kinds = tuple(config["down_block_types"])
    if not isinstance(block, int) or isinstance(block, bool) or not 0 <= block < len(kinds):
        raise ValueError(f"block: {block!r} is not allowed; use 0 to {len(kinds) - 1}")
    if kinds[block] != "CrossAttnDownBlock2D":
        crossed = [i for i, kind in enumerate(kinds) if kind == "CrossAttnDownBlock2D"]
        raise ValueError(f"block: down_blocks.{block} is a {kinds[block]}, without attention; "
                         f"use one of {crossed}")
    tokens, sizes = checks.positive_int(text_tokens, "text_tokens"), _sizes(config, sample_size)
    k = _block_numbers(config, block)
    rows = _block_rows(k, sizes, block, tokens)
    inside = _transformer_rows(k, sizes[block], tokens, config["use_linear_projection"])
    x, w, h, gap, last = 2.8, 3.7, 0.5, 0.72, len(rows) + 1
    y = lambda r: 0.8 + r * gap
    fig, ax = _figure(10.0, max(y(last), y(1) + len(inside) * gap) + 0.75)
    frame = _draw_transformer(ax, inside, k, tokens, y(1))
    size_out = sizes[min(block + 1, len(kinds) - 1)]
    for r, text in ((0, f"input: {k['c_in']}×{_hw(sizes[block])}"),
                    (last, f"output: {k['out']}×{_hw(size_out)}")):
        ax.text(x, y(r), text, ha="center", va="center", fontsize=8.5)
    for r, lines in enumerate(rows, start=1):
        _box(ax, x, y(r), w, h, lines, COLOURS["cross" if "Transformer" in lines[0] else "plain"])
        if lines[0] != "ResnetBlock2D":  # its output is pushed on the skip stack
            _arrow(ax, (x - w / 2, y(r)), (0.2, y(r)), colour=SKIP_COLOUR)
            ax.text(0.55, y(r) - 0.06, "skip", ha="center", va="bottom", fontsize=8,
                    color=SKIP_COLOUR)
    for r in range(last):
        _arrow(ax, (x, y(r) + (0.1 if r == 0 else h / 2)),
               (x, y(r + 1) - (0.1 if r + 1 == last else h / 2)))
    for edge, corner in ((0, -1), (1, 1)):  # the zoom: the first Transformer2DModel, enlarged
        ax.plot([x + w / 2, 4.9], [y(2) + corner * h / 2, frame[edge]], color="#999999",
                lw=0.7, ls=":")
    note = ("Each ResnetBlock2D adds the timestep embedding. Each BasicTransformerBlock runs "
            "self-attention, cross-attention and the feed-forward, each after a LayerNorm and "
            "added back to its input. Outputs marked 'skip' are saved for the up blocks.")
    default = f"Inside down_blocks.{block} ({kinds[block]}), for a {_hw(sizes[0])} latent"
    return _finish(fig, ax, title or default, note)
