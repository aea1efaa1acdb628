"""Helpers of the training tests: mica_train's commands in a subprocess (the way users run
them) and the tiny model the tests train."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MICA = Path(sys.executable).with_name("mica")  # the console script installed beside this python


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", **extra)
    return env


def run_mica(*args, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    """``mica ARGS`` through the installed console script (``python -m mica_core.cli`` when
    there is none, e.g. without an install)."""
    cmd = [str(MICA)] if MICA.is_file() else [sys.executable, "-m", "mica_core.cli"]
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env or subprocess_env(),
                          capture_output=True, text=True, check=False)


def run_module(module: str, *args, env=None) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (for launchers such as torchrun)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env=env or subprocess_env(), capture_output=True, text=True, check=False)


def write_small_tiny_model(out):
    """The tiny Llama model and tokenizer of the tests (hidden 32; about a second)."""
    from mica_train.tiny import TinyModelConfig, write_tiny_model
    from mica_train.warmstart import corpus_texts, generate_corpus

    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    return write_tiny_model(out, corpus_texts(generate_corpus(12, seed=0)), cfg)
