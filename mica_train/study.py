"""The credit-assignment study (``mica study``): every estimator trains the same warm-started tiny
policy at the same rollout budget over several seeds, then plays the evaluation scenario set.

    mica study                                 # the full study (docs/study.md)
    mica study --quick                         # a smoke run for CI (writes to runs/study-quick)
    mica study --seeds 3 --estimators mica,grpo --steps 8 --set optim.lr=1e-3

Stages:

1. build the tiny model and warm-start it once (``WORK/tiny-warm``): every run starts from these
   weights;
2. evaluate the warm start (``WORK/before.json``);
3. one training run per (estimator, seed) in ``WORK/runs/<estimator>/seed<k>``, ``--workers``
   processes in parallel (one torch thread each). A run is ``Trainer(cfg).train()`` on the study
   config (``configs/study.yaml`` plus ``--set``), then ``evaluate`` on the 30 evaluation
   scenarios; its ``result.json`` holds the evaluation metrics and the per-step learning curve;
4. ``OUT/study.json`` (per estimator: pass rate per seed, mean and standard deviation, mean
   final distance, the EPM-style metrics, the paired difference to ``mica`` per seed, mean
   learning curves) and the learning-curve figure.

Only the estimator differs between the runs of one seed: the warm start, the LoRA
initialisation, the scenario order, the environment seeds, the minibatch order and the
evaluation episodes' seeds are the same (sampled replies differ once the policies do). The seed
changes everything random in training. A run whose ``result.json`` exists for the same settings is
not run again, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "ESTIMATORS",
    "QUICK_OVERRIDES",
    "StudyPlan",
    "format_table",
    "main",
    "make_plan",
    "plot_study_curves",
    "run_study",
    "summarize",
]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "study.yaml"

# The paper's comparison, in the order of the tables.
ESTIMATORS = (
    "mica",
    "mica_turn",
    "mica_group",
    "mica_adr",
    "mapo",
    "grpo",
    "reinforce_pp",
    "reinforce_pp_idr",
)

# Metrics of the evaluation episodes reported per estimator (EMPA-style, aggregate_metrics).
EVAL_METRICS = (
    "pass_rate",
    "mean_final_distance",
    "mean_energy",
    "mean_positive_energy_ratio",
    "mean_turns",
)

# Per-step training metrics kept in each run's learning curve.
CURVE_KEYS = (
    "pass_rate",
    "mean_final_distance",
    "reward_mean",
    "mean_turns",
    "advantage_std",
    "clip_frac",
    "entropy",
    "grad_norm",
    "time_step",
)

# --quick: seconds-long runs that exercise every stage (sizes only; not a result).
QUICK_OVERRIDES = (
    "steps=1",
    "data.scenarios_per_step=2",
    "data.group_size=2",
    "env.max_turns=4",
    "env.min_turns=3",
    "rollout.max_new_tokens=8",
    "optim.minibatches=1",
    "eval.episodes_per_scenario=1",
    "eval.max_turns=4",
)
QUICK_SEEDS = 2
QUICK_WARM_START_STEPS = 20
QUICK_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
QUICK_CORPUS_EPISODES = 12
# The credit diagnostic (study_credit.py): cards x rollouts per seed.
CREDIT_SIZE = (64, 8)
QUICK_CREDIT_SIZE = (6, 4)


def _say(t0: float, msg: str) -> None:
    print(f"[study {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


# Bumped when a run's result.json changes shape: older results are then run again.
RESULT_VERSION = 2


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- the plan
class StudyPlan:
    """Everything a study run needs, resolved from the command line (no torch import)."""

    def __init__(self, *, estimators, seeds, config, overrides, work, out, plot, workers, threads,
                 warm_start_steps, tiny, corpus_episodes, quick, command):
        self.estimators = list(estimators)
        self.seeds = list(seeds)
        self.config = str(config)
        self.overrides = list(overrides)
        self.work = Path(work)
        self.out = Path(out)
        self.plot = Path(plot) if plot else None
        self.workers = int(workers)
        self.threads = int(threads)
        self.warm_start_steps = int(warm_start_steps)
        self.tiny = dict(tiny)
        self.corpus_episodes = int(corpus_episodes)
        self.quick = bool(quick)
        self.command = command

    @property
    def warm_dir(self) -> Path:
        return self.work / "tiny-warm"

    @property
    def base_dir(self) -> Path:
        return self.work / "tiny-base"

    def run_dir(self, estimator: str, seed: int) -> Path:
        return self.work / "runs" / estimator / f"seed{seed}"

    def run_overrides(self, estimator: str | None, seed: int) -> list[str]:
        out = [*self.overrides, f"model.path={self.warm_dir}", f"seed={seed}", f"threads={self.threads}"]
        if estimator is not None:
            out += [f"advantage.estimator={estimator}", f"run_dir={self.run_dir(estimator, seed)}"]
        return out

    def load(self, estimator: str | None = None, seed: int = 0):
        from .config import load_config

        return load_config(self.config, self.run_overrides(estimator, seed))

    def warm_spec(self) -> dict:
        cfg = self.load()
        return {
            "warm_start_steps": self.warm_start_steps,
            "seed": 0,
            "tiny": self.tiny,
            "corpus_episodes": self.corpus_episodes,
            "context_messages": cfg.rollout.context_messages,
        }

    def run_fingerprint(self, estimator: str | None, seed: int) -> str:
        from .config import config_to_dict

        cfg = config_to_dict(self.load(estimator, seed))
        cfg.pop("run_dir", None)
        cfg.pop("threads", None)
        if estimator is None:  # the warm-start evaluation: only the policy and the evaluation matter
            cfg = {k: cfg[k] for k in ("model", "lora", "env", "rollout", "eval")}
        return _fingerprint({"config": cfg, "warm": self.warm_spec(), "version": RESULT_VERSION})

    def settings(self) -> dict:
        from .config import config_to_dict

        cfg = self.load(self.estimators[0] if self.estimators else None, self.seeds[0] if self.seeds else 0)
        d = config_to_dict(cfg)
        for k in ("run_dir", "seed"):
            d.pop(k, None)
        d["advantage"].pop("estimator", None)
        episodes = cfg.data.scenarios_per_step * cfg.data.group_size
        return {
            "estimators": self.estimators,
            "seeds": self.seeds,
            "steps": cfg.steps,
            "scenarios_per_step": cfg.data.scenarios_per_step,
            "group_size": cfg.data.group_size,
            "episodes_per_step": episodes,
            "episodes_per_run": episodes * cfg.steps,
            "train_max_turns": cfg.env.max_turns,
            "train_min_turns": cfg.env.min_turns,
            "eval_scenarios": 30,
            "eval_episodes_per_scenario": cfg.eval.episodes_per_scenario,
            "eval_episodes": 30 * cfg.eval.episodes_per_scenario,
            "eval_max_turns": cfg.eval.max_turns or cfg.env.max_turns,
            "eval_temperature": cfg.eval.temperature,
            "eval_seed": cfg.eval.seed,
            "lr": cfg.optim.lr,
            "warm_start_steps": self.warm_start_steps,
            "tiny_model": self.tiny or "defaults",
            "workers": self.workers,
            "threads_per_worker": self.threads,
            "config_file": os.path.relpath(self.config, ROOT) if Path(self.config).is_absolute() else self.config,
            "overrides": self.overrides,
            "quick": self.quick,
            "config": d,
        }


def make_plan(args: argparse.Namespace) -> StudyPlan:
    import mica_core as mc

    known = mc.list_estimators()
    estimators = [e.strip() for e in (args.estimators or ",".join(ESTIMATORS)).split(",") if e.strip()]
    unknown = [e for e in estimators if e not in known]
    if unknown:
        raise SystemExit(f"mica study: unknown estimator(s) {unknown}; known: {known}")
    if len(set(estimators)) != len(estimators):
        raise SystemExit("mica study: --estimators lists a name twice")
    n_seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 5)
    if n_seeds < 1:
        raise SystemExit("mica study: --seeds must be >= 1")
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    overrides += args.overrides
    work = args.work or ("runs/study-quick" if args.quick else "runs/study")
    out = args.out or ("runs/study-quick" if args.quick else "bench/results")
    plot = args.plot if args.plot is not None else (
        str(Path(out) / "study_curves.png") if args.quick else "docs/study_curves.png")
    warm = args.warm_start_steps if args.warm_start_steps is not None else (
        QUICK_WARM_START_STEPS if args.quick else 400)
    plan = StudyPlan(
        estimators=estimators,
        seeds=list(range(args.first_seed, args.first_seed + n_seeds)),
        config=args.config or DEFAULT_CONFIG,
        overrides=overrides,
        work=work,
        out=out,
        plot=plot or None,
        workers=max(1, args.workers),
        threads=args.threads,
        warm_start_steps=warm,
        tiny=QUICK_TINY if args.quick else {},
        corpus_episodes=QUICK_CORPUS_EPISODES if args.quick else 200,
        quick=args.quick,
        command=args.command or "mica study",
    )
    plan.load()  # a bad --config / --set fails here, before any work
    return plan


# ------------------------------------------------------------------------ stages
def prepare_warm_start(plan: StudyPlan, t0: float) -> dict:
    """Build and warm-start the tiny model once; reuse it when its settings are unchanged."""
    from mica_core.atomic import atomic_write_json
    from .tiny import TinyModelConfig, write_tiny_model
    from .warmstart import WarmStartConfig, corpus_texts, generate_corpus, warm_start

    spec = plan.warm_spec()
    spec_path = plan.work / "warm_spec.json"
    summary_path = plan.warm_dir / "warm_start.json"
    if _read_json(spec_path) == spec and summary_path.is_file():
        _say(t0, f"reusing the warm start in {plan.warm_dir}")
        return json.loads(summary_path.read_text())
    _say(t0, f"building the tiny model and warm-starting it ({plan.warm_start_steps} supervised steps)")
    examples = generate_corpus(plan.corpus_episodes, seed=spec["seed"], context_messages=spec["context_messages"])
    write_tiny_model(plan.base_dir, corpus_texts(examples), TinyModelConfig(seed=spec["seed"], **plan.tiny))
    summary = warm_start(
        plan.base_dir, plan.warm_dir,
        WarmStartConfig(steps=plan.warm_start_steps, seed=spec["seed"], context_messages=spec["context_messages"],
                        n_episodes=plan.corpus_episodes),
        progress=False,
    )
    atomic_write_json(spec_path, spec)
    return summary


def _init_worker(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    torch.set_num_threads(max(1, threads))


def _curve(records: list[dict]) -> list[dict]:
    return [{"step": int(r["step"]), **{k: r[k] for k in CURVE_KEYS if k in r}} for r in records]


def run_job(job: dict) -> dict:
    """One study job in this process: the warm-start evaluation (``estimator`` None) or a training
    run followed by its evaluation. Writes ``job['result']`` atomically and returns it."""
    _init_worker(job["threads"])
    from mica_core.atomic import atomic_write_json
    from .config import load_config
    from .policy import load_policy, quiet_transformers
    from .study_eval import evaluate_with_behaviour as evaluate
    from .trainer import Trainer

    quiet_transformers()
    cfg = load_config(job["config"], job["overrides"])
    t_start = time.perf_counter()
    c_start = time.process_time()
    result: dict[str, Any] = {"estimator": job["estimator"], "seed": job["seed"], "fingerprint": job["fingerprint"]}
    if job["estimator"] is None:
        policy = load_policy(cfg.model, cfg.lora)
        result["eval"] = evaluate(policy, cfg)
        result["eval_seconds"] = time.perf_counter() - t_start
    else:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # no stale checkpoint: every run starts afresh
        trainer = Trainer(cfg)
        trainer.train()
        t_train = time.perf_counter() - t_start
        records = list(trainer.logger.records) if trainer.logger is not None else []
        t_eval = time.perf_counter()
        result["eval"] = evaluate(trainer.policy, cfg)
        result["eval_seconds"] = time.perf_counter() - t_eval
        result["train_seconds"] = t_train
        result["steps"] = trainer.step
        result["curve"] = _curve(records)
    result["seconds"] = time.perf_counter() - t_start
    result["cpu_seconds"] = time.process_time() - c_start
    atomic_write_json(job["result"], result)
    return result


def plan_jobs(plan: StudyPlan) -> list[dict]:
    """The warm-start evaluation, then the runs seed by seed (so a partial study is balanced)."""
    jobs = []
    before = {"estimator": None, "seed": plan.seeds[0], "result": str(plan.work / "before.json")}
    jobs.append(before)
    for seed in plan.seeds:
        for est in plan.estimators:
            jobs.append({"estimator": est, "seed": seed, "result": str(plan.run_dir(est, seed) / "result.json")})
    for job in jobs:
        job["config"] = plan.config
        job["overrides"] = plan.run_overrides(job["estimator"], job["seed"])
        job["threads"] = plan.threads
        job["fingerprint"] = plan.run_fingerprint(job["estimator"], job["seed"])
    return jobs


def _done(job: dict) -> dict | None:
    res = _read_json(Path(job["result"]))
    if res is not None and res.get("fingerprint") == job["fingerprint"] and "eval" in res:
        return res
    return None


def _describe(res: dict) -> str:
    ev = res["eval"]
    who = "warm start" if res["estimator"] is None else f"{res['estimator']} seed {res['seed']}"
    return (f"{who}: eval pass rate {ev['pass_rate']:.3f}, mean final distance {ev['mean_final_distance']:.2f} "
            f"({res['seconds']:.0f}s)")


def execute(plan: StudyPlan, jobs: list[dict], t0: float) -> dict[str, dict]:
    """Run the jobs that have no current result; returns every result by its file path."""
    results: dict[str, dict] = {}
    todo = []
    for job in jobs:
        res = _done(job)
        if res is None:
            todo.append(job)
        else:
            results[job["result"]] = res
    if len(results):
        _say(t0, f"{len(results)} of {len(jobs)} jobs already done, skipped")
    if not todo:
        return results
    _say(t0, f"running {len(todo)} jobs on {min(plan.workers, len(todo))} worker(s)")
    if plan.workers <= 1 or len(todo) == 1:
        for i, job in enumerate(todo, 1):
            res = run_job(job)
            results[job["result"]] = res
            _say(t0, f"[{i}/{len(todo)}] {_describe(res)}")
        return results
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # no forked torch state; each worker imports its own
    with ProcessPoolExecutor(max_workers=plan.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(plan.threads,)) as pool:
        futures = {pool.submit(run_job, job): job for job in todo}
        pending = set(futures)
        n = 0
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = futures[fut]
                exc = fut.exception()
                if exc is not None:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(
                        f"study job {job['estimator']} seed {job['seed']} failed: {exc!r}"
                    ) from exc
                n += 1
                res = fut.result()
                results[job["result"]] = res
                _say(t0, f"[{n}/{len(todo)}] {_describe(res)}")
    return results


# ------------------------------------------------------------------------ summary
def _stats(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"per_seed": [float(v) for v in values], "mean": mean, "std": std,
            "sem": std / math.sqrt(n) if n else float("nan"), "n": n}


def summarize(plan: StudyPlan, jobs: list[dict], results: dict[str, dict], wall: float,
              warm: dict | None = None, load: dict | None = None) -> dict:
    """The content of ``study.json`` (see the module docstring and docs/study.md)."""
    before = results.get(jobs[0]["result"])
    runs: dict[str, dict[int, dict]] = {e: {} for e in plan.estimators}
    for job in jobs[1:]:
        res = results.get(job["result"])
        if res is not None:
            runs[job["estimator"]][job["seed"]] = res
    settings = plan.settings()
    n_eval = settings["eval_episodes"]
    per_est: dict[str, dict] = {}
    for est in plan.estimators:
        seeds = [s for s in plan.seeds if s in runs[est]]
        evs = [runs[est][s]["eval"] for s in seeds]
        entry: dict[str, Any] = {"seeds": seeds}
        entry["metrics"] = {m: _stats([ev.get(m) for ev in evs]) for m in EVAL_METRICS}
        entry["pass_rate"] = entry["metrics"]["pass_rate"]
        entry["mean_final_distance"] = entry["metrics"]["mean_final_distance"]
        succ = [ev.get("mean_turns_to_success") for ev in evs]
        entry["metrics"]["mean_turns_to_success"] = _stats([s for s in succ if s is not None])
        status: dict[str, float] = {}
        for ev in evs:
            for k, v in ev.get("status_counts", {}).items():
                status[k] = status.get(k, 0.0) + v / max(len(evs), 1)
        entry["status_counts_mean"] = status
        behav = [ev["behaviour"] for ev in evs if "behaviour" in ev]
        if behav:
            entry["behaviour"] = {
                "pacing_agreement": _stats([b["pacing_agreement"] for b in behav]),
                "opening_validation": _stats([b["opening_validation"] for b in behav]),
                "act_shares": {k: _stats([b["act_shares"][k] for b in behav]) for k in behav[0]["act_shares"]},
            }
        # Mean learning curve over the seeds (steps every run of this estimator reached).
        curves = [runs[est][s].get("curve", []) for s in seeds]
        n_steps = min((len(c) for c in curves), default=0)
        curve: dict[str, list] = {"step": [curves[0][i]["step"] for i in range(n_steps)] if curves else []}
        for key in CURVE_KEYS:
            if n_steps and all(key in c[i] for c in curves for i in range(n_steps)):
                curve[f"{key}_mean"] = [sum(c[i][key] for c in curves) / len(curves) for i in range(n_steps)]
        entry["curve"] = curve
        entry["train_seconds_mean"] = _stats([runs[est][s].get("train_seconds") for s in seeds])["mean"]
        entry["run_seconds_mean"] = _stats([runs[est][s].get("seconds") for s in seeds])["mean"]
        per_est[est] = entry
    # Paired by seed: mica minus each other estimator (same seed, same scenarios, same eval seeds).
    ref = "mica" if "mica" in plan.estimators else plan.estimators[0]
    for est in plan.estimators:
        common = [s for s in plan.seeds if s in runs[est] and s in runs[ref]]
        paired = {}
        for m in ("pass_rate", "mean_final_distance"):
            diffs = [runs[ref][s]["eval"][m] - runs[est][s]["eval"][m] for s in common]
            st = _stats(diffs)
            st["seeds"] = common
            if m == "pass_rate":
                st["wins"] = sum(d > 0 for d in diffs)
                st["ties"] = sum(d == 0 for d in diffs)
                st["losses"] = sum(d < 0 for d in diffs)
            paired[m] = st
        per_est[est]["paired_vs_" + ref] = paired
    # Noise at this scale.
    pooled = [per_est[e]["pass_rate"]["std"] ** 2 for e in plan.estimators if per_est[e]["pass_rate"]["n"] > 1]
    mean_pass = [per_est[e]["pass_rate"]["mean"] for e in plan.estimators if per_est[e]["pass_rate"]["n"]]
    p_bar = sum(mean_pass) / len(mean_pass) if mean_pass else float("nan")
    noise = {
        "eval_binomial_sd_at_mean_pass_rate": math.sqrt(p_bar * (1 - p_bar) / n_eval) if mean_pass else None,
        "seed_sd_pass_rate_pooled": math.sqrt(sum(pooled) / len(pooled)) if pooled else None,
        "paired_diff_sd_pass_rate_pooled": (
            math.sqrt(sum(per_est[e][f"paired_vs_{ref}"]["pass_rate"]["std"] ** 2 for e in plan.estimators if e != ref)
                      / max(1, len(plan.estimators) - 1)) if len(plan.estimators) > 1 else None
        ),
        "n_seeds": len(plan.seeds),
        "eval_episodes_per_run": n_eval,
    }
    ranking = sorted(
        (e for e in plan.estimators if per_est[e]["pass_rate"]["n"]),
        key=lambda e: (-per_est[e]["pass_rate"]["mean"], per_est[e]["mean_final_distance"]["mean"]),
    )
    n_done = sum(len(runs[e]) for e in plan.estimators)
    return {
        "command": plan.command,
        "complete": n_done == len(plan.estimators) * len(plan.seeds) and before is not None,
        "runs_done": n_done,
        "runs_planned": len(plan.estimators) * len(plan.seeds),
        "wall_seconds": wall,
        "run_seconds_total": sum(r.get("seconds", 0.0) for r in results.values()),
        "run_cpu_seconds_total": sum(r.get("cpu_seconds", 0.0) for r in results.values()),
        "load_average": load,
        "settings": settings,
        "warm_start": {k: warm.get(k) for k in ("steps", "loss_first", "loss_last", "seconds")} if warm else None,
        "before": {m: before["eval"].get(m) for m in (*EVAL_METRICS, "n", "behaviour")} if before else None,
        "reference": ref,
        "estimators": per_est,
        "ranking_by_pass_rate": ranking,
        "noise": noise,
    }


def credit_summary(plan: StudyPlan) -> dict:
    """The training-free credit diagnostic (study_credit.py), one rollout set per study seed,
    at the training turn limits."""
    from .study_credit import credit_diagnostic

    cfg = plan.load()
    n_scen, group = QUICK_CREDIT_SIZE if plan.quick else CREDIT_SIZE
    per_seed = [credit_diagnostic(plan.estimators, n_scen, group, seed, cfg.env.max_turns, cfg.env.min_turns)
                for seed in plan.seeds]
    out = {k: v for k, v in per_seed[0].items() if k not in ("estimators", "seed", "turns", "good_share")}
    out["seeds"] = list(plan.seeds)
    out["turns_per_seed"] = [d["turns"] for d in per_seed]
    out["good_share_per_seed"] = [d["good_share"] for d in per_seed]
    ref = "mica" if "mica" in plan.estimators else plan.estimators[0]
    out["estimators"] = {}
    for est in plan.estimators:
        aucs = [d["estimators"][est]["auc"] for d in per_seed]
        out["estimators"][est] = {
            "auc": _stats(aucs),
            "effect": _stats([d["estimators"][est]["effect"] for d in per_seed]),
            f"auc_{ref}_minus_it": _stats([d["estimators"][ref]["auc"] - a for d, a in zip(per_seed, aucs)]),
        }
    return out


def format_credit_table(credit: dict, ref: str = "mica") -> str:
    """The credit diagnostic as Markdown."""
    lines = [f"| estimator | AUC (mean ± sd over seeds) | effect size | {ref} AUC − it (mean ± sd) |",
             "|---|---|---|---|"]
    for est, e in credit["estimators"].items():
        d = e.get(f"auc_{ref}_minus_it")
        paired = "" if est == ref or d is None else f"{d['mean']:+.3f} ± {d['std']:.3f}"
        lines.append(f"| `{est}` | {e['auc']['mean']:.3f} ± {e['auc']['std']:.3f} | "
                     f"{e['effect']['mean']:+.3f} | {paired} |")
    return "\n".join(lines)


def format_behaviour_table(study: dict) -> str:
    """What the evaluated policies do (study_eval.py), means over the seeds, as Markdown."""
    lines = ["| estimator | pacing agreement | opening validation | validate | reframe | plan | several acts | no act |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(f"`{e}`", v.get("behaviour")) for e, v in study["estimators"].items()]
    before = (study.get("before") or {}).get("behaviour")
    if before:
        rows.append(("warm start (no RL)", {
            "pacing_agreement": {"mean": before["pacing_agreement"], "std": 0.0},
            "opening_validation": {"mean": before["opening_validation"]},
            "act_shares": {k: {"mean": v} for k, v in before["act_shares"].items()},
        }))
    for name, b in rows:
        if not b:
            continue
        a = b["act_shares"]
        lines.append(
            f"| {name} | {b['pacing_agreement']['mean']:.3f} ± {b['pacing_agreement']['std']:.3f} | "
            f"{b['opening_validation']['mean']:.3f} | "
            + " | ".join(f"{a[k]['mean']:.3f}" for k in ("validate", "reframe", "plan", "multiple", "none")) + " |"
        )
    return "\n".join(lines)


def format_table(study: dict) -> str:
    """The results table as Markdown (what docs/study.md shows)."""
    ref = study["reference"]
    lines = [
        f"| estimator | pass rate (mean ± sd) | per seed | mean final distance | energy | positive-energy ratio | turns | {ref} − it (pass, mean ± sd) | {ref} wins/ties/losses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for est, e in study["estimators"].items():
        m = e["metrics"]
        p = e[f"paired_vs_{ref}"]["pass_rate"]
        per_seed = " ".join(f"{v:.2f}" for v in e["pass_rate"]["per_seed"])
        paired = "" if est == ref else f"{p['mean']:+.3f} ± {p['std']:.3f}"
        wtl = "" if est == ref else f"{p['wins']}/{p['ties']}/{p['losses']}"
        lines.append(
            f"| `{est}` | {m['pass_rate']['mean']:.3f} ± {m['pass_rate']['std']:.3f} | {per_seed} | "
            f"{m['mean_final_distance']['mean']:.2f} ± {m['mean_final_distance']['std']:.2f} | "
            f"{m['mean_energy']['mean']:.1f} | {m['mean_positive_energy_ratio']['mean']:.3f} | "
            f"{m['mean_turns']['mean']:.1f} | {paired} | {wtl} |"
        )
    b = study.get("before")
    if b:
        lines.append(
            f"| warm start (no RL) | {b['pass_rate']:.3f} | | {b['mean_final_distance']:.2f} | "
            f"{b['mean_energy']:.1f} | {b['mean_positive_energy_ratio']:.3f} | {b['mean_turns']:.1f} | | |"
        )
    return "\n".join(lines)


def plot_study_curves(study: dict, out_png: str | Path) -> Path | None:
    """Mean learning curves per estimator (training rollouts) and the final evaluation pass rates."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from mica_core.atomic import atomic_path

    ests = [e for e, v in study["estimators"].items() if v["curve"].get("step")]
    if not ests:
        return None
    credit = study.get("credit_diagnostic")
    fig, axes = plt.subplots(1, 4 if credit else 3, figsize=(17 if credit else 13, 3.6))
    cmap = plt.get_cmap("tab10")
    for i, est in enumerate(ests):
        c = study["estimators"][est]["curve"]
        style = {"color": cmap(i % 10), "lw": 2.2 if est == "mica" else 1.2, "label": est}
        if "pass_rate_mean" in c:
            axes[0].plot(c["step"], c["pass_rate_mean"], **style)
        if "mean_final_distance_mean" in c:
            axes[1].plot(c["step"], c["mean_final_distance_mean"], **style)
    axes[0].set_title("training pass rate (mean over seeds)", fontsize=9)
    axes[1].set_title("training mean final distance (mean over seeds)", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax = axes[2]
    all_ests = list(study["estimators"])
    for i, est in enumerate(all_ests):
        pr = study["estimators"][est]["pass_rate"]
        vals = [v for v in pr["per_seed"] if v is not None]
        ax.scatter([i] * len(vals), vals, s=12, color=cmap(i % 10), alpha=0.6)
        ax.errorbar([i], [pr["mean"]], yerr=[pr["std"]], fmt="o", color="black", ms=4, capsize=3)
    if study.get("before"):
        ax.axhline(study["before"]["pass_rate"], color="gray", ls="--", lw=1, label="warm start")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks(range(len(all_ests)))
    ax.set_xticklabels(all_ests, rotation=40, ha="right", fontsize=7)
    ax.set_title("evaluation pass rate (seeds, mean ± sd)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(labelsize=7)
    if credit:
        ax = axes[3]
        names = list(credit["estimators"])
        means = [credit["estimators"][e]["auc"]["mean"] for e in names]
        sds = [credit["estimators"][e]["auc"]["std"] for e in names]
        ax.bar(range(len(names)), means, yerr=sds, color=[cmap(i % 10) for i in range(len(names))], capsize=3)
        ax.axhline(0.5, color="gray", ls="--", lw=1)
        ax.set_ylim(0.45, max(means + [0.55]) + 0.05)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title("credit diagnostic: AUC for pacing's act (no training)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=75)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------ driver
def run_study(plan: StudyPlan) -> dict:
    """Run (or resume) the study of ``plan``; writes ``OUT/study.json`` and the figure."""
    from mica_core.atomic import atomic_write_json

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    torch.set_num_threads(max(1, plan.threads))  # the warm start, and every job when --workers 1
    t0 = time.perf_counter()
    load = {"start": list(os.getloadavg())}  # other work on the machine slows the study down
    s = plan.settings()
    _say(t0, f"{len(plan.estimators)} estimators x {len(plan.seeds)} seeds; {s['steps']} steps of "
         f"{s['scenarios_per_step']} scenarios x {s['group_size']} rollouts per run; evaluation "
         f"{s['eval_episodes']} episodes (max {s['eval_max_turns']} turns)")
    plan.work.mkdir(parents=True, exist_ok=True)
    warm = prepare_warm_start(plan, t0)
    jobs = plan_jobs(plan)
    reused = sum(_done(job) is not None for job in jobs)
    results = execute(plan, jobs, t0)
    t_credit = time.perf_counter()
    _say(t0, "credit diagnostic (no training)")
    credit = credit_summary(plan)
    credit["seconds"] = time.perf_counter() - t_credit
    load["end"] = list(os.getloadavg())
    study = summarize(plan, jobs, results, time.perf_counter() - t0, warm, load)
    study["jobs_reused"] = reused  # wall_seconds covers only this invocation
    study["credit_diagnostic"] = credit
    out_json = plan.out / "study.json"
    png = plot_study_curves(study, plan.plot) if plan.plot is not None else None
    study["plot"] = str(png) if png else None
    study["wall_seconds"] = time.perf_counter() - t0
    atomic_write_json(out_json, study)
    _say(t0, f"wrote {out_json}" + (f" and {plan.plot}" if plan.plot else ""))
    print(format_table(study), flush=True)
    print("\nbehaviour on the evaluation episodes", flush=True)
    print(format_behaviour_table(study), flush=True)
    print("\ncredit diagnostic (no training): advantages of pacing-consistent turns vs the others", flush=True)
    print(format_credit_table(study["credit_diagnostic"], study["reference"]), flush=True)
    _say(t0, f"done in {time.perf_counter() - t0:.0f}s")
    return study


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mica study",
        description="Credit-assignment study: every estimator trains the same warm-started tiny policy "
        "at equal rollout budget over several seeds and is evaluated on the evaluation scenario set.",
    )
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run of every stage (writes to runs/study-quick; not a result)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; --quick: 2)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST .. FIRST+N-1")
    p.add_argument("--estimators", default=None, help=f"comma-separated (default: {','.join(ESTIMATORS)})")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    p.add_argument("--out", default=None, help="where study.json goes (default bench/results)")
    p.add_argument("--work", default=None, help="warm start and run directories (default runs/study)")
    p.add_argument("--plot", default=None,
                   help="learning-curve PNG (default docs/study_curves.png; --quick: OUT/study_curves.png; '' none)")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--warm-start-steps", type=int, default=None, help="supervised warm-start steps (default 400)")
    p.add_argument("--config", default=None, help=f"training config of every run (default configs/{DEFAULT_CONFIG.name})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config field for every run (repeatable; values are YAML)")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """credit-assignment study over estimators (mica_train)"""
    args = build_parser().parse_args(argv)
    if args.command is None:
        words = sys.argv[1:] if argv is None else list(argv)
        args.command = " ".join(["mica study", *words])
    try:
        plan = make_plan(args)
    except ValueError as exc:
        print(f"mica study: {exc}", file=sys.stderr)
        return 2
    run_study(plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
