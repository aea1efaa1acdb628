"""Fixtures shared by the training tests: a tiny model and a short run that saved transcripts."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny Llama model and tokenizer (hidden 32), built offline."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mica_train.tiny import TinyModelConfig, write_tiny_model
    from mica_train.warmstart import corpus_texts, generate_corpus

    out = tmp_path_factory.mktemp("tiny") / "base"
    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    write_tiny_model(out, corpus_texts(generate_corpus(12, seed=0)), cfg)
    return out


@pytest.fixture(scope="session")
def transcript_run(tiny_base, tmp_path_factory):
    """``(run_dir, trainer)``: 2 steps of configs/tiny.yaml with transcripts every step and an
    evaluation at every step."""
    pytest.importorskip("peft")
    from mica_train.config import load_config
    from mica_train.trainer import Trainer

    run = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(TINY_CONFIG, [f"model.path={tiny_base}", f"run_dir={run}", "steps=2",
                                    "transcripts_every=1", "eval.every=1", "eval.max_turns=3",
                                    "save_every=0"])
    trainer = Trainer(cfg)
    trainer.train()
    return run, trainer
