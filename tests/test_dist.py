"""The distributable wheel (`make dist`): it holds sdhelpers and everything it reads next to itself,
and installed in a fresh venv outside the repository it runs the quickstart's calls offline.

The wheel is built here, into a temporary folder, with `make dist`'s own command, from a copy of what
the build reads (pyproject.toml, README.md, sdhelpers/), so the test needs no earlier `make dist` and
leaves no build/ folder behind. The fresh venv gets no second copy of torch and diffusers: one .pth
line makes this interpreter's site-packages visible to it. A .pth file inside a folder that a .pth
line adds is not processed, so the repository's editable install of sdhelpers stays out; the
script checks that the sdhelpers it imported is the venv's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sdhelpers"
DATA_DIRS = ("tinysd", "tinysd_cross", "bench_results")
"""Folders the package opens next to itself: TinySD, chapter 8's fine-tunes, the benchmark runs."""
NOT_PACKAGED = ("__pycache__", "*.pyc", "*.work", ".ipynb_checkpoints")
"""Git-ignored leftovers of a working copy (bytecode, training checkpoints), never in the wheel."""
PIP = ("-m", "pip", "--disable-pip-version-check")

QUICKSTART = r"""
import json, sys

import sdhelpers
from PIL import Image
from sdhelpers.device import get_device, make_generator
from sdhelpers.models import TINYSD_DIR, load_pipeline

device = get_device()
pipe = load_pipeline()  # no argument: the embedded TinySD
image = pipe(
    "a red circle on a blue background", height=64, width=64, num_inference_steps=4,
    guidance_scale=7.5, generator=make_generator(42, device),
).images[0]
quality = json.loads((TINYSD_DIR / "quality.json").read_text())
print("RESULT " + json.dumps({
    "file": sdhelpers.__file__, "tinysd": str(TINYSD_DIR), "path": sys.path,
    "editable": [name for name in sys.modules if "editable" in name.lower()]
    + [type(f).__name__ for f in sys.meta_path if "editable" in type(f).__name__.lower()],
    "pipeline": type(pipe).__name__, "tokens": len(pipe.tokenizer),
    "is_pil": isinstance(image, Image.Image), "size": list(image.size), "mode": image.mode,
    "guidance": quality["settings"]["guidance_scale"],
}))
"""


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point Python back at the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """What the build reads, copied out of the repository."""
    src = tmp_path_factory.mktemp("sdhelpers-src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "sdhelpers", ignore=shutil.ignore_patterns(*NOT_PACKAGED))
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, *PIP, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", out, source, env=_clean_env())
    (built,) = out.glob("sdhelpers-*-py3-none-any.whl")
    return built


def test_wheel_holds_the_modules_and_every_data_file(source, wheel):
    with zipfile.ZipFile(wheel) as archive:
        crcs = {info.filename: info.CRC for info in archive.infolist() if not info.is_dir()}
    packaged = {name for name in crcs if not name.split("/")[0].endswith(".dist-info")}
    modules = {p.relative_to(source).as_posix() for p in (source / "sdhelpers").rglob("*.py")}
    data = {
        p.relative_to(source).as_posix()
        for folder in DATA_DIRS for p in (source / "sdhelpers" / folder).rglob("*") if p.is_file()
    }
    assert packaged == modules | data  # exactly: nothing missing, nothing extra
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json"):
        assert f"sdhelpers/tinysd/{name}" in packaged
    assert "sdhelpers/tinysd_cross/learned_embeds.safetensors" in packaged
    assert not [n for n in crcs if n.startswith(("tests/", "notebooks/", "book/")) or ".work/" in n]
    for name in data:  # the weights are the repository's, byte for byte
        assert crcs[name] == zlib.crc32((REPO / name).read_bytes()), name


def test_wheel_runs_the_quickstart_in_a_fresh_venv_offline(wheel, tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "work"
    assert not venv.resolve().is_relative_to(REPO) and not work.resolve().is_relative_to(REPO)
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # Install before the .pth exists: pip then sees no other sdhelpers to upgrade or uninstall.
    _run(sys.executable, *PIP, "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel,
         env=_clean_env())
    site = Path(_run(python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    here = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "zz_test_environment.pth").write_text("".join(f"{path}\n" for path in here))

    work.mkdir()
    env = _clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SDHELPERS_DEVICE="cpu", OMP_NUM_THREADS="1")
    done = _run(python, "-I", "-c", QUICKSTART, cwd=work, env=env, timeout=600)
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))

    # The wheel's sdhelpers and its TinySD were used, not the repository's editable install.
    assert Path(result["file"]).resolve().is_relative_to(venv.resolve()), result["file"]
    assert Path(result["tinysd"]).resolve().is_relative_to(venv.resolve()), result["tinysd"]
    assert result["editable"] == []
    assert REPO not in [(work / entry).resolve() for entry in result["path"]]
    assert result["pipeline"] == "StableDiffusionPipeline" and result["tokens"] == 49408
    assert result["is_pil"] and result["size"] == [64, 64] and result["mode"] == "RGB"
    assert result["guidance"] == 7.5
