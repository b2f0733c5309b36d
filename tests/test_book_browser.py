"""The built book, read the way a reader reads it: in a headless Chromium, fully offline.

Why: a book can build without a warning and still show a reader a blank widget, a broken
image, a traceback or a path of the machine that executed it. These tests open the intro
and every chapter listed in `book/_toc.yml` (so a new chapter is covered as soon as it is
in the table of contents) from a local HTTP server, check what the page shows, and save a
full-page screenshot of each in `tests/artifacts/screenshots/`.

Needs the built book (`make book`; `make test` builds it first) and Debian's
`chromium` and `chromium-driver` packages; Selenium is given the driver's path, so it
never downloads one. Chromium cannot resolve any host but 127.0.0.1, so a page that
reaches for the network fails the test instead of quietly loading from a CDN.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BOOK_DIR = REPO / "book"
HTML_DIR = BOOK_DIR / "_build" / "html"
SCREENSHOT_DIR = Path(__file__).resolve().parent / "artifacts" / "screenshots"
BOOK_TITLE = "Stable Diffusion from the inside"

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "chromedriver")
INSTALL_HINT = "apt-get install chromium chromium-driver"
BUILD_HINT = "the book is not built: run `make book` first (`make test` does it)"

# Text a reader must never see: a Python traceback, or a path of the machine that ran the notebook:
# a folder under the usual roots of checkouts, homes and scratch space, an installed package's
# folder, or this checkout's own absolute path (wherever it lives).
TRACEBACK = "Traceback (most recent call last)"
# nbval's comment markers (# NBVAL_SKIP, ...) are test machinery; cells carry tags instead.
TEST_MARKER = "NBVAL"
MACHINE_ROOTS = ("work", "root", "tmp", "home", "Users", "opt", "mnt", "srv", "var")
MACHINE_PATH = re.compile(
    "|".join(
        [rf"(?<![\w.~-])/(?:{'|'.join(MACHINE_ROOTS)})/[\w.~-]+", r"site-packages/", re.escape(str(REPO))]
    )
)
# Requests that browsers make on their own, whatever the page says.
IGNORED_REQUESTS = ("/favicon.ico",)
PAGE_LOAD_TIMEOUT_S = 30
WIDGET_RENDER_TIMEOUT_S = 20


# --------------------------------------------------------------------------- the pages


def toc_pages(toc_path: Path = BOOK_DIR / "_toc.yml") -> list[str]:
    """Every page of the table of contents, root first, as paths without suffix (e.g. notebooks/00_setup)."""
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    pages = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key, []))

    walk([toc])  # the toc's top level holds `parts` or `chapters` like any entry
    return [page.removesuffix(".ipynb").removesuffix(".md") for page in pages]


PAGES = toc_pages()
ROOT_PAGE = PAGES[0]


def page_html(page: str) -> Path:
    return HTML_DIR / f"{page}.html"


def screenshot_name(page: str) -> str:
    """`notebooks/00_setup` -> `00_setup`: the chapter's own name, unique within the book."""
    return Path(page).name


# --------------------------------------------------------------------------- static checks


