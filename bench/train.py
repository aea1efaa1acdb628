"""Trainer speed: episodes per second and the time split of a training step, before and after
the fast paths, measured side by side in one run.

    python -m bench.train                      # the demo's config; writes bench/results/train_speed.json
    python -m bench.train --steps 4 --quick    # a smoke run (smaller batch, fewer steps)
    python -m bench.train --model runs/demo/tiny-warm --set data.scenarios_per_step=4

Two trainers on the same warm-started tiny policy and config, differing only in these switches:

    before   rollout.sampler=hf  rollout.merge_lora=false  loss.old_logprobs=recompute
             loss.kl_metric=true  optim.sort_by_length=false
    after    the defaults (sampler mica, merged adapter, old log-probs from the rollout,
             no reference pass without a KL term, length-sorted micro-batches)

``before`` is the trainer as it was: transformers' ``generate`` with the adapter unmerged, a
forward pass for the old log-probs and one for the reference (the KL was always measured),
micro-batches in shuffled order. After one warm-up step each, the two run their steps
alternately (before, after, after, before, ...) so that load from other processes falls on
both alike. Per step: the wall time and this process's CPU time of the rollout (generation and
environment), the advantage (``mica_core``), the old/reference log-prob passes and the
optimizer updates. The table shows medians over the measured steps and the before/after
ratio of the medians. With ``--eval`` it also times one evaluation (30 scenarios, 45 turns)
per variant and repetition.

The tiny model and its warm start are built once into ``--cache`` (default
``runs/bench_train``) and reused while the config's context settings match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "demo"  # the packaged config
BEFORE = ("rollout.sampler=hf", "rollout.merge_lora=false", "loss.old_logprobs=recompute",
          "loss.kl_metric=true", "optim.sort_by_length=false")
PHASES = ("rollout", "advantage", "logprob", "update", "step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="training config: a packaged name or a YAML path (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, for both variants (repeatable)")
    p.add_argument("--model", default=None, help="a warm-started model directory (default: build one)")
    p.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench_train"),
                   help="where the tiny model and its warm start are built")
    p.add_argument("--warm-start-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=6, help="measured steps per variant (after one warm-up)")
    p.add_argument("--eval", action="store_true", help="also time one evaluation per variant and repetition")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 scenarios x 4 rollouts per step, 2 steps, 60 warm-start steps")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "train_speed.json"))
    return p.parse_args(argv)


def _prepare_model(cfg, cache: str, warm_start_steps: int) -> str:
    """The tiny model warm-started with the config's context, built once into ``cache``."""
    from mica_core.atomic import atomic_write_json
    from mica_train.tiny import TinyModelConfig, write_tiny_model
    from mica_train.warmstart import WarmStartConfig, corpus_texts, generate_corpus, warm_start

    spec = {"seed": cfg.seed, "context_messages": cfg.rollout.context_messages,
            "context_replies": cfg.rollout.context_replies, "warm_start_steps": warm_start_steps}
    stamp = os.path.join(cache, "spec.json")
    warm = os.path.join(cache, "tiny-warm")
    if os.path.exists(stamp) and os.path.isdir(warm):
        with open(stamp, encoding="utf-8") as fh:
            if json.load(fh) == spec:
                return warm
    shutil.rmtree(cache, ignore_errors=True)
    print(f"building the tiny model and warm-starting it ({warm_start_steps} steps) in {cache}", flush=True)
    examples = generate_corpus(200, seed=cfg.seed, context_messages=cfg.rollout.context_messages,
                               context_replies=cfg.rollout.context_replies)
    base = os.path.join(cache, "tiny-base")
    write_tiny_model(base, corpus_texts(examples), TinyModelConfig(seed=cfg.seed))
    warm_start(base, warm, WarmStartConfig(steps=warm_start_steps, seed=cfg.seed,
                                           context_messages=cfg.rollout.context_messages,
                                           context_replies=cfg.rollout.context_replies), progress=False)
    atomic_write_json(stamp, spec)
    return warm


