"""The shipped fine-tunes: plain diffusers loads them, they do what results.json says, and the run's pieces work."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from sdhelpers import concepts, teach
from sdhelpers.data import ALL_SHAPES
from sdhelpers.evaluate import generate
from sdhelpers.judge import judge
from sdhelpers.lora import LORA_FILE, lora_parameter_count
from sdhelpers.models import load_pipeline
from sdhelpers.textual_inversion import learnt_embedding

RESULTS = teach.read_results()
METHODS = {method.name: method for method in teach.METHODS}


def test_the_shipped_embedding_loads_with_load_textual_inversion():
    pipe = load_pipeline(device="cpu")
    path = teach.SHIPPED / teach.TI_FILE
    pipe.load_textual_inversion(str(path), token=teach.TOKEN)
    vector = load_file(path)[teach.TOKEN]
    assert vector.shape == (pipe.text_encoder.config.hidden_size,)
    assert torch.equal(learnt_embedding(pipe, teach.TOKEN), vector)
    ids = pipe.tokenizer("a red <cross> on a white background").input_ids
    assert pipe.tokenizer.convert_tokens_to_ids(teach.TOKEN) in ids


@pytest.mark.parametrize("name", [m.name for m in teach.METHODS if m.path != teach.TI_FILE])
def test_each_shipped_lora_loads_with_load_lora_weights(name):
    method = METHODS[name]
    pipe = load_pipeline(device="cpu")
    trainable = lora_parameter_count(pipe.unet, teach.LORA_RANK, method.targets)  # before peft wraps
    pipe.load_lora_weights(str(teach.SHIPPED / method.path))
    assert pipe.get_active_adapters()
    assert RESULTS["methods"][name]["trainable_parameters"] == trainable
    state = load_file(teach.SHIPPED / method.path / LORA_FILE)
    assert sum(v.numel() for v in state.values()) == trainable
    assert all(v.dtype == torch.float16 for v in state.values())


def test_the_shipped_lora_draws_crosses_and_scale_zero_does_not():
    pipe = load_pipeline(device="cpu")
    pipe.load_lora_weights(str(teach.SHIPPED / "lora"))
    prompts = [concepts.concept_prompt(scene, "cross") for scene in concepts.seen_scenes()]
    drawn = [judge(image, ALL_SHAPES).shape for image in generate(pipe, prompts)]
    assert drawn.count("cross") >= 4
    off = generate(pipe, prompts, cross_attention_kwargs={"scale": 0.0})
    assert [judge(image, ALL_SHAPES).shape for image in off].count("cross") == 0


def test_results_json_describes_the_shipped_files():
    assert set(RESULTS["methods"]) == set(METHODS)
    for name, entry in RESULTS["methods"].items():
        path = teach.SHIPPED / METHODS[name].path
        file = path / LORA_FILE if path.is_dir() else path
        assert entry["file_bytes"] == file.stat().st_size < 1024 * 1024
        for key in ("seen", "unseen", "drift"):
            assert 0.0 <= entry[key]["both"] <= 1.0
    assert RESULTS["methods"]["textual inversion"]["trainable_parameters"] == 64


def test_results_json_was_made_with_the_methods_settings():
    """A changed method must be re-run (``make teach``) before the chapter quotes its figures."""
    for method in teach.METHODS:
        entry = RESULTS["methods"][method.name]
        recorded = (entry["word"], entry["file"], entry["steps"], entry["learning_rate"],
                    entry["prior"], tuple(entry["targets"]))
        assert recorded == (method.word, method.path, method.steps, method.learning_rate,
                            method.prior, method.targets), method.name
    assert RESULTS["settings"]["lora_rank"] == teach.LORA_RANK


def test_each_prior_is_drawn_from_its_own_prompts():
    assert set(teach.PRIOR_PROMPTS) == {m.prior for m in teach.METHODS if m.prior}
    replayed = concepts.replay_prompts()
    assert len(replayed) == concepts.REPLAY_COUNT and all(" shape " not in p for p in replayed)
    assert replayed != concepts.adherence_prompts("train", concepts.REPLAY_COUNT, 0)  # not the drift test's
    assert all(" shape " in p for p in concepts.class_prompts())


def test_the_table_and_the_targets_come_from_the_results():
    rows = teach.results_table(RESULTS)
    assert [row["method"] for row in rows] == [m.name for m in teach.METHODS]
    text = teach.format_table(rows)
    assert text.splitlines()[0].startswith("method") and len(text.splitlines()) == len(rows) + 1
    report = teach.target_report(RESULTS)
    assert len(report) == 4 and all(isinstance(met, bool) for _, _, met in report)


@pytest.mark.parametrize("name", ["textual inversion", "LoRA, old world replayed",
                                  "DreamBooth-LoRA, prior preservation"])
def test_train_method_writes_a_file_that_load_method_reads(name, tiny_pipeline_dir, tmp_path, monkeypatch):
    method = replace(METHODS[name], steps=1)
    # two prior pictures instead of dozens: the same code path, in seconds
    monkeypatch.setitem(teach.PRIOR_PROMPTS, "world", lambda: concepts.replay_prompts(2))
    monkeypatch.setitem(teach.PRIOR_PROMPTS, "class", lambda: concepts.class_prompts()[:2])
    examples = concepts.example_set(count=2)
    pipe = load_pipeline(tiny_pipeline_dir, device="cpu")
    result = teach.train_method(pipe, method, examples, tmp_path)
    assert result.steps == 1 and (tmp_path / method.path).exists()
    loaded = teach.load_method(load_pipeline(tiny_pipeline_dir, device="cpu"), method, tmp_path)
    prompt = [concepts.concept_prompt(examples.scenes[0], method.word)]
    kwargs = {"steps": 2, "output_type": "pt"}
    a = torch.stack(generate(pipe, prompt, **kwargs))
    b = torch.stack(generate(loaded, prompt, **kwargs))
    assert torch.allclose(a, b, atol=1e-2)
