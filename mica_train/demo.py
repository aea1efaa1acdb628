"""The end-to-end demo (``make demo``): tiny model, warm start, a short MICA run, before/after.

    python -m mica_train.demo [--out runs/demo] [--config demo] [steps=20 ...]

1. build the tiny offline model and tokenizer (``OUT/tiny-base``);
2. supervised warm start on generated replies of all three kinds (``OUT/tiny-warm``);
3. evaluate on the fixed 30-scenario evaluation set (pass rate before; ``OUT/eval_before.jsonl``);
4. train a LoRA adapter with PPO-clip on MICA advantages against the embedded simulator,
   saving the rollouts of every 10th step with their credit (``OUT/train/transcripts/``);
5. evaluate again (pass rate after; ``OUT/eval_after.jsonl``), write ``OUT/summary.json``,
   ``OUT/learning_curves.png`` and the credit report ``OUT/report.html`` (``mica report``).

Every stage is deterministic by seed; the training run starts afresh each time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

__all__ = ["main", "run_demo"]

DEFAULT_CONFIG = "demo"  # packaged with mica_train (mica_train/configs/demo.yaml)


def _time_split(records: list[dict]) -> dict:
    """Mean seconds and shares of rollout / advantage / update over the steps (the first step
    excluded when there are several: it pays one-off warm-up costs)."""
    rows = records[1:] if len(records) > 1 else records
    if not rows:
        return {}
    out = {}
    total = sum(r["time_step"] for r in rows) / len(rows)
    for part in ("rollout", "advantage", "update"):
        sec = sum(r[f"time_{part}"] for r in rows) / len(rows)
        out[part] = {"seconds": sec, "percent": 100.0 * sec / total if total else 0.0}
    out["step_seconds"] = total
    out["steps_measured"] = len(rows)
    return out


def run_demo(out: str | Path = "runs/demo", config: str | Path | None = None, overrides: list[str] | None = None,
             warm_start_steps: int = 400, progress: bool = True) -> dict:
    import torch

    from .config import load_config
    from .metrics import plot_learning_curves
    from .report import write_report
    from .tiny import TinyModelConfig, write_tiny_model
    from .trainer import Trainer, evaluate
    from .warmstart import WarmStartConfig, corpus_texts, generate_corpus, warm_start

    t_start = time.perf_counter()
    out = Path(out)
    base_dir, warm_dir, run_dir = out / "tiny-base", out / "tiny-warm", out / "train"
    cfg = load_config(config or DEFAULT_CONFIG, [f"model.path={warm_dir}", f"run_dir={run_dir}", *(overrides or [])])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    stages: dict[str, float] = {}

    def say(msg: str) -> None:
        print(f"[demo {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    t = time.perf_counter()
    say("building the tiny model and tokenizer")
    examples = generate_corpus(200, seed=cfg.seed, context_messages=cfg.rollout.context_messages,
                               context_replies=cfg.rollout.context_replies)
    write_tiny_model(base_dir, corpus_texts(examples), TinyModelConfig(seed=cfg.seed))
    stages["tiny_model"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"warm start ({warm_start_steps} supervised steps on replies of all three kinds)")
    ws = warm_start(
        base_dir, warm_dir,
        WarmStartConfig(steps=warm_start_steps, seed=cfg.seed, context_messages=cfg.rollout.context_messages,
                        context_replies=cfg.rollout.context_replies),
        progress=progress,
    )
    stages["warm_start"] = time.perf_counter() - t

    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    trainer = Trainer(cfg)
    t = time.perf_counter()
    n_eval = 30 * cfg.eval.episodes_per_scenario
    say(f"evaluating before training ({n_eval} episodes, up to {cfg.eval.max_turns or cfg.env.max_turns} turns)")
    before = evaluate(trainer.policy, cfg, transcripts=out / "eval_before.jsonl", progress=progress)
    stages["eval_before"] = time.perf_counter() - t
    say(f"pass rate before: {before['pass_rate']:.3f} (mean final distance {before['mean_final_distance']:.2f})")

    t = time.perf_counter()
    say(f"training {cfg.steps} steps ({cfg.data.scenarios_per_step} scenarios x {cfg.data.group_size} rollouts, "
        f"estimator {cfg.advantage.estimator})")
    trainer.train()
    stages["train"] = time.perf_counter() - t

    t = time.perf_counter()
    after = evaluate(trainer.policy, cfg, transcripts=out / "eval_after.jsonl", progress=progress)
    stages["eval_after"] = time.perf_counter() - t
    say(f"pass rate after:  {after['pass_rate']:.3f} (mean final distance {after['mean_final_distance']:.2f})")

    records = list(trainer.logger.records) if trainer.logger is not None else []
    if records:
        # The evaluations before and after training go on the same figure.
        curves = records + [{"step": records[0]["step"] - 1, "eval_pass_rate": before["pass_rate"]}]
        if "eval_pass_rate" not in records[-1]:
            curves.append({"step": records[-1]["step"], "eval_pass_rate": after["pass_rate"]})
        curves.sort(key=lambda r: r["step"])
        plot_learning_curves(curves, out / "learning_curves.png", title="mica demo: MICA on the tiny policy")
    else:
        curves = []
    report = write_report(run_dir, out / "report.html", records=curves,
                          transcripts=[out / "eval_before.jsonl", out / "eval_after.jsonl"],
                          title="mica demo: MICA on the tiny policy (runs/demo)")
    split = _time_split(records)
    seconds = time.perf_counter() - t_start
    summary = {
        "pass_rate_before": before["pass_rate"],
        "pass_rate_after": after["pass_rate"],
        "mean_final_distance_before": before["mean_final_distance"],
        "mean_final_distance_after": after["mean_final_distance"],
        "eval_episodes": before["n"],
        "eval_max_turns": cfg.eval.max_turns or cfg.env.max_turns,
        "steps": trainer.step,
        "seconds": seconds,
        "stage_seconds": stages,
        "time_split": split,
        "estimator": cfg.advantage.estimator,
        "train_pass_rate_last": records[-1]["pass_rate"] if records else None,
        "warm_start": {k: ws[k] for k in ("steps", "loss_first", "loss_last", "seconds")},
        "plot": str(out / "learning_curves.png"),
        "report": str(report),
        "transcripts": sorted(str(p) for p in (run_dir / "transcripts").glob("*.jsonl"))
        + [str(out / "eval_before.jsonl"), str(out / "eval_after.jsonl")],
        "run_dir": str(run_dir),
        "command": "python -m mica_train.demo",
    }
    from mica_core.atomic import atomic_write_json

    atomic_write_json(out / "summary.json", summary)
    if split:
        say(
            "time split per step: "
            + ", ".join(f"{k} {split[k]['seconds']:.3f}s ({split[k]['percent']:.2f}%)"
                        for k in ("rollout", "advantage", "update"))
        )
    say(f"done in {seconds:.0f}s: pass rate {before['pass_rate']:.3f} -> {after['pass_rate']:.3f}; "
        f"wrote {out / 'summary.json'}, {out / 'learning_curves.png'} and {report}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from .config import add_config_arguments, overrides_from_args

    p = argparse.ArgumentParser(prog="python -m mica_train.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory")
    add_config_arguments(p, default=DEFAULT_CONFIG)
    p.add_argument("--warm-start-steps", type=int, default=400)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)
    overrides = overrides_from_args(args) + (["progress=false"] if args.no_progress else [])
    from mica_core import MicaInputError

    from .config import load_config

    try:  # a bad config is one line, before any work
        load_config(args.config or DEFAULT_CONFIG, overrides)
    except MicaInputError as exc:
        print(f"mica demo: error: {exc}", file=sys.stderr)
        return 2
    from .trainer import JudgeFailureStop, TrainingDiverged

    try:
        summary = run_demo(args.out, args.config, overrides, args.warm_start_steps,
                           progress=not args.no_progress)
    except (JudgeFailureStop, TrainingDiverged) as exc:  # a stop the trainer explains in one line
        print(f"mica demo: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("pass_rate_before", "pass_rate_after", "steps", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
