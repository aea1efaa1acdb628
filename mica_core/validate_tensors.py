"""Validation and conversion of torch tensor input: shapes and dtypes on the host, values on
the device, with at most one device-to-host copy for all checks together (docs/torch.md has
the sync-free path, ``validate=False``). The rules and their messages are
:mod:`mica_core.validate`'s; this module only decides where and when they are checked.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .layout import Ragged
from .validate import (
    MAX_MAGNITUDE,
    check_key,
    check_offsets,
    code_out_of_range,
    codes_not_integer,
    empty_trajectory,
    exclusive_inputs,
    group_codes,
    group_length,
    initial_distance_required,
    key_required,
    label_array,
    label_not_finite,
    meta_device,
    negative_distance,
    ngroups_too_small,
    not_finite,
    not_numeric,
    offsets_dtype,
    offsets_end,
    offsets_shape,
    offsets_start,
    too_large,
    too_many_turns,
    values_required,
    wrong_length,
)

__all__ = ["TorchInputs", "is_torch", "torch_inputs", "work_dtype"]



def _torch():
    import torch

    return torch


def is_torch(x) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def work_dtype(device):
    """float64 wherever the device has it; MPS has no float64."""
    torch = _torch()
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class TorchInputs(NamedTuple):
    """Validated tensors on one device, in the work dtype (float64; float32 on MPS)."""

    offsets: Any  # int64 [n_traj + 1]
    group: Any  # int64 codes [n_traj] in 0 .. ngroups-1
    ngroups: int
    max_turns: int  # at least the longest trajectory, at least 1
    distance: Any
    initial_distance: Any
    reward: Any
    out_dtype: Any
    key: Any = None  # int64 [n_rows] key bucket codes, for plans with a key component
    nkeys: int = 0


def _values_tensor(x, name, n, device, wdt):
    """Shape and dtype checks on the host (no data access); returns the work-dtype tensor."""
    torch = _torch()
    if not is_torch(x):
        a = np.asarray(x)
        if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
            raise not_numeric(name, a.dtype)
        x = torch.as_tensor(a)
    if x.ndim != 1 or (n is not None and x.shape[0] != n):
        raise wrong_length(name, n, x.shape)
    if x.dtype == torch.bool or x.is_complex():
        raise not_numeric(name, x.dtype)
    return x.to(device=device, dtype=wdt)


def _out_dtype(values, initial_distance):
    """The host path's rule: float32 values give float32 unless ``initial_distance`` is
    float64; float64 and integers give float64; float16/bfloat16 give float32."""
    torch = _torch()

    def kind(x):
        if x is None:
            return None
        dt = x.dtype if is_torch(x) else np.asarray(x).dtype
        if dt in (torch.float32, torch.float16, torch.bfloat16, np.float32, np.float16):
            return "f32"
        return "f64"

    if kind(values) == "f32" and kind(initial_distance) != "f64":
        return torch.float32
    return torch.float64


def _offsets_tensor(offsets, device):
    """Offsets as int64 on ``device``. Tensors (any device) are checked later with the other
    device-side checks; host data is checked here, on the host."""
    torch = _torch()
    if is_torch(offsets):
        o = offsets
        if o.ndim != 1 or o.shape[0] == 0:
            raise offsets_shape(o.shape)
        if o.is_floating_point() or o.dtype == torch.bool or o.is_complex():
            raise offsets_dtype(o.dtype)
        return o.to(device=device, dtype=torch.int64), None
    host = check_offsets(offsets)
    return torch.from_numpy(host).to(device), host


def _group_tensor(group, n_traj, device, ngroups):
    """Group codes int64 on ``device``, their count, and whether the codes still need the
    device-side range check.

    Tensors: codes as given when ``ngroups`` is passed, else ``torch.unique`` (one sync).
    Host labels: factorized on the host (or range-checked there when ``ngroups`` is given).
    """
    torch = _torch()
    if is_torch(group):
        if group.ndim != 1 or group.shape[0] != n_traj:
            raise group_length(n_traj, group.shape)
        if ngroups is not None:
            if group.is_floating_point() or group.dtype == torch.bool or group.is_complex():
                raise codes_not_integer(group.dtype)
            return group.to(device=device, dtype=torch.int64), int(ngroups), True
        if group.is_floating_point():
            bad = (~torch.isfinite(group)).nonzero()
            if bad.numel():
                raise label_not_finite("group", int(bad[0, 0]))
        uniq, codes = torch.unique(group, return_inverse=True)
        return codes.to(device=device, dtype=torch.int64), int(uniq.shape[0]), False
    if ngroups is not None:
        g = label_array(group, "group")
        if g.ndim != 1 or len(g) != n_traj:
            raise group_length(n_traj, g.shape)
        if g.dtype.kind not in "iu":
            raise codes_not_integer(g.dtype)
        bad = np.flatnonzero((g < 0) | (g >= ngroups))
        if bad.size:
            raise code_out_of_range(int(bad[0]), g[bad[0]], int(ngroups))
        return torch.from_numpy(g.astype(np.int64)).to(device), int(ngroups), False
    codes, ng = group_codes(group, n_traj)
    return torch.from_numpy(codes).to(device), ng, False


def _first_index(bad):
    """Index of the first True in ``bad`` as a 0-d tensor (``len(bad)`` when none); no sync."""
    torch = _torch()
    n = bad.shape[0]
    if not n:
        return torch.zeros((), dtype=torch.int64, device=bad.device)
    idx = torch.arange(n, dtype=torch.int64, device=bad.device)
    return torch.where(bad, idx, n).min()


class _Check(NamedTuple):
    """A device-side check: ``value`` (0-d tensor) equals ``ok`` unless it failed, and
    ``fail(value)`` raises the rule's error."""

    value: Any
    ok: int
    fail: Any


