"""Benchmark runs on paper: the stored runs, and a run as a Markdown table.

Why apart from :mod:`sdhelpers.bench`: reading a stored GPU run and printing it needs neither a GPU
nor the measuring code, and chapters 9 and 10 do only that.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "bench_results"
"""Where the book keeps benchmark runs made on a GPU (``--json sdhelpers/bench_results/...``).

Inside the package, so an installed ``sdhelpers`` shows the same stored runs as the repository."""


def peak_memory_gib(row: dict) -> float | None:
    """The memory that matters, in GiB: CUDA peak allocated on a GPU, else the process's peak RSS."""
    return row["peak_allocated_gib"] if row["peak_allocated_gib"] is not None else row["peak_rss_gib"]


def load_results(folder: str | Path | None = None) -> dict[str, dict]:
    """The stored benchmark runs (file stem → JSON document), in name order; empty if there are none."""
    folder = RESULTS_DIR if folder is None else Path(folder)
    if not folder.is_dir():
        return {}
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(row: dict, key: str) -> str:
    ratio = row["ratio_vs_default"]
    return "–" if not ratio or ratio.get(key) is None else f"{ratio[key]:.2f}×"


def _memory(row: dict) -> str:
    if row["peak_allocated_gib"] is not None:
        return f"{row['peak_allocated_gib']:.2f} alloc / {row['peak_reserved_gib']:.2f} reserved"
    return "–" if row["peak_rss_gib"] is None else f"{row['peak_rss_gib']:.2f} RSS"


def to_markdown(doc: dict) -> str:
    """The run as Markdown: hardware and settings, one table row per model and preset, skipped models."""
    args = doc["arguments"]
    lines = [
        f"**Hardware:** {doc['hardware']}",
        "",
        f"**Run:** dtype {args['dtype'] or 'per preset (fp16 on a GPU, fp32 on a CPU)'}, guidance {args['guidance']}, "
        f"{args['repeats']} timed call(s) after 1 warm-up, {args['threads']} CPU thread(s). "
        "it/s: denoising-loop iterations per second; s/image: the whole call; memory: peak of the timed calls.",
        "",
        "| model | size | steps | batch | preset | it/s | s/image | peak memory (GiB) | load s | warm-up s "
        "| it/s vs default | memory vs default | status |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in doc["results"]:
        lines.append(
            f"| {row['model']} | {row['size']} | {row['steps']} | {row['batch']} | {row['preset']} "
            f"| {_num(row['it_per_s'])} | {_num(row['s_per_image'])} | {_memory(row)} | {_num(row['load_s'], '.1f')} "
            f"| {_num(row['warmup_s'], '.1f')} | {_ratio(row, 'it_per_s')} | {_ratio(row, 'peak_memory')} "
            f"| {row['status'].replace('|', '/')} |"
        )
    for item in doc["skipped"]:
        lines += ["", f"{item['model']}: skipped: {item['reason']}"]
    return "\n".join(lines) + "\n"
