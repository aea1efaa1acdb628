"""Resume equivalence: a run killed mid-step and resumed equals an uninterrupted run with the
same seed (weights, optimizer state and logged metrics); checkpoint writes are atomic."""

import json
import signal
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from train_helpers import run_mica, subprocess_env

from mica_train.checkpoint import latest_checkpoint
from mica_train.trainer import KILL_AFTER_STEPS_ENV


def _train(tiny_dir, run_dir, *overrides, kill_after=None):
    env = subprocess_env(**({KILL_AFTER_STEPS_ENV: str(kill_after)} if kill_after else {}))
    return run_mica("train", "--config", "tiny", f"model.path={tiny_dir}", f"run_dir={run_dir}", "steps=4",
                    *overrides, env=env)


def _metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "elapsed_seconds"} for r in rows]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_killed_and_resumed_equals_uninterrupted(tiny_model_dir, tmp_path, lora):
    opts = [f"lora.enabled={str(lora).lower()}"]
    full = tmp_path / "full"
    done = _train(tiny_model_dir, full, *opts)
    assert done.returncode == 0, done.stderr

    broken = tmp_path / "broken"
    killed = _train(tiny_model_dir, broken, *opts, kill_after=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(broken).name == "step_000002"
    assert [r["step"] for r in _metrics(broken)] == [1, 2]  # step 3 was under way, not logged

    resumed = _train(tiny_model_dir, broken, *opts)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "(step 2)" in resumed.stderr

    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a = _tensors(full / "checkpoints" / "step_000004" / "weights" / weights)
    b = _tensors(broken / "checkpoints" / "step_000004" / "weights" / weights)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-7), k
    # ... and the run really moved: the final weights differ from those after step 2.
    step2 = _tensors(full / "checkpoints" / "step_000002" / "weights" / weights)
    assert any(not torch.equal(a[k], step2[k]) for k in a)

    opt_a = torch.load(full / "checkpoints" / "step_000004" / "optimizer.pt", weights_only=False)
    opt_b = torch.load(broken / "checkpoints" / "step_000004" / "optimizer.pt", weights_only=False)
    for i, st in opt_a["state"].items():
        assert torch.allclose(st["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"], rtol=0, atol=1e-9)
        assert float(st["step"]) == float(opt_b["state"][i]["step"])

    ma, mb = _metrics(full), _metrics(broken)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]  # no step applied or logged twice
    assert ma == mb


def test_latest_checkpoint_ignores_incomplete_directories(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_000003").mkdir(parents=True)  # no trainer_state.json: incomplete
    (root / "step_000002").mkdir()
    (root / "step_000002" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert latest_checkpoint(tmp_path / "nothing") is None


@pytest.mark.slow
def test_resuming_with_another_training_config_is_refused(tiny_model_dir, tmp_path):
    # Was: optim.lr and lora.r silently ignored (old schedule and adapter continued) while
    # config.json was overwritten with the new values.
    run = tmp_path / "run"
    first = _train(tiny_model_dir, run, "steps=2", "save_every=1")
    assert first.returncode == 0, first.stderr
    record = (run / "config.json").read_text()
    changed = _train(tiny_model_dir, run, "steps=2", "save_every=1", "optim.lr=0.5", "lora.r=8")
    assert changed.returncode == 2
    err = changed.stderr.strip().splitlines()
    assert len(err) == 1 and "another config" in err[0], changed.stderr
    assert "lora.r: 4 -> 8" in err[0] and "optim.lr:" in err[0] and "-> 0.5" in err[0]
    assert (run / "config.json").read_text() == record  # the record is untouched
    # watching and evaluation settings may change: the run resumes (and has nothing left)
    same = _train(tiny_model_dir, run, "steps=2", "save_every=2", "eval.episodes_per_scenario=1",
                  "progress=false")
    assert same.returncode == 0, same.stderr
