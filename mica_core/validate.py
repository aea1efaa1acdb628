"""Validation and conversion of host input, and the rules every input path shares.

docs/architecture.md, "Validation": invalid input raises :class:`mica_core.MicaInputError`
naming the column (or argument), the first offending row and the rule. Each rule has one name
and one message, built by one function of the validate modules: this one (the shared rules,
host arrays, Arrow tables), :mod:`mica_core.validate_tensors` (torch tensors),
:mod:`mica_core.validate_tokens` (token layouts) and :mod:`mica_core.validate_rows` (per-row
turn signals of the integrations). Readers and adapters raise what these build. After
validation nothing checks again: backends and kernels trust what they are given.

- Host data (numpy arrays, lists, Arrow-backed views): :func:`make_ragged` checks ``offsets``
  and factorizes ``group``; :func:`numpy_inputs` checks the value arrays and returns them
  as contiguous float32/float64.
- Torch tensors: :mod:`mica_core.validate_tensors` applies the same rules to tensors (shapes
  and dtypes on the host, values on the device, one device-to-host copy).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _compiled
from ._errors import MicaInputError
from .layout import ON_MISSING, Ragged, fill_missing

__all__ = [
    "MAX_MAGNITUDE",
    "NumpyInputs",
    "Potential",
    "check_key",
    "check_num_threads",
    "check_offsets",
    "check_out",
    "check_potentials",
    "check_range",
    "check_states",
    "check_values",
    "factorize",
    "key_buckets",
    "label_array",
    "make_ragged",
    "numpy_inputs",
    "potential_options",
]


# --------------------------------------------------------------------------- the rules


def not_finite(column, row, value, at="") -> MicaInputError:
    """``at``: where in the row, e.g. ``"call 2: "`` (a per-call list)."""
    return MicaInputError(f"{at}value {value} is not finite (NaN and infinities are rejected)",
                          column=column, row=row, rule="finite")


def negative_distance(column, row, value, at="") -> MicaInputError:
    return MicaInputError(f"{at}distance {value} is negative (distances are >= 0)",
                          column=column, row=row, rule="non-negative")


def wrong_length(column, expected, shape) -> MicaInputError:
    """``expected`` rows in a 1-D array (``None``: any number of rows, but 1-D). Per-turn
    arrays have ``offsets[-1]`` rows, per-trajectory arrays one row per trajectory."""
    if expected is None:
        return MicaInputError(f"needs a 1-D array; got shape {tuple(shape)}", column=column,
                              rule="shape")
    why = "one per trajectory" if column == "initial_distance" else "offsets[-1]"
    return MicaInputError(f"needs shape ({expected},) ({why}); got {tuple(shape)}",
                          column=column, rule="length")


def not_numeric(column, dtype) -> MicaInputError:
    return MicaInputError(f"must be numeric; got dtype {dtype}", column=column, rule="dtype")


def exclusive_inputs() -> MicaInputError:
    return MicaInputError("pass either reward or distance (+ initial_distance), not both",
                          column="reward", rule="exclusive inputs")


def values_required() -> MicaInputError:
    return MicaInputError("one of distance or reward is required", column="distance",
                          rule="required")


def initial_distance_required() -> MicaInputError:
    return MicaInputError("IDR needs initial_distance (one value per trajectory)",
                          column="initial_distance", rule="required")


def offsets_shape(shape) -> MicaInputError:
    return MicaInputError(f"must be a 1-D array of length n_traj + 1 >= 1; got shape "
                          f"{tuple(shape)}", column="offsets", rule="shape")


def offsets_dtype(dtype) -> MicaInputError:
    return MicaInputError(f"must hold integers; got dtype {dtype}", column="offsets",
                          rule="dtype")


def offsets_start(value) -> MicaInputError:
    return MicaInputError(f"must start at 0; got {value}", column="offsets", row=0,
                          rule="start at 0")


def empty_trajectory(traj, turns) -> MicaInputError:
    return MicaInputError(f"trajectory {traj} has {turns} turns; every trajectory needs at "
                          f"least one (offsets must be strictly increasing)", column="offsets",
                          row=traj + 1, rule="strictly increasing")


def offsets_end(value, n_rows, n_traj) -> MicaInputError:
    return MicaInputError(f"offsets[-1] = {value} but the values have {n_rows} rows",
                          column="offsets", row=n_traj, rule="length")


def too_many_turns(traj, turns, max_turns) -> MicaInputError:
    text = f"has {turns} turns, more" if turns is not None else "has more turns"
    return MicaInputError(f"trajectory {traj} {text} than max_turns={max_turns}",
                          column="offsets", row=traj + 1, rule="max_turns")


def group_length(n_traj, shape) -> MicaInputError:
    return MicaInputError(f"needs one label per trajectory ({n_traj}); got shape "
                          f"{tuple(shape)}", column="group", rule="length")


def code_out_of_range(row, code, ngroups) -> MicaInputError:
    return MicaInputError(f"code {code} is outside 0 .. ngroups-1 = {ngroups - 1}",
                          column="group", row=row, rule="codes in range")


def codes_not_integer(dtype) -> MicaInputError:
    return MicaInputError(f"codes with ngroups= must be integers; got dtype {dtype}",
                          column="group", rule="dtype")


def label_not_finite(column, row) -> MicaInputError:
    return MicaInputError("labels must not be NaN or infinite", column=column, row=row,
                          rule="finite")


def label_not_scalar(column, row, kind) -> MicaInputError:
    return MicaInputError(f"labels must be numbers, strings or other scalar values; got "
                          f"{kind}", column=column, row=row, rule="dtype")


def duplicate_column(column, copies) -> MicaInputError:
    return MicaInputError(f"appears {copies} times in the table (column names must be unique)",
                          column=column, rule="unique column names")


def mixed_kinds(column, row, found) -> MicaInputError:
    """A container column (pandas) whose values are of kinds one Arrow column cannot hold."""
    return MicaInputError(f"mixes kinds of values that one Arrow column cannot hold ({found}); "
                          f"give the column one type (e.g. all text)", column=column, row=row,
                          rule="one type per column")


def trajectory_in_two_groups(column, row) -> MicaInputError:
    return MicaInputError("trajectory appears in more than one group (a trajectory belongs "
                          "to one group)", column=column, row=row,
                          rule="one group per trajectory")


def offsets_too_large(row, value) -> MicaInputError:
    return MicaInputError(f"offsets[{row}] = {value} is beyond the int64 range of row "
                          f"numbers", column="offsets", row=row, rule="int64")


def choice(column, value, choices) -> MicaInputError:
    """An option outside its choices (``choices``: the allowed values, in order)."""
    return MicaInputError(f"must be one of {', '.join(map(str, choices))}; got {value!r}",
                          column=column, rule="choice")


def not_boolean(column, value) -> MicaInputError:
    return MicaInputError(f"must be true or false; got {value!r}", column=column,
                          rule="boolean")


def meta_device(column) -> MicaInputError:
    return MicaInputError("is a tensor on the meta device, which holds no values (move it to a "
                          "real device first)", column=column, rule="device")


def ngroups_too_small(ngroups) -> MicaInputError:
    return MicaInputError(f"ngroups must be >= 1; got {ngroups}", column="group",
                          rule="codes in range")


def key_required(plan) -> MicaInputError:
    return MicaInputError(f"estimator {plan.name!r} has a component with scope 'key': pass a "
                          f"key per turn (key=, or a key column), e.g. an anchor-state hash",
                          column="key", rule="required")


def missing_first_value(column, row, carried="initial_distance") -> MicaInputError:
    """``on_missing="carry"`` with a missing first-turn value and nothing to carry into it."""
    return MicaInputError(f"missing on a first turn and no {carried} to carry", column=column,
                          row=row, rule="finite")


def null_value(column, row, what="null value") -> MicaInputError:
    return MicaInputError(what, column=column, row=row, rule="no nulls")




# --------------------------------------------------------------------------- table rules
# Rules of Arrow tables (mica_core.arrow, mica_core.stream): columns, list columns, turns.


def missing_column(column, role, present) -> MicaInputError:
    return MicaInputError(f"missing (needed as the {role} column; present: "
                          f"{', '.join(present) or 'none'})", column=column,
                          rule="missing column")


def no_value_column(column, wanted, present) -> MicaInputError:
    return MicaInputError(f"no value column: need {wanted} (present: {', '.join(present)})",
                          column=column, rule="missing column")


def key_column_missing(column, nested) -> MicaInputError:
    return MicaInputError(f"missing (the estimator has a component with scope 'key'; it needs "
                          f"a key per turn{', as a list column' if nested else ''})",
                          column=column, rule="missing column")


def column_type(column, expected, got) -> MicaInputError:
    """A column of the wrong Arrow type (``expected``: "numeric", "integer", "a list column")."""
    return MicaInputError(f"must be {expected}; got {got}", column=column, rule="dtype")


def null_list_element(column, row, position) -> MicaInputError:
    return null_value(column, row, f"null element at position {position} of the list")


def state_axes_differ(column, row, axes, first_axes) -> MicaInputError:
    return MicaInputError(f"state has {axes} axes here but {first_axes} on row 0", column=column,
                          row=row, rule="same number of axes")


def state_axes_mismatch(column, axes, other, other_axes) -> MicaInputError:
    return MicaInputError(f"state has {axes} axes but {other} has {other_axes}", column=column,
                          row=0, rule="same number of axes")


def empty_states(column) -> MicaInputError:
    return MicaInputError("state vectors are empty", column=column, row=0, rule="non-empty")


def weights_per_axis(n_weights, column, axes) -> MicaInputError:
    return MicaInputError(f"has {n_weights} weights but {column} has {axes} axes",
                          column="state_weights", rule="one weight per axis")


def keys_per_turn(column, row, detail="has a different number of keys than turns") \
        -> MicaInputError:
    return MicaInputError(detail, column=column, row=row, rule="one key per turn")


def negative_turn(column, row, turn) -> MicaInputError:
    return MicaInputError(f"turn {turn} is negative", column=column, row=row,
                          rule="turns are 0..T-1")


def duplicate_turn(column, row, turn) -> MicaInputError:
    return MicaInputError(f"turn {turn} appears twice in its trajectory", column=column, row=row,
                          rule="no duplicate turns")


def missing_turn(column, row, turn, expected) -> MicaInputError:
    return MicaInputError(f"turn {turn} found where turn {expected} was expected: a turn is "
                          f"missing (turns are 0..T-1 per trajectory)", column=column, row=row,
                          rule="no missing turns")


def initial_value_changes(column, row) -> MicaInputError:
    return MicaInputError("differs from the value on the trajectory's other rows (one initial "
                          "value per trajectory)", column=column, row=row,
                          rule="constant within trajectory")


def nested_trajectory_twice(column, row) -> MicaInputError:
    return MicaInputError("trajectory id appears on two rows (nested form has one row per "
                          "trajectory)", column=column, row=row, rule="unique trajectory ids")


def empty_list_trajectory(column, row) -> MicaInputError:
    return MicaInputError("trajectory has no turns (empty list)", column=column, row=row,
                          rule="at least one turn")


#: the rule of a streamed dataset whose group comes back after other groups
GROUPED_RULE = "rows of a group stored together"


def group_not_together(column, row, label) -> MicaInputError:
    return MicaInputError(f"group {label!r} appears again after other groups (the rows of a "
                          f"group must be stored together; sort the dataset by group first)",
                          column=column, row=row, rule=GROUPED_RULE)


#: The most threads one call runs on; a larger ``num_threads`` is capped (results are the
#: same bits on any number of threads).
MAX_THREADS = 1024


def check_num_threads(num_threads) -> int:
    """``num_threads`` as an int in ``1 .. MAX_THREADS``; not an integer >= 1 is an error."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) \
            or num_threads < 1:
        raise MicaInputError(f"must be an integer >= 1; got {num_threads!r}",
                             column="num_threads", rule="integer >= 1")
    return min(int(num_threads), MAX_THREADS)


