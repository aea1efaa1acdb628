"""Timing, memory and machine description for the benchmark runner."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc


def time_call(fn, *, repeats, warmup=1):
    """Median (and min) wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    The garbage collector is paused while timing so a collection does not land in a sample.
    """
    for _ in range(warmup):
        fn()
    samples = []
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    finally:
        if gc_was_on:
            gc.enable()
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "repeats": repeats}


def repeats_for(seconds_per_call, budget_s, lo=3, hi=200):
    """How many timed calls fit a time budget (at least ``lo``, at most ``hi``)."""
    if seconds_per_call <= 0:
        return hi
    return max(lo, min(hi, int(budget_s / seconds_per_call)))


# --------------------------------------------------------------------------- memory


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss():
    """Reset the kernel's high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def extra_peak_bytes(fn):
    """Peak memory ``fn()`` needs beyond what the process held when it started.

    Returns ``{"rss": bytes or None, "tracemalloc": bytes}``: the resident-set high-water
    mark (everything, including compiled kernels' own allocations) measured from a reset
    just before the call, and the peak of Python-tracked allocations (numpy arrays) during
    the call. The call's result is dropped only after the measurement.
    """
    gc.collect()
    base = _status_kib("VmRSS")
    rss = None
    if base is not None and _reset_peak_rss():
        result = fn()
        peak = _status_kib("VmHWM")
        rss = (peak - base) * 1024 if peak is not None else None
        del result
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        _, traced = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return {"rss": rss, "tracemalloc": traced}


# --------------------------------------------------------------------------- machine


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(module):
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", None)


def _git_commit(root):
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(root):
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_bytes": _mem_total_bytes(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "pyarrow": _version("pyarrow"),
        "numba": _version("numba"),
        "pandas": _version("pandas"),
        "polars": _version("polars"),
        "mica_commit": _git_commit(root),
    }
    try:
        import numba

        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
        info["numba_threading_layer"] = None  # filled after the first parallel call
    except ImportError:
        pass
    return info
