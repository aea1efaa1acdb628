"""Running a study: the shared warm start, the jobs (in a process pool, resumable), the credit
diagnostic, then the summary and the report.

Only the estimator differs between the runs of one seed: the warm start, the LoRA
initialisation, the scenario order, the environment seeds, the minibatch order and the
evaluation episodes' seeds are the same (sampled replies differ once the policies do). The seed
changes everything random in training. A job whose result file exists with the same
fingerprint (``plan.Job``) is not run again, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .plan import CURVE_KEYS, Job, StudyPlan

__all__ = ["execute", "prepare_warm_start", "run_credit_diagnostic", "run_job", "run_study"]


def _say(t0: float, msg: str) -> None:
    print(f"[study {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def prepare_warm_start(plan: StudyPlan, t0: float) -> dict:
    """Build and warm-start the tiny model once; reuse it when its settings are unchanged."""
    from mica_core.atomic import atomic_write_json

    from ..tiny import TinyModelConfig, write_tiny_model
    from ..warmstart import WarmStartConfig, corpus_texts, generate_corpus, warm_start

    spec = plan.warm_spec()
    spec_path = plan.run_dir / "warm_spec.json"
    summary_path = plan.warm_dir / "warm_start.json"
    if _read_json(spec_path) == spec and summary_path.is_file():
        _say(t0, f"reusing the warm start in {plan.warm_dir}")
        return json.loads(summary_path.read_text())
    _say(t0, f"building the tiny model and warm-starting it ({plan.warm.steps} supervised steps)")
    examples = generate_corpus(plan.warm.corpus_episodes, seed=spec["seed"], context_messages=spec["context_messages"])
    write_tiny_model(plan.base_dir, corpus_texts(examples), TinyModelConfig(seed=spec["seed"], **plan.warm.tiny))
    summary = warm_start(
        plan.base_dir, plan.warm_dir,
        WarmStartConfig(steps=plan.warm.steps, seed=spec["seed"], context_messages=spec["context_messages"],
                        n_episodes=plan.warm.corpus_episodes),
        progress=False,
    )
    atomic_write_json(spec_path, spec)
    return summary


def _init_worker(threads: int) -> None:
    _offline_env()
    import torch

    torch.set_num_threads(max(1, threads))


def _curve(records: list[dict]) -> list[dict]:
    return [{"step": int(r["step"]), **{k: r[k] for k in CURVE_KEYS if k in r}} for r in records]


def run_job(job: Job) -> dict:
    """Run ``job`` in this process: the warm-start evaluation or a training run followed by its
    evaluation. Writes ``job.result`` atomically and returns it."""
    _init_worker(job.threads)
    from mica_core.atomic import atomic_write_json

    from ..config import load_config
    from ..policy import load_policy, quiet_transformers
    from ..trainer import Trainer
    from .evaluation import evaluate_with_behaviour as evaluate

    quiet_transformers()
    cfg = load_config(job.config, list(job.overrides))
    t_start = time.perf_counter()
    c_start = time.process_time()
    result: dict[str, Any] = {"estimator": job.estimator, "seed": job.seed, "fingerprint": job.fingerprint}
    if job.estimator is None:
        policy = load_policy(cfg.model, cfg.lora)
        result["eval"] = evaluate(policy, cfg)
        result["eval_seconds"] = time.perf_counter() - t_start
    else:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # no stale checkpoint: every run starts afresh
        trainer = Trainer(cfg)
        trainer.train()
        t_train = time.perf_counter() - t_start
        records = list(trainer.logger.records) if trainer.logger is not None else []
        t_eval = time.perf_counter()
        result["eval"] = evaluate(trainer.policy, cfg)
        result["eval_seconds"] = time.perf_counter() - t_eval
        result["train_seconds"] = t_train
        result["steps"] = trainer.step
        result["curve"] = _curve(records)
    result["seconds"] = time.perf_counter() - t_start
    result["cpu_seconds"] = time.process_time() - c_start
    atomic_write_json(job.result, result)
    return result


def finished_result(job: Job) -> dict | None:
    """The job's result when it exists for the same settings (its fingerprint), else None."""
    res = _read_json(job.result)
    if res is not None and res.get("fingerprint") == job.fingerprint and "eval" in res:
        return res
    return None


def _describe(job: Job, res: dict) -> str:
    ev = res["eval"]
    return (f"{job.label}: eval pass rate {ev['pass_rate']:.3f}, mean final distance "
            f"{ev['mean_final_distance']:.2f} ({res['seconds']:.0f}s)")


