"""The committed record of a SmolLM2 learning run (``scripts/smollm2-learning-run.sh``).

    python -m bench.smollm2_learning runs/smollm2-learning     # -> bench/results/smollm2_learning.json
                                                               #    and bench/results/smollm2_learning/

Reads the run folder the script wrote (``summary.json``, both evaluations, the training run's
``config.json`` and ``metrics.jsonl``) and writes one JSON: the before/after summary, every
training step's metrics, the config, the mica commit and the machine. The evaluations'
transcripts and the HTML credit report are copied beside it, so the replies behind every
number can be read. Nothing is written unless every input is there and readable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_FIELDS = ("step", "pass_rate", "mean_final_distance", "reward_mean", "advantage_std", "loss",
               "clip_frac", "ppo_kl", "entropy", "grad_norm", "lr", "response_tokens_mean",
               "time_rollout", "time_update", "time_step")
COPIED = ("eval_before.jsonl", "eval_after.jsonl", "report.html")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the script's OUT folder (default runs/smollm2-learning)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "smollm2_learning.json"))
    p.add_argument("--note", default="", help="a sentence on how the run was made (load, pauses)")
    return p.parse_args(argv)


def collect(run: str, note: str = "") -> dict:
    """The record of the run in folder ``run``; raises ``SystemExit`` naming a missing part."""
    from bench.measure import machine_info

    def need(*parts):
        path = os.path.join(run, *parts)
        if not os.path.isfile(path):
            raise SystemExit(f"smollm2_learning: error: {path} is missing (run scripts/smollm2-learning-run.sh first)")
        return path

    def read_json(*parts, lines=False):
        path = need(*parts)
        with open(path) as f:
            texts = [t for t in f if t.strip()] if lines else [f.read()]
        try:
            return [json.loads(t) for t in texts] if lines else json.loads(texts[0])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SystemExit(f"smollm2_learning: error: {path} is not valid JSON ({e})") from None

    summary = read_json("summary.json")
    evals = {when: read_json(f"eval_{when}.json") for when in ("before", "after")}
    config = read_json("train", "config.json")
    steps = [{k: rec.get(k) for k in STEP_FIELDS} for rec in read_json("train", "metrics.jsonl", lines=True)
             if isinstance(rec, dict) and "step" in rec and "time_step" in rec]
    for name in COPIED:
        need(name)
    return {"summary": summary, "evaluations": evals, "steps": steps, "config": config,
            "note": note, "machine": machine_info(ROOT)}


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    from mica_core.atomic import atomic_write_json

    record = collect(args.run, args.note)
    folder = os.path.splitext(args.out)[0]
    os.makedirs(folder, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(os.path.join(args.run, name), os.path.join(folder, name))
    atomic_write_json(args.out, record)
    print(f"wrote {args.out} and {folder}/ ({', '.join(COPIED)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
