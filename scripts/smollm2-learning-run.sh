#!/usr/bin/env bash
# The measured learning run of SmolLM2-135M-Instruct on the embedded simulator
# (docs/training.md, "A real chat model: SmolLM2"): evaluate the base model, train with the
# packaged smollm2 config, evaluate the trained adapter, write the credit report and one
# summary JSON (pass rate, mean final distance, reply length, acts per reply, before/after).
#
#   scripts/smollm2-learning-run.sh                         # -> runs/smollm2-learning/
#   STEPS=1 EVAL_TURNS=1 OUT=/tmp/smoke scripts/smollm2-learning-run.sh   # a smoke check
#
# Environment: PY (default .venv/bin/python), OUT (run folder), MODEL (converted model,
# default runs/models/smollm2; made with `mica model get` when missing), STEPS (training
# steps, default the config's 12, about 90 minutes in all on 2 idle cores: see the docs),
# EVAL_TURNS (turns per evaluation episode, default the config's 15), plus any
# KEY=VALUE arguments, passed to train and both evaluations.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/smollm2-learning}
MODEL=${MODEL:-runs/models/smollm2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

if [ -e "$OUT/train" ]; then
    echo "smollm2-learning-run: error: $OUT/train exists (a finished or running run); choose another OUT" >&2
    exit 2
fi
if [ ! -f "$MODEL/config.json" ]; then
    "$PY" -m mica_train.models get smollm2 --out "$MODEL"
fi
common=(--config smollm2 "model.path=$MODEL" "run_dir=$OUT/train")
[ -n "${STEPS:-}" ] && common+=("steps=$STEPS")
[ -n "${EVAL_TURNS:-}" ] && common+=("eval.max_turns=$EVAL_TURNS")
common+=("$@")
mkdir -p "$OUT"
start=$(date +%s)

"$PY" -m mica_train.cli eval "${common[@]}" --checkpoint base --out "$OUT/eval_before.json" \
    --transcripts "$OUT/eval_before.jsonl"
"$PY" -m mica_train.cli train "${common[@]}"
"$PY" -m mica_train.cli eval "${common[@]}" --checkpoint latest --out "$OUT/eval_after.json" \
    --transcripts "$OUT/eval_after.jsonl"
"$PY" -m mica_train.report "$OUT/train" --transcripts "$OUT/eval_before.jsonl" \
    --transcripts "$OUT/eval_after.jsonl" --out "$OUT/report.html"

OUT="$OUT" SECONDS_TAKEN=$(( $(date +%s) - start )) "$PY" - <<'EOF'
import json, os
from mica_core.atomic import atomic_write_json
from mica_train.env.acts import detect_acts
from mica_train.transcripts import read_transcripts

out = os.environ["OUT"]
summary = {"seconds": int(os.environ["SECONDS_TAKEN"])}
for when in ("before", "after"):
    metrics = json.load(open(os.path.join(out, f"eval_{when}.json")))
    replies = [t["reply"] for ep in read_transcripts(os.path.join(out, f"eval_{when}.jsonl"))
               for t in ep["turns"]]
    summary[when] = {
        "episodes": metrics["n"], "pass_rate": metrics["pass_rate"],
        "mean_final_distance": metrics["mean_final_distance"], "mean_turns": metrics["mean_turns"],
        "replies": len(replies),
        "mean_reply_words": sum(len(r.split()) for r in replies) / max(len(replies), 1),
        "mean_acts_per_reply": sum(len(detect_acts(r)) for r in replies) / max(len(replies), 1),
        "weights": metrics["weights"],
    }
atomic_write_json(os.path.join(out, "summary.json"), summary)
print(json.dumps(summary, indent=2))
EOF