def _value_checks(v, name, d0, distances):
    def finite(x, col):
        def fail(i):
            raise not_finite(col, i, float(x[i].cpu()))
        return _Check(_first_index(~_torch().isfinite(x)), x.shape[0], fail)

    def nonneg(x, col):
        def fail(i):
            raise negative_distance(col, i, float(x[i].cpu()))
        return _Check(_first_index(x < 0), x.shape[0], fail)

    def bounded(x, col):
        def fail(i):
            raise too_large(col, i, float(x[i].cpu()))
        return _Check(_first_index(x.abs() > MAX_MAGNITUDE), x.shape[0], fail)

    checks = [finite(v, name), bounded(v, name)]
    if distances:
        checks.append(nonneg(v, name))
    if d0 is not None:
        checks += [finite(d0, "initial_distance"), nonneg(d0, "initial_distance"),
                   bounded(d0, "initial_distance")]
    return checks


def _offsets_checks(o, lengths, n_rows):
    n_traj = lengths.shape[0]

    def start_fail(v):
        raise offsets_start(v)

    def step_fail(i):
        raise empty_trajectory(i, int(lengths[i].cpu()))

    def end_fail(v):
        raise offsets_end(v, n_rows, n_traj)

    return [_Check(o[0], 0, start_fail),
            _Check(_first_index(lengths <= 0), n_traj, step_fail),
            _Check(o[-1], n_rows, end_fail)]


def _group_checks(g, ngroups):
    def fail(i):
        raise code_out_of_range(i, int(g[i].cpu()), ngroups)
    return [_Check(_first_index((g < 0) | (g >= ngroups)), g.shape[0], fail)]


def _run_device_checks(checks, lengths, measure_max_turns):
    """Evaluate every device-side check with one host copy; raise on the first failure.
    Returns the longest trajectory when ``measure_max_turns``."""
    torch = _torch()
    scalars = [c.value for c in checks]
    if measure_max_turns:
        scalars.append(lengths.max() if lengths.numel() else
                       torch.ones((), dtype=torch.int64, device=lengths.device))
    if not scalars:
        return None
    got = torch.stack([s.to(torch.int64) for s in scalars]).tolist()  # the one sync
    for check, v in zip(checks, got):
        if v != check.ok:
            check.fail(v)
    return got[-1] if measure_max_turns else None


