"""How TinySD's recipe was chosen: the measured recipe variants kept beside the weights.

``levers.json`` lists, one entry per variant tried, what it measured: the branch gap at t = 200,
adherence at guidance 7.5, held-out compositions with the prompted branch alone, the ends of the
guidance sweep, and open and negative prompts. The model card renders it as a table
(:func:`levers_section`), so the card's notes come from runs, not prose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LEVERS_FILE = "levers.json"
"""Measured recipe variants (the model card's notes), kept beside the weights when there are any."""


def levers_section(levers: list[dict[str, Any]]) -> str:
    """How the recipe was chosen: each variant's branch gap and adherence at guidance 7.5, as measured."""
    if not levers:
        return ""
    rows = ["| variant | UNet steps | gap at t = 200 | colour / shape / both at 7.5 | held-out both at 7.5 | "
            "held-out both at guidance 1 / at 7.5 only for t ≥ 600 | both at guidance 2 / 12 | "
            "colours of an open prompt / stated right under the negative |", "|---|---|---|---|---|---|---|---|"]
    for lever in levers:
        train, held = lever["train_7.5"], lever["held_out_7.5"]
        rows.append(f"| {lever['name']} | {lever['unet_steps']} | {lever['gap_200']:.3f} | "
                    f"{' / '.join(f'{100 * train[k]:.1f}%' for k in ('colour', 'shape', 'both'))} (n = {train['n']}) | "
                    f"{100 * held['both']:.1f}% (n = {held['n']}) | {_prompted_alone(lever)} | {_sweep_ends(lever)} | "
                    f"{lever.get('open_colours', '—')} / {_share(lever.get('negative_stated_right'))} |")
    return "\n## How the recipe was chosen\n\n" + levers[0].get("how", "") + "\n\n" + "\n".join(rows) + "\n"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _prompted_alone(lever: dict[str, Any]) -> str:
    """Held-out adherence where the empty branch does not act at low noise: guidance 1, and guidance
    only while t ≥ 600 (``sdhelpers.guidance.interval_guidance``); "—" where not measured."""
    interval = lever.get("interval_600", {}).get("held_out_7.5", {})
    return " / ".join(_share(part.get("both")) for part in (lever.get("held_out_1", {}), interval))


def _sweep_ends(lever: dict[str, Any]) -> str:
    """Both right at guidance 2 and 12, where a variant was measured there ("—" where not)."""
    return " / ".join(_share(lever.get(f"guidance_{scale}", {}).get("both")) for scale in (2, 12))


def read_levers(folder: Path) -> list[dict[str, Any]] | None:
    """The folder's ``levers.json``, or ``None`` when the folder has none."""
    path = Path(folder) / LEVERS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
