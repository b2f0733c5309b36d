"""Serve the book's third-party JavaScript from npm packages, never from a CDN.

Why this exists: myst-nb points the ipywidgets embed manager and RequireJS at CDNs,
and Sphinx does the same for MathJax. The book must read offline, so `book/package.json`
installs those files with npm (`npm ci` in `book/`, which `make book` runs) and this
extension copies them from `book/node_modules/` into `_static/offline/` of the built HTML.
`_config.yml` points `nb_ipywidgets_js` and `mathjax_path` at the copies.

It also guards the promise "no network": every built page is scanned for scripts,
stylesheets, images or frames loaded from another host, and each one found is a
warning, which fails the build because the book is built with `-W`.
"""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

# Folder under the built `_static/` -> (folder under `book/node_modules/`, files to copy from it).
FROM_NPM: dict[str, tuple[str, tuple[str, ...]]] = {
    "offline/requirejs": ("requirejs", ("require.js",)),
    # embed-amd.js loads its icon fonts from its own folder, so they travel with it.
    "offline/html-manager": (
        "@jupyter-widgets/html-manager/dist",
        ("embed-amd.js", "*.woff", "*.woff2", "*.ttf", "*.eot", "*.svg"),
    ),
    # MathJax loads its fonts and extensions lazily, relative to its entry script.
    "offline/mathjax": ("mathjax/es5", ("**/*",)),
}

# File under the built `_static/` -> file of this folder (the book's own JavaScript).
FROM_HERE: dict[str, str] = {
    "offline/html-manager/widgets-setup.js": "widgets_setup.js",
}

# Tag -> attributes whose URL the browser fetches when it renders the page.
FETCHED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "script": ("src",),
    "img": ("src",),
    "iframe": ("src",),
    "source": ("src",),
    "video": ("src", "poster"),
    "audio": ("src",),
    "embed": ("src",),
}
# <link rel=...> values that make the browser fetch the href.
FETCHED_LINK_RELS = {"stylesheet", "preload", "modulepreload", "icon", "prefetch"}


def node_modules_dir(app: Sphinx) -> Path:
    """Where `npm ci` puts the packages: next to `package.json` in the book's source folder."""
    return Path(app.srcdir) / "node_modules"


def check_sources(app: Sphinx) -> None:
    """Fail before reading any page if npm was not run, with the command that fixes it."""
    missing = [
        source
        for source, patterns in FROM_NPM.values()
        if not any((node_modules_dir(app) / source).glob(patterns[0]))
    ]
    if missing:
        raise ExtensionError(
            f"offline_assets: missing {', '.join(missing)} in {node_modules_dir(app).name}/; "
            "run `npm ci` in the book folder (`make book` does it)"
        )


def copy_matching(source: Path, patterns: tuple[str, ...], target: Path) -> None:
    """Copy the files of `source` that match `patterns` into `target`, keeping subfolders."""
    for pattern in patterns:
        for path in source.glob(pattern):
            if path.is_file():
                destination = target / path.relative_to(source)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, destination)


def is_remote(url: str) -> bool:
    """True for a URL the browser would fetch from another host (http, https or scheme-relative)."""
    url = url.strip().lower()
    return url.startswith(("http://", "https://", "//"))


class RemoteFetchFinder(HTMLParser):
    """Collect the URLs of resources that a page would fetch from another host."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        names = FETCHED_ATTRIBUTES.get(tag, ())
        if tag == "link" and FETCHED_LINK_RELS & set(values.get("rel", "").lower().split()):
            names = ("href",)
        self.remote += [values[name] for name in names if is_remote(values.get(name, ""))]


def remote_fetches(html: str) -> list[str]:
    """The remote URLs that the page in `html` loads as scripts, styles, images or frames."""
    finder = RemoteFetchFinder()
    finder.feed(html)
    return finder.remote


def copy_offline_assets(app: Sphinx, exception: Exception | None) -> None:
    """Copy the npm files into the built HTML, then warn about any page that fetches remotely."""
    if exception is not None or app.builder.format != "html":
        return
    static_dir = Path(app.outdir) / "_static"
    for destination, (source, patterns) in FROM_NPM.items():
        copy_matching(node_modules_dir(app) / source, patterns, static_dir / destination)
    for destination, source in FROM_HERE.items():
        shutil.copyfile(Path(__file__).parent / source, static_dir / destination)
    for page in sorted(Path(app.outdir).rglob("*.html")):
        for url in remote_fetches(page.read_text(encoding="utf-8")):
            logger.warning(
                "offline_assets: %s loads %s from the network; the book must read offline",
                page.relative_to(app.outdir).as_posix(),
                url,
                type="offline_assets",
            )


def setup(app: Sphinx) -> dict[str, bool | str]:
    """Register the check and the copy with Sphinx."""
    app.connect("builder-inited", check_sources)
    app.connect("build-finished", copy_offline_assets)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