def check_on_missing(on_missing) -> bool:
    """``True`` for ``"carry"``; a ``ValueError`` for anything but ``"raise"``/``"carry"``."""
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {', '.join(ON_MISSING)}; got "
                         f"{on_missing!r}")
    return on_missing == "carry"


# --------------------------------------------------------------------------- host data


_SCALAR_TYPES = (int, float, str, bytes, np.generic)


def _masked_row(a) -> int:
    """The first masked position of a ``numpy.ma`` array, or -1 (no mask, or nothing masked)."""
    mask = np.ma.getmaskarray(a).reshape(len(a), -1).any(axis=1) if np.ma.isMaskedArray(a) \
        else None
    if mask is None or not mask.any():
        return -1
    return int(np.flatnonzero(mask)[0])


def label_array(labels, name="group") -> np.ndarray:
    """``labels`` as a 1-D array that keeps what each label is.

    numpy coerces a list of mixed kinds to one type (``[1, "1"]`` to two strings ``"1"``,
    ``[2**53 + 1, 2.0**53]`` to two equal floats); a list or tuple whose items are not all
    of one type becomes an object array instead, compared by Python equality. A masked
    entry of a ``numpy.ma`` array is a null label: an error naming ``name`` and its row, as
    a null in a table column is.
    """
    if isinstance(labels, (list, tuple)):
        types = set(map(type, labels))
        if len(types) > 1 or (types and not issubclass(types.pop(), _SCALAR_TYPES)):
            a = np.empty(len(labels), dtype=object)
            for i, value in enumerate(labels):
                a[i] = value
            return a
    if np.ma.isMaskedArray(labels) and np.ndim(labels) >= 1:
        row = _masked_row(labels)
        if row >= 0:
            raise null_value(name, row)
        labels = np.ma.getdata(labels)
    return np.asarray(labels)


