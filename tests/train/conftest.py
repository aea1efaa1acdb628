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
