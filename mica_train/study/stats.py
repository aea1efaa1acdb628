"""The study's statistics: pure functions from the jobs' results to the content of
``study.json`` (no I/O, no torch).

Inference over seeds (docs/study.md, "Pre-registration"):

- :func:`t_test_greater`: the one-sided paired t-test of a contrast in the paper's direction;
- :func:`holm`: Holm's step-down adjustment of the family of p-values;
- :func:`t_interval`: the t confidence interval of a mean (of the paired differences, and of
  each estimator's values);
- :func:`noncentral_t_sf`, :func:`power_t_greater`, :func:`minimum_detectable_effect`: the
  power of that one-sided t-test and the smallest difference it detects at a given power, at
  Holm's first step (``alpha / m``) and at ``alpha``;
- :func:`paired_contrast`, :func:`contrast_family`: everything the contrast table reports.

The earlier procedure's tools stay for reading its results and for comparison:
:func:`bootstrap_mean_ci` (the exact percentile bootstrap; over 8 seeds its 95 % interval
covers about 89 %), :func:`sign_flip_pvalue` and :func:`minimum_detectable_difference` (the
two-sided normal-approximation formula).

Summaries: :func:`seed_stats` (mean, sd, sem over seeds), :func:`summarize` (the whole
``study.json``), :func:`summarize_credit` (the credit diagnostic over seeds).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from .plan import ACT_KEYS, CURVE_KEYS, EVAL_METRICS, Job, StudyPlan

__all__ = [
    "bootstrap_mean_ci",
    "contrast_family",
    "holm",
    "minimum_detectable_difference",
    "minimum_detectable_effect",
    "noncentral_t_sf",
    "paired_contrast",
    "power_t_greater",
    "seed_stats",
    "sign_flip_pvalue",
    "summarize",
    "summarize_credit",
    "t_cdf",
    "t_interval",
    "t_quantile",
    "t_test_greater",
]

# ----------------------------------------------------------------------------- inference
def bootstrap_mean_ci(x, level: float = 0.95, *, exact_limit: int = 200_000, resamples: int = 20_000,
                      seed: int = 0) -> tuple[float, float, str]:
    """``(low, high, method)``: the percentile bootstrap interval of the mean of ``x``.

    The bootstrap distribution is that of the mean of ``n`` values drawn from ``x`` with
    replacement. When it has at most ``exact_limit`` distinct resamples (multisets of indices,
    ``C(2n-1, n)``: 6,435 for n = 8, 92,378 for n = 10) it is enumerated exactly, each multiset
    ``c`` weighted by ``n! / (prod_i c_i! * n^n)``; otherwise ``resamples`` draws from a generator
    seeded by ``seed``. ``low`` is the smallest resampled mean whose cumulative probability
    reaches ``(1 - level) / 2``, ``high`` the smallest reaching ``(1 + level) / 2``.
    """
    import numpy as np

    x = np.asarray(x, float)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), "none"
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    if math.comb(2 * n - 1, n) <= exact_limit:
        combos = np.array(list(itertools.combinations_with_replacement(range(n), n)), dtype=np.int64)
        means = x[combos].mean(axis=1)
        counts = np.stack([np.bincount(row, minlength=n) for row in combos])
        log_factorial = np.array([math.lgamma(k + 1.0) for k in range(n + 1)])
        logw = log_factorial[n] - log_factorial[counts].sum(axis=1) - n * math.log(n)
        weights = np.exp(logw)
        method = "exact"
    else:
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        weights = np.full(resamples, 1.0 / resamples)
        method = f"monte carlo ({resamples} resamples)"
    order = np.argsort(means, kind="mergesort")
    cdf = np.cumsum(weights[order])
    cdf /= cdf[-1]
    tol = 1e-12
    low = means[order][np.searchsorted(cdf, lo_q - tol)]
    high = means[order][np.searchsorted(cdf, hi_q - tol)]
    return float(low), float(high), method


def sign_flip_pvalue(d, *, exact_limit: int = 16, resamples: int = 200_000, seed: int = 0) -> tuple[float, str]:
    """``(p, method)``: the two-sided paired sign-flip permutation test of mean ``d`` = 0.

    Under the null hypothesis each paired difference is as likely to have either sign, so
    ``p = #{s in {-1,+1}^n : |sum_i s_i d_i| >= |sum_i d_i|} / 2^n``, enumerated exactly for
    n <= ``exact_limit`` (the smallest p it can give is ``2 / 2^n``: 1/128 with 8 seeds);
    above, ``(1 + hits) / (1 + resamples)`` over random sign patterns. Sums equal to within
    ``1e-9 * sum |d|`` count as ties (hits).
    """
    import numpy as np

    d = np.asarray(d, float)
    n = len(d)
    if n == 0:
        return float("nan"), "none"
    observed = abs(d.sum())
    tol = 1e-9 * float(np.abs(d).sum())
    if n <= exact_limit:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        sums = np.abs((1 - 2 * bits) @ d)
        return float(np.mean(sums >= observed - tol)), f"exact ({2 ** n} sign patterns)"
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(resamples, n))
    hits = int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + resamples), f"monte carlo ({resamples} sign patterns)"


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: with the m p-values sorted
    ``p_(1) <= ... <= p_(m)``, ``adj_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``. Rejecting
    where ``adj < alpha`` controls the family-wise error rate at ``alpha``."""
    p = [float(v) for v in pvalues]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function: ``1 - I_{df/(df+t^2)}(df/2, 1/2) / 2`` for t >= 0."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`t_cdf` to 1e-12)."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def t_interval(x, level: float = 0.95) -> tuple[float, float]:
    """The t confidence interval of the mean of ``x``: ``mean -+ t_{(1+level)/2, n-1} * sd / sqrt(n)``
    (NaN for n < 2)."""
    st = seed_stats(list(x))
    if st["n"] < 2:
        return float("nan"), float("nan")
    half = t_quantile((1.0 + level) / 2.0, st["n"] - 1) * st["sem"]
    return st["mean"] - half, st["mean"] + half