def torch_inputs(plan, offsets, group, distance, initial_distance, reward, *, ngroups=None,
                 max_turns=None, validate=True, key=None) -> TorchInputs:
    """Check and convert torch input for ``plan``; computation happens on the values' device.

    ``ngroups``: with ``group`` an int64 tensor of codes ``0 .. ngroups-1``, skips
    factorizing. ``max_turns``: an upper bound on trajectory length (skips measuring it).
    ``validate=False`` skips the device-side checks (finite values, non-negative distances,
    offsets, codes in range, ``max_turns`` large enough) and their sync: bad input then gives
    wrong numbers or a device-side assertion, not an error. ``key`` (plans with a component
    of scope ``key``): per-turn labels, factorized on the host (one copy from the device when
    they live there), the buckets sent to the values' device.
    """
    torch = _torch()
    for name, x in (("offsets", offsets), ("group", group), ("distance", distance),
                    ("initial_distance", initial_distance), ("reward", reward), ("key", key)):
        if is_torch(x) and x.device.type == "meta":
            raise meta_device(name)
    values_in = reward if reward is not None else distance
    if reward is not None and (distance is not None or initial_distance is not None):
        raise exclusive_inputs()
    if values_in is None:
        raise values_required()
    if plan.reward == "idr" and reward is None and initial_distance is None:
        raise initial_distance_required()
    tensors = [x for x in (values_in, initial_distance, offsets) if is_torch(x)]
    device = values_in.device if is_torch(values_in) else (
        tensors[0].device if tensors else torch.device("cpu"))
    wdt = work_dtype(device)
    out_dt = _out_dtype(values_in, initial_distance if reward is None else None)

    o, host_offsets = _offsets_tensor(offsets, device)
    n_traj = o.shape[0] - 1
    vname = "reward" if reward is not None else "distance"
    v = _values_tensor(values_in, vname, None, device, wdt)
    n_rows = v.shape[0]
    if host_offsets is not None and int(host_offsets[-1]) != n_rows:
        raise wrong_length(vname, int(host_offsets[-1]), (n_rows,))
    d0 = None
    if initial_distance is not None and reward is None:
        d0 = _values_tensor(initial_distance, "initial_distance", n_traj, device, wdt)
    g, ng, device_codes = _group_tensor(group, n_traj, device, ngroups)
    if ngroups is not None and int(ngroups) < 1 and n_traj > 0:
        raise ngroups_too_small(ngroups)

    lengths = o[1:] - o[:-1]
    if host_offsets is not None:
        diffs = np.diff(host_offsets)
        longest = int(diffs.max()) if diffs.size else 1
        if max_turns is None:
            max_turns = longest
        elif validate and longest > int(max_turns):
            i = int(np.flatnonzero(diffs > int(max_turns))[0])
            raise too_many_turns(i, int(diffs[i]), int(max_turns))
    checks = []
    if validate:
        checks = _value_checks(v, vname, d0, reward is None)
        if host_offsets is None:
            checks += _offsets_checks(o, lengths, n_rows)
            if max_turns is not None:
                mt = int(max_turns)

                def fail(i, mt=mt):
                    raise too_many_turns(i, None, mt)
                checks.append(_Check(_first_index(lengths > mt), n_traj, fail))
        if device_codes:
            checks += _group_checks(g, ng)
    measured = _run_device_checks(checks, lengths, max_turns is None)
    if max_turns is None:
        max_turns = measured
    kb, nkeys = None, 0
    if plan.needs_key:
        if key is None:
            raise key_required(plan)
        host_key = key.cpu().numpy() if is_torch(key) else key
        offs = host_offsets if host_offsets is not None else o.cpu().numpy()
        ragged = check_key(host_key, n_rows, Ragged(offs, g.cpu().numpy(), ng))
        kb, nkeys = torch.from_numpy(ragged.key).to(device), ragged.nkeys
    if reward is not None:
        return TorchInputs(o, g, ng, max(int(max_turns), 1), None, None, v, out_dt, kb, nkeys)
    return TorchInputs(o, g, ng, max(int(max_turns), 1), v, d0, None, out_dt, kb, nkeys)
