"""Markdown tables: one line per row, separators, escaped pipes, clear errors."""

import pytest

from sdhelpers.tables import markdown_table


def test_rows_become_a_markdown_table():
    text = markdown_table([{"method": "LoRA", "params": 223744, "met": True},
                           {"method": "a|b", "params": 64, "met": False}])
    assert text.splitlines() == [
        "| method | params | met |",
        "|---|---|---|",
        "| LoRA | 223,744 | yes |",
        "| a\\|b | 64 | no |",
    ]


@pytest.mark.parametrize("rows, match", [([], "rows"), ([{"a": 1}, {"b": 2}], r"rows\[1\]")])
def test_bad_rows_are_refused(rows, match):
    with pytest.raises(ValueError, match=match):
        markdown_table(rows)
