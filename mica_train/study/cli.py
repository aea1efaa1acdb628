"""``mica study``: the command line of the credit-assignment study.

    mica study                                 # the full study, in runs/study/
    mica study --quick                         # a smoke run of every stage, in runs/study-quick/
    mica study --seeds 3 --estimators mica,grpo --steps 8 --checkpoints 2 optim.lr=1e-3
    mica study --publish                       # also write bench/results/study.json,
                                               # docs/study_curves.png and docs/study.md's tables
    mica study --policy tabular                # the fast policy class (study/tabular.py), 30 seeds
    mica study --policy tabular --plugin my_estimators --estimators mine,mica,grpo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import add_config_arguments, overrides_from_args, redact_override
from .plan import ESTIMATORS, FULL, POLICIES, PRESETS, QUICK, TABULAR, StudyPlan, WarmStartSpec

__all__ = ["build_parser", "load_plugins", "main", "plan_from_args"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mica study",
        description="Credit-assignment study: every estimator trains the same policy (the warm-started tiny "
        "language model, or with --policy tabular a softmax policy over the features it sees) at equal rollout "
        "budget over several seeds and is evaluated at several checkpoints on the evaluation scenario set; the "
        "pre-registered contrasts (docs/study.md) are tested on the pass rate averaged over the checkpoints "
        "(one-sided paired t-tests in the paper's direction, Holm). Writes study.json, study_curves.png and "
        "study.md into the run directory; an interrupted study resumes where it stopped.",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"seconds-long smoke run of every stage (run directory {QUICK.run_dir}; with --policy "
                   f"tabular {PRESETS['tabular', True].run_dir}; not a result)")
    p.add_argument("--policy", choices=POLICIES, default="lm",
                   help="what trains: lm, the warm-started tiny language model (default), or tabular, a softmax "
                   f"policy over the features the language model sees ({len(TABULAR.seeds)} seeds by default, "
                   f"run directory {TABULAR.run_dir})")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable): a user's mica_core.register_estimator calls, so that "
                   "--estimators can name them; the current directory is searched too")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds (default {len(FULL.seeds)}; --quick: {len(QUICK.seeds)})")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST .. FIRST+N-1")
    p.add_argument("--estimators", default=None, help=f"comma-separated (default: {','.join(ESTIMATORS)})")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    p.add_argument("--checkpoints", type=int, default=None,
                   help=f"evaluations per run, evenly spaced, the last at the final step "
                   f"(default {FULL.checkpoints}; --policy tabular: {TABULAR.checkpoints}; --quick: "
                   f"{QUICK.checkpoints})")
    p.add_argument("--run-dir", default=None,
                   help=f"warm start, runs and outputs (default {FULL.run_dir}; --quick: {QUICK.run_dir})")
    p.add_argument("--publish", action="store_true",
                   help="also write the committed results of the mica checkout in the current directory: "
                   "bench/results/study.json, docs/study_curves.png and the tables of docs/study.md")
    p.add_argument("--workers", type=int, default=FULL.workers, help="parallel training processes (default 2)")
    p.add_argument("--threads", type=int, default=FULL.threads, help="torch threads per worker (default 1)")
    p.add_argument("--warm-start-steps", type=int, default=None,
                   help=f"supervised warm-start steps (default {FULL.warm.steps}; --quick: {QUICK.warm.steps})")
    add_config_arguments(p, default=FULL.config, scope=" of every run")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    return p


def load_plugins(modules) -> None:
    """Import ``--plugin`` modules (the current directory first on the path, as ``python -m``
    has it); raises ``ValueError`` naming the module when one fails to import."""
    import os

    from .run import import_plugins

    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            import_plugins([name])
        except (Exception, SystemExit) as exc:
            what = str(exc).splitlines()[0] if str(exc) else ""
            raise ValueError(f"--plugin {name}: cannot import it ({type(exc).__name__}"
                             f"{': ' + what if what else ''})") from None


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    """The plan of a command line: the full or quick preset with the options applied. Raises
    ``ValueError`` (a bad estimator list, seed count, config or override) before any work."""
    import mica_core as mc

    from ..config import check_config

    base = PRESETS[args.policy, bool(args.quick)]
    load_plugins(args.plugin)
    known = mc.list_estimators()
    estimators = [e.strip() for e in (args.estimators or ",".join(ESTIMATORS)).split(",") if e.strip()]
    if not estimators:
        raise ValueError(f"--estimators names no estimator; known: {', '.join(known)}")
    unknown = [e for e in estimators if e not in known]
    if unknown:
        raise ValueError(f"--estimators: unknown estimator(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if len(set(estimators)) != len(estimators):
        raise ValueError("--estimators lists a name twice")
    n_seeds = args.seeds if args.seeds is not None else len(base.seeds)
    for option, value, low in (("--seeds", n_seeds, 1), ("--first-seed", args.first_seed, 0),
                               ("--steps", args.steps, 1), ("--checkpoints", args.checkpoints, 1),
                               ("--workers", args.workers, 1), ("--threads", args.threads, 1),
                               ("--warm-start-steps", args.warm_start_steps, 0)):
        if value is not None and value < low:
            raise ValueError(f"{option} must be >= {low}, got {value}")
    run_dir = Path(args.run_dir or base.run_dir)
    for parent in (run_dir, *run_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--run-dir: {parent} exists and is not a directory")
            break
    overrides = list(base.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    overrides += overrides_from_args(args)
    warm = base.warm
    if args.warm_start_steps is not None:
        warm = WarmStartSpec(steps=args.warm_start_steps, tiny=warm.tiny, corpus_episodes=warm.corpus_episodes,
                             seed=warm.seed)
    plan = base.replace(
        estimators=tuple(estimators),
        seeds=tuple(range(args.first_seed, args.first_seed + n_seeds)),
        config=args.config or base.config,
        overrides=tuple(overrides),
        run_dir=run_dir,
        workers=args.workers,
        threads=args.threads,
        warm=warm,
        checkpoints=args.checkpoints or base.checkpoints,
        command=args.command or base.command,
        plugins=tuple(args.plugin),
    )
    check_config(plan.load(plan.estimators[0], plan.seeds[0]))  # a bad --config or override fails here
    cfg = plan.load()
    if plan.policy == "tabular":  # its episodes hand mica distances, not a table
        from mica_core.options import option_fields

        takes = [f.name for f in option_fields("estimate")]
        extra = [k for k in cfg.advantage.options if k not in takes]
        if extra:
            raise ValueError(f"advantage.options.{extra[0]} does not apply to --policy tabular (its "
                             f"episodes give mica distances, not a table); it takes {', '.join(takes)}")
    steps = cfg.steps
    if plan.checkpoints > steps:
        raise ValueError(f"--checkpoints ({plan.checkpoints}) must be <= the training steps ({steps})")
    return plan


def main(argv: list[str] | None = None) -> int:
    """credit-assignment study over estimators (mica_train)"""
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(words)
    if args.command is None:
        args.command = " ".join(["mica study", *map(redact_override, words)])
    from .report import check_publish_target
    from .run import run_study

    try:
        plan = plan_from_args(args)
        if args.publish:
            check_publish_target(".", plan.policy)
    except ValueError as exc:
        print(f"mica study: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        run_study(plan, publish_root="." if args.publish else None)
    except RuntimeError as exc:
        from ..env.errors import EndpointConfigError
        from ..trainer import JudgeFailureStop, TrainingDiverged

        if not isinstance(exc.__cause__, (JudgeFailureStop, TrainingDiverged, EndpointConfigError)):
            raise
        # a run the trainer stopped on purpose: which job, and the trainer's own line
        print(f"mica study: error: {str(exc).split(':', 1)[0]}: {exc.__cause__}", file=sys.stderr)
        return 2
    return 0
