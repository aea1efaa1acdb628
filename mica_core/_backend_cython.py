"""The Cython backend: the fused kernels of ``mica_core._ext`` (compiled ahead of time at
install), driven by :func:`mica_core._fused.run_fused`."""

from __future__ import annotations

from . import _compiled
from ._fused import run_fused

__all__ = ["run"]


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv):
    """Fill ``out_reward``, ``out_return``, ``out_adv`` (float64 ``[n_rows]``) for ``plan``.

    ``distance``, ``initial_distance`` and ``reward`` may be float32 or float64; statistics
    accumulate in float64.
    """
    run_fused(_compiled.require(), plan, ragged, distance, initial_distance, reward, out_reward, out_return,
              out_adv)