class LocalAssetFinder(HTMLParser):
    """The scripts and stylesheets that a built page loads (their src/href as written)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.assets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "script" and values.get("src"):
            self.assets.append(values["src"])
        if tag == "link" and "stylesheet" in values.get("rel", "").split():
            self.assets.append(values["href"])


def page_assets(html_file: Path) -> list[str]:
    finder = LocalAssetFinder()
    finder.feed(html_file.read_text(encoding="utf-8"))
    return finder.assets


@pytest.fixture(scope="module")
def built_book() -> Path:
    """The built HTML folder; a missing build or a missing toc page fails with how to build it."""
    missing = [page for page in PAGES if not page_html(page).is_file()]
    if missing:
        pytest.fail(f"{BUILD_HINT}; missing pages: {', '.join(missing)}", pytrace=False)
    return HTML_DIR


def test_toc_lists_the_intro_and_the_chapters() -> None:
    assert ROOT_PAGE == "intro"
    assert len(PAGES) >= 2, f"expected the intro and at least one chapter in _toc.yml, got {PAGES}"
    chapters = [page for page in PAGES if page.startswith("notebooks/")]
    assert chapters and PAGES[1] == chapters[0], f"the chapters come right after the intro: {PAGES}"
    others = [page for page in PAGES[1:] if page not in chapters]
    assert all((BOOK_DIR / f"{page}.md").is_file() or page == "claims" for page in others), others
    names = [screenshot_name(page) for page in PAGES]
    assert len(set(names)) == len(names), f"two toc pages share a file name: {names}"


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_only_local_assets_that_exist(built_book: Path, page: str) -> None:
    """Every script and stylesheet of the page is a file of the build: nothing from a CDN."""
    html_file = page_html(page)
    problems = []
    for asset in page_assets(html_file):
        url = urlsplit(asset)
        if url.scheme or url.netloc:
            problems.append(f"remote asset {asset}")
        elif not (html_file.parent / url.path).resolve().is_file():
            problems.append(f"missing file {asset}")
    assert not problems, f"{page}: " + "; ".join(problems)


# --------------------------------------------------------------------------- the browser


def find_program(candidates: tuple[str, ...]) -> str | None:
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def missing_browser(reason: str) -> None:
    """Fail in CI, where the browser is part of the setup; skip on a machine without it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run `{INSTALL_HINT}`)", pytrace=False)
    pytest.skip(f"{reason}: run `{INSTALL_HINT}` to check the book in a browser")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the built book without printing a line per request."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib's name)
        pass


