"""Running a study: the shared warm start, the jobs (in a process pool, resumable), then the
summary and the report.

Only the estimator differs between the runs of one seed: the warm start, the LoRA
initialisation, the scenario order, the environment seeds, the minibatch order and the
evaluation episodes' seeds are the same (sampled replies differ once the policies do). The seed
changes everything random in training; the evaluation episodes are the same for every run and
checkpoint. A job whose result file exists with the same fingerprint (``plan.Job``) is not run
again, so an interrupted study resumes where it stopped.

Scheduling: the warm start and the credit diagnostics (which need no model) go to the pool
first, so the diagnostics use the second core while the warm start trains; the warm start's
evaluation and the training runs follow once the warm start exists.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .plan import CURVE_KEYS, Job, StudyPlan

__all__ = ["execute", "prepare_warm_start", "run_job", "run_study"]


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


def warm_start_is_current(plan: StudyPlan) -> bool:
    if plan.policy == "tabular":
        return True  # no warm start: the tabular policy starts uniform
    return _read_json(plan.run_dir / "warm_spec.json") == plan.warm_spec() and \
        (plan.warm_dir / "warm_start.json").is_file()


def prepare_warm_start(plan: StudyPlan, threads: int | None = None) -> dict:
    """Build and warm-start the tiny model once; reuse it when its settings are unchanged. The
    warm start sees the rollouts' context (``context_messages`` and ``context_replies``)."""
    from mica_core.atomic import atomic_write_json

    _init_worker(plan.threads if threads is None else threads)
    from ..tiny import TinyModelConfig, write_tiny_model
    from ..warmstart import WarmStartConfig, corpus_texts, generate_corpus, warm_start

    spec = plan.warm_spec()
    summary_path = plan.warm_dir / "warm_start.json"
    if plan.policy == "tabular":
        return {}
    if warm_start_is_current(plan):
        return json.loads(summary_path.read_text())
    context = {"context_messages": spec["context_messages"], "context_replies": spec["context_replies"],
               "system_prompt": spec["system_prompt"]}
    examples = generate_corpus(plan.warm.corpus_episodes, seed=spec["seed"], **context)
    write_tiny_model(plan.base_dir, corpus_texts(examples), TinyModelConfig(seed=spec["seed"], **plan.warm.tiny))
    summary = warm_start(
        plan.base_dir, plan.warm_dir,
        WarmStartConfig(steps=plan.warm.steps, seed=spec["seed"], n_episodes=plan.warm.corpus_episodes, **context),
        progress=False,
    )
    atomic_write_json(plan.run_dir / "warm_spec.json", spec)
    return summary


def _init_worker(threads: int) -> None:
    _offline_env()
    import torch

    torch.set_num_threads(max(1, threads))


def _curve(records: list[dict]) -> list[dict]:
    return [{"step": int(r["step"]), **{k: r[k] for k in CURVE_KEYS if k in r}} for r in records]


def _run_credit(job: Job) -> dict[str, Any]:
    from .credit import credit_diagnostic

    estimators, spec, max_turns, min_turns = job.credit
    return {"credit": credit_diagnostic(estimators, spec.scenarios, spec.group_size, job.seed, max_turns,
                                        min_turns, forks=spec.forks, fork_scenarios=spec.fork_scenarios)}


def _run_before(job: Job, cfg) -> dict[str, Any]:
    from ..policy import load_policy
    from .evaluation import evaluate_with_behaviour as evaluate

    policy = load_policy(cfg.model, cfg.lora)
    replicate_seed = cfg.eval.seed + 1
    return {"eval": evaluate(policy, cfg),
            "replicate": {"eval_seed": replicate_seed, "eval": evaluate(policy, cfg, eval_seed=replicate_seed)}}


def _run_training(job: Job, cfg) -> dict[str, Any]:
    from ..trainer import Trainer
    from .evaluation import evaluate_with_behaviour as evaluate

    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # no stale checkpoint: every run starts afresh
    t_start = time.perf_counter()
    trainer = Trainer(cfg)
    checkpoints: list[dict] = []
    eval_seconds = 0.0

    def at_checkpoint(step: int, rec: dict) -> None:
        nonlocal eval_seconds
        if step in job.checkpoints:
            t = time.perf_counter()
            ev = evaluate(trainer.policy, cfg)
            eval_seconds += time.perf_counter() - t
            checkpoints.append({"step": step, "eval": ev})
            rec["eval_pass_rate"] = float(ev["pass_rate"])
            rec["eval_mean_final_distance"] = float(ev["mean_final_distance"])

    trainer.train(on_step=at_checkpoint)
    records = list(trainer.logger.records) if trainer.logger is not None else []
    return {
        "checkpoints": checkpoints,
        "eval": checkpoints[-1]["eval"] if checkpoints else None,
        "steps": trainer.step,
        "curve": _curve(records),
        "train_seconds": time.perf_counter() - t_start - eval_seconds,
        "eval_seconds": eval_seconds,
    }


