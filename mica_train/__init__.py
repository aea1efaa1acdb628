"""mica_train: LoRA policy-gradient training with mica_core advantages (see docs/training.md).

Public names load on first use, so importing the package (or ``--help``) pulls in neither
torch nor transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config", "load_config": "config", "apply_overrides": "config",
    "ConfigError": "config", "packaged_configs": "config",
    "Trainer": "trainer", "evaluate": "trainer", "warmup_cosine": "trainer",
    "Policy": "policy", "load_policy": "policy", "generate_replies": "policy",
    "response_logprobs": "policy", "collate_turns": "policy",
    "policy_loss": "loss", "ppo_clip_token_losses": "loss", "k3_kl": "loss",
    "run_episodes": "rollout", "trajectory_table": "rollout",
    "save_checkpoint": "checkpoint", "latest_checkpoint": "checkpoint",
    "write_tiny_model": "tiny", "TinyModelConfig": "tiny",
    "warm_start": "warmstart", "WarmStartConfig": "warmstart", "generate_corpus": "warmstart",
    "plot_learning_curves": "metrics",
    "write_report": "report", "read_transcripts": "transcripts", "add_credit": "transcripts",
}

__all__ = [
    "ConfigError",
    "Policy",
    "TinyModelConfig",
    "TrainConfig",
    "Trainer",
    "WarmStartConfig",
    "add_credit",
    "apply_overrides",
    "collate_turns",
    "evaluate",
    "generate_corpus",
    "generate_replies",
    "k3_kl",
    "latest_checkpoint",
    "load_config",
    "load_policy",
    "packaged_configs",
    "plot_learning_curves",
    "policy_loss",
    "ppo_clip_token_losses",
    "read_transcripts",
    "response_logprobs",
    "run_episodes",
    "save_checkpoint",
    "trajectory_table",
    "warm_start",
    "warmup_cosine",
    "write_report",
    "write_tiny_model",
]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
