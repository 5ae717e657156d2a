# regdiff — the two commands a fresh machine needs are `make book` and `make test`.
#
#   make book        venv + install, download data, run every notebook (profile ci), build _build/html
#   make test        venv + install, lint, unit tests, run every notebook (profile ci), build with -W
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

ifneq ($(REGDIFF_DATA_URL),)
WITH_DATA :=
else ifneq ($(wildcard $(MIRROR)/lms_validation_cropped.pth),)
WITH_DATA := $(PY) -m data_download.mirror $(MIRROR) --
else
WITH_DATA :=
endif

.PHONY: install lint unit notebooks pages html book test gpu-check gpu-book smoke clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[book,dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check regdiff_core data_download tests notebooks
	$(VENV)/bin/ruff format --check regdiff_core data_download tests notebooks

unit: install
	$(VENV)/bin/pytest -q

notebooks: install
	$(WITH_DATA) $(PY) -m regdiff_core.runbook --profile $(PROFILE) --device $(DEVICE) \
		--data-dir $(DATA_DIR) --work-dir $(WORK_DIR) --out book/chapters

pages: install
	$(PY) -m regdiff_core.bookpages book/chapters

html: install pages
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going

book: notebooks html
	@echo "book: open _build/html/index.html"

# CI: a fresh work folder, so every chapter trains from scratch.
test: lint unit
	rm -rf _build/test-work
	$(MAKE) notebooks html WORK_DIR=_build/test-work PROFILE=ci

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
