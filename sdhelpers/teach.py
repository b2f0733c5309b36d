"""Teach TinySD the cross three ways, measure each side by side, and ship the small files.

    python -m sdhelpers.teach --out sdhelpers/tinysd_cross

Each method starts from a fresh TinySD, trains on the same 12 examples (:func:`sdhelpers.concepts.example_set`),
writes its file in the format diffusers loads, and is then measured from that file, loaded into
another fresh pipeline with the stock call (``load_textual_inversion`` or ``load_lora_weights``):

- **textual inversion**: ``<cross>``'s embedding (:mod:`sdhelpers.textual_inversion`);
- **LoRA**: adapters on the UNet, captions naming the shape "cross" (:mod:`sdhelpers.lora`), on
  attention alone as diffusers' scripts place them, and where this UNet draws shapes; and the
  latter with regularisation images, the model's own pictures of old-world captions;
- **DreamBooth-LoRA** with prior preservation, and without it: "sks shape", with the model's own
  class pictures beside the examples, or not.

``results.json`` holds, per method: the concept's success on the examples' colours and on unseen
ones, the drift of the standard evaluation, the class word's drift, trainable numbers, file
size and training seconds. :func:`results_table` turns it into the chapter's table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdhelpers import concepts
from sdhelpers.checkpoint import atomic_write_json
from sdhelpers.lora import LORA_FILE, LORA_TARGETS, class_images, load_lora, save_lora, train_lora
from sdhelpers.textual_inversion import save_textual_inversion, train_textual_inversion

SHIPPED = Path(__file__).resolve().parent / "tinysd_cross"
"""The shipped files: the learnt ``<cross>`` embedding, one LoRA folder per other method and ``results.json``."""

TI_FILE = "learned_embeds.safetensors"
TOKEN = "<cross>"
DREAMBOOTH_WORD = "sks shape"


@dataclass(frozen=True)
class Method:
    """One fine-tune: how its captions name the concept, its file, and its training settings.

    ``prior`` names the model's own pictures trained beside the examples: ``"class"`` for
    DreamBooth's class prompts (:func:`sdhelpers.concepts.class_prompts`), ``"world"`` for
    old-world captions (:func:`sdhelpers.concepts.replay_prompts`), ``""`` for none.
    """

    name: str
    word: str
    path: str
    steps: int
    learning_rate: float
    prior: str = ""
    targets: tuple[str, ...] = ()


LORA_RANK = 8
ATTENTION_TARGETS = LORA_TARGETS
SHAPE_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                 "conv1", "conv2")
"""Where the book's LoRA goes: self-attention, the queries and outputs of cross-attention, and the
ResNets' two convolutions. A tiny UNet draws its shapes in the convolutions (attention alone did
not learn the cross), and cross-attention's keys and values, which read every word of the prompt,
stay frozen so that colour and background words keep their meaning (measured in the chapter)."""

METHODS: tuple[Method, ...] = (
    Method("textual inversion", TOKEN, TI_FILE, 1000, 5e-3),
    Method("LoRA, attention only", "cross", "lora_attention", 800, 3e-3, targets=ATTENTION_TARGETS),
    Method("LoRA", "cross", "lora", 800, 3e-3, targets=SHAPE_TARGETS),
    Method("LoRA, old world replayed", "cross", "lora_replay", 800, 3e-3, prior="world", targets=SHAPE_TARGETS),
    Method("DreamBooth-LoRA, prior preservation", DREAMBOOTH_WORD, "dreambooth", 800, 3e-3, prior="class",
           targets=SHAPE_TARGETS),
    Method("DreamBooth-LoRA, no prior", DREAMBOOTH_WORD, "dreambooth_no_prior", 800, 3e-3, targets=SHAPE_TARGETS),
)


PRIOR_PROMPTS = {"class": concepts.class_prompts, "world": concepts.replay_prompts}
"""What each :attr:`Method.prior` draws with the untouched model before training."""


def load_method(pipe: Any, method: Method, folder: str | Path = SHIPPED) -> Any:
    """Put ``method``'s shipped file into ``pipe`` with diffusers' own loader; return ``pipe``."""
    path = Path(folder) / method.path
    if method.path == TI_FILE:
        from sdhelpers.libraries import quiet_libraries

        with quiet_libraries():
            pipe.load_textual_inversion(str(path), token=TOKEN)
    else:
        load_lora(pipe, path)
    return pipe


def train_method(pipe: Any, method: Method, examples: concepts.ConceptExamples, out: Path, seed: int = 0):
    """Train ``method`` on ``pipe`` and write its file under ``out``; return the training result."""
    prompts = examples.prompts(method.word)
    if method.path == TI_FILE:
        result = train_textual_inversion(pipe, list(examples.images), prompts, token=TOKEN, steps=method.steps,
                                         learning_rate=method.learning_rate, seed=seed)
        save_textual_inversion(pipe, TOKEN, out / TI_FILE)
        return result
    prior: dict[str, Any] = {}
    if method.prior:
        prior_prompts = PRIOR_PROMPTS[method.prior]()
        prior = {"prior_images": class_images(pipe, prior_prompts), "prior_prompts": prior_prompts}
    result = train_lora(pipe, list(examples.images), prompts, rank=LORA_RANK, targets=method.targets,
                        steps=method.steps, learning_rate=method.learning_rate, seed=seed, method=method.name, **prior)
    save_lora(pipe, out / method.path)
    return result


def measure(pipe: Any, word: str | None, drift_prompts: int = 200) -> dict[str, Any]:
    """The concept on seen and unseen scenes (when ``word`` names it), the drift and the class drift."""
    report: dict[str, Any] = {}
    if word is not None:
        report["seen"] = concepts.concept_report(pipe, word, concepts.seen_scenes())
        report["unseen"] = concepts.concept_report(pipe, word, concepts.unseen_scenes())
    report["drift"] = concepts.drift_report(pipe, drift_prompts)
    report["class_drift"] = concepts.class_drift(pipe)
    return report


def _file_bytes(path: Path) -> int:
    return (path / LORA_FILE).stat().st_size if path.is_dir() else path.stat().st_size


def run(out: str | Path = SHIPPED, methods: Sequence[Method] = METHODS, seed: int = 0,
        drift_prompts: int = 200) -> dict[str, Any]:
    """Train, save, reload and measure every method; write ``out/results.json`` and return it."""
    from sdhelpers.models import load_pipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    examples = concepts.example_set(seed=seed)
    base = load_pipeline(device="cpu")
    results: dict[str, Any] = {"base": measure(base, "cross"), "methods": {},
                               "round_trip": {shape: concepts.round_trip_report(base.vae, shape)
                                              for shape in ("cross", "star")}}
    for method in methods:
        began = time.perf_counter()
        trained = train_method(load_pipeline(device="cpu"), method, examples, out, seed)
        loaded = load_method(load_pipeline(device="cpu"), method, out)
        entry = {"word": method.word, "file": method.path, "steps": method.steps,
                 "learning_rate": method.learning_rate, "prior": method.prior, "targets": list(method.targets),
                 "trainable_parameters": trained.trainable_parameters, "seconds": round(trained.seconds, 1),
                 "file_bytes": _file_bytes(out / method.path), **measure(loaded, method.word, drift_prompts)}
        results["methods"][method.name] = entry
        print(f"{method.name}: unseen {entry['unseen']['both']:.1%} in {time.perf_counter() - began:.0f} s", flush=True)
    results["settings"] = {"examples": len(examples), "seed": seed, "drift_prompts": drift_prompts,
                           "lora_rank": LORA_RANK, "file_dtype": "float16",
                           "guidance_scale": 7.5, "steps": 25}
    atomic_write_json(out / "results.json", results)
    return results


def read_results(folder: str | Path = SHIPPED) -> dict[str, Any]:
    """The ``results.json`` that :func:`run` wrote."""
    return json.loads((Path(folder) / "results.json").read_text())


def results_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: the chapter's side-by-side table (percentages, KB, seconds)."""
    before = results["base"]["drift"]["both"]
    rows = []
    for name, entry in results["methods"].items():
        rows.append({
            "method": name,
            "seen colours": round(100 * entry["seen"]["both"], 1),
            "unseen colours": round(100 * entry["unseen"]["both"], 1),
            "drift (points)": round(100 * (before - entry["drift"]["both"]), 1),
            "class as cross": round(100 * entry["class_drift"], 1),
            "trainable": entry["trainable_parameters"],
            "file KB": round(entry["file_bytes"] / 1024, 1),
            "train s": entry["seconds"],
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as aligned text columns, integers with thousands separators."""
    columns = list(rows[0])
    text = [[f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in text)) for i, c in enumerate(columns)]
    lines = [columns] + text
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def target_report(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The chapter's targets: ``(target, what was measured, met)``, from ``results.json``."""
    methods, before = results["methods"], results["base"]["drift"]["both"]
    unseen = {name: entry["unseen"]["both"] for name, entry in methods.items()}
    best = max(unseen, key=unseen.get)
    drift = {name: 100 * (before - entry["drift"]["both"]) for name, entry in methods.items()}
    prior, no_prior = methods["DreamBooth-LoRA, prior preservation"], methods["DreamBooth-LoRA, no prior"]
    return [
        ("best method >= 85% on unseen colours", f"{best}: {unseen[best]:.1%}", unseen[best] >= 0.85),
        ("LoRA drift <= 3 points", f"{drift['LoRA']:.1f}", drift["LoRA"] <= 3),
        ("textual inversion drift <= 3 points", f"{drift['textual inversion']:.1f}", drift["textual inversion"] <= 3),
        ("DreamBooth: the prior drifts less (class as cross)",
         f"{prior['class_drift']:.1%} vs {no_prior['class_drift']:.1%}", prior["class_drift"] < no_prior["class_drift"]),
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sdhelpers.teach", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(SHIPPED), help="folder for the files and results.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = run(args.out, seed=args.seed)
    print(format_table(results_table(results)))
    for target, measured, met in target_report(results):
        print(f"{target}: {measured} ({'met' if met else 'missed'})")
    return results


if __name__ == "__main__":
    main()
