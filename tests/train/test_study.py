"""`mica study`: the smoke run writes every documented output, runs of one seed differ only by
the estimator, a finished study resumes without rerunning, --publish updates a checkout's
committed results, and the summary statistics and the credit diagnostic are what they claim."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from train_helpers import ROOT

from mica_train import study
from mica_train.study.credit import _auc, credit_diagnostic, label_rollouts
from mica_train.study.report import TABLES, replace_tables

STUDY_KEYS = {
    "command", "complete", "runs_done", "runs_planned", "wall_seconds", "run_seconds_total", "run_cpu_seconds_total",
    "load_average", "jobs_reused", "settings",
    "warm_start", "before", "reference", "estimators", "ranking_by_pass_rate", "noise", "plot",
    "credit_diagnostic",
}
ESTIMATOR_KEYS = {
    "seeds", "metrics", "pass_rate", "mean_final_distance", "status_counts_mean", "curve",
    "train_seconds_mean", "run_seconds_mean", "paired_vs_mica",
}
METRICS = {"pass_rate", "mean_final_distance", "mean_energy", "mean_positive_energy_ratio", "mean_turns",
           "mean_turns_to_success"}
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
    assert s["episodes_per_run"] == s["steps"] * s["scenarios_per_step"] * s["group_size"]
    assert s["eval_episodes"] == 30 * s["eval_episodes_per_scenario"]
    assert res["before"]["n"] == s["eval_episodes"]
    assert set(res["ranking_by_pass_rate"]) == {"mica", "grpo"}
    for name, e in res["estimators"].items():
        assert ESTIMATOR_KEYS <= set(e), name
        assert METRICS <= set(e["metrics"])
        assert STAT_KEYS <= set(e["pass_rate"]) and len(e["pass_rate"]["per_seed"]) == 1
        assert 0.0 <= e["pass_rate"]["mean"] <= 1.0 and e["mean_final_distance"]["mean"] >= 0.0
        assert len(e["curve"]["step"]) == s["steps"] and len(e["curve"]["pass_rate_mean"]) == s["steps"]
        assert "mean_final_distance_mean" in e["curve"]
        b = e["behaviour"]
        assert 0.0 <= b["pacing_agreement"]["mean"] <= 1.0 and "opening_validation" in b
        assert set(b["act_shares"]) == {"validate", "reframe", "plan", "multiple", "none"}
        assert math.isclose(sum(v["mean"] for v in b["act_shares"].values()), 1.0)
    assert res["before"]["behaviour"]["replay_mismatches"] == 0
    credit = res["credit_diagnostic"]
    assert credit["seeds"] == [0] and set(credit["estimators"]) == {"mica", "grpo"}
    for e in credit["estimators"].values():
        assert 0.0 <= e["auc"]["mean"] <= 1.0 and "effect" in e and "auc_mica_minus_it" in e

    # Only the estimator differs: the first step's rollouts (same warm start, same LoRA
    # initialisation, same scenarios and sampling seeds) are identical across estimators.
    runs = {e: json.loads((out / "runs" / e / "seed0" / "result.json").read_text()) for e in ("mica", "grpo")}
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
    assert "reusing the warm start" in log and "3 of 3 jobs already done" in log
    assert {e: (out / "runs" / e / "seed0" / "result.json").stat().st_mtime_ns for e in runs} == stamps

    # Changed training settings invalidate the runs (not the warm start or its evaluation), and
    # --publish writes the committed results of the checkout in the current directory.
    checkout = tmp_path / "checkout"
    (checkout / "docs").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "study.md", checkout / "docs" / "study.md")
    monkeypatch.chdir(checkout)
    assert study.main(_args(out, "--workers", "1", "--estimators", "grpo", "--steps", "2", "--publish")) == 0
    log = capsys.readouterr().out
    assert "1 of 2 jobs already done" in log
    res2 = json.loads((out / "study.json").read_text())
    assert res2["settings"]["steps"] == 2 and len(res2["estimators"]["grpo"]["curve"]["step"]) == 2
    assert res2["reference"] == "grpo"
    published = json.loads((checkout / "bench" / "results" / "study.json").read_text())
    assert published["plot"] == "docs/study_curves.png"
    assert dict(published, plot=None) == dict(res2, plot=None)
    assert (checkout / "docs" / "study_curves.png").read_bytes()[:8] == PNG
    doc = (checkout / "docs" / "study.md").read_text()
    committed = json.loads((ROOT / "bench" / "results" / "study.json").read_text())
    assert TABLES["evaluation"](res2) in doc and TABLES["evaluation"](committed) not in doc
    assert "## What held and what did not" in doc  # the prose around the tables is kept
    assert replace_tables(doc, res2) == doc


def test_bad_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    for extra, message in (
        (["--estimators", "mica,nope"], "--estimators: unknown estimator(s) nope"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["optim.learning_rate=1"], "optim.learning_rate: unknown key"),
        (["--config", "nope"], "config 'nope': no such file"),
        (["--publish"], "--publish: docs/study.md not found"),
    ):
        monkeypatch.chdir(tmp_path)
        assert study.main(_args(out, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("mica study: error: ") and message in err, err
    assert not out.exists()


def test_summary_statistics():
    plan = dataclasses.replace(study.QUICK, estimators=("mica", "grpo"), seeds=(0, 1, 2))
    jobs = plan.jobs()
    assert [(j.estimator, j.seed) for j in jobs] == [
        (None, 0), ("mica", 0), ("grpo", 0), ("mica", 1), ("grpo", 1), ("mica", 2), ("grpo", 2)]
    passes = {"mica": [0.5, 0.7, 0.6], "grpo": [0.4, 0.7, 0.8]}
    results = {}

    def ev(p):
        return {"pass_rate": p, "mean_final_distance": 10 * (1 - p), "mean_energy": 1.0, "n": 30,
                "mean_positive_energy_ratio": 0.5, "mean_turns": 20.0, "mean_turns_to_success": 14.0,
                "status_counts": {"success": round(30 * p), "max_turns": 30 - round(30 * p)}}

    results[jobs[0]] = {"estimator": None, "seed": 0, "eval": ev(0.2), "seconds": 1.0}
    for job in jobs[1:]:
        p = passes[job.estimator][job.seed]
        curve = [{"step": 1, "pass_rate": 0.1 * job.seed, "mean_final_distance": 5.0}]
        results[job] = {"estimator": job.estimator, "seed": job.seed, "eval": ev(p),
                        "curve": curve, "seconds": 2.0, "train_seconds": 1.5}
    res = study.summarize(plan, jobs, results, wall=3.0)
    mica, grpo = res["estimators"]["mica"], res["estimators"]["grpo"]
    assert mica["pass_rate"]["per_seed"] == [0.5, 0.7, 0.6]
    assert math.isclose(mica["pass_rate"]["mean"], 0.6) and math.isclose(mica["pass_rate"]["std"], 0.1)
    paired = grpo["paired_vs_mica"]["pass_rate"]
    assert paired["per_seed"] == pytest.approx([0.1, 0.0, -0.2])
    assert math.isclose(paired["mean"], -0.1 / 3)
    assert (paired["wins"], paired["ties"], paired["losses"]) == (1, 1, 1)
    assert mica["curve"]["pass_rate_mean"] == pytest.approx([0.1])
    assert res["ranking_by_pass_rate"] == ["grpo", "mica"]  # 0.633 > 0.6
    assert res["complete"] and res["before"]["pass_rate"] == 0.2
    assert res["noise"]["n_seeds"] == 3 and res["noise"]["eval_episodes_per_run"] == 30
    table = study.format_table(res)
    assert "| `mica` | 0.600 ± 0.100 |" in table and "warm start" in table

    # A partial study is summarized as such.
    del results[jobs[-1]]
    part = study.summarize(plan, jobs, results, wall=3.0)
    assert not part["complete"] and part["runs_done"] == 5
    assert part["estimators"][jobs[-1].estimator]["pass_rate"]["n"] == 2


def test_fingerprints_follow_the_settings():
    jobs = study.QUICK.jobs()
    again = study.QUICK.jobs()
    assert [j.fingerprint for j in jobs] == [j.fingerprint for j in again]
    lr = study.QUICK.replace(overrides=(*study.QUICK.overrides, "optim.lr=1e-2")).jobs()
    assert lr[0].fingerprint == jobs[0].fingerprint  # the warm start's evaluation does not train
    assert all(a.fingerprint != b.fingerprint for a, b in zip(jobs[1:], lr[1:]))
    assert len({j.fingerprint for j in jobs}) == len(jobs)


def test_committed_docs_tables_are_the_committed_results():
    """docs/study.md's tables are generated from bench/results/study.json (`--publish`)."""
    committed = json.loads((ROOT / "bench" / "results" / "study.json").read_text())
    doc = (ROOT / "docs" / "study.md").read_text()
    assert replace_tables(doc, committed) == doc