def t_test_greater(d) -> tuple[float, float]:
    """``(t, p)``: the one-sided paired t-test of H0 mean(d) <= 0 against mean(d) > 0,
    ``t = mean / (sd / sqrt(n))``, ``p = P(T_{n-1} >= t)``. With sd 0 the p-value is 0 for a
    positive mean and 1 otherwise; NaN for n < 2."""
    st = seed_stats(list(d))
    n = st["n"]
    if n < 2:
        return float("nan"), float("nan")
    if st["std"] == 0:
        return (math.inf, 0.0) if st["mean"] > 0 else (-math.inf if st["mean"] < 0 else 0.0, 1.0)
    t = st["mean"] / st["sem"]
    df = n - 1
    upper = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T >= |t|), without 1 - cdf's rounding
    return t, upper if t >= 0 else 1.0 - upper


def noncentral_t_sf(c: float, df: float, ncp: float, *, points: int = 801) -> float:
    """``P(T > c)`` for the noncentral t with ``df`` degrees of freedom and noncentrality
    ``ncp``, ``T = (Z + ncp) / sqrt(V / df)``: the integral over ``u = sqrt(V)`` (density
    proportional to ``u^(df-1) exp(-u^2/2)``) of ``1 - Phi(c u / sqrt(df) - ncp)``, by Simpson's rule
    on ``[0, sqrt(df) + 12]``."""
    import numpy as np

    hi = math.sqrt(df) + 12.0
    u = np.linspace(0.0, hi, points)
    log_f = ((df - 1.0) * np.log(np.maximum(u, 1e-300)) - u * u / 2.0 - (df / 2.0 - 1.0) * math.log(2.0)
             - math.lgamma(df / 2.0))
    f = np.exp(log_f)
    tail = 0.5 * np.array([math.erfc((c * v / math.sqrt(df) - ncp) / math.sqrt(2.0)) for v in u])
    w = np.ones(points)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return float(min(1.0, max(0.0, (w * f * tail).sum() * (hi / (points - 1)) / 3.0)))


