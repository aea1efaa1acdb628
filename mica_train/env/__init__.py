"""EMPA-style support-state environment for mica_train (see docs/env.md).

Public names are loaded on first use, so ``python -m mica_train.env.cli --help`` stays instant.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AXES": "rubric", "INITIAL_KEYS": "rubric", "PROGRESS_KEYS": "rubric",
    "INDICATOR_WEIGHTS": "rubric", "initial_state": "rubric", "progress_increment": "rubric",
    "parse_initial_rubric": "rubric", "parse_progress_rubric": "rubric",
    "SupportTrajectory": "engine", "TurnRecord": "engine", "replay_episode": "engine",
    "mean_increment": "engine",
    "SUPPORT_ACTS": "acts", "detect_acts": "acts", "sample_reply": "acts",
    "Scenario": "scenarios", "generate_scenarios": "scenarios", "eval_scenarios": "scenarios",
    "save_scenarios": "scenarios", "load_scenarios": "scenarios",
    "EmbeddedDynamics": "simulator",
    "EnvConfig": "env", "StepResult": "env", "Episode": "env", "SupportEnv": "env",
    "make_env": "env", "aggregate_metrics": "env", "JudgeError": "env",
    "SCRIPTED_POLICIES": "policies", "run_episode": "policies", "evaluate_policy": "policies",
    "ChatClient": "llm", "LLMJudge": "llm", "LLMUser": "llm", "RequestStats": "llm",
    "LocalChatServer": "local_server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