def test_auc_counts_ties_as_half():
    assert _auc([2.0, 3.0], [1.0]) == 1.0
    assert _auc([1.0], [2.0, 3.0]) == 0.0
    assert _auc([1.0, 1.0], [1.0]) == 0.5
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert math.isclose(_auc(pos, neg), brute)


def test_credit_diagnostic_scores_the_labelled_turns():
    import mica_core as mc

    size = {"n_scenarios": 3, "group_size": 3, "seed": 1, "max_turns": 5, "min_turns": 3}
    a = credit_diagnostic(["mica", "grpo"], **size)
    assert a == credit_diagnostic(["mica", "grpo"], **size)  # deterministic by seed
    cols = label_rollouts(**size)
    good = np.asarray(cols.pop("good"))
    assert a["turns"] == len(good) and 0.0 < a["good_share"] < 1.0
    for est in ("mica", "grpo"):
        adv = mc.compute_advantages(cols, estimator=est).column("advantage").to_numpy()
        brute = np.mean([(p > n) + 0.5 * (p == n) for p in adv[good] for n in adv[~good]])
        assert math.isclose(a["estimators"][est]["auc"], brute), est
        effect = (adv[good].mean() - adv[~good].mean()) / adv.std()
        assert math.isclose(a["estimators"][est]["effect"], effect), est