def power_t_greater(effect: float, n: int, alpha: float) -> float:
    """The power of the one-sided paired t-test at level ``alpha`` with ``n`` pairs when the true
    mean difference is ``effect`` standard deviations of the differences."""
    c = t_quantile(1.0 - alpha, n - 1)
    return noncentral_t_sf(c, n - 1, effect * math.sqrt(n))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true paired mean difference that the one-sided paired t-test at level
    ``alpha`` detects with probability ``power`` from ``n`` pairs whose differences have
    standard deviation ``sd`` (the noncentral t, :func:`power_t_greater`, solved by bisection;
    NaN for n < 2). With Holm over ``m`` contrasts, ``alpha / m`` gives the power every contrast
    has whatever the others do (Holm's first step); ``alpha`` the most any can have."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    lo, hi = 0.0, 1.0
    while power_t_greater(hi, n, alpha) < power:
        hi *= 2.0
        if hi > 1e6:
            return float("nan")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if power_t_greater(mid, n, alpha) < power:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-5:
            break
    return 0.5 * (lo + hi) * sd


def minimum_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true paired mean difference a two-sided test at level ``alpha`` detects with
    probability ``power`` from ``n`` pairs whose differences have standard deviation ``sd``:
    ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)`` (the paired t-test's power
    approximation; NaN for n < 2)."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return (t_quantile(1.0 - alpha / 2.0, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def paired_contrast(a: dict[int, float], b: dict[int, float], *, level: float = 0.95, alpha: float = 0.05,
                    power: float = 0.8, family_size: int = 1) -> dict[str, Any]:
    """``a - b`` seed by seed on the seeds both have: the differences, their mean and sd, the t
    interval (:func:`t_interval`), the one-sided paired t-test of ``a > b``
    (:func:`t_test_greater`; ``p_reverse`` tests ``b > a``), wins/ties/losses, and the minimum
    detectable difference of that test at ``alpha / family_size`` (``mde``: Holm's first step,
    the power every contrast of the family has) and at ``alpha`` (``mde_alpha``: Holm's last)."""
    seeds = sorted(s for s in a if s in b)
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    st = seed_stats(diffs)
    low, high = t_interval(diffs, level)
    t, p = t_test_greater(diffs)
    return {
        "seeds": seeds,
        "diffs": diffs,
        "n": st["n"],
        "mean": st["mean"],
        "sd": st["std"],
        "ci": [low, high],
        "ci_level": level,
        "ci_method": "t",
        "t": t,
        "p": p,
        "p_reverse": 1.0 - p if math.isfinite(p) else p,
        "p_method": "one-sided paired t (a > b)",
        "wins": sum(x > 0 for x in diffs),
        "ties": sum(x == 0 for x in diffs),
        "losses": sum(x < 0 for x in diffs),
        "mde": minimum_detectable_effect(st["std"], st["n"], alpha / max(1, family_size), power),
        "mde_alpha": minimum_detectable_effect(st["std"], st["n"], alpha, power),
    }