def _run_before_tabular(job: Job, cfg) -> dict[str, Any]:
    from .tabular import TabularPolicy, evaluate_tabular

    policy = TabularPolicy()
    replicate_seed = cfg.eval.seed + 1
    return {"eval": evaluate_tabular(policy, cfg),
            "replicate": {"eval_seed": replicate_seed, "eval": evaluate_tabular(policy, cfg, eval_seed=replicate_seed)}}


def _run_training_tabular(job: Job, cfg) -> dict[str, Any]:
    from .tabular import evaluate_tabular, train_tabular

    t_start = time.perf_counter()
    checkpoints: list[dict] = []
    eval_seconds = 0.0

    def at_checkpoint(step: int, rec: dict, policy) -> None:
        nonlocal eval_seconds
        if step in job.checkpoints:
            t = time.perf_counter()
            ev = evaluate_tabular(policy, cfg, behaviour=step == job.checkpoints[-1])  # the summary reads the last
            eval_seconds += time.perf_counter() - t
            checkpoints.append({"step": step, "eval": ev, "weights": policy.state()})
        rec["time_step"] = time.perf_counter() - t_start

    out = train_tabular(cfg, on_step=at_checkpoint)
    return {
        "checkpoints": checkpoints,
        "eval": checkpoints[-1]["eval"] if checkpoints else None,
        "steps": len(out["records"]),
        "curve": _curve(out["records"]),
        "train_seconds": time.perf_counter() - t_start - eval_seconds,
        "eval_seconds": eval_seconds,
    }


def import_plugins(modules) -> None:
    """Import each module of ``modules`` (``mica study --plugin``: a user's estimators register
    themselves on import)."""
    import importlib

    for name in modules:
        importlib.import_module(name)


def run_job(job: Job) -> dict:
    """Run ``job`` in this process (``Job`` lists the kinds). Writes ``job.result`` atomically
    and returns it."""
    _init_worker(job.threads)
    from mica_core.atomic import atomic_write_json

    from ..config import load_config
    from ..policy import quiet_transformers

    quiet_transformers()
    import_plugins(job.plugins)
    t_start = time.perf_counter()
    c_start = time.process_time()
    result: dict[str, Any] = {"kind": job.kind, "estimator": job.estimator, "seed": job.seed,
                              "fingerprint": job.fingerprint}
    if job.kind == "credit":
        result.update(_run_credit(job))
    else:
        cfg = load_config(job.config, list(job.overrides))
        if job.policy == "tabular":
            result.update(_run_before_tabular(job, cfg) if job.kind == "before" else _run_training_tabular(job, cfg))
        else:
            result.update(_run_before(job, cfg) if job.kind == "before" else _run_training(job, cfg))
    result["seconds"] = time.perf_counter() - t_start
    result["cpu_seconds"] = time.process_time() - c_start
    atomic_write_json(job.result, result)
    return result


def finished_result(job: Job) -> dict | None:
    """The job's result when it exists for the same settings (its fingerprint), else None."""
    res = _read_json(job.result)
    if res is not None and res.get("fingerprint") == job.fingerprint and ("credit" in res or res.get("eval")):
        return res
    return None


def _describe(job: Job, res: dict) -> str:
    if job.kind == "credit":
        est = res["credit"]["estimators"]
        best = max(est, key=lambda e: est[e].get("true_pearson", est[e]["auc"]))
        return f"{job.label}: {res['credit']['turns']} turns ({res['seconds']:.0f}s; best signal {best})"
    ev = res["eval"]
    curve = ""
    if res.get("checkpoints"):
        curve = " pass rate at checkpoints " + " ".join(f"{c['eval']['pass_rate']:.2f}" for c in res["checkpoints"])
        return f"{job.label}:{curve}, mean final distance {ev['mean_final_distance']:.2f} ({res['seconds']:.0f}s)"
    return (f"{job.label}: eval pass rate {ev['pass_rate']:.3f}, mean final distance "
            f"{ev['mean_final_distance']:.2f} ({res['seconds']:.0f}s)")