def _is_missing(value) -> bool:
    """Whether a label is a missing value of some library: ``None``, ``pandas.NA``,
    ``pandas.NaT``, ``numpy.datetime64('NaT')`` (floating NaN is the finite rule's)."""
    if value is None:
        return True
    if isinstance(value, (np.datetime64, np.timedelta64)):
        return bool(np.isnat(value))
    kind = type(value).__name__
    return kind in ("NAType", "NaTType") and type(value).__module__.startswith("pandas")


def _factorize_objects(a: np.ndarray, name):
    """Codes of an object array by Python equality and hashing (``1 == 1.0 == True``,
    ``0.0 == -0.0``, ``1 != "1"``), rejecting missing values (None, pandas.NA, NaT), NaN,
    infinities and unhashable values."""
    index: dict = {}
    codes = np.empty(len(a), dtype=np.int64)
    for i, value in enumerate(a):
        if _is_missing(value):
            raise null_value(name, i)
        try:
            code = index.setdefault(value, len(index))
        except TypeError:
            raise label_not_scalar(name, i, type(value).__name__) from None
        if isinstance(value, numbers.Number) and not isinstance(value, numbers.Integral) \
                and (value != value or value in (math.inf, -math.inf)):
            raise label_not_finite(name, i)
        codes[i] = code
    uniques = np.empty(len(index), dtype=object)
    for value, code in index.items():
        uniques[code] = value
    return codes, uniques


