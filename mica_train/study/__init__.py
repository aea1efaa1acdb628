"""The credit-assignment study (``mica study``, docs/study.md): every estimator trains the same
warm-started tiny policy at the same rollout budget over several seeds, then plays the
evaluation scenario set; a training-free credit diagnostic scores the advantages themselves.

The parts, each replaceable on its own:

- ``plan``: :class:`StudyPlan` (estimators, seeds, training config and overrides, warm start,
  run directory) and the :class:`Job` s it implies, with the fingerprints that make a study
  resumable; ``FULL`` and ``QUICK`` are the presets;
- ``run``: the shared warm start, the job runner (a spawned process pool; finished jobs are
  skipped), the credit diagnostic, and :func:`run_study`, which ties the stages together;
- ``evaluation``: the trainer's evaluation plus what the policy does in it (behaviour);
- ``credit``: the credit diagnostic (AUC of each estimator's advantages for good turns);
- ``stats``: statistics over seeds, paired differences, noise (pure functions);
- ``report``: Markdown tables, the figure, ``study.json`` / ``study.md``, and ``--publish``;
- ``cli``: the ``mica study`` command line.

Stages of a run: (1) build the tiny model and warm-start it once (``RUN_DIR/tiny-warm``);
(2) evaluate the warm start (``RUN_DIR/before.json``); (3) one training run per (estimator,
seed) in ``RUN_DIR/runs/<estimator>/seed<k>`` whose ``result.json`` holds its evaluation and
learning curve; (4) the credit diagnostic; (5) ``RUN_DIR/study.json``, ``study_curves.png`` and
``study.md``.
"""

from __future__ import annotations

from .cli import build_parser, main, plan_from_args
from .plan import ESTIMATORS, FULL, QUICK, Job, StudyPlan, WarmStartSpec
from .report import format_behaviour_table, format_credit_table, format_table, plot_study_curves
from .run import run_study
from .stats import seed_stats, summarize

__all__ = [
    "ESTIMATORS",
    "FULL",
    "QUICK",
    "Job",
    "StudyPlan",
    "WarmStartSpec",
    "build_parser",
    "format_behaviour_table",
    "format_credit_table",
    "format_table",
    "main",
    "plan_from_args",
    "plot_study_curves",
    "run_study",
    "seed_stats",
    "summarize",
]