@pytest.fixture(scope="module")
def book_url(built_book: Path) -> Iterator[str]:
    """The book served over HTTP on 127.0.0.1 (a free port), as a real reader would get it."""
    handler = functools.partial(QuietHandler, directory=str(built_book))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian Chromium driven by Debian's chromedriver, with a fresh profile and no network."""
    chromium = find_program(CHROMIUM_CANDIDATES)
    chromedriver = find_program(CHROMEDRIVER_CANDIDATES)
    if not chromium or not chromedriver:
        missing_browser(f"chromium or chromedriver not found (chromium={chromium}, chromedriver={chromedriver})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_browser("the Python package selenium is not installed")

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--window-size=1280,1000",
        # Only the local server resolves: any request to another host fails and is reported.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    # An explicit driver path: Selenium Manager is never asked to download anything.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    driver.get("about:blank")  # leave the start page, whose own requests are not the book's
    try:
        yield driver
    finally:
        driver.quit()


# --------------------------------------------------------------------------- what a page shows

IMAGES_LOADED_JS = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
images.forEach(img => { img.loading = 'eager'; });
Promise.all(images.map(img => img.complete ? null : new Promise(ok => {
    img.addEventListener('load', ok); img.addEventListener('error', ok);
}))).then(() => done(images.filter(img => !(img.complete && img.naturalWidth > 0))
                             .map(img => img.currentSrc || img.src || img.outerHTML.slice(0, 120))));
"""

# Text of the page as a reader could find it, hidden cells included, without script or style code.
VISIBLE_TEXT_JS = """
const body = document.body.cloneNode(true);
body.querySelectorAll('script, style, noscript').forEach(node => node.remove());
return body.textContent;
"""

WIDGETS_JS = """
return {
    views: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
    rendered: Array.from(document.querySelectorAll('.widget-subarea')).filter(a => a.children.length).length,
};
"""


# Code and output boxes that a reader would have to scroll sideways at the window's 1280 px.
# Folded cells are opened for the measure (a reader opens them), then folded again.
SCROLLING_BOXES_JS = """
const folded = Array.from(document.querySelectorAll('details:not([open])'));
folded.forEach(fold => { fold.open = true; });
const boxes = document.querySelectorAll('div.cell_input pre, div.cell_output pre, div.cell_output');
const scrolling = Array.from(boxes)
    .filter(box => box.offsetParent !== null && box.scrollWidth > box.clientWidth + 2)
    .map(box => box.textContent.trim().split('\\n')[0].slice(0, 60));
folded.forEach(fold => { fold.open = false; });
return scrolling;
"""

# The exercises' section: its code cells, and whether each is folded inside a closed <details>.
EXERCISES_JS = """
const heading = Array.from(document.querySelectorAll('main h2'))
    .find(h => h.textContent.replace('#', '').trim() === 'Exercises');
if (!heading) return null;
const section = heading.closest('section');
const cells = Array.from(section.querySelectorAll('div.cell'));
return {
    cells: cells.length,
    open: cells.filter(cell => {
        const fold = cell.querySelector('details');
        return !fold || fold.open;
    }).length,
    folds: section.querySelectorAll('details').length,
};
"""

# Markdown that was printed as text: a table's separator row outside any <table>.
UNRENDERED_TABLE = re.compile(r"^\s*\|(\s*:?-{3,}:?\s*\|)+\s*$", re.M)


def chapter_shape_problems(driver) -> list[str]:
    """Boxes that scroll sideways, unrendered tables, the summary and the folded solutions."""
    from selenium.webdriver.common.by import By

    problems = []
    scrolling = driver.execute_script(SCROLLING_BOXES_JS)
    if scrolling:
        problems.append(f"{len(scrolling)} code or output boxes scroll sideways at 1280 px, "
                        f"e.g. {scrolling[:3]}")
    outputs = " ".join(o.text for o in driver.find_elements(By.CSS_SELECTOR, "div.cell_output"))
    if UNRENDERED_TABLE.search(outputs):
        problems.append("an output shows a Markdown table as text instead of a <table>")
    summaries = [s for s in driver.find_elements(By.CSS_SELECTOR, "main p > strong")
                 if s.text.startswith("What we verified")]
    if len(summaries) != 1:
        problems.append(f"{len(summaries)} 'What we verified' summaries; a chapter has one")
    exercises = driver.execute_script(EXERCISES_JS)
    if exercises is None:
        problems.append("no 'Exercises' section")
    elif exercises["open"] or not exercises["folds"]:
        problems.append(f"solutions not folded: {exercises['open']} of {exercises['cells']} code "
                        f"cells open, {exercises['folds']} folds in the exercises")
    return problems


def network_problems(performance_log: list[dict], base_url: str) -> list[str]:
    """Requests that failed (network error or HTTP >= 400) or that left the local server."""
    requests: dict[str, tuple[str, str]] = {}
    problems = []
    for entry in performance_log:
        message = json.loads(entry["message"])["message"]
        method, params = message["method"], message.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            requests[params["requestId"]] = (url, params.get("type", "?"))
            if url.startswith(("http:", "https:")) and not url.startswith(base_url):
                problems.append(f"request to another host: {url}")
        elif params.get("requestId") not in requests:
            continue  # a late event of the page loaded before this one
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            url = params["response"]["url"]
            if not url.endswith(IGNORED_REQUESTS):
                problems.append(f"HTTP {params['response']['status']} for {params.get('type', '?')} {url}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url, kind = requests[params["requestId"]]
            if not url.endswith(IGNORED_REQUESTS):
                problems.append(f"{params.get('errorText', 'failed')} for {kind} {url}")
    return sorted(set(problems))


def javascript_errors(browser_log: list[dict]) -> list[str]:
    """Uncaught errors of the page's own scripts (network failures are reported separately)."""
    return [
        entry["message"]
        for entry in browser_log
        if entry["level"] == "SEVERE" and entry.get("source") == "javascript"
    ]


def wait_for_widgets(driver) -> dict[str, int]:
    """Wait until every stored widget view is rendered by the embed manager (or time runs out)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    counts = driver.execute_script(WIDGETS_JS)
    if counts["views"]:
        try:
            WebDriverWait(driver, WIDGET_RENDER_TIMEOUT_S).until(
                lambda d: d.execute_script(WIDGETS_JS)["rendered"] >= counts["views"]
            )
        except TimeoutException:
            pass
        counts = driver.execute_script(WIDGETS_JS)
    return counts


def save_full_page_screenshot(driver, path: Path) -> None:
    """A PNG of the whole page, not just the window, through the DevTools protocol."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.parametrize("page", PAGES)
def test_page_reads_well_in_a_browser(browser, book_url: str, page: str) -> None:
    """Title, table of contents, outputs, images, widgets, requests: what a reader sees is whole."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("performance")  # drop what earlier pages left in the logs
    browser.get_log("browser")
    url = f"{book_url}{page}.html"
    browser.get(url)
    WebDriverWait(browser, PAGE_LOAD_TIMEOUT_S).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    widgets = wait_for_widgets(browser)
    broken_images = browser.execute_async_script(IMAGES_LOADED_JS)
    save_full_page_screenshot(browser, SCREENSHOT_DIR / f"{screenshot_name(page)}.png")

    problems: list[str] = []

    headings = [h for h in browser.find_elements(By.CSS_SELECTOR, "main h1") if h.is_displayed()]
    if not headings or not headings[0].text.strip():
        problems.append("no visible page title (h1)")
    elif headings[0].text.strip().rstrip("#").strip() not in browser.title:
        problems.append(f"h1 {headings[0].text!r} is not in the window title {browser.title!r}")
    if BOOK_TITLE not in browser.title:
        problems.append(f"window title {browser.title!r} lacks the book title")

    sidebars = browser.find_elements(By.CSS_SELECTOR, "nav.bd-docs-nav")
    if not sidebars or not sidebars[0].is_displayed():
        problems.append("the table of contents sidebar is not shown")
    else:
        linked = {
            urldefrag(link.get_attribute("href") or "").url
            for link in sidebars[0].find_elements(By.CSS_SELECTOR, "a.reference.internal")
        }
        unlinked = [other for other in PAGES if f"{book_url}{other}.html" not in linked]
        if unlinked:
            problems.append(f"sidebar has no link to {unlinked}")

    if page.startswith("notebooks/"):  # a chapter; the intro and the reference pages are prose
        outputs = [o for o in browser.find_elements(By.CSS_SELECTOR, "div.cell_output") if o.is_displayed()]
        if not outputs:
            problems.append("a chapter without any rendered cell output (was it executed and saved?)")
        problems += chapter_shape_problems(browser)
    if widgets["rendered"] < widgets["views"]:
        problems.append(f"only {widgets['rendered']} of {widgets['views']} stored widgets rendered")

    if broken_images:
        problems.append(f"broken images: {broken_images}")

    text = browser.execute_script(VISIBLE_TEXT_JS)
    if TRACEBACK in text:
        problems.append(f"the page shows a traceback: {TRACEBACK!r}")
    if TEST_MARKER in text or TEST_MARKER in browser.page_source:
        problems.append(f"the page shows test machinery: {TEST_MARKER!r} (use nbval's cell tags)")
    paths = sorted(set(MACHINE_PATH.findall(text)))
    if paths:
        excerpt = [" ".join(text[max(0, m.start() - 40): m.end() + 40].split()) for m in MACHINE_PATH.finditer(text)][:3]
        problems.append(f"the page shows machine paths {paths}, e.g. {excerpt}")

    problems += network_problems(browser.get_log("performance"), book_url)
    problems += [f"javascript error: {error}" for error in javascript_errors(browser.get_log("browser"))]

    assert not problems, f"{page} ({url}):\n  " + "\n  ".join(problems)
