"""The upgrade check: the whole suite on the newest releases of the book's direct dependencies.

Why: `requirements.txt` pins what the book is tested with, but readers install whatever is new,
and library drift is the commonest way a tutorial breaks. This builds a separate venv
(`.venv-latest`) with the newest release of each package in the first block of
`requirements.txt`, builds the book and runs the whole suite there, then prints one line per
chapter: passed, or the first failing cell and its error.

Run it with `make test-latest` (not part of `make test` or CI). torch comes from pip's own
configuration, so on Linux plain PyPI gives a CUDA build that also runs on the CPU; pass
``TORCH_INDEX=<url of a CPU wheel index>`` to take CPU builds from that index instead.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements.txt"
VENV = REPO / ".venv-latest"
REPORT = REPO / "tests" / "artifacts" / "latest.xml"


def direct_dependencies(requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """Name -> pinned version for the first block of requirements.txt (what the book imports)."""
    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            if pins and "pull in" in line:  # the second block: transitive pins
                break
            continue
        if line:
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def run(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, command)), flush=True)
    return subprocess.run([str(c) for c in command], cwd=REPO, **kwargs)


def build_venv(torch_index: str | None) -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", VENV, check=True)
    pip = [python, "-m", "pip", "install", "--quiet", "--upgrade"]
    run(*pip, "pip", check=True)
    torch = ["torch"] + (["--index-url", torch_index] if torch_index else [])
    run(*pip, *torch, check=True)
    others = [name for name in direct_dependencies() if name != "torch"]
    run(*pip, *others, check=True)
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", ".", check=True)
    return python


def installed_versions(python: Path, names) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout)


def first_line(text: str | None) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^\w*(Error|Exception)\b|^E\s", line)]
    return (errors or lines or ["(no message)"])[-1 if errors else 0][:200]


def verdicts(report: Path) -> dict[str, str]:
    """One verdict per notebook (and one for the unit tests) from pytest's junit XML."""
    cases = defaultdict(list)
    for case in ET.parse(report).iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/")
        if file.endswith(".ipynb"):
            name = Path(file).name
        else:
            name = "browser check" if "test_book_browser" in file else "unit tests"
        cases[name].append(case)
    result = {}
    for name, items in sorted(cases.items()):
        failed = [c for c in items if c.find("failure") is not None or c.find("error") is not None]
        if not failed:
            result[name] = f"passed ({len(items)} tests)"
            continue
        bad = failed[0]
        problem = bad.find("failure") if bad.find("failure") is not None else bad.find("error")
        detail = first_line(problem.get("message", "") + "\n" + (problem.text or ""))
        result[name] = f"FAILED at {bad.get('name')} ({len(failed)} of {len(items)}): {detail}"
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-index", default=os.environ.get("TORCH_INDEX") or None)
    args = parser.parse_args(argv)

    python = build_venv(args.torch_index)
    pins = direct_dependencies()
    found = installed_versions(python, pins)
    print("\nnewest releases found (pinned in requirements.txt):")
    for name, version in found.items():
        mark = "" if version == pins[name] else "   <- newer than the pin"
        print(f"  {name:<14} {version:<16} ({pins[name]}){mark}")

    book = run(VENV / "bin" / "jupyter-book", "build", "book", "-W", "-n", "--keep-going",
               capture_output=True, text=True)
    print(book.stdout[-2000:], book.stderr[-2000:], sep="\n")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    run(python, "-m", "pytest", "-q", f"--junitxml={REPORT}", "-o", "junit_family=xunit1")

    print("\nverdict with the newest releases:")
    book_verdict = "passed" if book.returncode == 0 else f"FAILED: {first_line(book.stderr or book.stdout)}"
    print(f"  {'book build':<34} {book_verdict}")
    results = verdicts(REPORT)
    for name, verdict in results.items():
        print(f"  {name:<34} {verdict}")
    ok = book.returncode == 0 and all(v.startswith("passed") for v in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
