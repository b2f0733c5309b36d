"""The chapters read well in the book's code boxes: short lines, short cells, one way to get sdhelpers.

The HTML book's code boxes show 88 characters at 1280 px; a longer line is cut off at the right
edge. A cell of more than 25 lines is a module's job, not a reader's.
"""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_COLUMNS = 88
MAX_CELL_LINES = 25


def _code_cells(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_lines_fit_the_code_box(path):
    long = [f"cell {i}: {line[:40]}…" for i, source in _code_cells(path)
            for line in source.splitlines() if len(line) > MAX_COLUMNS]
    assert not long, f"{len(long)} code lines over {MAX_COLUMNS} characters: {long[:5]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_cells_are_short(path):
    big = [(i, len(source.splitlines())) for i, source in _code_cells(path)
           if len(source.splitlines()) > MAX_CELL_LINES]
    assert not big, f"cells over {MAX_CELL_LINES} lines (cell, lines): {big}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_source_dumps(path):
    dumps = [i for i, source in _code_cells(path) if "getsource" in source]
    assert not dumps, f"cells {dumps} print source code instead of writing it out"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_says_how_to_get_sdhelpers(path):
    """A notebook downloaded on its own must say where its imports come from."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and "make dist" in first and "pip install" in first
