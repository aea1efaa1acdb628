"""Rollouts against an LLM judge and user simulator: concurrent episodes against serial ones.

    python -m bench.llm_concurrency                      # 32 episodes, 100 ms per request
    python -m bench.llm_concurrency --latency 0.05 --episodes 64 --concurrency 64
    make bench-llm                                       # the same as the first line

One rollout batch (``--episodes`` episodes: groups of 8 rollouts of a scenario, 15-turn
training episodes) of the tiny policy, run through ``mica_train.rollout.run_episodes`` exactly as
the trainer runs it, against ``mica_train.env.local_server.LocalChatServer`` on 127.0.0.1,
which adds ``--latency`` seconds to every request and answers deterministically. The default,
100 ms, stands in for a judge's completion on a fast local server (a real one generating a
~50-token JSON rubric takes several times that); with less latency the policy's own
generation, the same in both settings, weighs more in the ratio. The server runs in its own process,
as a vLLM or SGLang server
would (a fresh one for each run); both settings run one after the other in this process:

- serial: ``max_concurrency=1``, one request in flight at a time (mica_train before this
  change stepped episodes one by one in the same way);
- concurrent: ``max_concurrency=--concurrency``; each lockstep turn sends every live
  episode's judge request together, then every user request.

Reported per setting: wall seconds (median of ``--repeats``), process CPU seconds (less
distorted by other jobs on a shared machine), requests, connections the server accepted and
the most requests it had in flight; and the embedded simulator on the same batch (no
endpoint) as the floor of generation and environment work. The two LLM runs must produce
the same trajectory table (checked). Results go to ``bench/results/llm_concurrency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 8.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.llm_concurrency",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=32, help="episodes in the batch (groups of 8)")
    p.add_argument("--latency", type=float, default=0.1, help="seconds added to every request")
    p.add_argument("--concurrency", type=int, default=32, help="max_concurrency of the concurrent run")
    p.add_argument("--max-turns", type=int, default=15)
    p.add_argument("--min-turns", type=int, default=12)
    p.add_argument("--repeats", type=int, default=1, help="runs of each setting (median reported)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "llm_concurrency.json"))
    return p.parse_args(argv)


def run_batch(policy, env, scenarios, rollout_cfg):
    import torch

    from mica_train.rollout import run_episodes

    n = len(scenarios)
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    records = run_episodes(policy, env, scenarios, range(n), [i // 8 for i in range(n)], range(n), rollout_cfg)
    return time.perf_counter() - t0, time.process_time() - c0, records


class ServerProcess:
    """``python -m mica_train.env.local_server`` in a child process; ``stats()`` from /stats."""

    def __init__(self, latency):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "mica_train.env.local_server", "--latency", str(latency)],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the local server did not start (printed {self.url!r})")

    def stats(self):
        import httpx

        return httpx.get(self.url.rsplit("/v1", 1)[0] + "/stats", timeout=10).json()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    import torch

    from bench.measure import _version, machine_info
    from mica_train.config import LoraSettings, ModelConfig, RolloutConfig
    from mica_train.env import EnvConfig, generate_scenarios, make_env
    from mica_train.policy import load_policy
    from mica_train.rollout import trajectory_table
    from mica_train.tiny import TinyModelConfig, write_tiny_model
    from mica_train.warmstart import corpus_texts, generate_corpus

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp) / "tiny", corpus_texts(generate_corpus(50, seed=0)), TinyModelConfig(seed=0))
        policy = load_policy(ModelConfig(path=str(Path(tmp) / "tiny")), LoraSettings(enabled=False))
    rollout_cfg = RolloutConfig()  # the training defaults: 24 new tokens, the last message as context
    pool = generate_scenarios(max(1, args.episodes // 8), seed=1)
    scenarios = [pool[i // 8] for i in range(args.episodes)]
    turns = {"max_turns": args.max_turns, "min_turns": args.min_turns}

    def llm_setting(concurrency):
        runs, tables = [], []
        for _ in range(args.repeats):
            with ServerProcess(args.latency) as server:
                env = make_env(EnvConfig(simulator="llm", base_url=server.url, model="local",
                                         max_concurrency=concurrency, **turns))
                wall, cpu, records = run_batch(policy, env, scenarios, rollout_cfg)
                env.close()
                stats = server.stats()
            stats["connections"] -= 1  # the /stats request's own
            served = {k: stats[k] for k in ("requests", "connections", "max_in_flight")}
            runs.append({"wall_s": wall, "cpu_s": cpu, **served,
                         "turns": sum(len(r.turns) for r in records),
                         "judge_failures": sum(r.metrics["judge_failures"] for r in records),
                         "user_failures": sum(r.metrics["user_failures"] for r in records)})
            tables.append(trajectory_table(records))
            print(f"  max_concurrency={concurrency}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
                  f"{stats['requests']} requests over {stats['connections']} connections, "
                  f"{stats['max_in_flight']} in flight at most", file=sys.stderr)
        return runs, tables

    print(f"bench.llm_concurrency: {args.episodes} episodes, {args.latency * 1000:.0f} ms per request",
          file=sys.stderr)
    # The floor: the same batch on the embedded simulator (generation and environment only).
    env = make_env(EnvConfig(simulator="embedded", **turns))
    floor_wall, floor_cpu, _ = run_batch(policy, env, scenarios, rollout_cfg)
    print(f"  embedded simulator: {floor_wall:.2f} s wall", file=sys.stderr)
    serial, serial_tables = llm_setting(1)
    concurrent, concurrent_tables = llm_setting(args.concurrency)
    identical = all(t.equals(serial_tables[0]) for t in serial_tables + concurrent_tables)

    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    ratio = med(serial, "wall_s") / med(concurrent, "wall_s")
    result = {
        "benchmark": "llm_concurrency",
        "command": "python -m bench.llm_concurrency " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"episodes": args.episodes, "rollouts_per_scenario": 8, "latency_s": args.latency,
                     "concurrency": args.concurrency, "repeats": args.repeats, **turns,
                     "policy": "tiny Llama (mica_train.tiny defaults), generate with 24 new tokens, 1 torch thread",
                     "server": "python -m mica_train.env.local_server (its own process) on "
                               "127.0.0.1, HTTP/1.1 keep-alive"},
        "embedded_floor": {"wall_s": floor_wall, "cpu_s": floor_cpu},
        "serial": {"median_wall_s": med(serial, "wall_s"), "median_cpu_s": med(serial, "cpu_s"), "runs": serial},
        "concurrent": {"median_wall_s": med(concurrent, "wall_s"), "median_cpu_s": med(concurrent, "cpu_s"),
                       "runs": concurrent},
        "speedup_wall": ratio,
        "target_speedup": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "identical_trajectories": identical,
        "machine": {**machine_info(str(ROOT)), "loadavg_1m_at_end": os.getloadavg()[0],
                    "httpx": _version("httpx"), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    from mica_core.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"serial {result['serial']['median_wall_s']:.2f} s, concurrent "
          f"{result['concurrent']['median_wall_s']:.2f} s: {ratio:.1f}x (target {TARGET_RATIO:g}x: "
          f"{'met' if result['meets_target'] else 'missed'}); identical trajectories: {identical}; "
          f"wrote {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
