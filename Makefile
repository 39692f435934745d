# Two commands on a fresh machine: `make run` (web UI) and `make test` (lint + tests).
# The virtual environment is created once; requirements are installed again only when
# requirements.txt changes (stamp file).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp
RAY_STAMP := $(VENV)/.requirements-ray.stamp
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.txt)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
ARGS ?=

.PHONY: run test demo lint venv browser-deps

run: $(STAMP)  ## web UI on http://127.0.0.1:7860 (the first generation downloads the weights)
	$(PY) wgp.py $(ARGS)

test: $(STAMP) $(RAY_STAMP) browser-deps  ## ruff + the test suite (CPU; the tests download nothing, setup may install requirements, Ray and chromium)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)  ## self-test generation from the terminal (tiny random model, no download)
	$(PY) wgp.py --selftest $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Without an NVIDIA GPU, torch comes from the CPU wheel index (no multi-GB CUDA libraries).
$(STAMP): requirements.txt | $(PY)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "no NVIDIA GPU found: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --retries 1 --timeout 10; \
	fi
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

# Ray is optional (batch jobs with --ray); the tests use it, `make run` does not install it.
$(RAY_STAMP): requirements-ray.txt | $(STAMP)
	$(PY) -m pip install --quiet -r requirements-ray.txt
	@touch $(RAY_STAMP)

# ---- HOOK for the web UI's browser tests (issue 6) ---------------------------------------------
# Playwright drives Debian's Chromium. This installs it when browser tests exist and it is missing
# (root + apt-get needed); otherwise it says why and the browser tests skip themselves.
BROWSER_TESTS := $(wildcard tests/test_web_browser*.py tests/browser/*.py)
browser-deps:
ifneq ($(strip $(BROWSER_TESTS)),)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		|| echo "browser-deps: could not install chromium; browser tests will be skipped"; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		|| echo "browser-deps: could not install chromium; browser tests will be skipped"; \
	else echo "browser-deps: chromium missing (sudo apt-get install chromium); browser tests will be skipped"; fi
else
	@:
endif
