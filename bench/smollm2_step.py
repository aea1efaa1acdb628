"""One training step of SmolLM2-135M-Instruct on a CPU, before and after its speed settings,
measured interleaved in one run.

    mica model get smollm2 --out runs/models/smollm2
    python -m bench.smollm2_step                       # writes bench/results/smollm2_step.json
    python -m bench.smollm2_step --turns 2 --pairs 2   # a shorter step (fewer turns per episode)

The step is the one of docs/training.md ("A real chat model: SmolLM2"): 2 scenarios x 4
rollouts, 48-token replies, ``--turns`` turns per episode (6 by default), the context and LoRA
of the built-in defaults, so all variants train exactly the same thing. They differ only in

    before     threads=0 (torch's default: one thread per core)   optim.micro_batch_rows=0
    after      threads=1                                          optim.micro_batch_rows=4
    after_all  threads=0                                          optim.micro_batch_rows=4

(one forward pass per minibatch before; length-sorted micro-batches of 4 rows after; the
packaged config's one thread, which a machine shared with other jobs needs, and every core,
which an idle machine may prefer). Each round runs the variants in turn, the next round in
reverse order, and so on, so that load from other processes falls on all alike; the load
average is recorded at every step. There is no warm-up step
(a step of this model takes minutes; its one-off costs are a small part of it). Per step: wall
and CPU time of the rollout (generation and environment), the advantage, the old-log-prob
passes (none here: old log-probs come from the rollout) and the updates; the table shows the
medians and the ratio of each variant's medians to ``before``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = ("threads=0", "optim.micro_batch_rows=0")
AFTER = ("threads=1", "optim.micro_batch_rows=4")
AFTER_ALL = ("threads=0", "optim.micro_batch_rows=4")
VARIANTS = (("before", BEFORE), ("after", AFTER), ("after_all", AFTER_ALL))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "runs", "models", "smollm2"),
                   help="the converted model (mica model get smollm2 --out DIR)")
    p.add_argument("--turns", type=int, default=6, help="turns per episode (the issue's step: 6)")
    p.add_argument("--pairs", type=int, default=2, help="rounds: one step of every variant each")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, for every variant (repeatable)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "smollm2_step.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(k, v)
    import torch

    from mica_core.atomic import atomic_write_json
    from mica_train.config import check_model_dir, config_to_dict, load_config

    sys.path.insert(0, ROOT)
    from bench.measure import machine_info
    from bench.train import PHASES, _Variant, summarize

    check_model_dir(args.model)
    default_threads = torch.get_num_threads()
    common = [f"model.path={args.model}", "model.dtype=float32", "tensorboard=false", "plot=false",
              "progress=false", "save_every=0", "eval.every=0", "keep_checkpoints=1",
              "data.scenarios_per_step=2", "data.group_size=4", f"env.max_turns={args.turns}",
              f"env.min_turns={args.turns}", "rollout.max_new_tokens=48", *args.overrides]
    loads = []
    t_start = time.perf_counter()
    info = machine_info(ROOT)
    info.update({"torch": torch.__version__, "torch_default_threads": default_threads})

    def report(variants, done: bool) -> dict:
        """The results so far (written after every step, so a stopped run keeps its steps)."""
        ran = {name: v for name, v in variants.items() if v.steps}
        result = {name: summarize(v) for name, v in ran.items()}
        ratio = {}
        for name in result:
            if name == "before" or "before" not in result:
                continue
            ratio[name] = {}
            for clock in ("wall", "cpu"):
                b, a = result["before"][clock], result[name][clock]
                ratio[name][clock] = {p: b["median_seconds"][p] / a["median_seconds"][p]
                                      for p in PHASES if a["median_seconds"][p] > 0}
                ratio[name][clock]["episodes_per_second"] = a["episodes_per_second"] / b["episodes_per_second"]
        out = {
            "command": "python -m bench.smollm2_step " + " ".join(argv if argv is not None else sys.argv[1:]),
            "complete": done, "model": args.model, "turns": args.turns, "pairs": args.pairs,
            "overrides": args.overrides, "switches": {name: list(extra) for name, extra in VARIANTS},
            "results": result, "speedup": ratio, "seconds": time.perf_counter() - t_start,
            "machine": {**info, "loadavg_1min_at_each_step_end": loads},
            "raw": {name: v.steps for name, v in variants.items()},
            "configs": {name: config_to_dict(v.trainer.cfg) for name, v in variants.items()},
        }
        atomic_write_json(args.out, out)
        return out

    with tempfile.TemporaryDirectory(prefix="mica-bench-smollm2-") as tmp:
        variants = {}
        for name, extra in VARIANTS:
            cfg = load_config(None, [*common, f"run_dir={tmp}/{name}", f"steps={args.pairs}", *extra])
            variants[name] = _Variant(name, cfg)
        order = list(variants.values())
        for k in range(args.pairs):
            for v in (order if k % 2 == 0 else order[::-1]):
                # Trainer sets its threads once, at construction; two trainers share this process.
                torch.set_num_threads(v.trainer.cfg.threads or default_threads)
                load_at_start = os.getloadavg()
                rec = v.step(k + 1)
                rec["threads"] = torch.get_num_threads()
                rec["loadavg_start"], rec["loadavg_end"] = load_at_start, os.getloadavg()
                v.steps.append(rec)
                loads.append(rec["loadavg_end"][0])
                print(f"[{time.perf_counter() - t_start:7.1f}s] {v.name:9s} step {k + 1}: {rec['turns']} turns, "
                      f"{rec['threads']} threads, wall {rec['wall']['step']:.1f}s (rollout "
                      f"{rec['wall']['rollout']:.1f}s, update {rec['wall']['update']:.1f}s), load "
                      f"{load_at_start[0]:.1f} -> {rec['loadavg_end'][0]:.1f}", flush=True)
                report(variants, done=False)
        final = report(variants, done=True)
    _print_table(final["results"], final["speedup"])
    print(f"wrote {args.out}")
    return 0


def _print_table(result, ratio) -> None:
    """Median seconds per phase for every variant, each with its ratio to ``before``."""
    names = list(result)
    phases = list(result[names[0]]["wall"]["median_seconds"])
    print(f"\n{'':20s}" + "".join(f"{n:>22s}" for n in names))
    for clock in ("wall", "cpu"):
        for p in phases:
            cells = []
            for n in names:
                sec = result[n][clock]["median_seconds"][p]
                r = ratio.get(n, {}).get(clock, {}).get(p)
                cells.append(f"{sec:11.2f}s" + (f" ({r:5.2f}x)" if r else " " * 9))
            print(f"  {clock:4s} {p:14s}" + "".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    raise SystemExit(main())
