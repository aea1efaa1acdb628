"""Where the order of operations is the same, results agree bit for bit.

- The Numba backend mirrors the numpy reference operation by operation: equal bits.
- The Cython and Numba backends give the same bits on any number of threads (a group, or a
  trajectory, is always computed by one thread in one order).

The fused Cython kernels and the torch backend sum in other orders (per turn inside the
return recursion, four interleaved running sums; vectorized ``a + alpha * b``): they agree
with the reference to 1e-12, not to the bit (tests/test_backends.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mica_core as mc
from mica_core.api import run_plan
from mica_core.estimators import resolve
from mica_core.validate import make_ragged

from strategies import ESTIMATORS, any_options, estimator_of, ragged_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_NUMBA = __import__("importlib").util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")


@needs_numba
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ragged_batches(values="continuous"), estimator=st.sampled_from(ESTIMATORS),
       opts=any_options, rewards=st.booleans())
def test_numba_equals_numpy_bit_for_bit(batch, estimator, opts, rewards):
    est, _ = estimator_of(estimator)
    values = (dict(reward=batch.distance - 5.0) if rewards else
              dict(distance=batch.distance, initial_distance=batch.initial_distance))
    a = mc.estimate(batch.offsets, batch.group, estimator=est, backend="numpy",
                    key=batch.keys(), **values, **opts)
    b = mc.estimate(batch.offsets, batch.group, estimator=est, backend="numba",
                    key=batch.keys(), **values, **opts)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()


def _batch(n_groups=600, per=8, seed=0, interleave=False):
    rng = np.random.default_rng(seed)
    n_traj = n_groups * per
    lengths = rng.integers(1, 46, n_traj)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    group = np.repeat(np.arange(n_groups), per)
    if interleave:
        group = rng.permutation(group)
    return offsets, group, rng.uniform(0, 5, offsets[-1]), rng.uniform(0, 5, n_traj)


def _ragged(offsets, group, plan, seed=1):
    """The layout, with key buckets when the plan needs them."""
    from mica_core.validate import check_key

    ragged = make_ragged(offsets, group)
    if plan.needs_key:
        keys = np.random.default_rng(seed).integers(0, 5, offsets[-1])
        ragged = check_key(keys, int(offsets[-1]), ragged)
    return ragged


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bits_do_not_depend_on_thread_count(backend, estimator, interleave):
    if backend == "numba" and not HAVE_NUMBA:
        pytest.skip("numba not installed")
    offsets, group, d, d0 = _batch(interleave=interleave)
    est, _ = estimator_of(estimator)
    plan = resolve(est, reward_given=False)
    ragged = _ragged(offsets, group, plan)
    results = [run_plan(plan, ragged, d, d0, None, backend, num_threads=threads)
               for threads in (1, 2, 3, 1)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


def test_cython_is_built_with_openmp():
    # The install must build the parallel kernels on a compiler with OpenMP (gcc here);
    # otherwise num_threads silently means one thread.
    from mica_core import _compiled

    assert _compiled.require().built_with_openmp()


@needs_numba
def test_numba_thread_setting_is_restored():
    import numba

    before = numba.get_num_threads()
    offsets, group, d, d0 = _batch(n_groups=4)
    run_plan(resolve("mica", reward_given=False), make_ragged(offsets, group), d, d0, None,
             "numba", num_threads=1)
    assert numba.get_num_threads() == before


def test_importing_and_running_mica_core_imports_no_numba():
    code = ("import sys, mica_core, numpy as np\n"
            "mica_core.estimate(np.array([0, 2]), [0], distance=np.array([1.0, 0.5]),"
            " initial_distance=np.array([1.5]))\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


@needs_numba
def test_numba_flags_keep_ieee_semantics():
    from mica_core._numba.config import JIT_OPTIONS

    assert JIT_OPTIONS["fastmath"] is False and JIT_OPTIONS["cache"] is True