def factorize(labels, name="group"):
    """Integer codes for any labels, in order of first appearance (as ``pandas.factorize``).

    The label-identity rule of every input path (README, "Choices the contract left open"):
    two labels are the same when they are equal values of the same kind. Numbers compare as
    numbers (``1``, ``1.0`` and ``True`` are one label, so are ``0.0`` and ``-0.0``); a
    number never equals a string, nor ``bytes`` a ``str``. NaN, infinite and null (``None``)
    labels are errors naming ``name`` and the row.

    Returns ``(codes int64, uniques)``.
    """
    a = label_array(labels, name)
    if a.ndim != 1:
        raise MicaInputError(f"must be one-dimensional, got shape {a.shape}", column=name,
                             rule="shape")
    if a.size == 0:
        return np.zeros(0, dtype=np.int64), a
    if a.dtype == object:
        return _factorize_objects(a, name)
    if a.dtype.kind in "fc":
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise label_not_finite(name, int(bad[0]))
    if a.dtype.kind in "mM":  # NaT is a missing date or duration: a null label
        bad = np.flatnonzero(np.isnat(a))
        if bad.size:
            raise null_value(name, int(bad[0]))
    if a.dtype.kind not in "biufcUSmM":
        raise label_not_scalar(name, 0, f"dtype {a.dtype}")
    # np.unique compares with ==: 0.0 and -0.0 are one value.
    uniques, first, inverse = np.unique(a, return_index=True, return_inverse=True)
    # Renumber so codes follow first appearance (stable, like pandas.factorize).
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)].astype(np.int64), uniques[order]