class _Clock:
    """Wall and process CPU time of a block, accumulated under a name."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, name, wall, cpu):
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def timed(self, name, fn, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(name, time.perf_counter() - w, time.process_time() - c)


class _Variant:
    """One trainer whose log-prob passes (``_score``) are timed apart from the update."""

    def __init__(self, name, cfg):
        from mica_train.trainer import Trainer

        self.name = name
        self.trainer = Trainer(cfg)
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self._clock = None
        score = self.trainer._score

        def timed_score(*args, **kwargs):
            return self._clock.timed("logprob", score, *args, **kwargs)

        self.trainer._score = timed_score

    def step(self, step: int) -> dict:
        """One training step as ``Trainer.train_step`` runs it, timed by phase."""
        import torch

        from mica_train.rollout import derive_seed, trajectory_table

        tr = self.trainer
        self._clock = clock = _Clock()
        w0, c0 = time.perf_counter(), time.process_time()
        torch.manual_seed(derive_seed(tr.cfg.seed, step, 3, tr.dist.rank))
        records = clock.timed("rollout", tr.rollout, step)
        table = clock.timed("rollout", trajectory_table, records)
        adv, _ = clock.timed("advantage", tr.advantages, table)
        clock.timed("update", tr.update, table, adv, step)
        tr.step = step
        clock.add("step", time.perf_counter() - w0, time.process_time() - c0)
        # the log-prob passes ran inside update: report them apart
        for d in (clock.wall, clock.cpu):
            d.setdefault("logprob", 0.0)
            d["update"] -= d["logprob"]
        return {"step": step, "episodes": len(records), "turns": table.num_rows,
                "wall": dict(clock.wall), "cpu": dict(clock.cpu)}

    def evaluate(self) -> dict:
        from mica_train.trainer import evaluate

        w, c = time.perf_counter(), time.process_time()
        m = evaluate(self.trainer.policy, self.trainer.cfg)
        return {"wall": time.perf_counter() - w, "cpu": time.process_time() - c, "episodes": m["n"]}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(variant: _Variant) -> dict:
    out = {"steps_measured": len(variant.steps)}
    for clock in ("wall", "cpu"):
        med = {p: _median([s[clock].get(p, 0.0) for s in variant.steps]) for p in PHASES}
        eps = _median([s["episodes"] / s[clock]["step"] for s in variant.steps])
        out[clock] = {"median_seconds": med, "episodes_per_second": eps,
                      "share": {p: med[p] / med["step"] for p in PHASES if p != "step"}}
    out["turns_per_step"] = _median([s["turns"] for s in variant.steps])
    out["episodes_per_step"] = _median([s["episodes"] for s in variant.steps])
    if variant.evals:
        out["eval"] = {k: _median([e[k] for e in variant.evals]) for k in ("wall", "cpu")}
        out["eval"]["episodes"] = variant.evals[0]["episodes"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    from mica_core.atomic import atomic_write_json
    from mica_train.config import config_to_dict, load_config

    sys.path.insert(0, ROOT)
    from bench.measure import machine_info

    common = ["tensorboard=false", "plot=false", "progress=false", "save_every=0", "eval.every=0",
              "keep_checkpoints=1", *args.overrides]
    steps, warm_steps = args.steps, args.warm_start_steps
    if args.quick:
        common += ["data.scenarios_per_step=2", "data.group_size=4", "eval.episodes_per_scenario=1"]
        steps, warm_steps = min(steps, 2), min(warm_steps, 60)
    base_cfg = load_config(args.config, common)
    if base_cfg.threads > 0:
        torch.set_num_threads(base_cfg.threads)
    model = args.model or _prepare_model(base_cfg, args.cache, warm_steps)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mica-bench-train-") as tmp:
        variants = {}
        for name, extra in (("before", BEFORE), ("after", ())):
            cfg = load_config(args.config, [*common, f"model.path={model}", f"run_dir={tmp}/{name}",
                                            f"steps={steps + 1}", *extra])
            variants[name] = _Variant(name, cfg)
        for v in variants.values():          # one-off costs (first calls, allocator) land here
            v.step(1)
        order = list(variants.values())
        for k in range(steps):
            for v in (order if k % 2 == 0 else order[::-1]):
                rec = v.step(k + 2)
                v.steps.append(rec)
                print(f"[{time.perf_counter() - t_start:6.1f}s] {v.name:6s} step {k + 2}: "
                      f"{rec['episodes']} episodes, {rec['turns']} turns, wall {rec['wall']['step']:.2f}s, "
                      f"cpu {rec['cpu']['step']:.2f}s", flush=True)
            if args.eval:
                for v in (order if k % 2 == 0 else order[::-1]):
                    v.evals.append(v.evaluate())
        result = {name: summarize(v) for name, v in variants.items()}
        raw = {name: {"steps": v.steps, "evals": v.evals} for name, v in variants.items()}
        configs = {name: config_to_dict(v.trainer.cfg) for name, v in variants.items()}
    ratio = {}
    for clock in ("wall", "cpu"):
        b, a = result["before"][clock], result["after"][clock]
        ratio[clock] = {"episodes_per_second": a["episodes_per_second"] / b["episodes_per_second"],
                        **{p: b["median_seconds"][p] / a["median_seconds"][p]
                           for p in PHASES if a["median_seconds"][p] > 0}}
    if args.eval:
        ratio["eval"] = {c: result["before"]["eval"][c] / result["after"]["eval"][c] for c in ("wall", "cpu")}
    info = machine_info(ROOT)
    info.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
    report = {
        "command": "python -m bench.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": os.path.relpath(args.config, ROOT) if os.path.isabs(args.config) else args.config,
        "overrides": args.overrides, "quick": args.quick, "model": model,
        "before_switches": list(BEFORE), "results": result, "speedup": ratio,
        "seconds": time.perf_counter() - t_start, "machine": info, "raw": raw,
        "configs": configs,
    }
    atomic_write_json(args.out, report)
    _print_table(result, ratio)
    print(f"wrote {args.out}")
    return 0


def _print_table(result, ratio):
    print(f"\n{'':18s}{'before':>20s}{'after':>20s}{'ratio':>9s}")
    for clock in ("wall", "cpu"):
        b, a = result["before"][clock], result["after"][clock]
        print(f"{clock} episodes/s    {b['episodes_per_second']:20.2f}{a['episodes_per_second']:20.2f}"
              f"{ratio[clock]['episodes_per_second']:8.2f}x")
        for p in PHASES:
            bs, as_ = b["median_seconds"][p], a["median_seconds"][p]
            bshare = f"({100 * b['share'][p]:4.1f}%)" if p != "step" else ""
            ashare = f"({100 * a['share'][p]:4.1f}%)" if p != "step" else ""
            r = f"{bs / as_:8.2f}x" if as_ > 0 else ""
            print(f"  {clock} {p:10s} {bs:10.3f}s {bshare:8s} {as_:10.3f}s {ashare:8s}{r}")


if __name__ == "__main__":
    raise SystemExit(main())
