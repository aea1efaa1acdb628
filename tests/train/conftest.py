"""Fixtures shared by the training tests: the tiny model, and a short run that saved
transcripts."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tests' tiny model (train_helpers.write_small_tiny_model), built once per session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from train_helpers import write_small_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "base"
    write_small_tiny_model(out)
    return out


@pytest.fixture(scope="session")
def transcript_run(tiny_model_dir, tmp_path_factory):
    """``(run_dir, trainer)``: 2 steps of the packaged ``tiny`` config with transcripts every
    step and an evaluation at every step."""
    pytest.importorskip("peft")
    from mica_train.config import load_config
    from mica_train.trainer import Trainer

    run = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config("tiny", [f"model.path={tiny_model_dir}", f"run_dir={run}", "steps=2",
                               "transcripts_every=1", "eval.every=1", "eval.max_turns=3",
                               "save_every=0"])
    trainer = Trainer(cfg)
    trainer.train()
    return run, trainer