def check_offsets(offsets) -> np.ndarray:
    """``offsets`` as contiguous int64, starting at 0 and strictly increasing."""
    o = np.asarray(offsets)
    if o.ndim != 1 or o.size == 0:
        raise offsets_shape(o.shape)
    if o.dtype.kind not in "iu":
        if not (o.dtype.kind == "f" and np.all(np.isfinite(o)) and np.all(o == np.round(o))):
            raise offsets_dtype(o.dtype)
    if o.dtype.kind in "uf":  # values past int64 would wrap to negative counts
        big = np.flatnonzero(o > np.uint64(np.iinfo(np.int64).max) if o.dtype.kind == "u"
                             else o >= 2.0**63)
        if big.size:
            raise offsets_too_large(int(big[0]), int(o[big[0]]))
    o = np.ascontiguousarray(o, dtype=np.int64)
    if o[0] != 0:
        raise offsets_start(int(o[0]))
    ext = _compiled.ext
    if ext is not None:  # one pass, no temporaries
        bad = ext.ragged_check_offsets(o)
        if bad >= 0:
            raise empty_trajectory(bad - 1, int(o[bad] - o[bad - 1]))
        return o
    steps = np.diff(o)
    if not (steps > 0).all():
        i = int(np.flatnonzero(steps <= 0)[0])
        raise empty_trajectory(i, int(steps[i]))
    return o


def group_codes(group, n_traj) -> tuple[np.ndarray, int]:
    """``(codes int64 [n_traj], ngroups)`` for any host labels, one per trajectory."""
    g = label_array(group, "group")
    if g.ndim != 1 or len(g) != n_traj:
        raise group_length(n_traj, g.shape)
    limit = max(n_traj, 1) * 4 + 16
    if g.dtype == np.int64 and _compiled.ext is not None:
        # Small non-negative integer codes (the usual case): kept in value order, unused ones
        # compacted away, in one pass.
        codes = np.empty(len(g), dtype=np.int64)
        ng = _compiled.ext.small_codes(np.ascontiguousarray(g), limit, codes)
        if ng >= 0:
            return codes, int(ng)
    elif g.dtype.kind in "iu" and (g.size == 0 or (g.min() >= 0 and g.max() < limit)):
        used = np.zeros(int(g.max()) + 1 if g.size else 0, dtype=bool)
        used[g] = True
        remap = np.cumsum(used) - 1
        return np.ascontiguousarray(remap[g].astype(np.int64)), int(used.sum())
    codes, uniques = factorize(g, "group")
    return np.ascontiguousarray(codes), len(uniques)