def contrast_family(values: dict[str, dict[int, float]], contrasts, *, metric: str, alpha: float = 0.05,
                    power: float = 0.8, level: float = 0.95) -> list[dict[str, Any]]:
    """:func:`paired_contrast` for each ``(a, b)`` of ``contrasts`` on ``values[estimator][seed]``,
    with Holm-adjusted one-sided p-values over the family, in the stated direction (``p_holm``)
    and in the reverse one (``p_reverse_holm``), and the verdict at ``alpha``: ``a`` (``a``
    better: the direction held), ``b`` (``b`` better: it is reversed) or ``undecided``. For a
    metric where lower is better (a distance), pass its negation."""
    rows = []
    for a, b in contrasts:
        row = {"a": a, "b": b, "metric": metric}
        row.update(paired_contrast(values.get(a, {}), values.get(b, {}), level=level, alpha=alpha, power=power,
                                   family_size=len(contrasts)))
        rows.append(row)
    if not rows:
        return rows
    for key in ("p", "p_reverse"):
        for row, adj in zip(rows, holm([1.0 if not math.isfinite(r[key]) else r[key] for r in rows])):
            row[f"{key}_holm"] = adj if math.isfinite(row[key]) else float("nan")
    for row in rows:
        row["verdict"] = ("a" if row["p_holm"] < alpha else "b" if row["p_reverse_holm"] < alpha
                          else "undecided")
    return rows


# ----------------------------------------------------------------------------- summaries
def seed_stats(values: list[float | None]) -> dict:
    """``{per_seed, mean, std, sem, n}`` of the finite values (``std`` with ddof 1; 0 for n=1)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"per_seed": [None if v is None else float(v) for v in values], "mean": mean, "std": std,
            "sem": std / math.sqrt(n) if n else float("nan"), "n": n}


def act_shares_tv(p: dict[str, float], q: dict[str, float]) -> float:
    """Total variation distance between two act mixes: ``sum_k |p_k - q_k| / 2``."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in ACT_KEYS)


def run_primary(res: dict) -> dict[str, float]:
    """A run's learning-curve summaries: the pass rate and the mean final distance averaged
    over its evaluation checkpoints (the area under the learning curve per step)."""
    evs = [c["eval"] for c in res["checkpoints"]]
    return {
        "pass_rate_auc": sum(e["pass_rate"] for e in evs) / len(evs),
        "distance_auc": sum(e["mean_final_distance"] for e in evs) / len(evs),
        "final_pass_rate": evs[-1]["pass_rate"],
        "final_distance": evs[-1]["mean_final_distance"],
    }


def run_movement(res: dict, before: dict | None) -> dict[str, float]:
    """How far a run's policy moved from the warm start: act-mix total variation, pass-rate
    and distance change at the last checkpoint, and the per-step clip fraction."""
    last = res["checkpoints"][-1]["eval"]
    clip = [c["clip_frac"] for c in res.get("curve", []) if "clip_frac" in c]
    out = {
        "clip_frac_mean": sum(clip) / len(clip) if clip else float("nan"),
        "clip_frac_max": max(clip) if clip else float("nan"),
    }
    if before is not None:
        out["act_tv"] = act_shares_tv(last["behaviour"]["act_shares"], before["behaviour"]["act_shares"])
        out["pass_rate_change"] = last["pass_rate"] - before["pass_rate"]
        out["distance_change"] = last["mean_final_distance"] - before["mean_final_distance"]
    return out


def _checkpoint_curves(runs: dict[int, dict], seeds: list[int]) -> dict[str, Any]:
    """Per checkpoint: the pass rate and mean final distance over seeds, with bootstrap CIs."""
    steps = [c["step"] for c in runs[seeds[0]]["checkpoints"]] if seeds else []
    out: dict[str, Any] = {"step": steps}
    for m in ("pass_rate", "mean_final_distance"):
        rows = []
        for i in range(len(steps)):
            vals = [runs[s]["checkpoints"][i]["eval"][m] for s in seeds]
            st = seed_stats(vals)
            st["ci"] = list(t_interval(vals))
            rows.append(st)
        out[m] = rows
    return out


