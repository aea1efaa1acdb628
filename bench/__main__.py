"""Micro-benchmarks of mica_core on the CPU: every backend on every preset, the baselines a
user would otherwise write, the memory floor, peak memory and the Numba start-up cost.

    make bench                       # = python -m bench: the full run (10M turns; minutes)
    python -m bench --quick          # small sizes, few repeats: a smoke test (seconds)
    python -m bench --turns 2000000 --repeats 9 --sections kernels,baselines
    python -m bench --sections threshold    # Cython vs parallel Numba: backend="auto"'s switch

Batches (bench/data.py): groups of 8 rollouts, lengths uniform in 1..45 (``uniform``) or
log-normal with the same mean (``skewed``); rollouts of a group adjacent (``contiguous``) or
permuted so the groups interleave (``shuffled``); float64 distances unless ``--dtype``.

Everything runs in one process. Each case is warmed up (JIT compiled or loaded from the
cache, caches filled), then timed ``--repeats`` times; the table shows medians. Ratios:

- kernels: the time of ``backend.run`` (outputs preallocated, as ``estimate`` hands them
  over) divided by the memory floor of the same batch: one ``np.copyto`` of the distance
  column into each of the three float64 output arrays;
- baselines: baseline time divided by mica's ``estimate`` (``backend="auto"``) on the same
  batch, after checking that the baseline's reward, return and advantage equal mica's.

Sections: ``kernels``, ``api`` (``estimate`` from numpy arrays, ``compute_advantages`` from
Arrow tables), ``baselines``, ``memory`` (extra peak memory of ``estimate``), ``firstcall``
(a new process's first Numba call, cache warm), ``threshold``. Results, with the machine's
description and load, go to ``bench/results/<name>.json`` (``--out``), and the targets of
docs/performance.md are evaluated at the end (only on a full-size run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("kernels", "api", "baselines", "memory", "firstcall", "threshold")
PRESETS = ("mica", "mica_turn", "mica_group", "mica_adr", "mapo", "grpo", "reinforce_pp",
           "reinforce_pp_idr")
SMALL_GROUPS = 64  # 64 groups of 8 rollouts: about 12k turns
LAYOUTS = (("uniform", "contiguous"), ("skewed", "contiguous"), ("uniform", "shuffled"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats (smoke test; no targets)")
    p.add_argument("--turns", type=int, default=None,
                   help="turns in the large batch (default 10,000,000; --quick: 50,000)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per large case (default 5; small cases time ~0.3 s each)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--presets", default=",".join(PRESETS), help="presets for the kernels")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/cpu_<n>cores[_quick].json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="JSON", default=None,
                   help="print the Markdown summary of an earlier run's JSON and exit")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(args.sections) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}; choose from {', '.join(SECTIONS)}")
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    if args.turns is None:
        args.turns = 50_000 if args.quick else 10_000_000
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


class Runner:
    def __init__(self, args):
        import numpy as np

        import mica_core as mc
        from bench import measure

        self.np, self.mc, self.measure, self.args = np, mc, measure, args
        self.dtype = np.float64 if args.dtype == "float64" else np.float32
        self.cases = []
        self._batches = {}
        self._numba = None
        try:
            import numba

            self._numba = numba
        except ImportError:
            pass

    # ------------------------------------------------------------------ helpers

    def batch(self, size, lengths="uniform", layout="contiguous"):
        from bench.data import groups_of, make_batch

        key = (size, lengths, layout)
        if key not in self._batches:
            if size == "small":
                b = groups_of(SMALL_GROUPS, lengths=lengths, layout=layout, dtype=self.dtype,
                              seed=self.args.seed)
            else:
                b = make_batch(self.args.turns, lengths=lengths, layout=layout,
                               dtype=self.dtype, seed=self.args.seed)
            self._batches[key] = b
        return self._batches[key]

    def repeats(self, size, seconds_per_call=None):
        if size == "small":
            if seconds_per_call is None:
                return 50
            if self.args.quick:
                return self.measure.repeats_for(seconds_per_call, 0.02, lo=3, hi=50)
            return self.measure.repeats_for(seconds_per_call, 1.0, lo=5, hi=500)
        return self.args.repeats

    def timed(self, fn, size, **record):
        t0 = time.perf_counter()
        fn()  # warm-up (JIT compile or cache load, page faults)
        first = time.perf_counter() - t0
        t = self.measure.time_call(fn, repeats=self.repeats(size, first), warmup=1)
        record.update(t)
        self.cases.append(record)
        return record

    def numba_threads(self):
        return self._numba.config.NUMBA_NUM_THREADS if self._numba else 0

    def kernel_backends(self):
        out = [("numpy", None), ("cython", None)]
        if self._numba:
            out.append(("numba", 1))
            if self.numba_threads() > 1:
                out.append(("numba", self.numba_threads()))
        return out

    def run_kernel(self, backend, threads, plan, ragged, b, outs):
        from mica_core.api import run_plan

        return lambda: run_plan(plan, ragged, b.distance, b.initial_distance, None, backend,
                                out=outs, num_threads=threads)

    def floor(self, size, b):
        np = self.np
        outs = [np.empty(b.n_turns) for _ in range(3)]

        def copy():
            for o in outs:
                np.copyto(o, b.distance)

        return self.timed(copy, size, section="floor", name="memory floor", turns=b.n_turns,
                          lengths=b.lengths, layout=b.layout)

    # ------------------------------------------------------------------ sections

    def kernels(self):
        from mica_core.estimators import resolve
        from mica_core.validate import make_ragged

        np = self.np
        for size in ("small", "large"):
            for lengths, layout in LAYOUTS:
                b = self.batch(size, lengths, layout)
                ragged = make_ragged(b.offsets, b.group)
                floor = self.floor(size, b)["median_s"]
                outs = [np.empty(b.n_turns) for _ in range(3)]
                for backend, threads in self.kernel_backends():
                    if backend == "numpy" and size == "large" and layout != "contiguous":
                        continue  # the reference backend: timed on the main layout only
                    for preset in self.args.presets:
                        plan = resolve(preset, reward_given=False)
                        rec = self.timed(self.run_kernel(backend, threads, plan, ragged, b,
                                                         outs), size, section="kernels",
                                         name=preset, backend=backend, threads=threads,
                                         turns=b.n_turns, lengths=lengths, layout=layout)
                        rec["x_floor"] = rec["median_s"] / floor

    def api(self):
        from bench.data import long_table

        mc = self.mc
        for size in ("small", "large"):
            b = self.batch(size)
            backends = ["auto", "cython"] + (["numba"] if self._numba else [])
            for backend in backends:
                self.timed(partial(mc.estimate, b.offsets, b.group, distance=b.distance,
                                   initial_distance=b.initial_distance, backend=backend),
                           size, section="api", name="estimate(mica) from numpy",
                           backend=backend, turns=b.n_turns, layout="contiguous")
            for shuffle in (False, True):
                table = long_table(b, shuffle_rows=shuffle, seed=self.args.seed)
                self.timed(partial(mc.compute_advantages, table), size, section="api",
                           name="compute_advantages(mica) from Arrow", backend="auto",
                           turns=b.n_turns, layout="shuffled rows" if shuffle else "sorted rows")

    def baselines(self):
        from bench.baselines import BASELINES

        np, mc = self.np, self.mc
        for size in ("small", "large"):
            b = self.batch(size)
            mica = self.timed(partial(mc.estimate, b.offsets, b.group, distance=b.distance,
                                      initial_distance=b.initial_distance),
                              size, section="baselines", name="mica estimate", backend="auto",
                              turns=b.n_turns)
            ref = mc.estimate(b.offsets, b.group, distance=b.distance,
                              initial_distance=b.initial_distance)
            for name, (prepare, run) in BASELINES.items():
                if size == "large" and name.startswith("python"):
                    continue  # minutes per call at 10M turns; timed at 12k
                data = prepare(b.offsets, b.group, b.distance, b.initial_distance)
                got = run(data)
                diff = max(float(np.max(np.abs(np.asarray(g, dtype=np.float64) - r)))
                           if len(r) else 0.0 for g, r in zip(got, ref))
                if not diff <= 1e-9:
                    raise AssertionError(f"baseline {name} differs from mica by {diff}")
                del got
                repeats_large = max(1, min(self.args.repeats, 3))
                if size == "large":
                    t = self.measure.time_call(partial(run, data), repeats=repeats_large,
                                               warmup=0)
                    rec = {"section": "baselines", "name": name, "turns": b.n_turns, **t}
                    self.cases.append(rec)
                else:
                    rec = self.timed(partial(run, data), size, section="baselines", name=name,
                                     turns=b.n_turns)
                rec["max_abs_diff_vs_mica"] = diff
                rec["x_mica"] = rec["median_s"] / mica["median_s"]

    def memory(self):
        np, mc = self.np, self.mc
        b = self.batch("large")
        out_bytes = 3 * b.n_turns * np.dtype(self.dtype).itemsize
        backends = ["auto", "cython"] + (["numba"] if self._numba else [])
        for backend in backends:
            mc.estimate(b.offsets, b.group, distance=b.distance,
                        initial_distance=b.initial_distance, backend=backend)  # warm
            peak = self.measure.extra_peak_bytes(
                partial(mc.estimate, b.offsets, b.group, distance=b.distance,
                        initial_distance=b.initial_distance, backend=backend))
            # The larger of the two: RSS misses memory malloc recycles from earlier calls,
            # tracemalloc misses allocations outside numpy (kernel scratch).
            extra = max(peak["rss"] or 0, peak["tracemalloc"])
            self.cases.append({"section": "memory", "name": "estimate(mica) extra peak",
                               "backend": backend, "turns": b.n_turns,
                               "output_bytes": out_bytes, "extra_peak_rss_bytes": peak["rss"],
                               "extra_peak_traced_bytes": peak["tracemalloc"],
                               "x_outputs": extra / out_bytes})

    def firstcall(self):
        if not self._numba:
            return
        code = (
            "import time, sys\n"
            "t0 = time.perf_counter()\n"
            "import numpy as np, mica_core as mc\n"
            "t1 = time.perf_counter()\n"
            "o = np.array([0, 2, 5]); d = np.array([1.0, 0.5, 2.0, 1.5, 1.0])\n"
            "mc.estimate(o, [0, 0], distance=d, initial_distance=np.array([2.0, 2.5]),"
            " backend='numba')\n"
            "t2 = time.perf_counter()\n"
            "print(t1 - t0, t2 - t1)\n")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        runs = []
        for _ in range(2 if self.args.quick else 4):  # the first may compile (cold cache)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env=env, cwd=ROOT, check=True)
            imp, first = map(float, out.stdout.split())
            runs.append({"import_mica_core_s": imp, "first_numba_call_s": first})
        warm = runs[1:]
        self.cases.append({"section": "firstcall", "name": "new process: first numba call",
                               "backend": "numba", "cold": runs[0], "warm": warm,
                               "median_s": sorted(r["first_numba_call_s"] for r in warm)[len(warm) // 2]})

    def threshold(self):
        """Cython vs all-thread Numba on ``mica`` at growing sizes: the crossover for auto."""
        if not self._numba:
            return
        from bench.data import make_batch
        from mica_core.estimators import resolve
        from mica_core.validate import make_ragged

        np = self.np
        plan = resolve("mica", reward_given=False)
        sizes = [2 ** k for k in range(11, 23)]
        if self.args.quick:
            sizes = sizes[:4]
        for n in sizes:
            b = make_batch(n, seed=self.args.seed, dtype=self.dtype)
            ragged = make_ragged(b.offsets, b.group)
            outs = [np.empty(b.n_turns) for _ in range(3)]
            row = {}
            for backend, threads in (("cython", None), ("numba", self.numba_threads())):
                fn = self.run_kernel(backend, threads, plan, ragged, b, outs)
                fn()
                t0 = time.perf_counter()
                fn()
                one = time.perf_counter() - t0
                reps = self.measure.repeats_for(one, 0.05 if self.args.quick else 1.5, lo=3,
                                                hi=2000)
                row[backend] = self.measure.time_call(fn, repeats=reps, warmup=1)["median_s"]
            self.cases.append({"section": "threshold", "name": "mica kernel", "turns": b.n_turns,
                                   "cython_s": row["cython"], "numba_s": row["numba"],
                                   "numba_threads": self.numba_threads(),
                                   "median_s": min(row.values())})


# --------------------------------------------------------------------------- report


def _find(cases, **match):
    for c in cases:
        if all(c.get(k) == v for k, v in match.items()):
            return c
    return None


def evaluate_targets(cases, turns, numba_threads):
    """The targets of docs/performance.md, from a full-size run."""
    t = {}

    def kern(backend, threads, layout="contiguous", lengths="uniform", name="mica"):
        return _find(cases, section="kernels", name=name, backend=backend, threads=threads,
                     turns=turns, layout=layout, lengths=lengths)

    cy = kern("cython", None)
    nb1 = kern("numba", 1)
    nb2 = kern("numba", numba_threads) if numba_threads > 1 else None
    if cy:
        t["mica_1_thread_cython_x_floor"] = {"value": cy["x_floor"], "target": 3.0,
                                             "met": cy["x_floor"] <= 3.0}
    if nb1:
        t["mica_1_thread_numba_x_floor"] = {"value": nb1["x_floor"], "target": 3.0,
                                            "met": nb1["x_floor"] <= 3.0}
    if nb2:
        t["mica_numba_2_threads_x_floor"] = {"value": nb2["x_floor"], "target": 2.0,
                                             "met": nb2["x_floor"] <= 2.0}
    shuffled = [c for c in (kern("cython", None, layout="shuffled"),
                            kern("numba", numba_threads, layout="shuffled") if nb2 else None)
                if c]
    if shuffled:
        best = min(shuffled, key=lambda c: c["x_floor"])
        t["mica_shuffled_x_floor"] = {"value": best["x_floor"], "target": 10.0,
                                      "met": best["x_floor"] <= 10.0,
                                      "backend": best["backend"], "threads": best["threads"]}
    for name in ("pandas_groupby", "polars_window"):
        c = _find(cases, section="baselines", name=name, turns=turns)
        if c:
            t[f"speedup_vs_{name}"] = {"value": c["x_mica"], "target": 50.0,
                                       "met": c["x_mica"] >= 50.0}
    small = [c for c in cases if c.get("section") == "baselines" and c.get("name") ==
             "python_loop" and c.get("turns") != turns]
    if small:
        c = small[0]
        t["speedup_vs_python_loop_12k"] = {"value": c["x_mica"], "target": 500.0,
                                           "met": c["x_mica"] >= 500.0, "turns": c["turns"]}
    est = [c for c in cases if c.get("section") == "api" and c.get("backend") == "auto"
           and c.get("name", "").startswith("estimate") and c.get("turns") != turns]
    if est:
        v = est[0]["median_s"] * 1e6
        t["estimate_12k_us"] = {"value": v, "target": 100.0, "met": v <= 100.0,
                                "turns": est[0]["turns"]}
    arrow = [c for c in cases if c.get("section") == "api" and c.get("layout") ==
             "sorted rows" and c.get("turns") != turns]
    if arrow:
        v = arrow[0]["median_s"] * 1e6
        t["compute_advantages_12k_us"] = {"value": v, "target": 300.0, "met": v <= 300.0,
                                          "turns": arrow[0]["turns"]}
    mem = _find(cases, section="memory", backend="auto")
    if mem and mem.get("x_outputs") is not None:
        t["extra_peak_x_outputs"] = {"value": mem["x_outputs"], "target": 3.0,
                                     "met": mem["x_outputs"] <= 3.0}
    first = _find(cases, section="firstcall")
    if first:
        t["first_numba_call_s"] = {"value": first["median_s"], "target": 1.0,
                                   "met": first["median_s"] <= 1.0}
    return t


def _fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:8.1f} us"
    if s < 1:
        return f"{s * 1e3:8.2f} ms"
    return f"{s:8.2f} s "


def print_table(result, file=sys.stdout):
    cases = result["cases"]
    w = file.write
    m = result["machine"]
    w(f"mica bench: {m['cpu']}, {m['cpus_usable']} usable cores, numba threads "
      f"{m.get('numba_threads')}, load {m.get('load_average_start')}\n")
    sections = [("floor", "memory floor"), ("kernels", "kernels (backend.run, outputs given)"),
                ("api", "API"), ("baselines", "baselines (mica: estimate, backend='auto')"),
                ("memory", "peak memory"), ("firstcall", "first Numba call in a new process"),
                ("threshold", "auto threshold: Cython vs parallel Numba, mica kernel")]
    for key, title in sections:
        rows = [c for c in cases if c.get("section") == key]
        if not rows:
            continue
        w(f"\n== {title}\n")
        for c in rows:
            if key == "kernels":
                thr = "" if c["threads"] is None else f"@{c['threads']}"
                w(f"  {c['turns']:>10,} {c['lengths']:>7} {c['layout']:>10}  "
                  f"{c['backend'] + thr:<9} {c['name']:<17}{_fmt_time(c['median_s'])}"
                  f"  {c['x_floor']:6.2f}x floor\n")
            elif key == "floor":
                w(f"  {c['turns']:>10,} {c['lengths']:>7} {c['layout']:>10}  "
                  f"{_fmt_time(c['median_s'])}\n")
            elif key == "api":
                w(f"  {c['turns']:>10,} {c['name']:<38} {c['backend']:<7} "
                  f"{c['layout']:<13}{_fmt_time(c['median_s'])}\n")
            elif key == "baselines":
                ratio = f"  {c['x_mica']:9.1f}x mica" if "x_mica" in c else ""
                w(f"  {c['turns']:>10,} {c['name']:<16}{_fmt_time(c['median_s'])}{ratio}\n")
            elif key == "memory":
                rss = c["extra_peak_rss_bytes"]
                w(f"  {c['turns']:>10,} {c['backend']:<7} extra peak {c['x_outputs']:4.2f}x "
                  f"the outputs ({c['output_bytes'] / 2**20:.1f} MiB): resident "
                  f"{(rss or 0) / 2**20:.1f} MiB, traced "
                  f"{c['extra_peak_traced_bytes'] / 2**20:.1f} MiB\n")
            elif key == "firstcall":
                warm = ", ".join(f"{r['first_numba_call_s']:.2f}" for r in c["warm"])
                w(f"  cold cache {c['cold']['first_numba_call_s']:.2f} s; warm cache {warm} s "
                  f"(import mica_core {c['warm'][0]['import_mica_core_s']:.2f} s)\n")
            elif key == "threshold":
                faster = "numba" if c["numba_s"] < c["cython_s"] else "cython"
                w(f"  {c['turns']:>10,}  cython{_fmt_time(c['cython_s'])}  "
                  f"numba@{c['numba_threads']}{_fmt_time(c['numba_s'])}  -> {faster}\n")
    if result.get("targets"):
        w("\n== targets\n")
        for name, v in result["targets"].items():
            w(f"  {'met ' if v['met'] else 'MISS'} {name:<34} {v['value']:10.3f}  "
              f"(target {v['target']})\n")


def markdown_summary(result) -> str:
    """The summary tables of docs/performance.md, from a run's JSON."""
    cases, m = result["cases"], result["machine"]
    big = [c for c in cases if c.get("section") == "kernels" and c["turns"] > 1_000_000]

    def load(key):
        value = m.get(key)
        return "n/a" if not value else f"{value[0]:.1f}"

    lines = [(f"Machine: {m['cpu']}, {m['cpus_usable']} cores, "
              f"{m['memory_bytes'] / 2**30:.0f} GiB; Python {m['python']}, numpy {m['numpy']}, "
              f"numba {m['numba']}; load average {load('load_average_start')} at start, "
              f"{load('load_average_end')} at end. Command: `{result['command'].strip()}`."),
             ""]
    if result.get("note"):
        lines += [result["note"], ""]
    if big:
        n = big[0]["turns"]
        lines += [f"Kernels, {n:,} turns, float64 (median time; ratio to the memory floor):",
                  "", "| preset | layout | cython | numba, 1 thread | numba, 2 threads |",
                  "|---|---|---|---|---|"]
        layouts = sorted({(c["lengths"], c["layout"]) for c in big},
                         key=lambda x: (x[1] != "contiguous", x[0] != "uniform"))
        for lengths, layout in layouts:
            for preset in dict.fromkeys(c["name"] for c in big):
                row = [preset, f"{lengths}, {layout}"]
                for backend, threads in (("cython", None), ("numba", 1), ("numba", 2)):
                    c = _find(big, name=preset, backend=backend, threads=threads,
                              lengths=lengths, layout=layout)
                    row.append("-" if c is None else
                               f"{c['median_s'] * 1e3:.1f} ms ({c['x_floor']:.2f}x)")
                lines.append("| " + " | ".join(row) + " |")
        floor = _find(cases, section="floor", turns=n, lengths="uniform", layout="contiguous")
        if floor:
            lines += ["", f"Memory floor (uniform, contiguous): {floor['median_s'] * 1e3:.1f} ms."]
    base = [c for c in cases if c.get("section") == "baselines"]
    if base:
        lines += ["", ("Against the baselines (`mica`: `estimate`, `backend=\"auto\"`, from "
                       "numpy arrays, validation included; baselines checked equal first):"),
                  "", ("| turns | mica | numpy bincount | pandas | polars | Python loop (verl "
                       "style) | Python lists |"), "|---|---|---|---|---|---|---|"]
        for n in sorted({c["turns"] for c in base}):
            row = [f"{n:,}"]
            for name in ("mica estimate", "numpy_bincount", "pandas_groupby", "polars_window",
                         "python_loop", "python_lists"):
                c = _find(base, name=name, turns=n)
                if c is None:
                    row.append("-")
                elif "x_mica" in c:
                    row.append(f"{_fmt_time(c['median_s']).strip()} ({c['x_mica']:.0f}x)")
                else:
                    row.append(_fmt_time(c["median_s"]).strip())
            lines.append("| " + " | ".join(row) + " |")
    targets = result.get("targets") or {}
    if targets:
        lines += ["", "| target | measured | goal | |", "|---|---|---|---|"]
        for name, v in targets.items():
            lines.append(f"| {name} | {v['value']:.3g} | {v['target']:g} | "
                         f"{'met' if v['met'] else 'missed'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_summary(json.load(f)), end="")
        return None
    sys.path.insert(0, ROOT)
    from bench.measure import machine_info

    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    runner = Runner(args)
    started = time.time()
    for section in SECTIONS:
        if section in args.sections:
            getattr(runner, section)()
    info = machine_info(ROOT)
    info["load_average_start"] = load_start
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if runner._numba:
        try:
            info["numba_threading_layer"] = runner._numba.threading_layer()
        except ValueError:
            info["numba_threading_layer"] = None
    result = {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {"turns": args.turns, "repeats": args.repeats, "quick": args.quick,
                   "dtype": args.dtype, "seed": args.seed, "sections": args.sections,
                   "presets": args.presets, "small_groups": SMALL_GROUPS},
        "machine": info,
        "wall_s": time.time() - started,
        "cases": runner.cases,
        "targets": ({} if args.quick else
                    evaluate_targets(runner.cases, runner.batch("large").n_turns,
                                     runner.numba_threads())),
    }
    out = args.out or os.path.join(
        ROOT, "bench", "results",
        f"cpu_{info['cpus_usable'] or info['cpu_count']}cores{'_quick' if args.quick else ''}"
        ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
