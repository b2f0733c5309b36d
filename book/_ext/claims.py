"""Generate the book's page of proven claims from the notebooks' ``assert`` statements.

Why this exists: the book checks its claims in ``assert`` cells, which the tests re-execute on every
change. This extension lists every one of them on a single page, chapter by chapter in the order of
the table of contents, each linked to the chapter that proves it. The page is never written by hand,
so it can't fall behind the notebooks.

When: on ``builder-inited``, before Sphinx looks for source files, it reads the toc (``_toc.yml``, or
``external_toc_path``), opens each listed notebook, finds the ``assert`` statements of its code
cells and writes ``claims.md`` into the book's source folder. Each bullet is the statement (on one
line), preceded by the ``#`` comment lines right above it, if any. The output depends only on the
toc and the notebooks' sources (not on outputs, dates or paths), and the file is rewritten only
when its text changes.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

PAGE_NAME = "claims.md"
PAGE_TITLE = "Every claim the book proves"
INTRO = (
    "Each line below is an `assert` statement in a chapter's code. The tests execute every chapter "
    "again on every change (nbval), so a claim listed here that stopped being true would fail them. "
    "The page is generated from the notebooks when the book is built; the comment written above an "
    "`assert` in the notebook, if there is one, follows it."
)
# Comments that steer the tools, not the reader.
TOOL_COMMENT = re.compile(r"^\s*#\s*(noqa|type:|pragma|fmt:)", re.IGNORECASE)
MAGIC_LINE = re.compile(r"^\s*[%!]")


@dataclass
class Claim:
    """One ``assert`` statement and the comment lines right above it."""

    statement: str
    comment: str = ""


@dataclass
class Chapter:
    """A notebook of the toc: its docname (path without suffix), title and claims."""

    docname: str
    title: str
    claims: list[Claim] = field(default_factory=list)


def toc_files(toc: Any) -> Iterator[str]:
    """Every ``root`` and ``file`` entry of a parsed ``_toc.yml``, in reading order (depth first)."""
    if isinstance(toc, dict):
        for key, value in toc.items():
            if key in ("root", "file") and isinstance(value, str):
                yield value
            else:
                yield from toc_files(value)
    elif isinstance(toc, list):
        for item in toc:
            yield from toc_files(item)


def _one_line(text: str) -> str:
    """A statement spread over lines, as one line (string contents kept).

    Lines are joined with one space, or none after an opening or before a closing bracket.
    """
    joined = ""
    for piece in (line.strip() for line in text.splitlines()):
        if piece:
            tight = not joined or joined.endswith(("(", "[", "{")) or piece.startswith((")", "]", "}"))
            joined += piece if tight else " " + piece
    return joined


def _comment_above(lines: list[str], first_line: int) -> str:
    """The run of ``#`` comment lines directly above line ``first_line`` (0-based), joined."""
    comments: list[str] = []
    index = first_line - 1
    while index >= 0 and lines[index].lstrip().startswith("#"):
        if not TOOL_COMMENT.match(lines[index]):
            comments.insert(0, lines[index].strip().lstrip("#").strip())
        index -= 1
    return " ".join(c for c in comments if c)


def asserts_in(source: str) -> list[Claim]:
    """The ``assert`` statements of one code cell, in order, with their comments.

    IPython magics and shell lines are blanked out before parsing. A cell that still isn't valid
    Python falls back to the lines that start with ``assert``.
    """
    lines = source.splitlines()
    python = "\n".join("" if MAGIC_LINE.match(line) else line for line in lines)
    try:
        tree = ast.parse(python)
    except SyntaxError:
        return [
            Claim(line.strip(), _comment_above(lines, number))
            for number, line in enumerate(lines)
            if re.match(r"^\s*assert\b", line)
        ]
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assert)), key=lambda n: (n.lineno, n.col_offset))
    claims = []
    for node in nodes:
        segment = ast.get_source_segment(python, node) or ""
        claims.append(Claim(_one_line(segment), _comment_above(lines, node.lineno - 1)))
    return claims


def notebook_title(cells: list[dict], fallback: str) -> str:
    """The first Markdown heading of the notebook, without its ``#`` marks."""
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            for line in _source(cell).splitlines():
                match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
                if match:
                    return match.group(1)
    return fallback


def _skipped(cell: dict) -> bool:
    """Whether nbval skips the cell (its ``nbval-skip`` tag): a claim it never runs proves nothing."""
    return "nbval-skip" in cell.get("metadata", {}).get("tags", [])


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def read_chapter(path: Path, docname: str) -> Chapter:
    """The title and the claims of the notebook at ``path``."""
    cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    chapter = Chapter(docname, notebook_title(cells, PurePosixPath(docname).name))
    for cell in cells:
        if cell.get("cell_type") == "code" and not _skipped(cell):
            chapter.claims.extend(asserts_in(_source(cell)))
    return chapter


def inline_code(text: str) -> str:
    """``text`` as Markdown inline code, with a fence longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_page(chapters: list[Chapter]) -> str:
    """The Markdown of the claims page: a section per chapter, a bullet per claim."""
    total = sum(len(c.claims) for c in chapters)
    proving = [c for c in chapters if c.claims]
    lines = [f"# {PAGE_TITLE}", "", INTRO, "",
             f"{total} claims in {len(proving)} chapters.", ""]
    for chapter in proving:
        link = f"{{doc}}`the chapter </{chapter.docname}>`"
        lines += [f"## {chapter.title}", "", f"Proved in {link} ({inline_code(chapter.docname + '.ipynb')}):", ""]
        for claim in chapter.claims:
            comment = claim.comment.rstrip(":")
            lines.append(f"- {inline_code(claim.statement)}" + (f" — {comment}" if comment else ""))
        lines.append("")
    return "\n".join(lines)


def collect_chapters(srcdir: Path, toc_path: Path) -> list[Chapter]:
    """The notebooks the toc lists, in its order (a name listed twice counts once)."""
    import yaml

    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    chapters, seen = [], set()
    for entry in toc_files(toc):
        docname = str(PurePosixPath(entry).with_suffix("")) if entry.endswith(".ipynb") else entry
        path = srcdir / f"{docname}.ipynb"
        if docname in seen or not path.is_file():
            continue
        seen.add(docname)
        chapters.append(read_chapter(path, docname))
    return chapters


def write_claims_page(srcdir: str | Path, toc_path: str | Path | None = None) -> Path:
    """Write ``claims.md`` into ``srcdir`` from the notebooks of the toc; return its path.

    The file is left untouched when its text would not change, so Sphinx doesn't rebuild it.
    """
    srcdir = Path(srcdir)
    toc_path = srcdir / "_toc.yml" if toc_path is None else Path(toc_path)
    if not toc_path.is_absolute():
        toc_path = srcdir / toc_path
    text = render_page(collect_chapters(srcdir, toc_path))
    page = srcdir / PAGE_NAME
    if not page.is_file() or page.read_text(encoding="utf-8") != text:
        page.write_text(text, encoding="utf-8")
    return page


def on_builder_inited(app) -> None:
    """Sphinx hook: generate the page before the source files are looked for."""
    toc = app.config["external_toc_path"] if "external_toc_path" in app.config else None
    write_claims_page(app.srcdir, toc)


def setup(app) -> dict[str, bool | str]:
    """Register the page generator with Sphinx."""
    app.connect("builder-inited", on_builder_inited)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
