"""Resume equivalence: a run killed mid-step and resumed equals an uninterrupted run with the
same seed (weights, optimizer state and logged metrics); checkpoint writes are atomic."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from mica_train.checkpoint import latest_checkpoint
from mica_train.tiny import TinyModelConfig, write_tiny_model
from mica_train.warmstart import corpus_texts, generate_corpus

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "base"
    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    write_tiny_model(out, corpus_texts(generate_corpus(12, seed=0)), cfg)
    return out


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def _train(tiny_dir, run_dir, *overrides):
    cmd = [sys.executable, "-m", "mica_train.cli", "train", "--config", str(CONFIG),
           "--set", f"model.path={tiny_dir}", "--set", f"run_dir={run_dir}", "--set", "steps=4"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, check=False)


def _metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "elapsed_seconds"} for r in rows]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_killed_and_resumed_equals_uninterrupted(tiny_dir, tmp_path, lora):
    opts = [f"lora.enabled={str(lora).lower()}"]
    full = tmp_path / "full"
    done = _train(tiny_dir, full, *opts)
    assert done.returncode == 0, done.stderr

    broken = tmp_path / "broken"
    killed = _train(tiny_dir, broken, *opts, "stop_after=2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(broken).name == "step_000002"
    assert [r["step"] for r in _metrics(broken)] == [1, 2]  # step 3 was under way, not logged

    resumed = _train(tiny_dir, broken, *opts)
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
