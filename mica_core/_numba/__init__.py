"""Numba kernels of mica_core: the interpreter's operations as small compiled kernels, a
mirror of the numpy reference functions (see :mod:`mica_core._numba.kernels`).

Importing this package imports numba; ``mica_core`` itself never does (the numba backend
imports it on first use). JIT flags live in :mod:`mica_core._numba.config`.
"""

from .kernels import (
    bucket_zscore,
    ragged_discounted_returns,
    ragged_incremental_distance_reward,
    ragged_outcome,
    ragged_outcome_returns,
)

__all__ = [
    "bucket_zscore",
    "ragged_discounted_returns",
    "ragged_incremental_distance_reward",
    "ragged_outcome",
    "ragged_outcome_returns",
]
