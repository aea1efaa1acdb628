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

setup: $(STAMP)

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
test-main: $(STAMP) browser
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
