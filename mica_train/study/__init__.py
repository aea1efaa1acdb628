"""The credit-assignment study (``mica study``, docs/study.md): every estimator trains the same
warm-started tiny policy at the same rollout budget over several seeds and plays the evaluation
scenario set at several checkpoints; pre-registered paired contrasts are tested on the pass rate
averaged over the checkpoints; a training-free credit diagnostic scores the advantages
themselves, against a true advantage measured by forking episodes.

The parts, each replaceable on its own:

- ``plan``: :class:`StudyPlan` (estimators, seeds, contrasts, training config and overrides,
  warm start, checkpoints, credit diagnostic sizes, run directory) and the :class:`Job` s it
  implies, with the fingerprints that make a study resumable; ``FULL`` and ``QUICK`` are the
  presets;
- ``run``: the shared warm start, the job runner (a spawned process pool; finished jobs are
  skipped), and :func:`run_study`, which ties the stages together;
- ``evaluation``: the trainer's evaluation plus what the policy does in it (behaviour);
- ``credit``: the credit diagnostic (AUC of each estimator's advantages for good turns, and
  their correlation with the true advantage from forked episodes);
- ``stats``: statistics over seeds, t intervals, one-sided paired t-tests, Holm, the power and
  minimum detectable effect of that procedure (pure functions);
- ``tabular``: the fast policy class (``--policy tabular``): a softmax policy over the features
  the language model sees, trained by the same PPO-clip loss and estimators;
- ``report``: Markdown tables, the figure, ``study.json`` / ``study.md``, and ``--publish``;
- ``cli``: the ``mica study`` command line.

Stages of a run: (1) build the tiny model and warm-start it once (``RUN_DIR/tiny-warm``), while
the credit diagnostic runs per seed (``RUN_DIR/credit/seed<k>.json``); (2) evaluate the warm
start (``RUN_DIR/before.json``); (3) one training run per (estimator, seed) in
``RUN_DIR/runs/<estimator>/seed<k>`` whose ``result.json`` holds its evaluations at the
checkpoints and its learning curve; (4) ``RUN_DIR/study.json``, ``study_curves.png`` and
``study.md``.
"""

from __future__ import annotations

from .cli import build_parser, main, plan_from_args
from .plan import (
    CONTRASTS,
    ESTIMATORS,
    FULL,
    QUICK,
    TABULAR,
    TABULAR_QUICK,
    TURN_ADR,
    CreditSpec,
    Job,
    StudyPlan,
    WarmStartSpec,
)
from .report import (
                     format_behaviour_table,
                     format_contrast_table,
                     format_credit_table,
                     format_movement_table,
                     format_table,
                     plot_study_curves,
)
from .run import run_study
from .stats import (
                     bootstrap_mean_ci,
                     holm,
                     minimum_detectable_difference,
                     minimum_detectable_effect,
                     power_t_greater,
                     seed_stats,
                     sign_flip_pvalue,
                     summarize,
                     t_interval,
                     t_quantile,
                     t_test_greater,
)

__all__ = [
    "CONTRASTS",
    "ESTIMATORS",
    "FULL",
    "QUICK",
    "TABULAR",
    "TABULAR_QUICK",
    "TURN_ADR",
    "CreditSpec",
    "Job",
    "StudyPlan",
    "WarmStartSpec",
    "bootstrap_mean_ci",
    "build_parser",
    "format_behaviour_table",
    "format_contrast_table",
    "format_credit_table",
    "format_movement_table",
    "format_table",
    "holm",
    "main",
    "minimum_detectable_difference",
    "minimum_detectable_effect",
    "plan_from_args",
    "plot_study_curves",
    "power_t_greater",
    "run_study",
    "seed_stats",
    "sign_flip_pvalue",
    "summarize",
    "t_interval",
    "t_quantile",
    "t_test_greater",
]