def _estimator_entry(runs: dict[int, dict], seeds: list[int], before: dict | None) -> dict[str, Any]:
    """Statistics over seeds of one estimator's results (``runs`` by seed)."""
    entry: dict[str, Any] = {"seeds": seeds}
    prim = {s: run_primary(runs[s]) for s in seeds}
    for key in ("pass_rate_auc", "distance_auc", "final_pass_rate", "final_distance"):
        entry[key] = seed_stats([prim[s][key] for s in seeds])
    for key in ("pass_rate_auc", "distance_auc"):
        entry[key]["ci"] = list(t_interval([prim[s][key] for s in seeds]))
    entry["checkpoints"] = _checkpoint_curves(runs, seeds) if seeds else {"step": []}
    evs = [runs[s]["checkpoints"][-1]["eval"] for s in seeds]  # the last checkpoint
    entry["final_metrics"] = {m: seed_stats([ev.get(m) for ev in evs]) for m in EVAL_METRICS}
    succ = [ev.get("mean_turns_to_success") for ev in evs]
    entry["final_metrics"]["mean_turns_to_success"] = seed_stats([s for s in succ if s is not None])
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
            "act_shares": {k: seed_stats([b["act_shares"][k] for b in behav]) for k in ACT_KEYS},
        }
    moves = [run_movement(runs[s], before) for s in seeds]
    entry["movement"] = {k: seed_stats([m[k] for m in moves]) for k in (moves[0] if moves else {})}
    # Mean training curve over the seeds (steps every run of this estimator reached).
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


def _before_entry(before: dict | None) -> dict | None:
    if before is None:
        return None
    ev = before["eval"]
    out = {m: ev.get(m) for m in (*EVAL_METRICS, "n", "behaviour")}
    rep = before.get("replicate")
    if rep is not None:
        # The same policy on other episode seeds: the noise floor of the movement measures.
        out["replicate"] = {"eval_seed": rep["eval_seed"], "pass_rate": rep["eval"]["pass_rate"],
                            "mean_final_distance": rep["eval"]["mean_final_distance"],
                            "act_tv": act_shares_tv(rep["eval"]["behaviour"]["act_shares"],
                                                    ev["behaviour"]["act_shares"])}
    return out


def summarize(plan: StudyPlan, jobs: list[Job], results: dict[Job, dict], wall: float,
              warm: dict | None = None, load: dict | None = None) -> dict:
    """The content of ``study.json`` (docs/study.md lists its keys) from the results of
    ``jobs`` that exist (a partial study is summarized as such: ``complete`` false)."""
    before_job = next((j for j in jobs if j.kind == "before"), None)
    before = results.get(before_job) if before_job is not None else None
    runs: dict[str, dict[int, dict]] = {e: {} for e in plan.estimators}
    for job in jobs:
        res = results.get(job)
        if job.kind == "train" and res is not None:
            runs[job.estimator][job.seed] = res
    settings = plan.settings()
    before_ev = before["eval"] if before else None
    per_est = {est: _estimator_entry(runs[est], [s for s in plan.seeds if s in runs[est]], before_ev)
               for est in plan.estimators}
    prim = {e: {s: run_primary(r) for s, r in runs[e].items()} for e in plan.estimators}
    primary = {e: {s: p["pass_rate_auc"] for s, p in prim[e].items()} for e in plan.estimators}
    # Lower distance is better: the family is computed on its negation, so that a positive
    # difference means `a` is better for both metrics.
    neg_distance = {e: {s: -p["distance_auc"] for s, p in prim[e].items()} for e in plan.estimators}
    final_pass = {e: {s: p["final_pass_rate"] for s, p in prim[e].items()} for e in plan.estimators}
    contrasts = list(plan.active_contrasts)
    design = {"alpha": plan.alpha, "power": plan.power, "ci_level": 0.95, "ci": "t",
              "test": "one-sided paired t, Holm over the contrasts", "policy": plan.policy}
    family = contrast_family(primary, contrasts, metric="pass_rate_auc", alpha=plan.alpha, power=plan.power)
    secondary = {
        "distance_auc_reduction": contrast_family(neg_distance, contrasts, metric="distance_auc_reduction",
                                                  alpha=plan.alpha, power=plan.power),
        "final_pass_rate": contrast_family(final_pass, contrasts, metric="final_pass_rate", alpha=plan.alpha,
                                           power=plan.power),
    }
    sds = [row["sd"] for row in family if row["n"] > 1]
    n_eval = settings["eval_episodes"]
    mean_pass = [per_est[e]["pass_rate_auc"]["mean"] for e in plan.estimators if per_est[e]["pass_rate_auc"]["n"]]
    p_bar = sum(mean_pass) / len(mean_pass) if mean_pass else float("nan")
    n_ck = len(settings["checkpoints"])
    pooled = [per_est[e]["pass_rate_auc"]["std"] ** 2 for e in plan.estimators if per_est[e]["pass_rate_auc"]["n"] > 1]
    noise = {
        "eval_binomial_sd_one_checkpoint": math.sqrt(p_bar * (1 - p_bar) / n_eval) if mean_pass else None,
        "eval_binomial_sd_auc_if_independent": (math.sqrt(p_bar * (1 - p_bar) / (n_eval * n_ck))
                                                if mean_pass and n_ck else None),
        "seed_sd_pass_rate_auc_pooled": math.sqrt(sum(pooled) / len(pooled)) if pooled else None,
        "paired_diff_sd_pass_rate_auc_pooled": math.sqrt(sum(s * s for s in sds) / len(sds)) if sds else None,
        "n_seeds": len(plan.seeds),
        "eval_episodes_per_checkpoint": n_eval,
        "checkpoints": n_ck,
    }
    ranking = sorted((e for e in plan.estimators if per_est[e]["pass_rate_auc"]["n"]),
                     key=lambda e: (-per_est[e]["pass_rate_auc"]["mean"], per_est[e]["distance_auc"]["mean"]))
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
        "design": design,
        "warm_start": {k: warm.get(k) for k in ("steps", "loss_first", "loss_last", "seconds")} if warm else None,
        "before": _before_entry(before),
        "primary_metric": "pass_rate_auc",
        "contrasts": family,
        "secondary_contrasts": secondary,
        "estimators": per_est,
        "ranking_by_pass_rate_auc": ranking,
        "noise": noise,
    }


