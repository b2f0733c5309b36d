"""Training on several processes: what `accelerate launch --num_processes N` does with the trainer.

Two CPU processes (Accelerate's ``debug_launcher``: gloo over loopback) train the UNet stage of the
smoke recipe. Each process writes the weights it ends with, so the test can check that the
gradients really were synchronised (identical weights on every rank), that only the main process
wrote a checkpoint, and that a two-process run stopped and resumed equals one that never stopped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdhelpers.data import ShapesDataset
from sdhelpers.recipe import SMOKE_RECIPE

STEPS, BATCH = 4, 8


def _train_on_this_rank(work: str, stop_at, resume: bool) -> None:
    """What every process runs: the UNet stage, then its own final weights into rank<N>.safetensors."""
    from accelerate import PartialState

    from sdhelpers import train
    from sdhelpers.architectures import build_vae

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = build_vae(SMOKE_RECIPE.vae_config)
    text_encoder = train.build_clip(SMOKE_RECIPE).text_model
    recipe = SMOKE_RECIPE.with_stage("unet", steps=STEPS, batch_size=BATCH, warmup_steps=1)
    result = train.train_unet(work, vae, text_encoder, recipe=recipe, dataset=ShapesDataset(8, seed=4),
                              progress=False, stop_at=stop_at, resume=resume)
    weights = {k: v.contiguous() for k, v in result.objective.state_dict().items()}
    save_file(weights, str(Path(work) / f"rank{PartialState().process_index}.safetensors"),
              metadata={"step": str(result.step), "processes": str(PartialState().num_processes)})


def _launch(work: Path, stop_at=None, resume=False) -> list[dict[str, torch.Tensor]]:
    from accelerate import debug_launcher

    debug_launcher(_train_on_this_rank, args=(str(work), stop_at, resume), num_processes=2)
    return [load_file(str(work / f"rank{rank}.safetensors")) for rank in range(2)]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    work = tmp_path_factory.mktemp("two-processes")
    return work, _launch(work)


def test_gradients_are_synchronised_so_every_rank_ends_with_the_same_weights(straight):
    work, ranks = straight
    assert _equal(ranks[0], ranks[1])
    torch.manual_seed(0)
    from sdhelpers.architectures import build_unet

    assert not _equal(ranks[0], {k: v for k, v in build_unet(SMOKE_RECIPE.unet_config).state_dict().items()})


def test_only_the_main_process_writes_one_checkpoint(straight):
    from sdhelpers.fit import read_training_state

    work, ranks = straight
    folder = work / "unet"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
        "checkpoint.safetensors", "latents.safetensors", "loss.json", "report.json",
    ]
    state = read_training_state(folder / "checkpoint.safetensors")
    assert state["step"] == STEPS and len(state["losses"]) == STEPS
    assert _equal(state["model"], ranks[0])
    assert not [p for p in work.rglob("*.tmp")]


def test_a_two_process_run_resumes_exactly(straight, tmp_path):
    _, ranks = straight
    half = _launch(tmp_path, stop_at=STEPS // 2)
    assert _equal(half[0], half[1]) and not _equal(half[0], ranks[0])
    resumed = _launch(tmp_path, resume=True)
    assert _equal(resumed[0], ranks[0]) and _equal(resumed[1], ranks[1])
