"""The benchmark harness on the tiny random pipeline: fields, ratios, table, JSON and argument errors.

No timing is asserted: only that the numbers are there, positive and consistent.
"""

import json

import pytest
import torch

from sdhelpers import bench, bench_measure, bench_report
from sdhelpers.gpu import PRESETS
from sdhelpers.models import ModelUnavailableError, load_pipeline

RUN = ["--size", "16", "--steps", "2", "--repeats", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_loaders(tiny_pipeline_dir):
    """The tiny random pipeline stands in for TinySD, loaded from its folder like the real one."""
    return {"tinysd": lambda device: load_pipeline(str(tiny_pipeline_dir), device=device, dtype=torch.float32)}


@pytest.fixture(scope="module")
def doc(tiny_loaders):
    return bench.run_benchmark(["tinysd"], PRESETS, device="cpu", size=16, steps=2, repeats=1, loaders=tiny_loaders)


def test_result_rows_have_every_field(doc):
    assert set(doc) == {"hardware", "versions", "arguments", "results", "skipped"}
    assert doc["hardware"].startswith("CPU") and doc["versions"]["diffusers"]
    assert [row["preset"] for row in doc["results"]] == list(PRESETS)
    for row in doc["results"]:
        assert set(row) == set(bench_measure.RESULT_FIELDS)


def test_default_is_measured_with_ratio_one(doc):
    row = doc["results"][0]
    assert row["status"] == "ok" and row["preset"] == "default"
    assert row["it_per_s"] > 0 and row["s_per_image"] > 0 and row["peak_rss_gib"] > 0
    assert row["load_s"] >= row["apply_s"] >= 0 and row["warmup_s"] > 0
    assert row["peak_allocated_gib"] is None and row["peak_reserved_gib"] is None  # no CUDA here
    assert row["ratio_vs_default"] == {"it_per_s": 1.0, "peak_memory": 1.0}
    assert "dtype float32" in row["changes"]


def test_gpu_presets_are_not_applicable_on_the_cpu(doc):
    for row in doc["results"][1:]:
        assert row["status"].startswith("n/a: ") and "\n" not in row["status"]
        assert row["it_per_s"] is None and row["ratio_vs_default"] is None
    assert "compile" in doc["results"][1]["status"] and "accelerator" in doc["results"][2]["status"]


def test_ratios_are_against_default():
    rows = [dict.fromkeys(bench_measure.RESULT_FIELDS) | {"model": "m", "preset": p, "status": "ok", "it_per_s": s,
                                                   "peak_allocated_gib": g, "peak_reserved_gib": g}
            for p, s, g in (("default", 10.0, 4.0), ("fast", 25.0, 3.0))]
    bench_measure.add_ratios(rows)
    assert rows[1]["ratio_vs_default"] == {"it_per_s": 2.5, "peak_memory": 0.75}


def test_markdown_table_has_a_row_per_preset(doc):
    table = bench_report.to_markdown(doc)
    rows = [line for line in table.splitlines() if line.startswith("| tinysd |")]
    assert len(rows) == len(PRESETS)
    for row, name in zip(rows, PRESETS):
        assert f"| {name} |" in row
    assert "| 1.00× | 1.00× | ok |" in rows[0] and "n/a:" in rows[1]
    assert doc["hardware"] in table


def test_command_line_prints_and_writes_json_and_markdown(tmp_path, capsys, tiny_loaders):
    out_json, out_md = tmp_path / "r" / "bench.json", tmp_path / "bench.md"
    argv = ["--model", "tinysd", "--preset", "default,fast", *RUN, "--json", str(out_json), "--markdown", str(out_md)]
    assert bench.main(argv, loaders=tiny_loaders) == 0
    printed = capsys.readouterr().out
    assert out_md.read_text() == printed
    loaded = json.loads(out_json.read_text())
    assert [r["preset"] for r in loaded["results"]] == ["default", "fast"]
    assert loaded["arguments"]["presets"] == ["default", "fast"] and loaded["arguments"]["size"] == 16
    assert loaded["results"][0]["ratio_vs_default"]["it_per_s"] == 1.0


def test_an_unavailable_model_is_skipped_in_one_line(capsys):
    def missing(device):
        raise ModelUnavailableError("model: the embedded TinySD is not in this installation")

    assert bench.main(["--model", "tinysd", "--preset", "default", *RUN], loaders={"tinysd": missing}) == 0
    out = capsys.readouterr().out
    assert "tinysd: skipped: model: the embedded TinySD is not in this installation" in out
    assert "| tinysd |" not in out


def test_out_of_memory_becomes_a_status_with_advice(monkeypatch, tiny_loaders):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(bench_measure, "_call", oom)
    settings = bench_measure.BenchSettings(size=16, steps=2, repeats=1)
    row = bench_measure.measure_preset(tiny_loaders["tinysd"], "tinysd", "default", settings)
    assert row["status"].startswith("oom: ") and "low-memory" in row["status"]


def test_any_other_failure_is_a_status_not_a_crash(monkeypatch, tiny_loaders):
    def broken(*args, **kwargs):
        raise RuntimeError("compiler exploded\nlong details")

    monkeypatch.setattr(bench_measure, "_call", broken)
    settings = bench_measure.BenchSettings(size=16, steps=2, repeats=1)
    row = bench_measure.measure_preset(tiny_loaders["tinysd"], "tinysd", "default", settings)
    assert row["status"] == "error: RuntimeError: compiler exploded"


def test_step_clock_counts_intervals():
    clock = bench_measure.StepClock(torch.device("cpu"))
    assert clock.iterations_per_second() is None
    clock.times = [10.0, 10.5, 11.0, 12.0]  # 3 intervals in 2 seconds
    assert clock.iterations_per_second() == 1.5


def test_sd15_arch_is_sd15_with_pndm():
    pipe = bench.build_sd15_arch_pipeline("meta")  # the real sizes without the memory
    sizes = [sum(p.numel() for p in m.parameters()) for m in (pipe.unet, pipe.text_encoder, pipe.vae)]
    assert sizes == [859_520_964, 123_060_480, 83_653_863]
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.skip_prk_steps and pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None and pipe.tokenizer.model_max_length == 77


@pytest.mark.parametrize("argv, expected", [
    (["--preset", "turbo"], "--preset: 'turbo' is not allowed; use one of default, fast, low-memory, lowest-memory"),
    (["--model", "sd3"], "--model: 'sd3' is not allowed; use one of tinysd, sd15-arch"),
    (["--size", "100"], "--size: 100 is not allowed; use a positive multiple of 8"),
    (["--size", "0"], "--size: 0 is not allowed"),
    (["--size", "big"], "argument --size: invalid int value: 'big'"),
    (["--steps", "1"], "--steps: 1 is too few"),
    (["--batch", "0"], "--batch: 0 is not allowed"),
    (["--device", "tpu"], "--device: 'tpu' is not a device; allowed: cuda, mps, cpu"),
    (["--dtype", "int8"], "--dtype: 'int8' is not allowed"),
    (["--compile-mode", "fastest"], "--compile-mode: 'fastest' is not allowed"),
])
def test_bad_arguments_fail_in_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_arguments_are_checked_at_the_api_entrance():
    with pytest.raises(ValueError, match="size: 100 is not allowed"):
        bench.run_benchmark(["tinysd"], ["default"], device="cpu", size=100)
    with pytest.raises(ValueError, match="dtype: 'int8' is not allowed"):
        bench.run_benchmark(["tinysd"], ["default"], device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="preset: 'turbo' is not allowed"):
        bench.run_benchmark(["tinysd"], ["turbo"], device="cpu")


def test_load_results_reads_stored_runs_in_name_order(tmp_path):
    from sdhelpers.bench_report import load_results

    assert load_results(tmp_path / "missing") == {}
    (tmp_path / "b_run.json").write_text(json.dumps({"hardware": "B", "results": []}))
    (tmp_path / "a_run.json").write_text(json.dumps({"hardware": "A", "results": []}))
    (tmp_path / "notes.md").write_text("not a run")
    runs = load_results(tmp_path)
    assert list(runs) == ["a_run", "b_run"] and runs["a_run"]["hardware"] == "A"


def test_peak_memory_prefers_cuda_allocated_over_rss():
    from sdhelpers.bench_report import peak_memory_gib

    assert peak_memory_gib({"peak_allocated_gib": 2.5, "peak_rss_gib": 9.0}) == 2.5
    assert peak_memory_gib({"peak_allocated_gib": None, "peak_rss_gib": 1.25}) == 1.25
