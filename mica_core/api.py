"""``estimate``: per-turn rewards, returns and advantages from ragged arrays.

Every input kind enters the core here: arrays and tensors through :func:`estimate`, tables
(:mod:`mica_core.arrow`, :mod:`mica_core.stream`) through :func:`run_plan` once the reader
has built a validated layout. This module resolves the plan, hands the input to
:mod:`mica_core.validate`, allocates the outputs and picks the backend; backends only fill
the arrays they are handed.
"""

from __future__ import annotations

import numpy as np

from . import validate as _validate
from . import validate_tensors as _tensors
from ._result import EstimateResult
from .estimators import resolve
from .options import BACKENDS, check_option

__all__ = ["estimate", "EstimateResult", "BACKENDS", "run_plan"]

TORCH_OPTIONS = ("ngroups", "max_turns", "validate", "deterministic")


def _check_backend(name):
    check_option("backend", name)


def _backend_module(name):
    if name == "numpy":
        from . import _backend_numpy as m
    elif name == "cython":
        from . import _backend_cython as m
    elif name == "numba":
        from . import _backend_numba as m
    elif name == "torch":
        from . import _backend_torch as m
    else:
        _check_backend(name)
    return m


def run_plan(plan, ragged, distance, initial_distance, reward, backend="auto", *, out=None,
             num_threads=None):
    """Run a resolved plan on validated host input (a :class:`mica_core.layout.Ragged` and
    value arrays checked by :mod:`mica_core.validate` or the Arrow reader).

    Args:
      out: optional ``(reward, returns, advantage)`` float64 arrays ``[n_rows]`` to fill
        (caller-owned; nothing is allocated), else new arrays.
      num_threads: threads of the ``cython`` and ``numba`` backends for this call, an
        integer >= 1 (default: by size, :func:`mica_core._autoselect.threads_for`); more than
        :data:`mica_core.validate.MAX_THREADS` run on that many (results do not depend on it).

    Returns the three float64 arrays.
    """
    if backend == "auto":
        from ._autoselect import pick_backend

        backend = pick_backend(ragged.n_rows)
    module = _backend_module(backend)
    n = ragged.n_rows
    if out is None:
        out = tuple(np.empty(n, dtype=np.float64) for _ in range(3))
    if num_threads is not None:
        if backend not in ("cython", "numba"):
            raise ValueError(f"num_threads applies to the cython and numba backends; got "
                             f"{backend!r}")
        module.run(plan, ragged, distance, initial_distance, reward, *out,
                   num_threads=_validate.check_num_threads(num_threads))
    else:
        module.run(plan, ragged, distance, initial_distance, reward, *out)
    return tuple(out)


def estimate(offsets, group, *, distance=None, initial_distance=None, reward=None,
             estimator="mica", gamma=None, weight=0.5, eps=1e-6, ddof=1, baseline="mean",
             scale="std", singleton="zero", backend="auto", on_missing="raise", key=None,
             out=None, **torch_options) -> EstimateResult:
    """Per-turn rewards, returns and advantages of ragged trajectories.

    Args:
      offsets: int ``[n_traj + 1]``; trajectory ``i`` owns rows ``offsets[i]:offsets[i+1]``,
        row ``offsets[i] + t`` is its turn ``t``. Every trajectory has at least one turn.
      group: ``[n_traj]`` rollout-group label per trajectory (GRPO's ``uid``): numbers,
        strings or other scalars, equal when they are equal values of the same kind
        (``1 == 1.0``, ``0.0 == -0.0``, ``1 != "1"``); NaN and None are errors.
      distance: ``[n_turns]`` residual distance ``D_t >= 0`` after each turn.
      initial_distance: ``[n_traj]`` distance ``D_{-1}`` before the first reply (IDR).
      reward: ``[n_turns]`` rewards given directly (instead of distances).
      estimator: a registered name (``mica_core.list_estimators()``) or an ``Estimator``.
      gamma: discount; ``None`` takes the preset's (0.85; ``grpo``/``reinforce_pp``: 1.0).
      weight: ``w`` of the two-component presets (``mica``, ``mica_adr``, ``mapo``).
      eps, ddof, baseline, scale, singleton: normalization options (README, "Estimators").
      backend: ``auto``, ``numpy``, ``cython``, ``numba`` or ``torch``. Torch tensors are
        computed by the torch backend on their device whatever this says.
      on_missing: ``"raise"`` (NaN and infinities are errors) or ``"carry"``: a missing
        distance repeats the previous turn's (IDR 0 for that turn), a missing reward is 0.
      key: ``[n_turns]`` labels (any kind, as ``group``) for estimators with a component of
        scope ``key`` (e.g. ``gigpo``): turns of the same group with the same key share a
        bucket, as GiGPO's anchor-state step groups do. Ignored by other estimators.
      out: ``(reward, returns, advantage)``, three float64 numpy arrays ``[n_turns]`` the
        result is written to (a training loop then allocates nothing per call); they are
        returned as the result. numpy input only, with float64 values.
      **torch_options: for torch tensors only: ``ngroups``, ``max_turns``, ``validate``,
        ``deterministic`` (the sync-free CUDA path; see docs/torch.md).

    Returns:
      :class:`EstimateResult` of flat arrays. numpy in, numpy out: float32 when the value
      input is float32, else float64 (statistics always accumulate in float64). Torch in,
      torch out on the input's device, never attached to an autograd graph.

    Raises:
      MicaInputError: naming the argument, the first offending row and the rule.
    """
    _check_backend(backend)
    check_option("on_missing", on_missing)
    plan = resolve(estimator, reward_given=reward is not None, gamma=gamma, weight=weight,
                   eps=eps, ddof=ddof, baseline=baseline, scale=scale, singleton=singleton)
    unknown = sorted(set(torch_options) - set(TORCH_OPTIONS))
    if unknown:
        raise TypeError(f"estimate() got unexpected keyword arguments {unknown}")
    if any(_tensors.is_torch(x) for x in (offsets, distance, initial_distance, reward)):
        if on_missing != "raise":
            raise ValueError("on_missing='carry' is for numpy and Arrow input; fill missing "
                             "values of torch tensors before calling estimate")
        if out is not None:
            raise ValueError("out= is for numpy input; torch results are new tensors")
        return _estimate_tensors(plan, offsets, group, distance, initial_distance, reward,
                                 key=key, **torch_options)
    if torch_options:
        raise TypeError(f"options {sorted(torch_options)} apply to torch tensors only")
    inputs = _validate.numpy_inputs(plan, offsets, group, distance, initial_distance, reward,
                                    on_missing, key)
    if out is not None:
        out = _validate.check_out(out, inputs.ragged.n_rows)
        if inputs.out_dtype != np.float64:
            raise ValueError("out= holds float64 results; the values given are float32 (pass "
                             "float64 values, or leave out= unset for float32 outputs)")
    res = run_plan(plan, inputs.ragged, inputs.distance, inputs.initial_distance,
                   inputs.reward, backend, out=out)
    if inputs.out_dtype == np.float32:
        res = tuple(a.astype(np.float32) for a in res)
    return EstimateResult(*res)


def _estimate_tensors(plan, offsets, group, distance, initial_distance, reward, *, key=None,
                      ngroups=None, max_turns=None, validate=True, deterministic=None):
    import torch

    from . import _backend_torch

    with torch.no_grad():
        inputs = _tensors.torch_inputs(plan, offsets, group, distance, initial_distance,
                                       reward, ngroups=ngroups, max_turns=max_turns,
                                       validate=validate, key=key)
        return EstimateResult(*_backend_torch.run_tensors(plan, inputs,
                                                          deterministic=deterministic))
