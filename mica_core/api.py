"""``estimate``: per-turn rewards, returns and advantages from ragged arrays.

This module owns validation, allocation and backend dispatch; backends only fill the
arrays they are handed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import MicaInputError
from .estimators import resolve
from .layout import ON_MISSING, Ragged, check_values, fill_missing, make_ragged

__all__ = ["estimate", "EstimateResult", "BACKENDS", "run_plan"]

BACKENDS = ("auto", "numpy", "cython", "numba", "torch")


@dataclass(frozen=True)
class EstimateResult:
    """Flat per-turn outputs, aligned with the input rows.

    ``reward``: IDR, ADR or the given reward; ``returns``: the preset's return (``G_t``,
    or ``R_i`` for ``grpo``, ``gamma^(T-1-t) R_i`` for ``reinforce_pp``); ``advantage``.
    """

    reward: Any
    returns: Any
    advantage: Any

    def __iter__(self):
        return iter((self.reward, self.returns, self.advantage))


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


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
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return m


def run_plan(plan, ragged: Ragged, distance, initial_distance, reward, backend="auto"):
    """Run a resolved plan on validated CSR input; returns float64 arrays."""
    if backend == "auto":
        from ._autoselect import pick_backend

        backend = pick_backend(ragged.n_rows)
    n = ragged.n_rows
    out_reward = np.empty(n, dtype=np.float64)
    out_return = np.empty(n, dtype=np.float64)
    out_adv = np.empty(n, dtype=np.float64)
    _backend_module(backend).run(plan, ragged, distance, initial_distance, reward,
                                 out_reward, out_return, out_adv)
    return out_reward, out_return, out_adv


def _inputs(ragged, distance, initial_distance, reward, plan_reward, on_missing="raise"):
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {', '.join(ON_MISSING)}; got {on_missing!r}")
    carry = on_missing == "carry"
    n, n_traj = ragged.n_rows, ragged.n_traj
    if reward is not None:
        if distance is not None or initial_distance is not None:
            raise MicaInputError("pass either reward or distance (+ initial_distance), not both",
                                 column="reward", rule="exclusive inputs")
        r = check_values(reward, "reward", n, allow_missing=carry)
        return None, None, fill_missing(r, ragged.offsets) if carry else r
    if distance is None:
        raise MicaInputError("one of distance or reward is required", column="distance",
                             rule="required")
    d = check_values(distance, "distance", n, allow_negative=False, allow_missing=carry)
    d0 = None
    if plan_reward == "idr":
        if initial_distance is None:
            raise MicaInputError("IDR needs initial_distance (one value per trajectory)",
                                 column="initial_distance", rule="required")
    if initial_distance is not None:
        d0 = check_values(initial_distance, "initial_distance", n_traj, allow_negative=False)
    if carry:
        if d0 is None and n and not np.isfinite(d[ragged.offsets[:-1]]).all():
            first = int(np.flatnonzero(~np.isfinite(d[ragged.offsets[:-1]]))[0])
            raise MicaInputError("missing on a first turn and no initial_distance to carry",
                                 column="distance", row=int(ragged.offsets[first]),
                                 rule="finite")
        d = fill_missing(d, ragged.offsets, d0 if d0 is not None else d)
    return d, d0, None


def estimate(offsets, group, *, distance=None, initial_distance=None, reward=None,
             estimator="mica", gamma=None, weight=0.5, eps=1e-6, ddof=1, baseline="mean",
             scale="std", singleton="zero", backend="auto",
             on_missing="raise", **torch_options) -> EstimateResult:
    """Per-turn rewards, returns and advantages of ragged trajectories.

    Args:
      offsets: int ``[n_traj + 1]``; trajectory ``i`` owns rows ``offsets[i]:offsets[i+1]``,
        row ``offsets[i] + t`` is its turn ``t``. Every trajectory has at least one turn.
      group: ``[n_traj]`` rollout-group label per trajectory (any labels; GRPO's ``uid``).
      distance: ``[n_turns]`` residual distance ``D_t >= 0`` after each turn.
      initial_distance: ``[n_traj]`` distance ``D_{-1}`` before the first reply (IDR).
      reward: ``[n_turns]`` rewards given directly (instead of distances).
      estimator: a registered name (``mica_core.list_estimators()``) or an ``Estimator``.
      gamma: discount; ``None`` takes the preset's (0.85; ``grpo``/``reinforce_pp``: 1.0).
      weight: ``w`` of the two-component presets (``mica``, ``mica_adr``, ``mapo``).
      eps, ddof, baseline, scale, singleton: normalization options (design §3).
      backend: ``auto``, ``numpy``, ``cython``, ``numba`` or ``torch``. Torch tensors are
        computed by the torch backend on their device whatever this says.
      on_missing: ``"raise"`` (NaN and infinities are errors) or ``"carry"``: a missing
        distance repeats the previous turn's (IDR 0 for that turn), a missing reward is 0.
      **torch_options: for torch tensors only: ``ngroups``, ``max_turns``, ``validate``,
        ``deterministic`` (the sync-free CUDA path; see docs/torch.md).

    Returns:
      :class:`EstimateResult` of flat arrays. numpy in, numpy out: float32 when the value
      input is float32, else float64 (statistics always accumulate in float64). Torch in,
      torch out on the input's device.

    Raises:
      MicaInputError: naming the argument, the first offending row and the rule.
    """
    if any(_is_torch(x) for x in (offsets, distance, initial_distance, reward)):
        from . import _backend_torch

        if on_missing != "raise":
            raise ValueError("on_missing='carry' is for numpy and Arrow input; fill missing "
                             "values of torch tensors before calling estimate")

        return _backend_torch.estimate(
            offsets, group, distance=distance, initial_distance=initial_distance,
            reward=reward, estimator=estimator, gamma=gamma, weight=weight, eps=eps,
            ddof=ddof, baseline=baseline, scale=scale, singleton=singleton, **torch_options)
    if torch_options:
        raise TypeError(f"options {sorted(torch_options)} apply to torch tensors only")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    plan = resolve(estimator, reward_given=reward is not None, gamma=gamma, weight=weight,
                   eps=eps, ddof=ddof, baseline=baseline, scale=scale, singleton=singleton)
    ragged = make_ragged(offsets, group)
    d, d0, r = _inputs(ragged, distance, initial_distance, reward, plan.reward, on_missing)
    out_dtype = (r if r is not None else d).dtype
    if d0 is not None and d0.dtype == np.float64:
        out_dtype = np.float64
    res = run_plan(plan, ragged, d, d0, r, backend)
    if out_dtype == np.float32:
        res = tuple(a.astype(np.float32) for a in res)
    return EstimateResult(*res)
