"""Type stubs for the compiled kernels in ``mica_core._ext`` (see kernels/_ext.pyx).

``mica_core._numba`` exposes the same kernels with the same signatures.
"""

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
F32or64 = NDArray[np.float32] | NDArray[np.float64]

def ragged_group_segments(offsets: I64, group: I64, ngroups: int, order: I64,
                          seg_start: I64) -> tuple[bool, int]: ...
def fused_group_advantages(offsets: I64, order: I64, seg_start: I64, values: F32or64,
                           initial_distance: F32or64, reward_kind: int, returns_kind: int,
                           gamma: float, spec: I64, weight: F64, eps: float, ddof: int,
                           singleton_raw: bool, max_len: int, out_reward: F64,
                           out_return: F64, sig_return: F64, sig_oret: F64, outcome: F64,
                           out_adv: F64, batch_part: F64) -> None: ...
def bucket_batch_moments(batch_part: F64, spec: I64, eps: float, ddof: int,
                         singleton_raw: bool, batch_params: F64) -> None: ...
def fused_batch_advantages(offsets: I64, spec: I64, weight: F64, batch_params: F64,
                           out_reward: F64, sig_return: F64, sig_oret: F64, outcome: F64,
                           assign: bool, out_adv: F64) -> None: ...
def ragged_run_codes(ids: I64, codes: I64, starts: I64) -> tuple[int, bool]: ...
def ragged_check_turns(offsets: I64, turn: I64) -> int: ...
def ragged_first_change(offsets: I64, values: I64 | F64) -> int: ...
def ragged_place_rows(traj: I64, turn: I64, offsets: I64, order: I64) -> int: ...
