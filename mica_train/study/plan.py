"""What a study runs: the estimators, seeds, training config, warm start and evaluation, and the
jobs that follow from them. Nothing here imports torch.

A :class:`StudyPlan` is a frozen dataclass; :data:`FULL` and :data:`QUICK` are the two presets
and ``dataclasses.replace(FULL, seeds=(0, 1), ...)`` makes any other. ``plan.jobs()`` lists the
:class:`Job` s: the warm start's evaluation first, then one training run per (seed, estimator),
seed by seed, so that a partial study is balanced. A job's ``fingerprint`` covers everything
that determines its result (the resolved config, the warm start, the result format), which is
what lets an interrupted study resume without rerunning finished jobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CURVE_KEYS",
    "ESTIMATORS",
    "EVAL_METRICS",
    "EVAL_SCENARIOS",
    "FULL",
    "QUICK",
    "RESULT_VERSION",
    "Job",
    "StudyPlan",
    "WarmStartSpec",
]

# The paper's comparison, in the order of the tables.
ESTIMATORS = (
    "mica",
    "mica_turn",
    "mica_group",
    "mica_adr",
    "mapo",
    "grpo",
    "reinforce_pp",
    "reinforce_pp_idr",
)

# Metrics of the evaluation episodes reported per estimator (EMPA-style, aggregate_metrics).
EVAL_METRICS = (
    "pass_rate",
    "mean_final_distance",
    "mean_energy",
    "mean_positive_energy_ratio",
    "mean_turns",
)

# Per-step training metrics kept in each run's learning curve.
CURVE_KEYS = (
    "pass_rate",
    "mean_final_distance",
    "reward_mean",
    "mean_turns",
    "advantage_std",
    "clip_frac",
    "entropy",
    "grad_norm",
    "time_step",
)

EVAL_SCENARIOS = 30  # the fixed evaluation set (mica_train.env.eval_scenarios)

# Bumped when a run's result.json changes shape: older results are then run again.
RESULT_VERSION = 2


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WarmStartSpec:
    """The tiny model and its supervised warm start, shared by every run of a study."""

    steps: int = 400
    tiny: dict[str, int] = field(default_factory=dict)  # TinyModelConfig fields ({}: its defaults)
    corpus_episodes: int = 200
    seed: int = 0


@dataclass(frozen=True)
class Job:
    """One unit of work: the warm start's evaluation (``estimator`` None) or one training run
    followed by its evaluation. ``result`` is the JSON file it writes."""

    estimator: str | None
    seed: int
    result: Path
    config: str
    overrides: tuple[str, ...]
    threads: int
    fingerprint: str

    @property
    def label(self) -> str:
        return "warm start" if self.estimator is None else f"{self.estimator} seed {self.seed}"


@dataclass(frozen=True)
class StudyPlan:
    """Everything a study needs, resolved from the command line (no torch import).

    ``config`` is a YAML path or a packaged config name (``study``); ``overrides`` are
    ``key=value`` strings applied to every run. Per run the plan sets ``model.path`` (the warm
    start), ``seed``, ``threads``, ``advantage.estimator`` and ``run_dir``.
    """

    estimators: tuple[str, ...] = ESTIMATORS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    config: str = "study"
    overrides: tuple[str, ...] = ()
    run_dir: Path = Path("runs/study")
    workers: int = 2
    threads: int = 1
    warm: WarmStartSpec = WarmStartSpec()
    credit_size: tuple[int, int] = (64, 8)  # credit diagnostic: cards x rollouts per seed
    quick: bool = False
    command: str = "mica study"

    def __post_init__(self):
        object.__setattr__(self, "estimators", tuple(self.estimators))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    def replace(self, **changes) -> StudyPlan:
        return dataclasses.replace(self, **changes)

    # -------------------------------------------------------------------- layout
    @property
    def warm_dir(self) -> Path:
        return self.run_dir / "tiny-warm"

    @property
    def base_dir(self) -> Path:
        return self.run_dir / "tiny-base"

    def train_dir(self, estimator: str, seed: int) -> Path:
        return self.run_dir / "runs" / estimator / f"seed{seed}"

    @property
    def reference(self) -> str:
        """The estimator every other is compared with, seed by seed."""
        return "mica" if "mica" in self.estimators else self.estimators[0]

    # -------------------------------------------------------------------- configs
    def run_overrides(self, estimator: str | None, seed: int) -> list[str]:
        out = [*self.overrides, f"model.path={self.warm_dir}", f"seed={seed}", f"threads={self.threads}"]
        if estimator is not None:
            out += [f"advantage.estimator={estimator}", f"run_dir={self.train_dir(estimator, seed)}"]
        return out

    def load(self, estimator: str | None = None, seed: int = 0):
        """The resolved ``TrainConfig`` of one run (``estimator`` None: the warm start's)."""
        from ..config import load_config

        return load_config(self.config, self.run_overrides(estimator, seed))

    def warm_spec(self) -> dict:
        cfg = self.load()
        return {
            "warm_start_steps": self.warm.steps,
            "seed": self.warm.seed,
            "tiny": self.warm.tiny,
            "corpus_episodes": self.warm.corpus_episodes,
            "context_messages": cfg.rollout.context_messages,
        }

    def run_fingerprint(self, estimator: str | None, seed: int) -> str:
        from ..config import config_to_dict

        cfg = config_to_dict(self.load(estimator, seed))
        cfg.pop("run_dir", None)
        cfg.pop("threads", None)
        if estimator is None:  # the warm-start evaluation: only the policy and the evaluation matter
            cfg = {k: cfg[k] for k in ("model", "lora", "env", "rollout", "eval")}
        return fingerprint({"config": cfg, "warm": self.warm_spec(), "version": RESULT_VERSION})

    # -------------------------------------------------------------------- jobs
    def jobs(self) -> list[Job]:
        """The warm-start evaluation, then the runs seed by seed (so a partial study is balanced)."""
        specs = [(None, self.seeds[0], self.run_dir / "before.json")]
        specs += [(est, seed, self.train_dir(est, seed) / "result.json")
                  for seed in self.seeds for est in self.estimators]
        return [Job(estimator=est, seed=seed, result=result, config=self.config,
                    overrides=tuple(self.run_overrides(est, seed)), threads=self.threads,
                    fingerprint=self.run_fingerprint(est, seed))
                for est, seed, result in specs]

    def settings(self) -> dict:
        """The sizes of the study as ``study.json`` reports them, plus the resolved config."""
        from ..config import config_to_dict

        cfg = self.load(self.estimators[0] if self.estimators else None, self.seeds[0] if self.seeds else 0)
        d = config_to_dict(cfg)
        for k in ("run_dir", "seed"):
            d.pop(k, None)
        d["advantage"].pop("estimator", None)
        episodes = cfg.data.scenarios_per_step * cfg.data.group_size
        return {
            "estimators": list(self.estimators),
            "seeds": list(self.seeds),
            "steps": cfg.steps,
            "scenarios_per_step": cfg.data.scenarios_per_step,
            "group_size": cfg.data.group_size,
            "episodes_per_step": episodes,
            "episodes_per_run": episodes * cfg.steps,
            "train_max_turns": cfg.env.max_turns,
            "train_min_turns": cfg.env.min_turns,
            "eval_scenarios": EVAL_SCENARIOS,
            "eval_episodes_per_scenario": cfg.eval.episodes_per_scenario,
            "eval_episodes": EVAL_SCENARIOS * cfg.eval.episodes_per_scenario,
            "eval_max_turns": cfg.eval.max_turns or cfg.env.max_turns,
            "eval_temperature": cfg.eval.temperature,
            "eval_seed": cfg.eval.seed,
            "lr": cfg.optim.lr,
            "warm_start_steps": self.warm.steps,
            "tiny_model": self.warm.tiny or "defaults",
            "workers": self.workers,
            "threads_per_worker": self.threads,
            "config_file": self.config,
            "overrides": list(self.overrides),
            "quick": self.quick,
            "config": d,
        }


# The full study (docs/study.md): 8 estimators x 5 seeds on the packaged `study` config.
FULL = StudyPlan()

# --quick: seconds-long runs that exercise every stage (sizes only; not a result).
QUICK = StudyPlan(
    seeds=(0, 1),
    overrides=(
        "steps=1",
        "data.scenarios_per_step=2",
        "data.group_size=2",
        "env.max_turns=4",
        "env.min_turns=3",
        "rollout.max_new_tokens=8",
        "optim.minibatches=1",
        "eval.episodes_per_scenario=1",
        "eval.max_turns=4",
    ),
    run_dir=Path("runs/study-quick"),
    warm=WarmStartSpec(
        steps=20,
        tiny={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1},
        corpus_episodes=12,
    ),
    credit_size=(6, 4),
    quick=True,
    command="mica study --quick",
)
