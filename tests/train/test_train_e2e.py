"""End to end through the `mica` command: tiny model -> warm start -> train -> eval, the
outputs of a run, and a two-process data-parallel run (gloo on CPU)."""

import json

import pytest
from train_helpers import run_mica, run_module


def _cli(*args):
    res = run_mica(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _cli("tiny-model", "--out", root / "base", "--hidden-size", 32, "--heads", 2, "--episodes", 12)
    res = _cli("warm-start", "--model", root / "base", "--out", root / "warm", "--steps", 6,
               "--episodes", 6, "--batch-size", 8, "--no-progress")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["loss_last"] < summary["loss_first"]
    assert set(summary["act_counts"]) == {"validate", "reframe", "plan"}
    return root / "warm"


@pytest.mark.slow
def test_train_then_eval(warm_model, tmp_path):
    run = tmp_path / "run"
    # Overrides in both forms: --set KEY=VALUE and the dotted words of Hydra / verl.
    _cli("train", "--config", "tiny", "--set", f"model.path={warm_model}", f"run_dir={run}",
         "advantage.estimator=grpo", "eval.every=3")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("pass_rate", "mean_final_distance", "reward_mean", "advantage_mean", "advantage_std",
                "clip_frac", "kl", "entropy", "lr", "grad_norm", "time_rollout", "time_advantage",
                "time_update"):
        assert key in rows[-1], key
    assert rows[-1]["episodes"] == 2 * 3
    assert "eval_pass_rate" in rows[-1]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = run / "checkpoints" / "step_000003"
    for name in ("weights/adapter_model.safetensors", "weights/adapter_config.json", "optimizer.pt",
                 "scheduler.pt", "rng.pt", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3

    out = tmp_path / "eval.json"
    _cli("eval", "--config", "tiny", f"model.path={warm_model}", f"run_dir={run}", "--out", out)
    ev = json.loads(out.read_text())
    assert ev["n"] == 30 and 0.0 <= ev["pass_rate"] <= 1.0
    assert ev["weights"].endswith("step_000003/weights")
    # Evaluation is deterministic by its seed.
    _cli("eval", "--config", "tiny", f"model.path={warm_model}", f"run_dir={run}", "--out", tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == ev


@pytest.mark.slow
def test_two_process_data_parallel(warm_model, tmp_path):
    """torchrun with two CPU processes (gloo): the batch is split, gradients are summed, and
    the processes stay in lockstep (one set of metrics, one checkpoint)."""
    pytest.importorskip("torch.distributed")
    run = tmp_path / "ddp"
    res = run_module("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mica_train.cli", "train",
                     "--config", "tiny", f"model.path={warm_model}", f"run_dir={run}", "steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["episodes"] == 2 * 3  # both processes' groups are counted once
    state = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
