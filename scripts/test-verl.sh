#!/usr/bin/env bash
# Runs mica's verl integration tests (and the CPU half of examples/verl_multiturn) against the real verl package in its own virtual
# environment, .venv-verl (verl pins transformers < 5.11, which the main .venv does not).
#
#   bash scripts/test-verl.sh            # create or update .venv-verl, then run the tests
#   bash scripts/test-verl.sh -k grpo    # extra arguments go to pytest
#
# The environment is (re)installed only when requirements/verl.txt, pyproject.toml,
# setup.py or the kernels changed since the last install (a stamp file records a hash).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${MICA_VERL_VENV:-.venv-verl}"  # override to keep several environments
PY="$VENV/bin/python"
STAMP="$VENV/.mica-verl-installed"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
# verl imports ray; keep ray from phoning home or starting a dashboard during imports.
export RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=disabled

want="$(cat requirements/verl.txt pyproject.toml setup.py kernels/*.pyx | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
    start=$(date +%s)
    test -x "$PY" || "$PYTHON" -m venv "$VENV"
    # (the grep drops pip's notes about this machine's local package mirrors)
    "$PY" -m pip install -q -r requirements/verl.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
    # mica itself, editable, compiled against this environment's numpy.
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    echo "$want" > "$STAMP"
    echo "test-verl: $VENV installed in $(( $(date +%s) - start )) s"
fi

"$PY" -c "import verl, torch, mica_core; print('test-verl: verl', verl.__version__, '| torch', torch.__version__)"
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_verl_integration.py tests/test_verl_example.py \
    tests/test_verl_adapters.py "$@"
