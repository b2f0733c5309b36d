"""The claims page generator (book/_ext/claims.py), on a small book made in a temporary folder."""

import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book" / "_ext"))
import claims  # noqa: E402

TOC = """\
format: jb-book
root: intro
parts:
  - caption: First
    chapters:
      - file: notebooks/02_second
  - caption: Second
    chapters:
      - file: notebooks/01_first
        sections:
          - file: notes
      - file: notebooks/03_empty
"""

FIRST_CELLS = [
    ("md", "# The first chapter\n\nSome text."),
    ("code", "import math\n\n# What we verified: pi, rounded.\nassert round(math.pi, 2) == 3.14\nassert 1 + 1 == 2"),
    ("code", "%matplotlib inline\nx = [1, 2]\nassert x == [\n    1,\n    2,\n], \"two items\""),
    ("code", "assert torch.cuda.is_available()", ["nbval-skip"]),
    ("code", "def check(v):\n    # a helper's own check\n    assert v > 0\n\ncheck(1)"),
    ("md", "```python\nassert 'in markdown' == 'not a claim'\n```"),
]


def write_notebook(path: Path, cells) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = []
    for kind, src, *tags in cells:
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        if tags:
            cell.metadata["tags"] = tags[0]
        nb.cells.append(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture()
def book(tmp_path):
    (tmp_path / "_toc.yml").write_text(TOC)
    (tmp_path / "intro.md").write_text("# Intro\n")
    (tmp_path / "notes.md").write_text("# Notes\n\n```python\nassert False\n```\n")
    write_notebook(tmp_path / "notebooks" / "01_first.ipynb", FIRST_CELLS)
    write_notebook(tmp_path / "notebooks" / "02_second.ipynb", [("code", "assert `x`` == 1"), ("md", "no title")])
    write_notebook(tmp_path / "notebooks" / "03_empty.ipynb", [("md", "# Empty"), ("code", "print(1)")])
    write_notebook(tmp_path / "notebooks" / "99_not_in_toc.ipynb", [("md", "# Stray"), ("code", "assert True")])
    return tmp_path


def test_toc_files_in_reading_order():
    import yaml

    assert list(claims.toc_files(yaml.safe_load(TOC))) == [
        "intro", "notebooks/02_second", "notebooks/01_first", "notes", "notebooks/03_empty",
    ]


def test_asserts_with_their_comments():
    found = claims.asserts_in("# What we verified: pi.\nassert a == 1\n\nassert b, 'msg'\n# noqa: E501\nassert c")
    assert [(c.statement, c.comment) for c in found] == [
        ("assert a == 1", "What we verified: pi."),
        ("assert b, 'msg'", ""),
        ("assert c", ""),
    ]


def test_multiline_assert_becomes_one_line_and_magics_are_ignored():
    found = claims.asserts_in("%time x = 1\nassert x == (\n    1\n)")
    assert [c.statement for c in found] == ["assert x == (1)"]


def test_invalid_python_falls_back_to_assert_lines():
    found = claims.asserts_in("# checked\nassert `x` == 1\nnot python (")
    assert [(c.statement, c.comment) for c in found] == [("assert `x` == 1", "checked")]


def test_inline_code_fence_is_longer_than_backticks_inside():
    assert claims.inline_code("a == 1") == "`a == 1`"
    assert claims.inline_code("a `b` ``c``") == "``` a `b` ``c`` ```"
    assert claims.inline_code("x``y") == "```x``y```"
    assert claims.inline_code("`x") == "`` `x ``"


def test_page_lists_every_claim_in_toc_order(book):
    page = claims.write_claims_page(book)
    assert page == book / "claims.md"
    text = page.read_text()
    assert text == "\n".join([
        "# Every claim the book proves",
        "",
        claims.INTRO,
        "",
        "5 claims in 2 chapters.",
        "",
        "## 02_second",
        "",
        "Proved in {doc}`the chapter </notebooks/02_second>` (`notebooks/02_second.ipynb`):",
        "",
        "- ```assert `x`` == 1```",
        "",
        "## The first chapter",
        "",
        "Proved in {doc}`the chapter </notebooks/01_first>` (`notebooks/01_first.ipynb`):",
        "",
        "- `assert round(math.pi, 2) == 3.14` — What we verified: pi, rounded.",
        "- `assert 1 + 1 == 2`",
        "- `assert x == [1, 2,], \"two items\"`",
        "- `assert v > 0` — a helper's own check",
        "",
    ])
    # Not listed: markdown code, .md pages, skipped cells, chapters without asserts, notebooks outside the toc.
    for absent in ("in markdown", "assert False", "cuda", "Empty", "Stray"):
        assert absent not in text


def test_page_is_deterministic_and_not_rewritten_when_unchanged(book):
    page = claims.write_claims_page(book)
    first, stamp = page.read_text(), page.stat().st_mtime_ns
    page_again = claims.write_claims_page(book, "_toc.yml")
    assert page_again.read_text() == first and page_again.stat().st_mtime_ns == stamp
    write_notebook(book / "notebooks" / "03_empty.ipynb", [("md", "# Empty"), ("code", "assert 2 > 1")])
    assert "- `assert 2 > 1`" in claims.write_claims_page(book).read_text()


def test_sphinx_hook_uses_the_external_toc_path(book):
    class Config(dict):
        pass

    class App:
        srcdir = str(book)
        config = Config(external_toc_path="_toc.yml")
        connected = []

        def connect(self, event, handler):
            self.connected.append((event, handler))

    app = App()
    assert claims.setup(app)["parallel_read_safe"] is True
    assert app.connected == [("builder-inited", claims.on_builder_inited)]
    claims.on_builder_inited(app)
    assert (book / "claims.md").is_file()
