"""The Numba backend: bit-identical results whatever the thread count, lazy import, cache."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import mica_core as mc
from mica_core.estimators import resolve
from mica_core.validate import make_ragged

numba = pytest.importorskip("numba")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(n_groups=300, per=8, seed=0, interleave=False):
    rng = np.random.default_rng(seed)
    n_traj = n_groups * per
    lengths = rng.integers(1, 46, n_traj)
    offsets = np.zeros(n_traj + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    group = np.repeat(np.arange(n_groups), per)
    if interleave:
        group = rng.permutation(group)
    return offsets, group, rng.uniform(0, 5, offsets[-1]), rng.uniform(0, 5, n_traj)


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("estimator", mc.list_estimators()[:8])
def test_bits_do_not_depend_on_thread_count(estimator, interleave):
    from mica_core import _backend_numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba was started with one thread")
    offsets, group, d, d0 = _batch(interleave=interleave)
    ragged = make_ragged(offsets, group)
    plan = resolve(estimator, reward_given=False)
    results = []
    for threads in (1, 2, 1):
        outs = [np.empty(len(d)) for _ in range(3)]
        _backend_numba.run(plan, ragged, d, d0, None, *outs, num_threads=threads)
        results.append(outs)
    for threads_result in results[1:]:
        for a, b in zip(results[0], threads_result):
            assert a.tobytes() == b.tobytes()


def test_num_threads_is_restored():
    from mica_core import _backend_numba

    before = numba.get_num_threads()
    offsets, group, d, d0 = _batch(n_groups=4)
    ragged = make_ragged(offsets, group)
    outs = [np.empty(len(d)) for _ in range(3)]
    _backend_numba.run(resolve("mica", reward_given=False), ragged, d, d0, None, *outs,
                       num_threads=1)
    assert numba.get_num_threads() == before


def test_importing_mica_core_imports_no_numba():
    code = ("import sys, mica_core, numpy as np\n"
            "mica_core.estimate(np.array([0, 2]), [0], distance=np.array([1.0, 0.5]),"
            " initial_distance=np.array([1.5]))\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_fastmath_keeps_nan_and_inf_semantics():
    from mica_core._numba.config import FASTMATH, JIT_OPTIONS

    assert "nnan" not in FASTMATH and "ninf" not in FASTMATH and "fast" not in FASTMATH
    assert "reassoc" not in FASTMATH
    assert JIT_OPTIONS["cache"] is True
