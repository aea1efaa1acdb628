"""`mica study`: the smoke run writes every documented output, runs of one seed differ only by
the estimator, checkpoint evaluations do not disturb training, a finished study resumes without
rerunning, --publish updates a checkout's committed results; the statistics (bootstrap CI,
sign-flip test, Holm, t quantiles, minimum detectable difference) against hand-computed cases;
the forked true advantage on tiny deterministic episodes; the credit diagnostic."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from train_helpers import ROOT

from mica_train import study
from mica_train.config import load_config
from mica_train.study.credit import _auc, credit_diagnostic, fork_true_advantage, label_rollouts, pearson, spearman
from mica_train.study.report import TABLES, published_studies, replace_tables
from mica_train.study.stats import (
    act_shares_tv,
    bootstrap_mean_ci,
    contrast_family,
    holm,
    minimum_detectable_difference,
    minimum_detectable_effect,
    power_t_greater,
    sign_flip_pvalue,
    t_cdf,
    t_interval,
    t_quantile,
    t_test_greater,
)

STUDY_KEYS = {
    "command", "complete", "runs_done", "runs_planned", "wall_seconds", "run_seconds_total", "run_cpu_seconds_total",
    "load_average", "jobs_reused", "settings", "design", "warm_start", "before", "primary_metric", "contrasts",
    "secondary_contrasts", "estimators", "ranking_by_pass_rate_auc", "noise", "plot", "credit_diagnostic",
}
ESTIMATOR_KEYS = {
    "seeds", "pass_rate_auc", "distance_auc", "final_pass_rate", "final_distance", "checkpoints", "final_metrics",
    "status_counts_mean", "behaviour", "movement", "curve", "train_seconds_mean", "run_seconds_mean",
}
CONTRAST_KEYS = {"a", "b", "metric", "seeds", "diffs", "n", "mean", "sd", "ci", "ci_level", "ci_method", "t", "p",
                 "p_reverse", "p_method", "wins", "ties", "losses", "mde", "mde_alpha", "p_holm", "p_reverse_holm",
                 "verdict"}
STAT_KEYS = {"per_seed", "mean", "std", "sem", "n"}
PNG = b"\x89PNG\r\n\x1a\n"


def _args(run_dir, *extra):
    return ["--quick", "--estimators", "mica,grpo", "--seeds", "1", "--warm-start-steps", "4",
            "--run-dir", str(run_dir), *extra]


@pytest.mark.slow
def test_quick_study_writes_outputs_resumes_and_publishes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    assert study.main(_args(out, "--workers", "2")) == 0
    res = json.loads((out / "study.json").read_text())
    assert STUDY_KEYS <= set(res)
    assert res["complete"] and res["runs_done"] == res["runs_planned"] == 2
    assert res["command"].startswith("mica study --quick")
    assert res["plot"] == str(out / "study_curves.png")
    assert (out / "study_curves.png").read_bytes()[:8] == PNG
    report = (out / "study.md").read_text()
    for fmt in TABLES.values():
        assert fmt(res) in report
    s = res["settings"]
    assert s["estimators"] == ["mica", "grpo"] and s["seeds"] == [0] and s["config_file"] == "study"
    assert s["contrasts"] == [["mica", "grpo"]] and s["checkpoints"] == [1, 2] == list(range(1, s["steps"] + 1))
    assert s["episodes_per_run"] == s["steps"] * s["scenarios_per_step"] * s["group_size"]
    assert s["eval_episodes"] == 30 * s["eval_episodes_per_scenario"]
    assert res["before"]["n"] == s["eval_episodes"] and "replicate" in res["before"]
    (row,) = res["contrasts"]
    assert CONTRAST_KEYS <= set(row) and (row["a"], row["b"], row["n"]) == ("mica", "grpo", 1)
    assert row["p"] is None and row["verdict"] == "undecided" and row["mde"] is None  # one seed: no test
    runs = {e: json.loads((out / "runs" / e / "seed0" / "result.json").read_text()) for e in ("mica", "grpo")}
    for name, e in res["estimators"].items():
        assert ESTIMATOR_KEYS <= set(e), name
        assert STAT_KEYS <= set(e["pass_rate_auc"]) and len(e["pass_rate_auc"]["per_seed"]) == 1
        checkpoints = runs[name]["checkpoints"]
        assert [c["step"] for c in checkpoints] == [1, 2] == e["checkpoints"]["step"]
        auc = sum(c["eval"]["pass_rate"] for c in checkpoints) / 2
        assert math.isclose(e["pass_rate_auc"]["mean"], auc)
        assert len(e["curve"]["step"]) == s["steps"]
        b = e["behaviour"]
        assert set(b["act_shares"]) == {"validate", "reframe", "plan", "multiple", "none"}
        assert math.isclose(sum(v["mean"] for v in b["act_shares"].values()), 1.0)
        tv = act_shares_tv(checkpoints[-1]["eval"]["behaviour"]["act_shares"], res["before"]["behaviour"]["act_shares"])
        assert math.isclose(e["movement"]["act_tv"]["mean"], tv)
    credit = res["credit_diagnostic"]
    assert credit["seeds"] == [0] and set(credit["estimators"]) == {"mica", "grpo"}
    assert {"auc", "effect", "true_pearson", "true_spearman"} <= set(credit["estimators"]["mica"])
    assert credit["true_advantage"]["forks_per_act"] == study.QUICK.credit.forks

    # Only the estimator differs: the first step's rollouts (same warm start, same LoRA
    # initialisation, same scenarios and sampling seeds) are identical across estimators.
    first = [r["curve"][0] for r in runs.values()]
    for key in ("pass_rate", "mean_final_distance", "reward_mean", "mean_turns"):
        assert first[0][key] == first[1][key], key

    # The study's evaluation plays exactly the trainer's evaluation episodes.
    from mica_train.policy import load_policy
    from mica_train.trainer import evaluate

    cfg = study.plan_from_args(study.build_parser().parse_args(_args(out))).load()
    ev = evaluate(load_policy(cfg.model, cfg.lora), cfg)
    before = json.loads((out / "before.json").read_text())["eval"]
    assert {k: before[k] for k in ev} == json.loads(json.dumps(ev))

    # Resume: nothing runs again (the results are reused as they are).
    capsys.readouterr()
    stamps = {e: (out / "runs" / e / "seed0" / "result.json").stat().st_mtime_ns for e in runs}
    assert study.main(_args(out, "--workers", "1")) == 0
    log = capsys.readouterr().out
    assert "reusing the warm start" in log and "4 of 4 jobs already done" in log
    assert {e: (out / "runs" / e / "seed0" / "result.json").stat().st_mtime_ns for e in runs} == stamps

    # Other checkpoints rerun the runs (not the warm start or its evaluation; the credit
    # diagnostic follows the estimator list) and train exactly as before: evaluating does not
    # disturb training. --publish writes the committed results of the checkout in the current
    # directory.
    checkout = tmp_path / "checkout"
    (checkout / "docs").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "study.md", checkout / "docs" / "study.md")
    monkeypatch.chdir(checkout)
    assert study.main(_args(out, "--workers", "1", "--estimators", "grpo", "--checkpoints", "1", "--publish")) == 0
    log = capsys.readouterr().out
    assert "1 of 3 jobs already done" in log and "reusing the warm start" in log
    rerun = json.loads((out / "runs" / "grpo" / "seed0" / "result.json").read_text())
    assert [c["step"] for c in rerun["checkpoints"]] == [2]
    def untimed(curve):
        return [{k: v for k, v in rec.items() if not k.startswith("time")} for rec in curve]

    assert untimed(rerun["curve"]) == untimed(runs["grpo"]["curve"])
    assert rerun["checkpoints"][-1]["eval"] == runs["grpo"]["checkpoints"][-1]["eval"]
    res2 = json.loads((out / "study.json").read_text())
    assert res2["contrasts"] == [] and res2["settings"]["checkpoints"] == [2]
    file = json.loads((checkout / "bench" / "results" / "study.json").read_text())
    assert file["format"] == 2 and set(file["studies"]) == {"lm"}  # the checkout had no results yet
    published = file["studies"]["lm"]
    assert published["plot"] == "docs/study_curves.png"
    assert dict(published, plot=None) == dict(res2, plot=None)
    assert (checkout / "docs" / "study_curves.png").read_bytes()[:8] == PNG
    doc = (checkout / "docs" / "study.md").read_text()
    committed = published_studies(json.loads((ROOT / "bench" / "results" / "study.json").read_text()))["lm"]
    assert TABLES["evaluation"](res2) in doc and TABLES["evaluation"](committed) not in doc
    assert "### Language-model study: results" in doc  # the prose around the tables is kept
    assert replace_tables(doc, res2) == doc


def test_bad_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for extra, message in (
        (["--estimators", "mica,nope"], "--estimators: unknown estimator(s) nope"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--checkpoints", "0"], "--checkpoints must be >= 1"),
        (["optim.learning_rate=1"], "optim.learning_rate: unknown key"),
        (["--config", "nope"], "config 'nope': no such file"),
        (["--publish"], "--publish: docs/study.md not found"),
        (["--estimators", ","], "--estimators names no estimator"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["steps=0"], "steps must be >= 1, got 0"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--warm-start-steps", "-1"], "--warm-start-steps must be >= 0, got -1"),
        (["--first-seed", "-2"], "--first-seed must be >= 0, got -2"),
        (["--checkpoints", "3"], "--checkpoints (3) must be <= the training steps (2)"),
        (["--run-dir", str(blocker)], f"--run-dir: {blocker} exists and is not a directory"),
        (["--run-dir", str(blocker / "sub")], f"--run-dir: {blocker} exists and is not a directory"),
    ):
        monkeypatch.chdir(tmp_path)
        assert study.main(_args(out, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("mica study: error: ") and message in err, err
    assert not out.exists()


def test_plan_jobs_checkpoints_and_contrasts():
    assert study.FULL.estimators == ("mica", "mica_turn", "mica_group", "mica_group_adr", "mica_turn_adr", "grpo",
                                     "reinforce_pp")
    assert ("mica_turn", "mica_turn_adr") in study.CONTRASTS and len(study.CONTRASTS) == 6
    import mica_core as mc

    turn_adr = mc.get_estimator("mica_turn_adr")  # registered by the study: mica_turn with ADR rewards
    assert (turn_adr.reward, turn_adr.components) == ("adr", mc.get_estimator("mica_turn").components)
    assert study.TABULAR.estimators == study.FULL.estimators and len(study.TABULAR.seeds) >= 30
    assert len(study.FULL.seeds) >= 8 and study.FULL.load().steps == 18  # the language-model pilot's budget
    assert {e for pair in study.CONTRASTS for e in pair} == set(study.FULL.estimators)
    assert study.FULL.checkpoint_steps() == (9, 18)
    assert study.TABULAR.load().steps == 36 and study.TABULAR.checkpoint_steps() == (9, 18, 27, 36)
    from mica_train.study.plan import checkpoint_steps

    assert checkpoint_steps(10, 4) == (2, 5, 8, 10) and checkpoint_steps(2, 3) == (1, 2)
    plan = dataclasses.replace(study.QUICK, estimators=("mica", "grpo"), seeds=(0, 1))
    jobs = plan.jobs()
    assert [(j.kind, j.estimator, j.seed) for j in jobs] == [
        ("credit", None, 0), ("credit", None, 1), ("before", None, 0),
        ("train", "mica", 0), ("train", "grpo", 0), ("train", "mica", 1), ("train", "grpo", 1)]
    assert plan.active_contrasts == (("mica", "grpo"),)
    # The warm start sees the rollouts' context (both settings are passed explicitly).
    spec = study.FULL.warm_spec()
    cfg = study.FULL.load()
    assert (spec["context_messages"], spec["context_replies"]) == (cfg.rollout.context_messages,
                                                                  cfg.rollout.context_replies)


def test_fingerprints_follow_the_settings():
    jobs = study.QUICK.jobs()
    again = study.QUICK.jobs()
    assert [j.fingerprint for j in jobs] == [j.fingerprint for j in again]
    lr = study.QUICK.replace(overrides=(*study.QUICK.overrides, "optim.lr=1e-2")).jobs()
    for a, b in zip(jobs, lr):  # training settings change only the training runs
        assert (a.fingerprint == b.fingerprint) == (a.kind != "train"), a.label
    ck = study.QUICK.replace(checkpoints=1).jobs()
    assert [a.fingerprint == b.fingerprint for a, b in zip(jobs, ck)] == [j.kind != "train" for j in jobs]
    assert len({j.fingerprint for j in jobs}) == len(jobs)


def test_committed_docs_tables_are_the_committed_results():
    """docs/study.md's tables are generated from bench/results/study.json (`--publish`): the
    tabular study (30 seeds or more) and the language-model study (8 seeds or more), both
    complete, both the six pre-registered contrasts under the one-sided t procedure."""
    committed = json.loads((ROOT / "bench" / "results" / "study.json").read_text())
    doc = (ROOT / "docs" / "study.md").read_text()
    assert replace_tables(doc, committed) == doc
    studies = published_studies(committed)
    for policy, seeds in (("tabular", 30), ("lm", 8)):
        st = studies[policy]
        assert st["complete"] and st["settings"]["policy"] == policy and len(st["settings"]["seeds"]) >= seeds
        assert st["design"]["test"] == "one-sided paired t, Holm over the contrasts"
        assert [(r["a"], r["b"]) for r in st["contrasts"]] == [tuple(c) for c in study.CONTRASTS]
        assert all(r["ci_method"] == "t" and "p_reverse_holm" in r for r in st["contrasts"])


# ---------------------------------------------------------------------------- statistics
def test_bootstrap_ci_hand_computed():
    # n = 2: the resampled means are x1 (1/4), the midpoint (1/2) and x2 (1/4).
    assert bootstrap_mean_ci([1.0, 3.0]) == (1.0, 3.0, "exact")
    assert bootstrap_mean_ci([1.0, 3.0], level=0.4) == (2.0, 2.0, "exact")  # 30 % and 70 % points
    # x = (0, 0, 3): the mean is k, k ~ Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27 for k = 0..3,
    # so the 97.5 % point is 3 (F(2) = 26/27 < 0.975) and the 95 % point is 2.
    assert bootstrap_mean_ci([0.0, 0.0, 3.0]) == (0.0, 3.0, "exact")
    assert bootstrap_mean_ci([0.0, 0.0, 3.0], level=0.9) == (0.0, 2.0, "exact")
    assert bootstrap_mean_ci([0.5]) == (0.5, 0.5, "exact")
    # Monte Carlo (forced) agrees with the exact enumeration for 8 seeds.
    x = [0.05, -0.02, 0.11, 0.03, 0.07, -0.04, 0.09, 0.01]
    exact = bootstrap_mean_ci(x)
    mc = bootstrap_mean_ci(x, exact_limit=0, resamples=40_000, seed=3)
    assert exact[2] == "exact" and mc[2].startswith("monte carlo")
    assert abs(exact[0] - mc[0]) < 0.004 and abs(exact[1] - mc[1]) < 0.004
    assert exact[0] < np.mean(x) < exact[1]


def test_sign_flip_pvalue_hand_computed():
    # (1, 2, 3): the 8 signed sums are ±6, ±4, ±2, 0, 0; |sum| >= 6 twice.
    assert sign_flip_pvalue([1.0, 2.0, 3.0]) == (0.25, "exact (8 sign patterns)")
    assert sign_flip_pvalue([1.0, 1.0])[0] == 0.5  # sums 2, 0, 0, -2
    assert sign_flip_pvalue([1.0, -1.0])[0] == 1.0  # observed 0: every pattern ties or exceeds
    # (3, 1, 1, -1), observed 4: 3 + {±1±1±1} = 6, 4, 4, 4, 2, 2, 2, 0 and the mirror: 8 of 16.
    assert sign_flip_pvalue([3.0, 1.0, 1.0, -1.0])[0] == 0.5
    assert sign_flip_pvalue([3.0, 1.0, 1.0, 1.0])[0] == 0.125  # only ±6
    # Eight differences of one sign: only the observed pattern and its mirror, 2 / 256.
    assert sign_flip_pvalue([0.1, 0.2, 0.05, 0.3, 0.01, 0.2, 0.1, 0.4])[0] == 2 / 256
    # Ties are counted however the sums round: 0.1 + 0.2 and 0.3 are the same size.
    assert sign_flip_pvalue([0.1, 0.2, -0.3])[0] == 1.0
    d = np.random.default_rng(0).normal(0.3, 1.0, 12)
    exact, _ = sign_flip_pvalue(d)
    mc, method = sign_flip_pvalue(d, exact_limit=0, resamples=100_000, seed=1)
    assert method.startswith("monte carlo") and abs(exact - mc) < 0.01


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # capped by the running maximum
    assert holm([0.9, 0.8]) == [1.0, 1.0]
    assert holm([]) == []


def test_t_quantiles_and_minimum_detectable_difference():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # Cauchy: 12.706
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)  # 4.303
    assert t_quantile(0.975, 7) == pytest.approx(2.364624, abs=1e-6)  # printed t tables
    assert t_quantile(0.8, 7) == pytest.approx(0.896030, abs=1e-6)
    assert t_quantile(0.995, 7) == pytest.approx(3.499483, abs=1e-6)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959966, abs=1e-5)
    assert t_quantile(0.025, 7) == -t_quantile(0.975, 7)
    assert t_cdf(0.0, 5) == 0.5 and t_cdf(t_quantile(0.9, 3), 3) == pytest.approx(0.9, abs=1e-10)
    # (2.364624 + 0.896030) * 0.1 / sqrt(8)
    assert minimum_detectable_difference(0.1, 8) == pytest.approx(0.1152815, abs=1e-6)
    bonferroni = (3.499483 + 0.896030) * 0.1 / math.sqrt(8)
    assert minimum_detectable_difference(0.1, 8, alpha=0.01) == pytest.approx(bonferroni, abs=1e-6)
    assert math.isnan(minimum_detectable_difference(0.1, 1))
    with pytest.raises(ValueError, match="t_quantile"):
        t_quantile(1.0, 3)


def test_contrast_family_one_sided_t_holm_and_verdicts():
    seeds = range(8)
    values = {
        "a": {s: 0.6 + 0.01 * (s % 3) for s in seeds},     # a beats b clearly
        "b": {s: 0.5 for s in seeds},
        "c": {s: 0.5 + (0.01 if s % 2 else -0.01) for s in seeds},  # no difference from b
        "d": {s: 0.5 - 0.05 - 0.001 * s for s in seeds},  # d loses to b on every seed: reversed
    }
    rows = contrast_family(values, [("a", "b"), ("c", "b"), ("d", "b")], metric="m")
    by = {r["a"]: r for r in rows}
    for r in rows:  # each row is its own one-sided t-test, interval and detectable effect
        d = [values[r["a"]][s] - values["b"][s] for s in seeds]
        assert r["diffs"] == pytest.approx(d) and r["ci_method"] == "t"
        t, p = t_test_greater(d)
        assert r["p"] == pytest.approx(p) and r["p_reverse"] == pytest.approx(1 - p)
        assert r["ci"] == pytest.approx(list(t_interval(d)))
        assert r["mde"] == pytest.approx(minimum_detectable_effect(r["sd"], 8, 0.05 / 3))
        assert r["mde_alpha"] == pytest.approx(minimum_detectable_effect(r["sd"], 8, 0.05))
    assert by["a"]["verdict"] == "a" and by["d"]["verdict"] == "b" and by["c"]["verdict"] == "undecided"
    # Holm: the smallest p times 3, the next times 2 (running maximum), the largest times 1.
    ps = sorted(r["p"] for r in rows)
    assert sorted(r["p_holm"] for r in rows) == pytest.approx([min(1, 3 * ps[0]), max(min(1, 3 * ps[0]),
                                                                                       min(1, 2 * ps[1])),
                                                               max(min(1, 2 * ps[1]), ps[2])])
    assert by["c"]["wins"] == 4 and by["c"]["losses"] == 4 and by["c"]["p"] == pytest.approx(0.5)
    assert by["d"]["p"] > 0.99 and by["d"]["p_reverse_holm"] < 0.05


def test_t_interval_and_one_sided_t_test_hand_computed():
    # d = 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), sem sqrt(5/12); t_{0.975, 3} = 3.182446 (printed tables).
    lo, hi = t_interval([1, 2, 3, 4])
    half = 3.182446 * math.sqrt(5 / 12)
    assert (lo, hi) == pytest.approx((2.5 - half, 2.5 + half), abs=1e-5)
    t, p = t_test_greater([1, 2, 3, 4])
    assert t == pytest.approx(2.5 / math.sqrt(5 / 12), rel=1e-12)  # 3.873
    # Student's t with 3 df: F(t) = 1/2 + (x / (1 + x^2) + atan x) / pi with x = t / sqrt(3) = sqrt(5).
    x = math.sqrt(5)
    assert p == pytest.approx(0.5 - (x / (1 + x * x) + math.atan(x)) / math.pi, abs=1e-10)  # 0.01524
    assert t_test_greater([-1, -2, -3, -4])[1] == pytest.approx(1 - p, abs=1e-10)
    assert t_test_greater([0.1, 0.1])[1] == 0.0 and t_test_greater([0.0, 0.0])[1] == 1.0
    assert t_test_greater([-0.1, -0.1])[1] == 1.0
    assert math.isnan(t_test_greater([1.0])[1]) and all(math.isnan(v) for v in t_interval([1.0]))


def test_power_and_minimum_detectable_effect_of_the_one_sided_t_test():
    # No effect: the power is the level, at every df (df 1 included).
    for n, a in ((2, 0.05), (8, 0.05 / 6), (30, 0.05 / 7)):
        assert power_t_greater(0.0, n, a) == pytest.approx(a, abs=1e-6)
    # Against a simulation of the test itself: 200,000 studies of 8 paired differences N(1, 1).
    rng = np.random.default_rng(0)
    d = rng.normal(1.0, 1.0, size=(200_000, 8))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(8))
    for alpha in (0.05, 0.05 / 7):
        simulated = float((t > t_quantile(1 - alpha, 7)).mean())
        assert power_t_greater(1.0, 8, alpha) == pytest.approx(simulated, abs=0.004)
    # The MDE has the asked power; for large n it is the normal one, (z_{1-alpha} + z_{power}) sd / sqrt(n).
    m = minimum_detectable_effect(0.5, 30, 0.05 / 7)
    assert power_t_greater(m / 0.5, 30, 0.05 / 7) == pytest.approx(0.8, abs=1e-4)
    assert minimum_detectable_effect(1.0, 2000, 0.05) * math.sqrt(2000) == pytest.approx(1.644854 + 0.841621,
                                                                                          rel=2e-3)
    assert math.isnan(minimum_detectable_effect(1.0, 1)) and minimum_detectable_effect(0.0, 8) == 0.0
    # 8 seeds at Holm's first step of 6 contrasts need 1.45 sd; 30 seeds of 7 contrasts 0.63 sd.
    assert minimum_detectable_effect(1.0, 8, 0.05 / 6) == pytest.approx(1.450, abs=2e-3)
    assert minimum_detectable_effect(1.0, 30, 0.05 / 7) == pytest.approx(0.634, abs=2e-3)


def test_summary_statistics():
    plan = dataclasses.replace(study.QUICK, estimators=("mica", "grpo"), seeds=(0, 1, 2))
    jobs = plan.jobs()
    passes = {"mica": [[0.4, 0.6], [0.6, 0.8], [0.5, 0.7]], "grpo": [[0.4, 0.4], [0.7, 0.7], [0.8, 0.8]]}
    shares = {"validate": 0.4, "reframe": 0.3, "plan": 0.3, "multiple": 0.0, "none": 0.0}

    def ev(p, validate=0.4):
        acts = dict(shares, validate=validate, reframe=0.7 - validate)
        return {"pass_rate": p, "mean_final_distance": 10 * (1 - p), "mean_energy": 1.0, "n": 30,
                "mean_positive_energy_ratio": 0.5, "mean_turns": 20.0, "mean_turns_to_success": 14.0,
                "status_counts": {"success": round(30 * p), "max_turns": 30 - round(30 * p)},
                "behaviour": {"pacing_agreement": 0.3, "opening_validation": 0.2, "act_shares": acts}}

    results = {}
    for job in jobs:
        if job.kind == "before":
            results[job] = {"eval": ev(0.2), "replicate": {"eval_seed": 1235, "eval": ev(0.25, 0.35)}, "seconds": 1.0}
        elif job.kind == "train":
            p = passes[job.estimator][job.seed]
            results[job] = {"checkpoints": [{"step": 1, "eval": ev(p[0])}, {"step": 2, "eval": ev(p[1], 0.6)}],
                            "curve": [{"step": 1, "pass_rate": 0.1 * job.seed, "clip_frac": 0.01},
                                      {"step": 2, "pass_rate": 0.2, "clip_frac": 0.03}],
                            "seconds": 2.0, "train_seconds": 1.5}
    res = study.summarize(plan, jobs, results, wall=3.0)
    mica = res["estimators"]["mica"]
    assert mica["pass_rate_auc"]["per_seed"] == pytest.approx([0.5, 0.7, 0.6])
    assert math.isclose(mica["pass_rate_auc"]["mean"], 0.6) and math.isclose(mica["pass_rate_auc"]["std"], 0.1)
    assert mica["final_pass_rate"]["per_seed"] == pytest.approx([0.6, 0.8, 0.7])
    assert mica["checkpoints"]["step"] == [1, 2]
    assert mica["checkpoints"]["pass_rate"][0]["mean"] == pytest.approx(0.5)
    (row,) = res["contrasts"]
    assert (row["a"], row["b"]) == ("mica", "grpo")
    assert row["diffs"] == pytest.approx([0.1, 0.0, -0.2]) and math.isclose(row["mean"], -0.1 / 3)
    assert (row["wins"], row["ties"], row["losses"]) == (1, 1, 1) and row["p_holm"] == row["p"]
    assert row["p"] == pytest.approx(t_test_greater([0.1, 0.0, -0.2])[1]) and row["ci_method"] == "t"
    assert mica["pass_rate_auc"]["ci"] == pytest.approx(list(t_interval([0.5, 0.7, 0.6])))
    # Every run moved the validate share from 0.4 to 0.6 (and reframe from 0.3 to 0.1): TV 0.2.
    assert mica["movement"]["act_tv"]["mean"] == pytest.approx(0.2)
    assert mica["movement"]["clip_frac_mean"]["mean"] == pytest.approx(0.02)
    assert mica["movement"]["pass_rate_change"]["per_seed"] == pytest.approx([0.4, 0.6, 0.5])
    assert res["before"]["replicate"]["act_tv"] == pytest.approx(0.05)
    assert res["ranking_by_pass_rate_auc"] == ["grpo", "mica"]  # 0.633 > 0.6
    assert res["complete"] and res["before"]["pass_rate"] == 0.2
    assert res["noise"]["n_seeds"] == 3 and res["noise"]["checkpoints"] == 2
    table = study.format_table(res)
    assert "| `mica` | 0.600 ± 0.100 |" in table and "warm start" in table
    assert "| `mica` − `grpo` | -0.033 |" in study.format_contrast_table(res)

    # A partial study is summarized as such.
    del results[jobs[-1]]
    part = study.summarize(plan, jobs, results, wall=3.0)
    assert not part["complete"] and part["runs_done"] == 5
    assert part["estimators"][jobs[-1].estimator]["pass_rate_auc"]["n"] == 2
    assert part["contrasts"][0]["n"] == 2


# ------------------------------------------------------------------------ tabular policy
def test_tabular_features_read_what_the_language_model_sees():
    from mica_train.study.tabular import FEATURES, features

    msg = ("I'm completely overwhelmed and I can barely hold it together. I just feel empty and unwanted. "
           "Also, i don't understand why it ended so suddenly.")
    on = {FEATURES[i] for i in np.flatnonzero(features(msg, 5, ["validate", "plan", "plan"]))}
    assert on == {"need1=A", "need2=C", "distress=high", "turn=4-5", "last=plan", "before_last=plan", "twice=plan",
                  "bias"}
    on = {FEATURES[i] for i in np.flatnonzero(features("Thanks, I'm calmer now.", 0, []))}
    assert on == {"need1=None", "need2=None", "distress=low", "turn=0", "last=None", "before_last=None", "bias"}
    on = {FEATURES[i] for i in np.flatnonzero(features("I'm tired and on edge. I don't know where to start with "
                                                       "the bills.", 30, ["reframe"]))}
    assert on == {"need1=P", "need2=None", "distress=medium", "turn=12+", "last=reframe", "before_last=None", "bias"}


def test_tabular_training_is_deterministic_paired_and_moves():
    from mica_train.study.tabular import TabularPolicy, evaluate_tabular, train_tabular

    overrides = ["steps=3", "data.scenarios_per_step=2", "data.group_size=4", "optim.lr=0.1",
                 "eval.episodes_per_scenario=1"]
    cfg = load_config("study", overrides)
    a, b = train_tabular(cfg), train_tabular(cfg)
    assert a["records"] == b["records"] and a["policy"].state() == b["policy"].state()
    assert np.abs(np.asarray(a["policy"].state())).max() > 0.05  # the policy moved from uniform
    g = train_tabular(load_config("study", [*overrides, "advantage.estimator=grpo"]))
    # Only the estimator differs: the first step's rollouts are the same, then the policies differ.
    for key in ("pass_rate", "mean_final_distance", "mean_turns", "reward_mean"):
        assert g["records"][0][key] == a["records"][0][key], key
    assert g["policy"].state() != a["policy"].state()
    ev = evaluate_tabular(TabularPolicy(), cfg)
    assert ev["n"] == 30 and ev["behaviour"]["replay_mismatches"] == 0
    assert ev == evaluate_tabular(TabularPolicy(), cfg)  # the evaluation episodes are fixed
    assert "behaviour" not in evaluate_tabular(TabularPolicy(), cfg, behaviour=False)


def test_plugin_estimators_join_the_study(tmp_path, capsys, monkeypatch):
    import mica_core as mc

    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "my_study_estimators.py").write_text(
        "import mica_core as mc\n"
        "mc.register_estimator('turn_heavy_study_test', [(0.8, 'return', 'turn'), (0.2, 'reward', 'group')],\n"
        "                      overwrite=True)\n")
    (mods / "broken_study_plugin.py").write_text("raise RuntimeError('boom')\n")
    (mods / "exiting_study_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(mods))
    out = tmp_path / "study"
    args = ["--policy", "tabular", "--quick", "--seeds", "1", "--run-dir", str(out), "steps=2",
            "--estimators", "turn_heavy_study_test,mica"]
    try:
        for extra, message in (
            ([], "--estimators: unknown estimator(s) turn_heavy_study_test"),
            (["--plugin", "no_such_study_plugin"], "--plugin no_such_study_plugin: cannot import it "
                                                   "(ModuleNotFoundError: No module named 'no_such_study_plugin')"),
            (["--plugin", "broken_study_plugin"],
             "--plugin broken_study_plugin: cannot import it (RuntimeError: boom)"),
            (["--plugin", "exiting_study_plugin"], "--plugin exiting_study_plugin: cannot import it (SystemExit: 3)"),
        ):
            assert study.main(args + extra) == 2, extra
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and message in err, err
        assert not out.exists()
        # The spawned workers import the plugin too.
        assert study.main(args + ["--plugin", "my_study_estimators", "--workers", "2"]) == 0
        res = json.loads((out / "study.json").read_text())
        assert res["settings"]["plugins"] == ["my_study_estimators"] and res["complete"]
        assert set(res["estimators"]) == {"turn_heavy_study_test", "mica"}
        run = json.loads((out / "runs" / "turn_heavy_study_test" / "seed0" / "result.json").read_text())
        assert len(run["checkpoints"]) == 2 and run["curve"][0]["step"] == 1
    finally:
        if "turn_heavy_study_test" in mc.list_estimators():
            mc.unregister_estimator("turn_heavy_study_test")


@pytest.mark.slow
def test_tabular_quick_study_runs_every_estimator_and_publishes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "tabular"
    assert study.main(["--policy", "tabular", "--quick", "--run-dir", str(out)]) == 0
    res = json.loads((out / "study.json").read_text())
    s = res["settings"]
    assert res["complete"] and s["policy"] == "tabular" and s["estimators"] == list(study.ESTIMATORS)
    assert [(r["a"], r["b"]) for r in res["contrasts"]] == list(study.CONTRASTS)
    assert res["warm_start"] is None and "credit_diagnostic" not in res and res["before"]["n"] == 30
    assert res["design"]["test"] == "one-sided paired t, Holm over the contrasts"
    for seed in s["seeds"]:  # within a seed only the estimator differs
        firsts = [json.loads((out / "runs" / e / f"seed{seed}" / "result.json").read_text())["curve"][0]
                  for e in s["estimators"]]
        assert len({(f["pass_rate"], f["mean_final_distance"], f["mean_turns"]) for f in firsts}) == 1
    for fmt in TABLES.values():
        if fmt is not TABLES["credit"]:
            assert fmt(res) in (out / "study.md").read_text()
    # --publish keeps the other policy class's results and fills the tabular blocks only.
    checkout = tmp_path / "checkout"
    (checkout / "docs").mkdir(parents=True)
    (checkout / "bench" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "study.md", checkout / "docs" / "study.md")
    shutil.copy(ROOT / "bench" / "results" / "study.json", checkout / "bench" / "results" / "study.json")
    monkeypatch.chdir(checkout)
    assert study.main(["--policy", "tabular", "--quick", "--run-dir", str(out), "--publish"]) == 0
    assert "15 of 15 jobs already done" in capsys.readouterr().out
    file = json.loads((checkout / "bench" / "results" / "study.json").read_text())
    committed = published_studies(json.loads((ROOT / "bench" / "results" / "study.json").read_text()))
    assert file["studies"]["lm"] == committed["lm"] and file["studies"]["tabular"]["plot"] == \
        "docs/study_curves_tabular.png"
    assert (checkout / "docs" / "study_curves_tabular.png").read_bytes()[:8] == PNG
    doc = (checkout / "docs" / "study.md").read_text()
    assert TABLES["contrasts"](res) in doc and replace_tables(doc, file) == doc


# ------------------------------------------------------------------------ true advantage
def _deterministic_episode(max_turns, rubric):
    """An episode whose simulator draws nothing that matters: no misses, the user names only
    the most pressing need."""
    from mica_train.env import EnvConfig, Scenario, make_env

    card = Scenario.from_dict({"id": "hand", "rubric": rubric, "dominant": "A", "difficulty": "easy",
                               "topic": "the move",
                               "needs": {"C": "I don't understand it.", "A": "I just feel awful.",
                                         "P": "I don't know what to do."}})
    env = make_env(EnvConfig(max_turns=max_turns, min_turns=1,
                             dynamics={"miss_prob": 0.0, "need_noise": 0.0, "secondary_prob": 0.0}))
    return env.reset(card, seed=5)


RUBRIC_ZERO = {f"{a}.{i}": 0 for a in "CAP" for i in (1, 2, 3)}


def test_true_advantage_of_one_turn_is_the_hand_computed_drop():
    # C.1 = 1 (C = -2), A.2 = 1 (A = -2 x 2 = -4), P.1 = 1 (P = -2): D = sqrt(1 + 9 + 1).
    ep = _deterministic_episode(1, dict(RUBRIC_ZERO, **{"C.1": 1, "A.2": 1, "P.1": 1}))
    assert ep.state == (-2, -4, -2) and ep.initial_distance == pytest.approx(math.sqrt(11))
    # The user names A. validate lands at level 1 (+1: A = -3, D = sqrt(6)); reframe and plan
    # answer needs the user did not name and lose their one level (no change).
    drop = math.sqrt(11) - math.sqrt(6)
    expected = {"validate": 2 * drop / 3, "reframe": -drop / 3, "plan": -drop / 3}
    for act, want in expected.items():
        got = fork_true_advantage(ep, act, forks=3, key="one")
        assert got["true_advantage"] == pytest.approx(want, abs=1e-12), act
        assert got["a_half"] == pytest.approx(want) and got["b_half"] == pytest.approx(want)
    assert ep.turn == 0 and not ep.done  # forking never advances the episode itself


def test_true_advantage_sees_the_delayed_setback():
    # A = -8 (A.2 = 2): leading now is premature (-A > 6), which costs a setback on the next turn.
    ep = _deterministic_episode(2, dict(RUBRIC_ZERO, **{"C.1": 1, "A.2": 2, "P.1": 1}))
    assert ep.state == (-2, -8, -2)

    def d(a):  # the zone hinge distance of (-2, a, -2)
        return math.sqrt(2 + (a + 1) ** 2)

    # Turn 1 validate: A = -7, rapport 1; then validate at level 2 (A = -4) or an unnamed act
    # (no change). Turn 1 reframe/plan: no progress, rapport 0, A.Neg = -1 (-2) on turn 2;
    # then validate at level 1 (A = -9) or an unnamed act (A = -10).
    after_validate = {"validate": d(-4), "other": d(-7)}
    after_lead = {"validate": d(-9), "other": d(-10)}
    forks = 5
    got = fork_true_advantage(ep, "validate", forks=forks, key="two")["true_advantage"]
    # Fork k continues with the same act after every first act (common random numbers), so with
    # j of the K continuations validating, A*(validate) = 2/3 (Q(validate) - Q(lead)) where
    # Q(first) = D0 - mean_k D_end(first, k).
    grid = [2 / 3 * ((j * (after_lead["validate"] - after_validate["validate"])
                      + (forks - j) * (after_lead["other"] - after_validate["other"])) / forks)
            for j in range(forks + 1)]
    assert min(abs(got - g) for g in grid) < 1e-12, (got, grid)
    lead = fork_true_advantage(ep, "plan", forks=forks, key="two")["true_advantage"]
    assert lead == pytest.approx(-got / 2)
    # One step ahead, leading loses only the validation's immediate drop (D0 - d(-7)) / 3; the
    # forked value also carries the setback it causes.
    assert lead < -(d(-8) - d(-7)) / 3 - 0.5


def test_fork_replays_or_reseeds_the_simulator():
    from mica_train.env import EnvConfig, generate_scenarios, make_env, sample_reply

    env = make_env(EnvConfig(max_turns=8, min_turns=3))
    card = generate_scenarios(1, seed=3)[0]
    acts = ["validate", "plan", "reframe", "validate", "plan", "plan", "reframe", "validate"]
    replies = [sample_reply(a, np.random.default_rng(i), card) for i, a in enumerate(acts)]
    ep = env.reset(card, seed=11)
    ep.step(replies[0])

    def play(e):
        out = []
        for reply in replies[1:]:
            if e.done:
                break
            r = e.step(reply)
            out.append((r.distance, r.state, r.user_message))
        return out

    same, other = ep.fork(), ep.fork()
    assert same.messages == ep.messages and same.messages is not ep.messages
    future = play(same)
    assert play(other) == future and ep.turn == 1  # seed None: the original's own future draws
    a, b, c = (ep.fork(seed=s) for s in (1, 1, 2))
    assert play(a) == play(b) != play(c)  # one seed, one future; another seed, other draws
    assert play(ep) == future


def test_credit_diagnostic_scores_the_labelled_turns():
    import mica_core as mc

    size = {"n_scenarios": 3, "group_size": 3, "seed": 1, "max_turns": 5, "min_turns": 3}
    a = credit_diagnostic(["mica", "grpo"], **size, forks=2, fork_scenarios=2)
    assert a == credit_diagnostic(["mica", "grpo"], **size, forks=2, fork_scenarios=2)  # deterministic by seed
    plain = credit_diagnostic(["mica", "grpo"], **size)
    assert {e: plain["estimators"][e]["auc"] for e in plain["estimators"]} == \
        {e: a["estimators"][e]["auc"] for e in a["estimators"]}  # forking leaves the rollouts alone
    cols = label_rollouts(**size, forks=2, fork_scenarios=2)
    good = np.asarray(cols.pop("good"))
    star = np.asarray(cols.pop("true_advantage"))
    halves = np.asarray(cols.pop("a_half")), np.asarray(cols.pop("b_half"))
    forked = ~np.isnan(star)
    assert forked.sum() == a["true_advantage"]["turns"] and forked.sum() == sum(np.asarray(cols["group_id"]) < 2)
    np.testing.assert_allclose(star[forked], (halves[0][forked] + halves[1][forked]) / 2)
    assert a["turns"] == len(good) and 0.0 < a["good_share"] < 1.0
    for est in ("mica", "grpo"):
        adv = mc.compute_advantages(cols, estimator=est).column("advantage").to_numpy()
        brute = np.mean([(p > n) + 0.5 * (p == n) for p in adv[good] for n in adv[~good]])
        assert math.isclose(a["estimators"][est]["auc"], brute), est
        effect = (adv[good].mean() - adv[~good].mean()) / adv.std()
        assert math.isclose(a["estimators"][est]["effect"], effect), est
        assert math.isclose(a["estimators"][est]["true_pearson"], np.corrcoef(adv[forked], star[forked])[0, 1])


def test_auc_and_correlations():
    assert _auc([2.0, 3.0], [1.0]) == 1.0
    assert _auc([1.0], [2.0, 3.0]) == 0.0
    assert _auc([1.0, 1.0], [1.0]) == 0.5
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert math.isclose(_auc(pos, neg), brute)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert spearman([1, 2, 3, 4], [10, 20, 15, 40]) == pytest.approx(0.8)  # ranks 1 2 3 4 vs 1 3 2 4
    assert spearman([1, 1, 2], [3, 3, 5]) == pytest.approx(1.0)  # ties share their rank
    assert math.isnan(pearson([1, 1], [1, 2]))


def test_a_key_given_to_a_study_reaches_no_written_setting(tmp_path, monkeypatch):
    """study.json's settings hold the overrides and the command line: values under env.extra
    (API keys, URLs with passwords) are shown as <not shown>; the config part is redacted."""
    from mica_train.study import run as study_run

    seen = {}
    monkeypatch.setattr(study_run, "run_study", lambda plan, publish_root=None: seen.update(plan=plan))
    words = ["--policy", "tabular", "--quick", "--run-dir", str(tmp_path / "s"),
             "--set", "env.extra.api_key=sk-SECRET-1", "env.extra.base_url=http://u:SECRET-2@127.0.0.1:9/v1"]
    assert study.main(words) == 0
    plan = seen["plan"]
    written = json.dumps({"settings": plan.settings(), "command": plan.command})
    assert "SECRET" not in written
    assert "env.extra.api_key=<not shown>" in plan.command and "--policy tabular" in plan.command
    assert "env.extra.api_key=<not shown>" in plan.settings()["overrides"]


def test_a_run_the_trainer_stops_is_one_line(capsys, monkeypatch, tmp_path):
    import pickle

    from mica_train.study import run as study_run
    from mica_train.trainer import JudgeFailureStop, TrainingDiverged

    for stop in (TrainingDiverged("step 3: the loss is nan"), JudgeFailureStop("step 1: 12 of 12 failed")):
        assert type(pickle.loads(pickle.dumps(stop))) is type(stop)  # crosses the process pool

        def fail(plan, publish_root=None, stop=stop):
            raise RuntimeError(f"study job mica/seed0 failed: {stop!r}") from stop

        monkeypatch.setattr(study_run, "run_study", fail)
        assert study.main(["--quick", "--run-dir", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"mica study: error: study job mica/seed0 failed: {stop}"
    monkeypatch.setattr(study_run, "run_study", lambda plan, publish_root=None: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is a bug, shown as such
        study.main(["--quick", "--run-dir", str(tmp_path / "s")])


@pytest.mark.parametrize("option", ["epsilon=0.5", "source=reward", "state_weights=[1, 1, 1]"])
def test_tabular_refuses_table_only_advantage_options(tmp_path, capsys, option):
    """The tabular policy's episodes give mica distances: an option only tables take is one
    line before any work, not a TypeError in a worker."""
    assert study.main(["--policy", "tabular", "--quick", "--run-dir", str(tmp_path / "s"),
                       f"advantage.options.{option}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mica study: error: advantage.options.{option.split('=')[0]} does not apply")
    assert "\n" not in err and not (tmp_path / "s").exists()