def make_ragged(offsets, group) -> Ragged:
    """Validated CSR layout from ``offsets`` and per-trajectory ``group`` labels."""
    o = check_offsets(offsets)
    codes, ngroups = group_codes(group, len(o) - 1)
    return Ragged(o, codes, ngroups)


def first_appearance_codes(values) -> tuple[np.ndarray, int]:
    """``(codes int64, n)`` of int64 ``values``: equal values share a code, codes numbered in
    order of first appearance."""
    if values.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    uniques, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniques))
    return rank[inverse.reshape(-1)], len(uniques)


def key_buckets(key_codes, nkey_labels, offsets, group) -> tuple[np.ndarray, int]:
    """Buckets of scope ``key``: one per (group, key) pair present, per row.

    ``key_codes`` int64 ``[n_rows]`` codes of the user's key labels (``0 .. nkey_labels-1``),
    ``offsets``/``group`` the layout. Returns ``(codes int64 [n_rows], nbuckets)``.
    """
    group_row = np.repeat(np.asarray(group, dtype=np.int64), np.diff(offsets))
    return first_appearance_codes(group_row * max(int(nkey_labels), 1) + key_codes)


def check_key(key, n_rows, ragged) -> Ragged:
    """``ragged`` with the key buckets of per-row labels ``key`` (any labels, as ``group``)."""
    k = label_array(key, "key")
    if k.ndim != 1 or len(k) != n_rows:
        raise wrong_length("key", n_rows, k.shape)
    codes, labels = factorize(k, "key")
    buckets, nkeys = key_buckets(codes, len(labels), ragged.offsets, ragged.group)
    return Ragged(ragged.offsets, ragged.group, ragged.ngroups, buckets, nkeys)


#: The largest ``|value|`` accepted (distances, rewards, initial distances). Above it rewards,
#: returns or squared deviations could leave float64's range (1.8e308) and the statistics
#: would silently become inf, NaN or 0; below it they cannot for any batch that fits in
#: memory (a squared deviation is at most (4 x 1e100 x turns)^2, summed over the turns).
MAX_MAGNITUDE = 1e100


def too_large(column, row, value, what="value") -> MicaInputError:
    # repr: the shortest text that gives the value back, so 1.0000001e+100 is not shown as
    # the limit itself.
    return MicaInputError(f"{what} {float(value)!r} is too large: |values| must be at most "
                          f"{MAX_MAGNITUDE!r} so that rewards, returns and squared deviations "
                          f"stay within float64 (advantages do not depend on the scale: "
                          f"rescale the values)", column=column, row=row, rule="magnitude")


# --------------------------------------------------------------------------- states


DISTANCE_KINDS = ("hinge", "norm")


class Potential(NamedTuple):
    """The checked options of :func:`mica_core.distance_from_state`: axis weights (``None``:
    all ones), the zone width ``epsilon`` and the ``kind`` of distance."""

    weights: np.ndarray | None
    epsilon: float
    kind: str


def potential_options(weights=None, epsilon=1.0, kind="hinge") -> Potential:
    """The state-to-distance options, checked once where they are given: ``weights`` a 1-D
    array of finite non-negative numbers, ``epsilon`` a finite number >= 0, ``kind``
    ``"hinge"`` or ``"norm"``. Errors name the option (``state_weights``, ``epsilon``,
    ``distance_kind``) and the rule."""
    if kind not in DISTANCE_KINDS:
        raise choice("distance_kind", kind, DISTANCE_KINDS)
    try:
        e = float(epsilon)
    except (TypeError, ValueError):
        raise MicaInputError(f"must be a number; got {epsilon!r}", column="epsilon",
                             rule="dtype") from None
    if not (math.isfinite(e) and e >= 0.0) or isinstance(epsilon, bool):
        raise MicaInputError(f"must be a finite number >= 0 (the width of the zone below "
                             f"0); got {epsilon!r}", column="epsilon", rule="range")
    if weights is None:
        return Potential(None, e, kind)
    w = np.asarray(weights)
    if w.ndim != 1 or w.size == 0:
        raise MicaInputError(f"needs one weight per state axis (a 1-D array); got shape "
                             f"{w.shape}", column="state_weights", rule="shape")
    if w.dtype.kind not in "fiu":
        raise not_numeric("state_weights", w.dtype)
    w = w.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0) | (w > MAX_MAGNITUDE))
    if bad.size:
        i = int(bad[0])
        raise MicaInputError(f"weight {w[i]!r} of axis {i} is not a finite number in "
                             f"[0, {MAX_MAGNITUDE!r}]", column="state_weights", row=i,
                             rule="finite, >= 0")
    return Potential(w, e, kind)


