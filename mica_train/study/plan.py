"""What a study runs: the estimators, seeds, contrasts, training config, warm start, evaluation
checkpoints and credit diagnostic, and the jobs that follow from them. Nothing here imports
torch.

A :class:`StudyPlan` is a frozen dataclass; :data:`FULL` and :data:`QUICK` are the two presets
and ``dataclasses.replace(FULL, seeds=(0, 1), ...)`` makes any other. ``plan.jobs()`` lists the
:class:`Job` s: the credit diagnostic per seed (no model needed), the warm start's evaluation,
then one training run per (seed, estimator), seed by seed, so that a partial study is
balanced. A job's ``fingerprint`` covers everything that determines its result (the resolved
config, the warm start, the checkpoints, the result format), which is what lets an interrupted
study resume without rerunning finished jobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import redact_override

__all__ = [
    "CONTRASTS",
    "CURVE_KEYS",
    "ESTIMATORS",
    "EVAL_METRICS",
    "EVAL_SCENARIOS",
    "FULL",
    "POLICIES",
    "PRESETS",
    "QUICK",
    "TABULAR",
    "TABULAR_QUICK",
    "TURN_ADR",
    "RESULT_VERSION",
    "CreditSpec",
    "Job",
    "StudyPlan",
    "WarmStartSpec",
    "checkpoint_steps",
    "register_study_estimators",
]

# The study's own estimator: the paper's turn-level reward ablation, mica_turn with ADR rewards
# r_t = -D_t (mica_core's presets have the group-level one, mica_group_adr). Registered on import
# of this module (so in every worker) unless a user registered the name first.
TURN_ADR = "mica_turn_adr"


def register_study_estimators() -> None:
    import mica_core as mc

    if TURN_ADR not in mc.list_estimators():
        mc.register_estimator(TURN_ADR, [(1.0, "return", "turn")], reward="adr", gamma=0.85,
                              description="z_turn(G), ADR r_t = -D_t (the paper's reward ablation of "
                              "mica_turn; registered by mica study)")


register_study_estimators()

POLICIES = ("lm", "tabular")

# The pre-registered contrasts (docs/study.md): (a, b) reads "a against b"; a positive paired
# difference a - b is the direction the MICA paper reports.
CONTRASTS = (
    ("mica", "mica_turn"),        # the mixed advantage against its turn-level part alone
    ("mica", "mica_group"),       # ... against its group-level part alone
    ("mica_group", "mica_group_adr"),  # the reward ablation: IDR against ADR at group level
    ("mica_turn", TURN_ADR),      # ... and at turn level (the paper: 5.3 / 34.0 against 3.3 / 31.5)
    ("mica", "grpo"),             # against trajectory-level GRPO
    ("mica", "reinforce_pp"),     # against trajectory-level REINFORCE++
)

# The estimators the contrasts need, in the order of the tables.
ESTIMATORS = ("mica", "mica_turn", "mica_group", "mica_group_adr", TURN_ADR, "grpo", "reinforce_pp")

# The shares of the reply acts in the behaviour summary (study/evaluation.py).
ACT_KEYS = ("validate", "reframe", "plan", "multiple", "none")

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
    "ppo_kl",
    "entropy",
    "grad_norm",
    "time_step",
)

EVAL_SCENARIOS = 30  # the fixed evaluation set (mica_train.env.eval_scenarios)

# Bumped when a result file changes shape: older results are then run again.
RESULT_VERSION = 4


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_steps(steps: int, n: int) -> tuple[int, ...]:
    """``n`` evaluation steps spread evenly over ``1..steps``, the last one ``steps``:
    ``round(steps * k / n)`` for ``k = 1..n`` (fewer when ``steps < n``)."""
    return tuple(sorted({max(1, round(steps * k / n)) for k in range(1, max(1, n) + 1)}))


@dataclass(frozen=True)
class WarmStartSpec:
    """The tiny model and its supervised warm start, shared by every run of a study."""

    steps: int = 400
    tiny: dict[str, int] = field(default_factory=dict)  # TinyModelConfig fields ({}: its defaults)
    corpus_episodes: int = 200
    seed: int = 0


@dataclass(frozen=True)
class CreditSpec:
    """Sizes of the training-free credit diagnostic (``credit.py``), per study seed: random-act
    rollouts of ``scenarios`` cards x ``group_size``; the true advantage from ``forks`` forks per
    act on every turn of the first ``fork_scenarios`` cards."""

    scenarios: int = 64
    group_size: int = 8
    forks: int = 8
    fork_scenarios: int = 12


@dataclass(frozen=True)
class Job:
    """One unit of work, written to ``result`` as JSON:

    - ``credit``: the credit diagnostic of seed ``seed`` (no model);
    - ``before``: the warm start's evaluation (and a replicate on other episode seeds);
    - ``train``: one training run of ``estimator`` with evaluations at ``checkpoints``.
    """

    kind: str
    estimator: str | None
    seed: int
    result: Path
    config: str
    overrides: tuple[str, ...]
    threads: int
    fingerprint: str
    checkpoints: tuple[int, ...] = ()
    credit: tuple = ()  # (estimators, CreditSpec, max_turns, min_turns) of a credit job
    policy: str = "lm"  # "lm": the warm-started language model; "tabular": study/tabular.py
    plugins: tuple[str, ...] = ()  # modules a worker imports first (users' estimators)

    @property
    def label(self) -> str:
        if self.kind == "before":
            return "warm start" if self.policy == "lm" else "uniform policy"
        if self.kind == "credit":
            return f"credit diagnostic seed {self.seed}"
        return f"{self.estimator} seed {self.seed}"


@dataclass(frozen=True)
class StudyPlan:
    """Everything a study needs, resolved from the command line (no torch import).

    ``config`` is a YAML path or a packaged config name (``study``); ``overrides`` are
    ``key=value`` strings applied to every run. Per run the plan sets ``model.path`` (the warm
    start), ``seed``, ``threads``, ``advantage.estimator`` and ``run_dir``. Each run is evaluated
    at ``checkpoints`` evenly spaced steps (:func:`checkpoint_steps`); the primary metric is its
    pass rate averaged over them. ``contrasts`` are tested at level ``alpha`` (Holm over the
    family) and sized at ``power``.
    """

    estimators: tuple[str, ...] = ESTIMATORS
    seeds: tuple[int, ...] = tuple(range(8))
    config: str = "study"
    overrides: tuple[str, ...] = ()
    run_dir: Path = Path("runs/study")
    workers: int = 2
    threads: int = 1
    warm: WarmStartSpec = WarmStartSpec()
    credit: CreditSpec | None = CreditSpec()
    checkpoints: int = 4
    contrasts: tuple[tuple[str, str], ...] = CONTRASTS
    alpha: float = 0.05
    power: float = 0.8
    quick: bool = False
    command: str = "mica study"
    policy: str = "lm"
    plugins: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "estimators", tuple(self.estimators))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "contrasts", tuple(tuple(c) for c in self.contrasts))
        object.__setattr__(self, "plugins", tuple(self.plugins))
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")

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
    def active_contrasts(self) -> tuple[tuple[str, str], ...]:
        """The contrasts whose two estimators this plan runs."""
        return tuple(c for c in self.contrasts if c[0] in self.estimators and c[1] in self.estimators)

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

    def checkpoint_steps(self) -> tuple[int, ...]:
        return checkpoint_steps(self.load().steps, self.checkpoints)

    def warm_spec(self) -> dict:
        """What determines the warm start: the model, its corpus and the context it is shown
        (the same ``context_messages`` and ``context_replies`` as the rollouts). A tabular
        policy has no warm start: it starts uniform."""
        if self.policy == "tabular":
            return {"policy": "tabular"}
        cfg = self.load()
        return {
            "warm_start_steps": self.warm.steps,
            "seed": self.warm.seed,
            "tiny": self.warm.tiny,
            "corpus_episodes": self.warm.corpus_episodes,
            "context_messages": cfg.rollout.context_messages,
            "context_replies": cfg.rollout.context_replies,
            "system_prompt": cfg.rollout.system_prompt,
        }

    def run_fingerprint(self, estimator: str | None, seed: int, *, warm: dict | None = None,
                        steps: tuple[int, ...] | None = None) -> str:
        """The fingerprint of one run's result; ``warm`` and ``steps`` (the same for every run
        of the plan: :meth:`warm_spec`, :meth:`checkpoint_steps`) are computed when not given."""
        from ..config import config_to_dict

        cfg = config_to_dict(self.load(estimator, seed))
        cfg.pop("run_dir", None)
        cfg.pop("threads", None)
        if estimator is None:  # the warm-start evaluation: only the policy and the evaluation matter
            cfg = {k: cfg[k] for k in ("model", "lora", "env", "rollout", "eval")}
            extra = {}
        else:
            extra = {"checkpoints": self.checkpoint_steps() if steps is None else steps}
        warm = self.warm_spec() if warm is None else warm
        return fingerprint({"config": cfg, "warm": warm, "version": RESULT_VERSION, **extra})

    def credit_args(self) -> tuple:
        cfg = self.load()
        return (self.estimators, self.credit, cfg.env.max_turns, cfg.env.min_turns)

    # -------------------------------------------------------------------- jobs
    def jobs(self) -> list[Job]:
        """The credit diagnostics, the warm-start evaluation, then the runs seed by seed (so a
        partial study is balanced)."""
        common = {"config": self.config, "threads": self.threads, "policy": self.policy, "plugins": self.plugins}
        out = []
        if self.credit is not None:
            credit = self.credit_args()
            out = [Job(kind="credit", estimator=None, seed=seed, result=self.run_dir / "credit" / f"seed{seed}.json",
                       overrides=(), credit=credit, **common,
                       fingerprint=fingerprint({"credit": [list(credit[0]), dataclasses.asdict(credit[1]),
                                                           *credit[2:]], "seed": seed, "version": RESULT_VERSION}))
                   for seed in self.seeds]
        warm, steps = self.warm_spec(), self.checkpoint_steps()
        out.append(Job(kind="before", estimator=None, seed=self.seeds[0], result=self.run_dir / "before.json",
                       overrides=tuple(self.run_overrides(None, self.seeds[0])), **common,
                       fingerprint=self.run_fingerprint(None, self.seeds[0], warm=warm)))
        out += [Job(kind="train", estimator=est, seed=seed, result=self.train_dir(est, seed) / "result.json",
                    overrides=tuple(self.run_overrides(est, seed)), **common,
                    fingerprint=self.run_fingerprint(est, seed, warm=warm, steps=steps), checkpoints=steps)
                for seed in self.seeds for est in self.estimators]
        return out

    def settings(self) -> dict:
        """The sizes of the study as ``study.json`` reports them, plus the resolved config."""
        from ..config import config_to_dict

        cfg = self.load(self.estimators[0] if self.estimators else None, self.seeds[0] if self.seeds else 0)
        d = config_to_dict(cfg)
        for k in ("run_dir", "seed"):
            d.pop(k, None)
        d["advantage"].pop("estimator", None)
        episodes = cfg.data.scenarios_per_step * cfg.data.group_size
        lm = self.policy == "lm"
        return {
            "policy": self.policy,
            "plugins": list(self.plugins),
            "estimators": list(self.estimators),
            "seeds": list(self.seeds),
            "contrasts": [list(c) for c in self.active_contrasts],
            "alpha": self.alpha,
            "power": self.power,
            "steps": cfg.steps,
            "checkpoints": list(self.checkpoint_steps()),
            "scenarios_per_step": cfg.data.scenarios_per_step,
            "group_size": cfg.data.group_size,
            "episodes_per_step": episodes,
            "episodes_per_run": episodes * cfg.steps,
            "updates_per_run": cfg.steps * cfg.optim.epochs * cfg.optim.minibatches,
            "train_max_turns": cfg.env.max_turns,
            "train_min_turns": cfg.env.min_turns,
            "context_messages": cfg.rollout.context_messages,
            "context_replies": cfg.rollout.context_replies,
            "epochs": cfg.optim.epochs,
            "minibatches": cfg.optim.minibatches,
            "eval_scenarios": EVAL_SCENARIOS,
            "eval_episodes_per_scenario": cfg.eval.episodes_per_scenario,
            "eval_episodes": EVAL_SCENARIOS * cfg.eval.episodes_per_scenario,
            "eval_max_turns": cfg.eval.max_turns or cfg.env.max_turns,
            "eval_temperature": cfg.eval.temperature,
            "eval_seed": cfg.eval.seed,
            "lr": cfg.optim.lr,
            "warm_start_steps": self.warm.steps if lm else None,
            "tiny_model": (self.warm.tiny or "defaults") if lm else None,
            "credit": dataclasses.asdict(self.credit) if self.credit is not None else None,
            "workers": self.workers,
            "threads_per_worker": self.threads,
            "config_file": self.config,
            "overrides": [redact_override(o) for o in self.overrides],
            "quick": self.quick,
            "config": d,
        }


# The language-model study (docs/study.md): 7 estimators x 8 seeds on the packaged `study`
# config (18 steps), evaluated at steps 9 and 18 (the pilot's budget: an evaluation of 30
# episodes costs about 3 training steps).
FULL = StudyPlan(checkpoints=2)

# --quick: seconds-long runs that exercise every stage (sizes only; not a result).
QUICK = StudyPlan(
    seeds=(0, 1),
    overrides=(
        "steps=2",
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
    credit=CreditSpec(scenarios=6, group_size=4, forks=2, fork_scenarios=2),
    checkpoints=2,
    quick=True,
    command="mica study --quick",
)

# The tabular study (docs/study.md, "Tabular study"): every estimator trains the softmax policy
# of study/tabular.py from uniform, over 30 seeds; no warm start and no credit diagnostic (it
# does not depend on the policy: the language-model study runs it). The learning rate and the
# batch shape are the pilot's (docs/study.md, "Pilot").
TABULAR = StudyPlan(
    seeds=tuple(range(30)),
    overrides=(
        "optim.lr=0.01",
        "data.scenarios_per_step=2",
        "data.group_size=6",
        "steps=36",
    ),
    run_dir=Path("runs/study-tabular"),
    credit=None,
    policy="tabular",
    command="mica study --policy tabular",
)

# --policy tabular --quick: a smoke run of every stage in seconds (sizes only; not a result).
TABULAR_QUICK = TABULAR.replace(
    seeds=(0, 1),
    overrides=(*TABULAR.overrides, "steps=4", "data.scenarios_per_step=2", "data.group_size=4",
               "eval.episodes_per_scenario=1"),
    run_dir=Path("runs/study-tabular-quick"),
    checkpoints=2,
    quick=True,
    command="mica study --policy tabular --quick",
)

PRESETS = {("lm", False): FULL, ("lm", True): QUICK, ("tabular", False): TABULAR, ("tabular", True): TABULAR_QUICK}
