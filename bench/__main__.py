"""Micro-benchmarks of mica_core on the CPU: every backend on every preset, against the
memory floor, the API at training-batch size, the baselines a user would otherwise write,
peak memory, first calls in a new process, and the command line on a large Parquet file.

    make bench                       # = python -m bench: the full run (10M turns; minutes)
    python -m bench --quick          # small sizes, few repeats: a smoke test (seconds)
    python -m bench --turns 2000000 --repeats 9 --sections kernels,baselines
    python -m bench --sections threshold    # 1 vs all threads: the parallel threshold

Batches (bench/data.py): groups of 8 rollouts, lengths uniform in 1..45 (``uniform``) or
log-normal with the same mean (``skewed``); rollouts of a group adjacent (``contiguous``) or
permuted so the groups interleave (``shuffled``); float64 distances unless ``--dtype``.

Everything runs in one process (first calls and the command line in new ones). Each case is
warmed up, then timed ``--repeats`` times; the table shows medians. Ratios:

- kernels: the time of ``run_plan`` on validated input, allocating its three outputs as
  ``estimate`` does, divided by the floor measured in the same run on the same number of
  threads: allocating three fresh float64 arrays of the batch's length and writing them;
- baselines: baseline time divided by mica's ``estimate`` (``backend="auto"``) on the same
  batch, after checking that the baseline's reward, return and advantage equal mica's;
- cli: ``mica advantages`` on a Parquet file divided by pyarrow reading the columns mica reads
  and writing three float64 columns of the same length.

- startup: the wall time of launching the ``mica`` console script (``mica --help``,
  ``mica advantages --help``, ``mica advantages`` on a 12k-turn Parquet file), median of
  ``--repeats`` launches (at least 5), and whether that small run imported torch or
  mica_train.

Sections: ``kernels``, ``api``, ``baselines``, ``memory``, ``firstcall``, ``cli``,
``startup``, ``threshold``. Results, with the machine's description and load, go to
``bench/results/<name>.json`` (``--out``); the targets of docs/performance.md are evaluated
at the end (only on a full-size run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial

from mica_core import estimators as _estimators

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("kernels", "api", "baselines", "memory", "firstcall", "cli", "startup",
            "threshold")
# mica's presets, less those that need a key per turn (the bench's batches have none)
PRESETS = tuple(name for name in _estimators.PRESETS
                if all(c.scope != "key" for c in _estimators.get_estimator(name).components))
# A child's own peak resident memory: VmHWM on Linux (ru_maxrss would include the parent's
# memory carried through vfork); ru_maxrss elsewhere (bytes on macOS).
PEAK_RSS_CODE = ("import os, resource\n"
                 "if os.path.exists('/proc/self/status'):\n"
                 "    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')]\n"
                 "    peak = int(hwm[0].split()[1]) * 1024\n"
                 "else:\n"
                 "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                 "print(t, peak)\n")
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


def _child_env():
    """The environment of a benchmark's child process: this checkout first on the path."""
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


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

    def threads(self):
        """Threads a parallel case uses: every core available to the process."""
        from mica_core.internal import available_threads

        return available_threads()

    def numba_threads(self):
        return self._numba.config.NUMBA_NUM_THREADS if self._numba else 0

    def kernel_backends(self):
        out = [("numpy", None), ("cython", 1)]
        if self.threads() > 1:
            out.append(("cython", self.threads()))
        if self._numba:
            out.append(("numba", 1))
            if self.numba_threads() > 1:
                out.append(("numba", self.numba_threads()))
        return out

    def run_kernel(self, backend, threads, plan, ragged, b, outs=None):
        """``run_plan`` on validated input; fresh outputs unless ``outs`` is given."""
        from mica_core.api import run_plan

        return lambda: run_plan(plan, ragged, b.distance, b.initial_distance, None, backend,
                                out=outs, num_threads=threads)

    def floor(self, size, b, threads=1):
        """Allocate three fresh float64 arrays of ``b.n_turns`` and write them, on ``threads``
        threads (each writes its share of every array): what any estimator's outputs cost."""
        np = self.np
        n = b.n_turns
        pool = None
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(threads)
            bounds = np.linspace(0, n, threads + 1).astype(np.int64)

        def fresh():
            outs = [np.empty(n) for _ in range(3)]
            if pool is None:
                for o in outs:
                    o.fill(1.0)
            else:  # numpy's fill releases the GIL: the threads write in parallel
                list(pool.map(lambda k: [o[bounds[k]:bounds[k + 1]].fill(1.0) for o in outs],
                              range(threads)))
            return outs

        try:
            return self.timed(fresh, size, section="floor", name="memory floor", turns=n,
                              lengths=b.lengths, layout=b.layout, threads=threads)
        finally:
            if pool is not None:
                pool.shutdown()

    # ------------------------------------------------------------------ sections

    def kernels(self):
        from mica_core.estimators import resolve
        from mica_core.validate import make_ragged

        for size in ("small", "large"):
            for lengths, layout in LAYOUTS:
                b = self.batch(size, lengths, layout)
                ragged = make_ragged(b.offsets, b.group)
                floors = {t: self.floor(size, b, t)["median_s"]
                          for t in sorted({1, self.threads()})}
                for backend, threads in self.kernel_backends():
                    if backend == "numpy" and size == "large" and layout != "contiguous":
                        continue  # the reference backend: timed on the main layout only
                    for preset in self.args.presets:
                        plan = resolve(preset, reward_given=False)
                        rec = self.timed(self.run_kernel(backend, threads, plan, ragged, b),
                                         size, section="kernels", name=preset,
                                         backend=backend, threads=threads, turns=b.n_turns,
                                         lengths=lengths, layout=layout)
                        rec["x_floor"] = rec["median_s"] / floors.get(threads or 1, floors[1])

    def api(self):
        from bench.data import long_table

        np, mc = self.np, self.mc
        for size in ("small", "large"):
            b = self.batch(size)
            for backend in ["auto", "cython"] + (["numba"] if self._numba else []):
                self.timed(partial(mc.estimate, b.offsets, b.group, distance=b.distance,
                                   initial_distance=b.initial_distance, backend=backend),
                           size, section="api", name="estimate(mica) from numpy",
                           backend=backend, turns=b.n_turns, layout="contiguous")
            outs = tuple(np.empty(b.n_turns) for _ in range(3))
            self.timed(partial(mc.estimate, b.offsets, b.group, distance=b.distance,
                               initial_distance=b.initial_distance, out=outs),
                       size, section="api", name="estimate(mica, out=) from numpy",
                       backend="auto", turns=b.n_turns, layout="contiguous")
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
        for backend in ["auto", "cython"] + (["numba"] if self._numba else []):
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
        """A new process's first call of every path ``backend="auto"`` can choose, on writable
        numpy arrays and on read-only Arrow-backed ones: nothing may wait for a compiler."""
        from mica_core.internal import PARALLEL_MIN_ROWS

        code = (
            "import sys, time\n"
            "t0 = time.perf_counter()\n"
            "import numpy as np, pyarrow as pa, mica_core as mc\n"
            "from bench.data import long_table, make_batch\n"
            "t1 = time.perf_counter()\n"
            "b = make_batch(int(sys.argv[2]))\n"
            "path = sys.argv[1]\n"
            "if path == 'numpy':\n"
            "    args = (b.offsets, b.group, b.distance, b.initial_distance)\n"
            "else:\n"
            "    t = long_table(b)\n"
            "if path == 'arrow_readonly_numpy':\n"
            "    col = t['distance'].to_numpy()\n"
            "    assert not col.flags.writeable\n"
            "    args = (b.offsets, b.group, col, b.initial_distance)\n"
            "t2 = time.perf_counter()\n"
            "if path == 'compute_advantages':\n"
            "    mc.compute_advantages(t)\n"
            "else:\n"
            "    mc.estimate(args[0], args[1], distance=args[2], initial_distance=args[3])\n"
            "t3 = time.perf_counter()\n"
            "print(t1 - t0, t3 - t2)\n")
        env = _child_env()
        small, large = 12_000, (PARALLEL_MIN_ROWS * 2 if not self.args.quick else 20_000)
        for path in ("numpy", "arrow_readonly_numpy", "compute_advantages"):
            for turns in (small, large):
                out = subprocess.run([sys.executable, "-c", code, path, str(turns)],
                                     capture_output=True, text=True, env=env, cwd=ROOT,
                                     check=True)
                imp, first = map(float, out.stdout.split())
                self.cases.append({"section": "firstcall", "name": f"first call: {path}",
                                   "backend": "auto", "turns": turns,
                                   "import_s": imp, "median_s": first})

    def cli(self):
        """``mica advantages`` on a Parquet file of the large batch, against pyarrow reading the
        columns it reads and writing three float64 columns of random values, drawn before the
        clock starts (what advantages look like to an encoder: constant columns would encode
        for free); peak resident memory of each process (``VmHWM``: ``ru_maxrss`` would count
        the parent's memory, which a child started by ``vfork`` carries until ``exec``)."""
        import tempfile

        import pyarrow.parquet as pq

        from bench.data import long_table

        b = self.batch("large")
        tmp = tempfile.mkdtemp(prefix="mica-bench-")
        src = os.path.join(tmp, "in.parquet")
        pq.write_table(long_table(b), src)
        env = _child_env()
        mica_code = ("import sys, time\n"
                     "from mica_core.cli import main\n"
                     "t = time.perf_counter()\n"
                     "rc = main(['advantages', sys.argv[1], sys.argv[2], '--force'])\n"
                     "t = time.perf_counter() - t\n"
                     "assert rc == 0\n"
                     + PEAK_RSS_CODE)
        arrow_code = ("import sys, time\n"
                      "import numpy as np, pyarrow as pa, pyarrow.parquet as pq\n"
                      "n = pq.ParquetFile(sys.argv[1]).metadata.num_rows\n"
                      "rng = np.random.default_rng(0)\n"
                      "values = [rng.standard_normal(n) for _ in range(3)]\n"
                      "t = time.perf_counter()\n"
                      "cols = ['group_id', 'traj_id', 'turn', 'distance', 'initial_distance']\n"
                      "tab = pq.read_table(sys.argv[1], columns=cols)\n"
                      "out = pa.table(dict(zip(('reward', 'return', 'advantage'), values)))\n"
                      "pq.write_table(out, sys.argv[2])\n"
                      "t = time.perf_counter() - t\n"
                      + PEAK_RSS_CODE)
        try:
            for name, code in (("mica advantages", mica_code), ("pyarrow read+write", arrow_code)):
                times, peaks = [], []
                for _ in range(max(2, min(self.args.repeats, 5))):
                    out = subprocess.run([sys.executable, "-c", code, src,
                                          os.path.join(tmp, "out.parquet")],
                                         capture_output=True, text=True, env=env, cwd=tmp,
                                         check=True)
                    t, peak = out.stdout.split()
                    times.append(float(t))
                    peaks.append(int(peak))
                times.sort()
                self.cases.append({"section": "cli", "name": name, "turns": b.n_turns,
                                   "median_s": times[len(times) // 2], "times_s": times,
                                   "peak_rss_bytes": max(peaks),
                                   "input_bytes": os.path.getsize(src)})
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        mica, arrow = (_find(self.cases, section="cli", name=n) for n in
                       ("mica advantages", "pyarrow read+write"))
        mica["x_pyarrow"] = mica["median_s"] / arrow["median_s"]

    def startup(self):
        """How long ``mica`` takes to start: the console script (or ``python -m
        mica_core.cli`` outside an install) launched as a user launches it, timed from the
        parent, median of several launches; then, in one more process, which heavy packages a
        small ``mica advantages`` run imported."""
        import shutil
        import tempfile

        import pyarrow.parquet as pq

        from bench.data import long_table, make_batch

        exe = shutil.which("mica", path=os.path.dirname(sys.executable))
        mica = [exe] if exe else [sys.executable, "-m", "mica_core.cli"]
        env = _child_env()
        tmp = tempfile.mkdtemp(prefix="mica-bench-")
        src, out = os.path.join(tmp, "in.parquet"), os.path.join(tmp, "out.parquet")
        pq.write_table(long_table(make_batch(SMALL_GROUPS * 8 * 23, seed=self.args.seed)), src)
        launches = max(5, self.args.repeats)
        try:
            for name, argv in (("mica --help", ["--help"]),
                               ("mica advantages --help", ["advantages", "--help"]),
                               ("mica advantages (12k turns)",
                                ["advantages", src, out, "--force"])):
                times = []
                for _ in range(launches):
                    t0 = time.perf_counter()
                    subprocess.run(mica + argv, capture_output=True, env=env, cwd=tmp,
                                   check=True)
                    times.append(time.perf_counter() - t0)
                times.sort()
                self.cases.append({"section": "startup", "name": name, "launches": launches,
                                   "median_s": times[len(times) // 2], "times_s": times,
                                   "command": " ".join(["mica"] + argv[:1])})
            probe = ("import sys\n"
                     "from mica_core.cli import main\n"
                     "assert main(['advantages', sys.argv[1], sys.argv[2], '--force']) == 0\n"
                     "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & "
                     "{'torch', 'mica_train', 'numba', 'matplotlib', 'transformers'})))\n")
            res = subprocess.run([sys.executable, "-c", probe, src, out], capture_output=True,
                                 text=True, env=env, cwd=tmp, check=True)
            _find(self.cases, section="startup", name="mica advantages (12k turns)")[
                "heavy_imports"] = res.stdout.split()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def threshold(self):
        """The ``mica`` kernel on 1 thread and on all threads at growing sizes: where ``auto``
        starts using threads."""
        if self.threads() < 2:
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
            for threads in (1, self.threads()):
                fn = self.run_kernel("cython", threads, plan, ragged, b, outs)
                fn()
                t0 = time.perf_counter()
                fn()
                one = time.perf_counter() - t0
                reps = self.measure.repeats_for(one, 0.05 if self.args.quick else 1.5, lo=3,
                                                hi=2000)
                row[threads] = self.measure.time_call(fn, repeats=reps, warmup=1)["median_s"]
            self.cases.append({"section": "threshold", "name": "mica kernel", "turns": b.n_turns,
                               "one_thread_s": row[1], "all_threads_s": row[self.threads()],
                               "threads": self.threads(), "median_s": min(row.values())})


# --------------------------------------------------------------------------- report


def _find(cases, **match):
    for c in cases:
        if all(c.get(k) == v for k, v in match.items()):
            return c
    return None


def evaluate_targets(cases, turns, threads):
    """The targets of docs/performance.md, from a full-size run."""
    t = {}

    def kern(th, layout="contiguous", lengths="uniform", name="mica"):
        return _find(cases, section="kernels", name=name, backend="cython", threads=th,
                     turns=turns, layout=layout, lengths=lengths)

    def target(name, case, key, goal, *, scale=1.0, **extra):
        if case is None or case.get(key) is None:
            return
        v = case[key] * scale
        t[name] = {"value": v, "target": goal, "met": v <= goal,
                   **extra}

    target("mica_1_thread_x_floor", kern(1), "x_floor", 1.5)
    if threads > 1:
        target(f"mica_{threads}_threads_x_floor", kern(threads), "x_floor", 1.5)
    shuffled = [c for c in (kern(1, "shuffled"), kern(threads, "shuffled")) if c]
    if shuffled:
        best = min(shuffled, key=lambda c: c["x_floor"])
        target("mica_shuffled_x_floor", best, "x_floor", 4.0, threads=best["threads"])

    def small(name, **match):
        found = [c for c in cases if c.get("section") == "api" and c.get("name") == name
                 and c.get("turns") != turns and all(c.get(k) == v for k, v in match.items())]
        return found[0] if found else None

    target("estimate_12k_us", small("estimate(mica) from numpy", backend="auto"), "median_s",
           50.0, scale=1e6)
    target("estimate_out_12k_us", small("estimate(mica, out=) from numpy"), "median_s", 50.0,
           scale=1e6)
    target("compute_advantages_12k_us", small("compute_advantages(mica) from Arrow",
                                              layout="sorted rows"), "median_s", 150.0,
           scale=1e6)
    first = [c for c in cases if c.get("section") == "firstcall"]
    if first:
        worst = max(first, key=lambda c: c["median_s"])
        target("first_call_s", worst, "median_s", 2.0, path=worst["name"],
               turns=worst["turns"])
    target("cli_parquet_x_pyarrow", _find(cases, section="cli", name="mica advantages"),
           "x_pyarrow", 2.0)
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
    sections = [("floor", "memory floor: three fresh float64 arrays written"),
                ("kernels", "kernels (run_plan, fresh outputs)"),
                ("api", "API"), ("baselines", "baselines (mica: estimate, backend='auto')"),
                ("memory", "peak memory"), ("firstcall", "first call in a new process"),
                ("cli", "command line on a Parquet file"),
                ("startup", "command line start-up (console script launches, median)"),
                ("threshold", "parallel threshold: the mica kernel on 1 and on all threads")]
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
                  f"@{c['threads']:<8} {_fmt_time(c['median_s'])}\n")
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
                w(f"  {c['turns']:>10,} {c['name']:<40}{_fmt_time(c['median_s'])} "
                  f"(imports {c['import_s']:.2f} s)\n")
            elif key == "cli":
                ratio = f"  {c['x_pyarrow']:.2f}x pyarrow" if "x_pyarrow" in c else ""
                w(f"  {c['turns']:>10,} {c['name']:<20}{_fmt_time(c['median_s'])}  peak "
                  f"{c['peak_rss_bytes'] / 2**20:,.0f} MiB{ratio}\n")
            elif key == "startup":
                heavy = c.get("heavy_imports")
                note = "" if heavy is None else f"  imports {', '.join(heavy) or 'no torch, no mica_train'}"
                w(f"  {c['name']:<30}{_fmt_time(c['median_s'])} ({c['launches']} launches){note}\n")
            elif key == "threshold":
                faster = "threads" if c["all_threads_s"] < c["one_thread_s"] else "1 thread"
                w(f"  {c['turns']:>10,}  1 thread{_fmt_time(c['one_thread_s'])}  "
                  f"{c['threads']} threads{_fmt_time(c['all_threads_s'])}  -> {faster}\n")
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
        configs = [("cython", 1), ("cython", m.get("cpus_usable") or 2), ("numba", 1),
                   ("numba", m.get("numba_threads") or 2), ("numpy", None)]
        configs = [cfg for cfg in dict.fromkeys(configs)
                   if any(c["backend"] == cfg[0] and c["threads"] == cfg[1] for c in big)]
        head = [f"{b}{'' if t is None else f', {t} thread' + ('s' if t > 1 else '')}"
                for b, t in configs]
        lines += [(f"Kernels, {n:,} turns, float64 (median time; ratio to the floor on as many "
                   f"threads: three fresh float64 arrays written):"), "",
                  "| preset | layout | " + " | ".join(head) + " |",
                  "|---|---|" + "---|" * len(configs)]
        layouts = sorted({(c["lengths"], c["layout"]) for c in big},
                         key=lambda x: (x[1] != "contiguous", x[0] != "uniform"))
        for lengths, layout in layouts:
            for preset in dict.fromkeys(c["name"] for c in big):
                row = [preset, f"{lengths}, {layout}"]
                for backend, threads in configs:
                    c = _find(big, name=preset, backend=backend, threads=threads,
                              lengths=lengths, layout=layout)
                    row.append("-" if c is None else
                               f"{c['median_s'] * 1e3:.1f} ms ({c['x_floor']:.2f}x)")
                lines.append("| " + " | ".join(row) + " |")
        floors = [c for c in cases if c.get("section") == "floor" and c["turns"] == n
                  and c["lengths"] == "uniform" and c["layout"] == "contiguous"]
        if floors:
            lines += ["", "Floor (uniform, contiguous): " + ", ".join(
                f"{c['median_s'] * 1e3:.1f} ms on {c['threads']} thread"
                f"{'s' if c['threads'] > 1 else ''}" for c in floors) + "."]
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
                                     runner.threads())),
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