def check_states(states, name, n_axes) -> None:
    """State values (flat, ``n_axes`` per row) are finite and at most :data:`MAX_MAGNITUDE`
    in size: checked before any distance is computed, whose squares would overflow. Errors
    name the row (``index // n_axes``)."""
    v = np.asarray(states)
    if not v.size:
        return
    lo, hi = float(v.min()), float(v.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise MicaInputError(f"state value {v[i]} (axis {i % n_axes}) is not finite (NaN and "
                             f"infinities are rejected)", column=name, row=i // n_axes,
                             rule="finite")
    if max(-lo, hi) > MAX_MAGNITUDE:
        i = int(np.flatnonzero(np.abs(v) > MAX_MAGNITUDE)[0])
        raise too_large(name, i // n_axes, v[i], what=f"state value (axis {i % n_axes})")


def check_potentials(d, name) -> None:
    """Distances computed from states (large weights can make them overflow): finite and at
    most :data:`MAX_MAGNITUDE`, the rule every distance follows; errors name the state
    column and its row."""
    if not len(d):
        return
    hi = float(d.max())
    if not hi <= MAX_MAGNITUDE:  # NaN and inf fail too
        i = int(np.flatnonzero(~(d <= MAX_MAGNITUDE))[0])
        raise too_large(name, i, d[i], what="distance computed from the state")


def check_values(x, name, n, *, allow_negative=True, allow_missing=False):
    """Validate a flat per-row (or per-trajectory) float array; returns it as float32/float64.

    ``allow_missing`` lets NaN and infinities through (to be filled by ``fill_missing``); a
    masked entry of a ``numpy.ma`` array is a missing value (an error, or NaN to be filled)."""
    masked = _masked_row(x) if np.ma.isMaskedArray(x) and np.ndim(x) == 1 else -1
    if masked >= 0 and not allow_missing:
        raise null_value(name, masked, "masked (missing) value")
    if masked >= 0:
        x = np.ma.filled(np.ma.asarray(x).astype(np.float64), np.nan)
    a = np.asarray(np.ma.getdata(x) if np.ma.isMaskedArray(x) else x)
    if a.ndim != 1 or len(a) != n:
        raise wrong_length(name, n, a.shape)
    if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
        raise not_numeric(name, a.dtype)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    check_range(a, name, allow_negative=allow_negative, allow_missing=allow_missing)
    return np.ascontiguousarray(a)


def check_range(a, name, *, allow_negative=True, allow_missing=False, order=None):
    """Finite (unless ``allow_missing``), non-negative (unless ``allow_negative``) and at most
    :data:`MAX_MAGNITUDE` in size; ``order`` maps positions to the rows an error names."""
    if not len(a):
        return

    def row(i):
        return int(i) if order is None else int(order[i])

    if allow_missing:  # NaN and inf pass, to be filled; NaN compares False below
        if not allow_negative and (a < 0).any():
            i = np.flatnonzero(a < 0)[0]
            raise negative_distance(name, row(i), a[i])
        big = np.abs(a) > MAX_MAGNITUDE
        big &= np.isfinite(a)
        if big.any():
            i = np.flatnonzero(big)[0]
            raise too_large(name, row(i), a[i])
        return
    # Two vectorized reductions and no temporary: min and max are NaN if any value is NaN and
    # infinite if any is; the minimum also answers "any negative?".
    lo, hi = float(a.min()), float(a.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        i = np.flatnonzero(~np.isfinite(a))[0]
        raise not_finite(name, row(i), a[i])
    if not allow_negative and lo < 0:
        i = np.flatnonzero(a < 0)[0]
        raise negative_distance(name, row(i), a[i])
    if max(-lo, hi) > MAX_MAGNITUDE:
        i = np.flatnonzero(np.abs(a) > MAX_MAGNITUDE)[0]
        raise too_large(name, row(i), a[i])


def check_out(out, n_rows):
    """``out=`` of :func:`mica_core.estimate`: three distinct writable C-contiguous float64
    arrays of ``n_rows`` values."""
    names = ("reward", "returns", "advantage")
    try:
        arrays = tuple(out)
    except TypeError:
        arrays = ()
    if len(arrays) != 3:
        raise MicaInputError("out= needs three arrays (reward, returns, advantage)",
                             column="out", rule="shape")
    for name, a in zip(names, arrays):
        if not (isinstance(a, np.ndarray) and a.dtype == np.float64 and a.ndim == 1
                and a.flags.c_contiguous and a.flags.writeable):
            raise MicaInputError(f"out {name}: needs a writable C-contiguous float64 numpy "
                                 f"array", column="out", rule="dtype")
        if len(a) != n_rows:
            raise wrong_length("out", n_rows, a.shape)
    if any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:]):
        raise MicaInputError("out arrays overlap; pass three separate arrays", column="out",
                             rule="distinct outputs")
    return arrays


class NumpyInputs(NamedTuple):
    """Validated host inputs: the layout, the value arrays (``None`` when not given) and the
    dtype the outputs are returned in."""

    ragged: Ragged
    distance: np.ndarray | None
    initial_distance: np.ndarray | None
    reward: np.ndarray | None
    out_dtype: Any


def numpy_inputs(plan, offsets, group, distance, initial_distance, reward,
                 on_missing="raise", key=None) -> NumpyInputs:
    """Check host inputs for ``plan`` (a resolved :class:`mica_core.estimators.Plan`).

    ``key``: per-turn labels, required when the plan has a component with scope ``key``
    (ignored otherwise). Output dtype: float32 when the per-turn values are float32 (and
    ``initial_distance``, if given, is not float64), else float64.
    """
    carry = check_on_missing(on_missing)
    ragged = make_ragged(offsets, group)
    n, n_traj = ragged.n_rows, ragged.n_traj
    if plan.needs_key:
        if key is None:
            raise key_required(plan)
        ragged = check_key(key, n, ragged)
    if reward is not None:
        if distance is not None or initial_distance is not None:
            raise exclusive_inputs()
        r = check_values(reward, "reward", n, allow_missing=carry)
        r = fill_missing(r, ragged.offsets) if carry else r
        return NumpyInputs(ragged, None, None, r, r.dtype)
    if distance is None:
        raise values_required()
    d = check_values(distance, "distance", n, allow_negative=False, allow_missing=carry)
    if plan.reward == "idr" and initial_distance is None:
        raise initial_distance_required()
    d0 = None
    if initial_distance is not None:
        d0 = check_values(initial_distance, "initial_distance", n_traj, allow_negative=False)
    out_dtype = np.float64 if d0 is not None and d0.dtype == np.float64 else d.dtype
    if carry:
        firsts = d[ragged.offsets[:-1]]
        if d0 is None and n and not np.isfinite(firsts).all():
            first = int(np.flatnonzero(~np.isfinite(firsts))[0])
            raise missing_first_value("distance", int(ragged.offsets[first]))
        d = fill_missing(d, ragged.offsets, d0 if d0 is not None else d)
    return NumpyInputs(ragged, d, d0, None, out_dtype)
