"""Numba kernels of mica_core: a mirror of the Cython kernels in ``kernels/_ext.pyx`` (same
names, argument order and results), with groups run in parallel.

Importing this package imports numba; ``mica_core`` itself never does (the numba backend
imports it on first use). JIT flags live in :mod:`mica_core._numba.config`.
"""

from .kernels import (
    bucket_batch_moments,
    fused_batch_advantages,
    fused_group_advantages,
    ragged_check_turns,
    ragged_first_change,
    ragged_group_segments,
    ragged_place_rows,
    ragged_run_codes,
)

__all__ = [
    "bucket_batch_moments",
    "fused_batch_advantages",
    "fused_group_advantages",
    "ragged_check_turns",
    "ragged_first_change",
    "ragged_group_segments",
    "ragged_place_rows",
    "ragged_run_codes",
]