def summarize_credit(per_seed: list[dict], estimators, contrasts=()) -> dict:
    """The credit diagnostics of the seeds (``credit.credit_diagnostic``, one per seed) as
    statistics over seeds; for each contrast ``(a, b)`` the paired differences of the AUC and of
    the correlation with the true advantage."""
    drop = ("estimators", "seed", "turns", "good_share", "true_advantage")
    out = {k: v for k, v in per_seed[0].items() if k not in drop}
    out["seeds"] = [d["seed"] for d in per_seed]
    out["turns_per_seed"] = [d["turns"] for d in per_seed]
    out["good_share_per_seed"] = [d["good_share"] for d in per_seed]
    if "true_advantage" in per_seed[0]:
        ta = [d["true_advantage"] for d in per_seed]
        out["true_advantage"] = {
            "forks_per_act": ta[0]["forks_per_act"],
            "fork_scenarios": ta[0]["fork_scenarios"],
            "turns_per_seed": [t["turns"] for t in ta],
            **{k: seed_stats([t[k] for t in ta])
               for k in ("sd", "split_half_r", "reliability", "good_label_pearson", "good_mean", "other_mean")},
        }
    first = per_seed[0]["estimators"][estimators[0]]
    keys = [k for k in ("auc", "effect", "true_pearson", "true_spearman") if k in first]
    out["estimators"] = {est: {k: seed_stats([d["estimators"][est][k] for d in per_seed]) for k in keys}
                         for est in estimators}
    out["contrasts"] = []
    for a, b in contrasts:
        if a not in estimators or b not in estimators:
            continue
        row = {"a": a, "b": b}
        for k in ("auc", "true_pearson"):
            if k in keys:
                row[k] = seed_stats([d["estimators"][a][k] - d["estimators"][b][k] for d in per_seed])
        out["contrasts"].append(row)
    return out
