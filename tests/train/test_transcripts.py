"""Transcripts of training and evaluation, TensorBoard text, curves at every evaluation, the
append-only metrics.jsonl, `mica eval --transcripts` and the rollout path under an LLM
simulator at several concurrency levels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import mica_core as mc
from mica_train.config import load_config
from mica_train.metrics import MetricsLogger, read_metrics
from mica_train.transcripts import (
    add_credit,
    conversation_markdown,
    pick_samples,
    read_transcripts,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tiny"  # the packaged config
TURN_KEYS = {"turn", "user", "reply", "rubric", "judge_failed", "state", "distance", "reward",
             "return", "advantage"}


def _turn_table(transcripts):
    import pyarrow as pa

    rows = {"group_id": [], "traj_id": [], "turn": [], "distance": [], "initial_distance": []}
    for i, t in enumerate(transcripts):
        for tr in t["turns"]:
            rows["group_id"].append(t["group"])
            rows["traj_id"].append(i)
            rows["turn"].append(tr["turn"])
            rows["distance"].append(tr["distance"])
            rows["initial_distance"].append(t["initial_distance"])
    return pa.table(rows)


def test_training_transcripts_carry_the_credit_the_update_used(transcript_run):
    run, trainer = transcript_run
    files = sorted((run / "transcripts").glob("step_*.jsonl"))
    assert [f.name for f in files] == ["step_000001.jsonl", "step_000002.jsonl"]
    ts = read_transcripts(files[-1])
    cfg = trainer.cfg
    assert len(ts) == cfg.data.scenarios_per_step * cfg.data.group_size
    assert sorted(t["traj"] for t in ts) == list(range(len(ts)))       # none lost or repeated
    for t in ts:
        assert t["split"] == "train" and t["step"] == 2 and t["estimator"] == "mica"
        assert len(t["turns"]) >= 1 and t["status"] in ("success", "failure", "max_turns")
        for k, tr in enumerate(t["turns"]):
            assert set(tr) == TURN_KEYS and tr["turn"] == k
            assert tr["user"] and len(tr["state"]) == 3
            assert isinstance(tr["rubric"], dict) and not tr["judge_failed"]
        # The first user message is the opening; later ones answer the previous reply.
        assert t["turns"][-1]["distance"] == pytest.approx(t["final_distance"])
    # reward / return / advantage are mica_core's output on exactly these turns.
    out = mc.compute_advantages(_turn_table(ts), estimator="mica")
    flat = [tr for t in ts for tr in t["turns"]]
    for name in ("reward", "return", "advantage"):
        assert [tr[name] for tr in flat] == pytest.approx(out.column(name).to_pylist(), abs=1e-12)
    assert any(tr["advantage"] > 0 for tr in flat) and any(tr["advantage"] < 0 for tr in flat)
    # ... and add_credit (the evaluation's path) agrees.
    again = add_credit(ts, "mica")
    assert [tr["advantage"] for t in again for tr in t["turns"]] == pytest.approx(
        [tr["advantage"] for tr in flat], abs=1e-12)


def test_tensorboard_text_and_curves_at_every_evaluation(transcript_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = transcript_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "conversations/sample_0/text_summary" in tags and "conversations/sample_1/text_summary" in tags
    events = acc.Tensors("conversations/sample_0/text_summary")
    assert [e.step for e in events] == [1, 2]
    text = events[-1].tensor_proto.string_val[0].decode()
    assert "| turn | user | reply | advantage |" in text
    assert (run / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "eval_pass_rate" in rows[0]


def test_curves_are_written_at_an_evaluation_before_the_end(tiny_model_dir, tmp_path):
    from mica_train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(CONFIG, [f"model.path={tiny_model_dir}", f"run_dir={run}", "steps=2", "eval.every=1",
                               "eval.max_turns=3", "save_every=0", "tensorboard=false"])
    trainer = Trainer(cfg)
    seen = []
    trainer.save = lambda: None  # only the evaluation can write the curves at step 1

    original = trainer.plot_curves

    def plot_curves():
        original()
        seen.append(((run / "learning_curves.png").is_file(), trainer.step))

    trainer.plot_curves = plot_curves
    trainer.train()
    assert seen[0] == (True, 1)


def test_samples_show_the_spread():
    ts = [{"initial_distance": 10.0, "final_distance": d, "turns": []} for d in (5.0, 1.0, 9.0, 3.0)]
    picked = pick_samples(ts, 3)
    assert [t["final_distance"] for t in picked] == [1.0, 9.0, 3.0]
    assert pick_samples(ts, 0) == [] and len(pick_samples(ts, 10)) == 4
    md = conversation_markdown({"scenario_id": "s", "topic": "a|b", "status": "success", "group": 0,
                                "traj": 1, "initial_distance": 3.0, "final_distance": 0.0,
                                "turns": [{"turn": 0, "user": "x|y", "reply": "r", "advantage": 0.5,
                                           "reward": 1.0, "return": 1.0, "state": [0, 0, 0],
                                           "distance": 0.0, "judge_failed": True}]})
    assert "x\\|y" in md and "(judge failed)" in md and "+0.50" in md


def test_read_transcripts_names_the_bad_line(tmp_path):
    from mica_core import MicaInputError

    path = tmp_path / "t.jsonl"
    path.write_text('{"turns": []}\n[1, 2]\n')
    with pytest.raises(MicaInputError, match=r"t.jsonl:2: not an episode transcript"):
        read_transcripts(path)


# ------------------------------------------------------------------ metrics.jsonl
def test_metrics_are_appended_and_cut_back_on_resume(tmp_path, monkeypatch):
    import mica_train.metrics as metrics_mod

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log({"step": step, "pass_rate": step / 10})
    # A line half-written by a kill after step 3.
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "pass_')
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]

    resumed = MetricsLogger(tmp_path, resume_step=2, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    # Logging appends: it never rewrites the file.
    monkeypatch.setattr(metrics_mod, "atomic_write_text", lambda *a, **k: pytest.fail("rewritten"))
    resumed.log({"step": 3, "pass_rate": 0.5})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["pass_rate"]) for r in rows] == [(1, 0.1), (2, 0.2), (3, 0.5)]
    # Reopening an intact file at its last step leaves it alone.
    MetricsLogger(tmp_path, resume_step=3, tensorboard=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(bad / "metrics.jsonl")


# ------------------------------------------------------------------ mica eval
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def test_eval_writes_transcripts_and_shows_progress(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "mica_train.cli", "eval", "--config", str(CONFIG), "--set",
         f"model.path={tiny_model_dir}",
         "--set", f"run_dir={tmp_path / 'none'}", "--set", "progress=true", "--set", "eval.max_turns=3",
         "--checkpoint", "base", "--transcripts", str(out)],
        env=_env(), cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(res.stdout)
    assert "mica eval" in res.stderr and f"{metrics['n']}/{metrics['n']}" in res.stderr  # the bar
    ts = read_transcripts(out)
    assert len(ts) == metrics["n"] == 30
    assert [t["traj"] for t in ts] == list(range(30)) and {t["split"] for t in ts} == {"eval"}
    assert sum(t["pass"] for t in ts) == metrics["pass_count"]
    out_table = mc.compute_advantages(_turn_table(ts), estimator="mica")
    assert [tr["advantage"] for t in ts for tr in t["turns"]] == pytest.approx(
        out_table.column("advantage").to_pylist(), abs=1e-12)


# ------------------------------------------------------------------ rollouts under an LLM simulator
def test_llm_rollouts_do_not_depend_on_the_concurrency(tiny_model_dir, monkeypatch):
    from mica_train.config import LoraSettings, ModelConfig, RolloutConfig
    from mica_train.env import EnvConfig, eval_scenarios, make_env
    from mica_train.env.local_server import LocalChatServer
    from mica_train.policy import load_policy
    from mica_train.rollout import run_episodes, trajectory_table
    from mica_train.transcripts import episode_transcripts

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    policy = load_policy(ModelConfig(path=str(tiny_model_dir)), LoraSettings(enabled=False))
    rollout = RolloutConfig(max_new_tokens=8, max_prompt_tokens=48)
    scenarios = [sc for sc in eval_scenarios()[:3] for _ in range(3)]

    def run(concurrency):
        with LocalChatServer(latency=0.002) as server:
            env = make_env(EnvConfig(simulator="llm", base_url=server.url, model="local", max_turns=4,
                                     min_turns=3, max_concurrency=concurrency, retries=0))
            torch.manual_seed(0)
            records = run_episodes(policy, env, scenarios, range(9), [i // 3 for i in range(9)], range(9), rollout)
            env.close()
            return records, server.max_in_flight

    serial, serial_flight = run(1)
    concurrent, flight = run(8)
    assert serial_flight == 1 and flight > 1
    assert trajectory_table(concurrent).equals(trajectory_table(serial))
    assert episode_transcripts(concurrent) == episode_transcripts(serial)
    assert all(r.metrics["llm_requests"] > 0 for r in concurrent)
