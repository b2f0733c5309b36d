"""The tolerant nbval comparison (tests/nbval_tolerance.py) still catches real changes.

The rule is checked on strings first, then end to end: a copy of the first cells of a real
chapter, with one stored output edited, is run under nbval exactly as `make test` runs it.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from nbval_tolerance import compare_texts, explain, texts_match

pytest_plugins = ["pytester"]

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "00_setup.ipynb"
SANITIZE = Path(__file__).resolve().parent / "sanitize.cfg"


@pytest.mark.parametrize(
    ("reference", "test"),
    [
        ("seam energy 1562.3", "seam energy 1562.4"),  # one unit of the last digit
        ("seam energy 1562.3", "seam energy 1563.8"),  # 0.1% of the value
        ("PSNR 31.52 dB", "PSNR 31.53 dB"),
        ("gap 0.107", "gap 0.108"),
        ("first draws: [0.3367, 0.1288]", "first draws: [0.3368, 0.1288]"),
        ("loss 1.5e-4.", "loss 1.6e-4."),
        ("x: 0.1", "x: 0.10000000000000002"),
    ],
)
def test_numbers_within_the_tolerance_match(reference, test):
    assert texts_match(reference, test)


@pytest.mark.parametrize(
    ("reference", "test"),
    [
        ("seam energy 1562.3", "seam energy 1640.4"),  # 5%
        ("gap 0.107", "gap 0.110"),
        ("ids: [49406, 320, 8853]", "ids: [49406, 320, 8854]"),  # integers are exact
        ("shape: (1, 77, 768)", "shape: (1, 77, 769)"),
        ("859,520,964 parameters", "859,520,965 parameters"),
        ("step 5.", "step 6."),  # an integer that ends a sentence is still an integer
        ("colour 16%", "colour 17%"),
        ("torch 2.13.0", "torch 2.13.1"),  # a version is text
        ("model sd15", "model sd16"),  # digits inside a word are text
        ("fp16 weights", "fp32 weights"),
        ("first draws: [0.3367]", "first drawn: [0.3367]"),  # words are exact
        ("a  b 1.5", "a b 1.5"),  # so is spacing
        ("values 1.5 2.5", "values 1.5"),  # and the count of numbers
    ],
)
def test_real_changes_do_not_match(reference, test):
    assert not texts_match(reference, test)


def test_explain_names_the_number_that_moved():
    lines = explain("psnr 31.5, gap 0.107", "psnr 31.5, gap 0.130")
    assert lines == ["  number moved: 0.107 became 0.130 (allowed difference 0.001)"]
    assert "integers compare exactly" in explain("id 8853", "id 8854")[0]
    assert "text around the numbers changed" in explain("a 1", "b 1")[0]
    assert compare_texts("same", "same") == (True, [])


# --------------------------------------------------------------------------- end to end


def first_cells(upto_output: str) -> nbformat.NotebookNode:
    """00_setup's cells up to the first one whose stored output contains ``upto_output``."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and any(upto_output in o.get("text", "") for o in cell.outputs):
            notebook.cells = notebook.cells[: index + 1]
            return notebook
    raise AssertionError(f"no stored output of {NOTEBOOK.name} contains {upto_output!r}")


def edit_output(notebook, old: str, new: str) -> None:
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if old in output.get("text", ""):
                output["text"] = output["text"].replace(old, new, 1)
                return
    raise AssertionError(f"no stored output contains {old!r}")


def run_nbval(pytester, notebook) -> pytest.RunResult:
    path = pytester.path / "chapter.ipynb"
    nbformat.write(notebook, path)
    return pytester.runpytest(
        "--nbval", "-p", "nbval_tolerance", "--nbval-sanitize-with", str(SANITIZE),
        "-p", "no:cacheprovider", str(path),
    )


@pytest.fixture()
def draws_and_ids():
    """A fresh copy of the stored first random draws (floats) and token ids (integers) of 00_setup."""
    notebook = first_cells("first 12 ids:")
    draws = next(o.text for c in notebook.cells if c.cell_type == "code"
                 for o in c.outputs if "first draws:" in o.get("text", ""))
    first_draw = draws.split("[")[1].split(",")[0]
    return notebook, first_draw


def test_the_unedited_copy_passes(pytester, draws_and_ids):
    notebook, _ = draws_and_ids
    run_nbval(pytester, notebook).assert_outcomes(passed=sum(c.cell_type == "code" for c in notebook.cells))


def test_a_number_moved_within_the_tolerance_passes(pytester, draws_and_ids):
    notebook, first_draw = draws_and_ids
    nudged = f"{float(first_draw) + 0.0001:.4f}"  # one unit of the last printed digit
    edit_output(notebook, first_draw, nudged)
    result = run_nbval(pytester, notebook)
    assert result.ret == 0, result.stdout.str()


def test_a_number_moved_by_five_percent_fails(pytester, draws_and_ids):
    notebook, first_draw = draws_and_ids
    moved = f"{float(first_draw) * 1.05:.4f}"
    edit_output(notebook, first_draw, moved)
    result = run_nbval(pytester, notebook)
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"*number moved: {moved} became {first_draw}*"])


@pytest.mark.parametrize(("old", "new", "report"), [
    ("first draws:", "first drawn:", "*text around the numbers changed*"),  # a word
    ("8853", "8854", "*integer 8854 became 8853*"),  # a token id
])
def test_a_changed_word_or_token_id_fails(pytester, draws_and_ids, old, new, report):
    notebook, _ = draws_and_ids
    edit_output(notebook, old, new)
    result = run_nbval(pytester, notebook)
    assert result.ret == 1
    result.stdout.fnmatch_lines([report])


def test_no_notebook_carries_a_test_marker_a_reader_would_see():
    """nbval's markers are cell tags (hidden from readers), never ``# NBVAL_...`` comments."""
    chapters = sorted(NOTEBOOK.parent.glob("*.ipynb"))
    assert chapters
    marked = [
        f"{path.name} cell {index}"
        for path in chapters
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells)
        if "NBVAL_" in cell.source
    ]
    assert not marked, f"use the cell tags nbval-ignore-output / nbval-skip instead: {marked}"
