"""Rebuild the CLIP tokenizer files shipped in ``sdhelpers/tinysd/tokenizer/``.

Stable Diffusion 1.x tokenizes prompts with the byte-level BPE of OpenAI's CLIP
(``openai/clip-vit-large-patch14``): 49,408 tokens, ``<|startoftext|>`` = 49406,
``<|endoftext|>`` = 49407. The book must work with no model hub, so we rebuild that
exact vocabulary from OpenAI's original merge list, ``bpe_simple_vocab_16e6.txt.gz``,
which the ``open_clip_torch`` wheel on PyPI ships (MIT licence, see ``tokenizer/LICENSE``).

The recipe is OpenAI's own ``SimpleTokenizer``: the 256 byte symbols, the same 256 with
the end-of-word marker ``</w>``, the first 48,894 merges in order, then the two special
tokens. Run it with::

    python -m sdhelpers.build_tokenizer            # downloads the wheel with pip
    python -m sdhelpers.build_tokenizer --wheel open_clip_torch-3.3.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48,894: what CLIP's 49,408-token vocabulary uses
TOKENIZER_DIR = Path(__file__).resolve().parent / "tinysd" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's vocabulary (token -> id) and ordered merge list from the BPE file text."""
    lines = bpe_text.split("\n")[1 : NUM_MERGES + 1]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"bpe file: expected {NUM_MERGES} merge pairs, got a different layout")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, [" ".join(m) for m in merges]


def read_bpe_from_wheel(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return gzip.decompress(zf.read(BPE_MEMBER)).decode("utf-8")


def download_wheel(folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder), OPEN_CLIP_WHEEL],
        check=True,
    )
    return next(folder.glob("open_clip_torch-*.whl"))


def write_tokenizer_files(bpe_text: str, out: Path) -> None:
    vocab, merges = vocab_and_merges(bpe_text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out.name}/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, help="a local open_clip_torch wheel (else pip downloads one)")
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    args = parser.parse_args(argv)
    if args.wheel is not None:
        write_tokenizer_files(read_bpe_from_wheel(args.wheel), args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(read_bpe_from_wheel(download_wheel(Path(tmp))), args.out)


if __name__ == "__main__":
    main()
