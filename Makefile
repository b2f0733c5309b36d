# Stable Diffusion from the inside: one Makefile for the book, the tests and the benchmarks.
# Every target sets itself up from nothing: it creates .venv when missing and installs into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WIDGETS_STAMP := book/node_modules/.installed

.PHONY: help venv book test test-latest unit nbval browser lab execute bench tinysd teach dist clean

help:
	@echo "make book     build the HTML book into book/_build/html (offline, from stored outputs)"
	@echo "make test     unit tests, nbval on every notebook, the book build and the browser check"
	@echo "make test-latest  the whole suite in .venv-latest, on the newest releases (one line per chapter)"
	@echo "make lab      open the notebooks in JupyterLab"
	@echo "make execute  re-execute every notebook in place (the only way stored outputs change)"
	@echo "make bench    print the side-by-side CPU benchmark table (sdhelpers.bench)"
	@echo "make tinysd   retrain the shipped TinySD from nothing, measure it, rewrite its model card"
	@echo "make teach    retrain chapter 8's textual inversion and LoRA files and their results.json"
	@echo "make dist     build the sdhelpers wheel, TinySD inside, into dist/ (for use outside the repository)"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

$(WIDGETS_STAMP): book/package.json book/package-lock.json
	cd book && npm ci --no-audit --no-fund --loglevel=error
	touch $@

book: $(STAMP) $(WIDGETS_STAMP)
	rm -rf book/_build
	$(BIN)/jupyter-book build book -W -n --keep-going

unit: $(STAMP)
	$(BIN)/python -m pytest tests

nbval: $(STAMP)
	$(BIN)/python -m pytest notebooks

browser: book
	CI=$${CI:-} $(BIN)/python -m pytest tests/test_book_browser.py

test: book
	$(BIN)/python -m pytest

# The upgrade check: newest releases of requirements.txt's first block in .venv-latest.
# TORCH_INDEX=<url> takes torch from a CPU wheel index instead of pip's default.
test-latest: $(WIDGETS_STAMP)
	rm -rf book/_build
	TORCH_INDEX=$(TORCH_INDEX) $(PYTHON) tests/latest.py

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

execute: $(STAMP)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 --ExecutePreprocessor.store_widget_state=True notebooks/*.ipynb

# Rebuild the shipped TinySD from nothing (about 80 minutes on 2 CPU cores), then measure it and
# rewrite its model card. Checkpoints go to sdhelpers/tinysd.work/; add --resume to continue.
tinysd: $(STAMP)
	$(BIN)/python -m sdhelpers.train all --out sdhelpers/tinysd --threads 2
	$(BIN)/python -m sdhelpers.evaluate --model sdhelpers/tinysd --write

# Chapter 8's fine-tunes (about 10 minutes on 2 CPU cores): each method on a fresh TinySD, saved,
# reloaded with the stock diffusers call and measured into sdhelpers/tinysd_cross/results.json.
teach: $(STAMP)
	$(BIN)/python -m sdhelpers.teach --out sdhelpers/tinysd_cross --threads 2

bench: $(STAMP)
	$(BIN)/python -m sdhelpers.bench

# The wheel for use outside the repository: every module, TinySD (weights and tokenizer), chapter 8's
# fine-tunes and the benchmark runs (pyproject.toml's package-data; tests/test_dist.py checks it).
# build/ goes first: setuptools would package files left there by an earlier build.
dist: $(STAMP)
	rm -rf build dist/sdhelpers-*.whl
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation --no-index -w dist .
	rm -rf build sdhelpers.egg-info
	@ls -l dist/sdhelpers-*.whl

clean:
	rm -rf book/_build .pytest_cache tests/artifacts build dist
