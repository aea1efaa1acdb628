"""End to end through the command line: tiny model -> warm start -> train -> eval, the outputs
of a run, the config parser, and a two-process data-parallel run (gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mica_train.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny.yaml"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def _cli(*args, module="mica_train.cli"):
    res = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_help_is_light():
    out = subprocess.run(
        [sys.executable, "-c", (
            "import sys; from mica_train.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
        )],
        env=_env(), cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "tiny-model" in out.stdout and out.stdout.strip().endswith("[]")


def test_config_file_overrides_and_errors(tmp_path):
    cfg = load_config(CONFIG, ["optim.lr=3e-4", "lora.target_modules=[q_proj,v_proj]", "advantage.options={gamma: 0.9}"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 3e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.advantage.options == {"gamma": 0.9}
    assert cfg.data.group_size == 3  # from the file
    assert load_config(None).loss.eps_high == 0.28  # defaults
    with pytest.raises(ValueError, match="unknown key"):
        load_config(CONFIG, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="expected true or false"):
        load_config(CONFIG, ["lora.enabled=maybe"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(CONFIG, ["steps"])
    res = _cli("train", "--config", CONFIG, "--set", "steps=7", "--print-config")
    assert "steps: 7" in res.stdout


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


def test_train_then_eval(warm_model, tmp_path):
    run = tmp_path / "run"
    _cli("train", "--config", CONFIG, "--set", f"model.path={warm_model}", "--set", f"run_dir={run}",
         "--set", "advantage.estimator=grpo", "--set", "eval.every=3")
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
    _cli("eval", "--config", CONFIG, "--set", f"model.path={warm_model}", "--set", f"run_dir={run}",
         "--out", out)
    ev = json.loads(out.read_text())
    assert ev["n"] == 30 and 0.0 <= ev["pass_rate"] <= 1.0
    assert ev["weights"].endswith("step_000003/weights")
    # Evaluation is deterministic by its seed.
    _cli("eval", "--config", CONFIG, "--set", f"model.path={warm_model}", "--set", f"run_dir={run}",
         "--out", tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == ev


def test_two_process_data_parallel(warm_model, tmp_path):
    """torchrun with two CPU processes (gloo): the batch is split, gradients are summed, and
    the processes stay in lockstep (one set of metrics, one checkpoint)."""
    pytest.importorskip("torch.distributed")
    run = tmp_path / "ddp"
    _cli("--standalone", "--nproc_per_node=2", "-m", "mica_train.cli", "train", "--config", CONFIG,
         "--set", f"model.path={warm_model}", "--set", f"run_dir={run}", "--set", "steps=2",
         module="torch.distributed.run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["episodes"] == 2 * 3  # both processes' groups are counted once
    state = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