def execute(plan: StudyPlan, jobs: list[Job], t0: float) -> tuple[dict[Job, dict], dict, int]:
    """Run the warm start (unless current) and the jobs that have no current result, on
    ``plan.workers`` spawned processes (in this process when it is 1). Returns every job's
    result, the warm start's summary and how many jobs had a current result already."""
    results: dict[Job, dict] = {}
    todo = []
    for job in jobs:
        res = finished_result(job)
        if res is None:
            todo.append(job)
        else:
            results[job] = res
    reused = len(results)
    if results:
        _say(t0, f"{len(results)} of {len(jobs)} jobs already done, skipped")
    free = [j for j in todo if j.kind == "credit"]  # need no model
    model = [j for j in todo if j.kind != "credit"]
    warm_needed = not warm_start_is_current(plan)
    if warm_needed:
        _say(t0, f"building the tiny model and warm-starting it ({plan.warm.steps} supervised steps)")
    elif plan.policy == "lm":
        _say(t0, f"reusing the warm start in {plan.warm_dir}")
    if todo:
        _say(t0, f"running {len(todo)} jobs on {max(1, min(plan.workers, len(todo)))} worker(s)")
    done = 0

    def finish(job: Job, res: dict) -> None:
        nonlocal done
        done += 1
        results[job] = res
        _say(t0, f"[{done}/{len(todo)}] {_describe(job, res)}")

    if plan.workers <= 1 or len(todo) + warm_needed <= 1:
        warm = prepare_warm_start(plan)
        if warm_needed:
            _say(t0, f"warm start done ({warm.get('seconds', 0):.0f}s)")
        for job in free + model:
            finish(job, run_job(job))
        return results, warm, reused

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # no forked torch state; each worker imports its own
    with ProcessPoolExecutor(max_workers=plan.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(plan.threads,)) as pool:
        warm_future = pool.submit(prepare_warm_start, plan)
        if plan.policy == "tabular":  # nothing waits for a warm start
            free, model = free + model, []
        futures = {pool.submit(run_job, job): job for job in free}
        pending = set(futures) | {warm_future}
        warm: dict = {}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                exc = fut.exception()
                what = "the warm start" if fut is warm_future else f"study job {futures[fut].label}"
                if exc is not None:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(f"{what} failed: {exc!r}") from exc
                if fut is warm_future:
                    warm = fut.result()
                    if warm_needed:
                        _say(t0, f"warm start done ({warm.get('seconds', 0):.0f}s)")
                    more = {pool.submit(run_job, job): job for job in model}
                    futures.update(more)
                    pending |= set(more)
                else:
                    finish(futures[fut], fut.result())
    return results, warm, reused


def run_study(plan: StudyPlan, publish_root: str | Path | None = None) -> dict:
    """Run (or resume) the study of ``plan``; writes ``study.json``, ``study_curves.png`` and
    ``study.md`` in ``plan.run_dir``, and the committed results under ``publish_root`` when given."""
    from .report import format_contrast_table, format_credit_table, format_table, publish, write_outputs
    from .stats import summarize, summarize_credit

    _offline_env()
    t0 = time.perf_counter()
    load = {"start": list(os.getloadavg())}  # other work on the machine slows the study down
    s = plan.settings()
    _say(t0, f"{len(plan.estimators)} estimators x {len(plan.seeds)} seeds; {s['steps']} steps of "
         f"{s['scenarios_per_step']} scenarios x {s['group_size']} rollouts per run; evaluation at steps "
         f"{', '.join(map(str, s['checkpoints']))}: {s['eval_episodes']} episodes (max {s['eval_max_turns']} turns)")
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan.jobs()
    results, warm, reused = execute(plan, jobs, t0)
    load["end"] = list(os.getloadavg())
    study = summarize(plan, jobs, results, time.perf_counter() - t0, warm, load)
    credit_results = [results[j]["credit"] for j in jobs if j.kind == "credit" and j in results]
    if credit_results:
        study["credit_diagnostic"] = summarize_credit(credit_results, plan.estimators, plan.active_contrasts)
        study["credit_diagnostic"]["cpu_seconds_total"] = sum(
            results[j].get("cpu_seconds", 0.0) for j in jobs if j.kind == "credit" and j in results)
    study["jobs_reused"] = reused  # wall_seconds covers only this invocation
    study["plot"] = None
    study["wall_seconds"] = time.perf_counter() - t0
    written = write_outputs(study, plan.run_dir)
    if publish_root is not None:
        written.update({f"published {k}": v for k, v in publish(study, publish_root).items()})
    _say(t0, "wrote " + ", ".join(str(p) for p in written.values()))
    print("\npre-registered contrasts (primary metric: pass rate averaged over the checkpoints)", flush=True)
    print(format_contrast_table(study), flush=True)
    print("\nper estimator", flush=True)
    print(format_table(study), flush=True)
    if "credit_diagnostic" in study:
        print("\ncredit diagnostic (no training)", flush=True)
        print(format_credit_table(study), flush=True)
    _say(t0, f"done in {time.perf_counter() - t0:.0f}s")
    return study