def execute(jobs: list[Job], workers: int, threads: int, t0: float) -> dict[Job, dict]:
    """Run the jobs that have no current result, on ``workers`` spawned processes (``threads``
    torch threads each; in this process when ``workers`` is 1). Returns every job's result."""
    results: dict[Job, dict] = {}
    todo = []
    for job in jobs:
        res = finished_result(job)
        if res is None:
            todo.append(job)
        else:
            results[job] = res
    if len(results):
        _say(t0, f"{len(results)} of {len(jobs)} jobs already done, skipped")
    if not todo:
        return results
    _say(t0, f"running {len(todo)} jobs on {min(workers, len(todo))} worker(s)")
    if workers <= 1 or len(todo) == 1:
        for i, job in enumerate(todo, 1):
            results[job] = res = run_job(job)
            _say(t0, f"[{i}/{len(todo)}] {_describe(job, res)}")
        return results
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # no forked torch state; each worker imports its own
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(run_job, job): job for job in todo}
        pending = set(futures)
        n = 0
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = futures[fut]
                exc = fut.exception()
                if exc is not None:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(f"study job {job.label} failed: {exc!r}") from exc
                n += 1
                results[job] = res = fut.result()
                _say(t0, f"[{n}/{len(todo)}] {_describe(job, res)}")
    return results


def run_credit_diagnostic(plan: StudyPlan) -> dict:
    """The training-free credit diagnostic (``credit.py``), one rollout set per study seed at
    the training turn limits, summarized over seeds."""
    from .credit import credit_diagnostic
    from .stats import summarize_credit

    cfg = plan.load()
    n_scen, group = plan.credit_size
    per_seed = [credit_diagnostic(plan.estimators, n_scen, group, seed, cfg.env.max_turns, cfg.env.min_turns)
                for seed in plan.seeds]
    return summarize_credit(per_seed, plan.estimators, plan.reference)


def run_study(plan: StudyPlan, publish_root: str | Path | None = None) -> dict:
    """Run (or resume) the study of ``plan``; writes ``study.json``, ``study_curves.png`` and
    ``study.md`` in ``plan.run_dir``, and the committed results under ``publish_root`` when given."""
    from .report import format_behaviour_table, format_credit_table, format_table, publish, write_outputs
    from .stats import summarize

    _offline_env()
    import torch

    torch.set_num_threads(max(1, plan.threads))  # the warm start, and every job when --workers 1
    t0 = time.perf_counter()
    load = {"start": list(os.getloadavg())}  # other work on the machine slows the study down
    s = plan.settings()
    _say(t0, f"{len(plan.estimators)} estimators x {len(plan.seeds)} seeds; {s['steps']} steps of "
         f"{s['scenarios_per_step']} scenarios x {s['group_size']} rollouts per run; evaluation "
         f"{s['eval_episodes']} episodes (max {s['eval_max_turns']} turns)")
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    warm = prepare_warm_start(plan, t0)
    jobs = plan.jobs()
    reused = sum(finished_result(job) is not None for job in jobs)
    results = execute(jobs, plan.workers, plan.threads, t0)
    t_credit = time.perf_counter()
    _say(t0, "credit diagnostic (no training)")
    credit = run_credit_diagnostic(plan)
    credit["seconds"] = time.perf_counter() - t_credit
    load["end"] = list(os.getloadavg())
    study = summarize(plan, jobs, results, time.perf_counter() - t0, warm, load)
    study["jobs_reused"] = reused  # wall_seconds covers only this invocation
    study["credit_diagnostic"] = credit
    study["plot"] = None
    study["wall_seconds"] = time.perf_counter() - t0
    written = write_outputs(study, plan.run_dir)
    if publish_root is not None:
        written.update({f"published {k}": v for k, v in publish(study, publish_root).items()})
    _say(t0, "wrote " + ", ".join(str(p) for p in written.values()))
    print(format_table(study), flush=True)
    print("\nbehaviour on the evaluation episodes", flush=True)
    print(format_behaviour_table(study), flush=True)
    print("\ncredit diagnostic (no training): advantages of pacing-consistent turns vs the others", flush=True)
    print(format_credit_table(study["credit_diagnostic"], study["reference"]), flush=True)
    _say(t0, f"done in {time.perf_counter() - t0:.0f}s")
    return study
