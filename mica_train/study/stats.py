"""The study's statistics: pure functions from the jobs' results to the content of
``study.json`` (no I/O, no torch).

- :func:`seed_stats`: mean, sample standard deviation (ddof 1), standard error over seeds;
- :func:`summarize`: per estimator the evaluation metrics over seeds, the behaviour summary,
  the mean learning curve, the paired difference to the reference estimator on the same seed
  (wins, ties, losses), and the noise of the study (binomial sd of one evaluation, pooled seed
  sd, pooled sd of paired differences);
- :func:`summarize_credit`: the credit diagnostic's AUC and effect size over seeds.
"""

from __future__ import annotations

import math
from typing import Any

from .plan import CURVE_KEYS, EVAL_METRICS, Job, StudyPlan

__all__ = ["seed_stats", "summarize", "summarize_credit"]


def seed_stats(values: list[float | None]) -> dict:
    """``{per_seed, mean, std, sem, n}`` of the finite values (``std`` with ddof 1; 0 for n=1)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"per_seed": [float(v) for v in values], "mean": mean, "std": std,
            "sem": std / math.sqrt(n) if n else float("nan"), "n": n}


def _estimator_entry(runs: dict[int, dict], seeds: list[int]) -> dict[str, Any]:
    """Statistics over seeds of one estimator's results (``runs`` by seed)."""
    evs = [runs[s]["eval"] for s in seeds]
    entry: dict[str, Any] = {"seeds": seeds}
    entry["metrics"] = {m: seed_stats([ev.get(m) for ev in evs]) for m in EVAL_METRICS}
    entry["pass_rate"] = entry["metrics"]["pass_rate"]
    entry["mean_final_distance"] = entry["metrics"]["mean_final_distance"]
    succ = [ev.get("mean_turns_to_success") for ev in evs]
    entry["metrics"]["mean_turns_to_success"] = seed_stats([s for s in succ if s is not None])
    status: dict[str, float] = {}
    for ev in evs:
        for k, v in ev.get("status_counts", {}).items():
            status[k] = status.get(k, 0.0) + v / max(len(evs), 1)
    entry["status_counts_mean"] = status
    behav = [ev["behaviour"] for ev in evs if "behaviour" in ev]
    if behav:
        entry["behaviour"] = {
            "pacing_agreement": seed_stats([b["pacing_agreement"] for b in behav]),
            "opening_validation": seed_stats([b["opening_validation"] for b in behav]),
            "act_shares": {k: seed_stats([b["act_shares"][k] for b in behav]) for k in behav[0]["act_shares"]},
        }
    # Mean learning curve over the seeds (steps every run of this estimator reached).
    curves = [runs[s].get("curve", []) for s in seeds]
    n_steps = min((len(c) for c in curves), default=0)
    curve: dict[str, list] = {"step": [curves[0][i]["step"] for i in range(n_steps)] if curves else []}
    for key in CURVE_KEYS:
        if n_steps and all(key in c[i] for c in curves for i in range(n_steps)):
            curve[f"{key}_mean"] = [sum(c[i][key] for c in curves) / len(curves) for i in range(n_steps)]
    entry["curve"] = curve
    entry["train_seconds_mean"] = seed_stats([runs[s].get("train_seconds") for s in seeds])["mean"]
    entry["run_seconds_mean"] = seed_stats([runs[s].get("seconds") for s in seeds])["mean"]
    return entry


def _paired(ref_runs: dict[int, dict], runs: dict[int, dict], seeds: list[int]) -> dict:
    """Reference minus this estimator, seed by seed (same seed: same scenarios, same
    evaluation episodes), on the seeds both have."""
    common = [s for s in seeds if s in runs and s in ref_runs]
    paired = {}
    for m in ("pass_rate", "mean_final_distance"):
        diffs = [ref_runs[s]["eval"][m] - runs[s]["eval"][m] for s in common]
        st = seed_stats(diffs)
        st["seeds"] = common
        if m == "pass_rate":
            st["wins"] = sum(d > 0 for d in diffs)
            st["ties"] = sum(d == 0 for d in diffs)
            st["losses"] = sum(d < 0 for d in diffs)
        paired[m] = st
    return paired


def summarize(plan: StudyPlan, jobs: list[Job], results: dict[Job, dict], wall: float,
              warm: dict | None = None, load: dict | None = None) -> dict:
    """The content of ``study.json`` (docs/study.md lists its keys) from the results of
    ``jobs`` that exist (a partial study is summarized as such: ``complete`` false)."""
    before = results.get(jobs[0])
    runs: dict[str, dict[int, dict]] = {e: {} for e in plan.estimators}
    for job in jobs[1:]:
        res = results.get(job)
        if res is not None:
            runs[job.estimator][job.seed] = res
    settings = plan.settings()
    n_eval = settings["eval_episodes"]
    per_est: dict[str, dict] = {}
    for est in plan.estimators:
        per_est[est] = _estimator_entry(runs[est], [s for s in plan.seeds if s in runs[est]])
    ref = plan.reference
    for est in plan.estimators:
        per_est[est]["paired_vs_" + ref] = _paired(runs[ref], runs[est], list(plan.seeds))
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


def summarize_credit(per_seed: list[dict], estimators: tuple[str, ...] | list[str], ref: str) -> dict:
    """The credit diagnostics of the seeds (``credit.credit_diagnostic``, one per seed) as
    statistics over seeds, with the reference's AUC minus each estimator's, seed by seed."""
    out = {k: v for k, v in per_seed[0].items() if k not in ("estimators", "seed", "turns", "good_share")}
    out["seeds"] = [d["seed"] for d in per_seed]
    out["turns_per_seed"] = [d["turns"] for d in per_seed]
    out["good_share_per_seed"] = [d["good_share"] for d in per_seed]
    out["estimators"] = {}
    for est in estimators:
        aucs = [d["estimators"][est]["auc"] for d in per_seed]
        out["estimators"][est] = {
            "auc": seed_stats(aucs),
            "effect": seed_stats([d["estimators"][est]["effect"] for d in per_seed]),
            f"auc_{ref}_minus_it": seed_stats([d["estimators"][ref]["auc"] - a for d, a in zip(per_seed, aucs)]),
        }
    return out
