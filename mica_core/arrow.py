"""Arrow tables in, the same rows with ``reward``, ``return`` and ``advantage`` out.

Long form (one row per turn): ``group_id``, ``traj_id``, ``turn`` and one of
``distance`` + ``initial_distance`` (repeated on every row of a trajectory),
``state`` + ``initial_state`` (fixed-size or variable lists of axis values), or ``reward``.
Rows may come in any order; outputs keep the input order.

Nested form (one row per trajectory): ``group_id``, ``distances: list<float>`` and
``initial_distance`` (or ``rewards: list<float>``); an optional ``traj_id`` names the
trajectories, else the row number does. Outputs are list columns aligned with ``distances``.

Estimators with a component of scope ``key`` (``gigpo``) also read a per-turn key: a ``key``
column in the long form, a ``keys`` list column (aligned with ``distances``) in the nested
form; any id type, as for ``group_id``.

Chunked arrays, sliced list arrays, ``large_list``, dictionary-encoded and string ids work.
Value columns are read without a copy where Arrow allows (one chunk, no nulls, float64);
pandas, polars and Hugging Face ``datasets`` objects go through Arrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _compiled
from . import validate as _validate
from ._errors import MicaInputError
from .api import run_plan
from .estimators import resolve
from .io import to_arrow_table
from .layout import ON_MISSING, Ragged, fill_missing, ragged_from_lengths
from .signals import potential as _potential
from .signals import turn_index

__all__ = ["compute_advantages", "ragged_from_table", "DEFAULT_COLUMNS", "TableInput",
           "to_arrow_table"]

DEFAULT_COLUMNS = {
    "group": "group_id",
    "traj": "traj_id",
    "turn": "turn",
    "distance": "distance",
    "initial_distance": "initial_distance",
    "state": "state",
    "initial_state": "initial_state",
    "reward": "reward",
    "distances": "distances",
    "rewards": "rewards",
    "key": "key",
    "keys": "keys",
}
OUTPUT_COLUMNS = ("reward", "return", "advantage")
SOURCES = ("auto", "distance", "state", "reward")


@dataclass
class TableInput:
    """A table read into the CSR layout. ``order[k]`` is the input row of sorted row ``k``
    (``None`` when the input was already in trajectory/turn order)."""

    ragged: Ragged
    distance: np.ndarray | None
    initial_distance: np.ndarray | None
    reward: np.ndarray | None
    order: np.ndarray | None
    form: str  # "long" or "nested"
    n_rows: int


# --------------------------------------------------------------------------- columns


def _column(table: pa.Table, name: str, role: str, *, allow_null=False):
    # get_field_index: the one field of that name, else -1 (absent or duplicated).
    i = table.schema.get_field_index(name) if isinstance(name, str) else -1
    if i < 0:
        names = table.column_names
        if name not in names:
            raise _validate.missing_column(name, role, names)
        raise _validate.duplicate_column(name, names.count(name))
    col = table.column(i)
    if col.null_count and not allow_null:
        first = int(pc.index(pc.is_null(col), True).as_py())
        raise _validate.null_value(name, first)
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    return col


def _numpy(col, name, *, kind="float"):
    """A 1-D numpy view (a copy only for several chunks or a type change)."""
    t = col.type
    if pa.types.is_null(t) and len(col) == 0:  # zero rows of unknown type (header-only CSV)
        return np.zeros(0, dtype=np.float64 if kind == "float" else np.int64)
    if kind == "float":
        if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
            raise _validate.column_type(name, "numeric", t)
        if pa.types.is_float16(t) or pa.types.is_integer(t):
            col = pc.cast(col, pa.float64())
    else:
        if not pa.types.is_integer(t):
            raise _validate.column_type(name, "integer", t)
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 1:
            col = col.chunk(0)
        else:
            col = col.combine_chunks()
    a = col.to_numpy(zero_copy_only=False)
    if kind == "int":
        a = a.astype(np.int64, copy=False)
    return a


def _reader_kernels():
    """The compiled single-pass checks (``None`` on a broken install: numpy fallbacks run)."""
    return _compiled.ext


def _int_ids(col):
    """An integer id column as a contiguous int64 array (``None`` for other types)."""
    if len(col) and pa.types.is_integer(col.type):
        return np.ascontiguousarray(_numpy(col, "", kind="int"))
    return None


def _run_codes(a: np.ndarray):
    """``(codes, n_ids, starts)`` of integer ids when every id occupies one run of adjacent
    rows (sorted ids, or rows stored id by id): the code is the run number, which is the
    order of first appearance, and ``starts`` [n_ids + 1] the first row of each run. ``None``
    when some id comes back after another one."""
    n = len(a)
    ext = _reader_kernels()
    if ext is not None:
        codes = np.empty(n, dtype=np.int64)
        starts = np.empty(n + 1, dtype=np.int64)
        nruns, increasing = ext.ragged_run_codes(a, codes, starts)
        starts = starts[:nruns + 1].copy()
    else:  # pragma: no cover - only without the compiled kernels
        change = a[1:] != a[:-1]
        codes = np.zeros(n, dtype=np.int64)
        np.cumsum(change, out=codes[1:])
        starts = np.concatenate([[0], np.flatnonzero(change) + 1, [n]]).astype(np.int64)
        nruns = len(starts) - 1
        increasing = bool(np.all(a[starts[1:-1]] > a[starts[:-2]])) if nruns > 1 else True
    if not increasing:
        # Ids come in runs but not in increasing order: one run per id if the run ids are
        # distinct. Worth checking only for long runs; rows in no particular order (runs
        # of about one row) go to hashing.
        if 8 * nruns > n or len(np.unique(a[starts[:-1]])) != nruns:
            return None
    return codes, nruns, starts


def check_label_type(t: pa.DataType, name: str):
    """Ids (groups, trajectories) are scalar values; a list, struct, map or union column is
    an error naming it."""
    if pa.types.is_nested(t):
        raise _validate.label_not_scalar(name, None, t)


def float_labels(col, name) -> np.ndarray:
    """A floating-point id column as float64 with ``-0.0`` as ``0.0``; NaN and infinities
    are errors (:func:`mica_core.validate.factorize`'s rule)."""
    a = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise _validate.label_not_finite(name, int(bad[0]))
    return a + 0.0  # -0.0 + 0.0 == +0.0


def _codes(col, name) -> tuple[np.ndarray, int]:
    """int64 codes in order of first appearance, for any scalar id type. Ids are equal by
    :func:`mica_core.validate.factorize`'s rule (a column holds one kind; floats compare as
    numbers: ``0.0`` and ``-0.0`` are one id, NaN is an error)."""
    check_label_type(col.type, name)
    if len(col) == 0:
        return np.zeros(0, dtype=np.int64), 0
    if pa.types.is_floating(col.type):
        # Arrow hashes floats by their bits (0.0 and -0.0 differ, NaN is a value): factorize
        # compares them as numbers and refuses NaN and infinities.
        values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        codes, uniques = _validate.factorize(values, name)
        return codes, len(uniques)
    ids = _int_ids(col)
    if ids is not None:
        # Fast path (no hashing): integer ids stored run by run.
        fast = _run_codes(ids)
        if fast is not None:
            return fast[0], fast[1]
    uniques = pc.unique(col)
    codes = pc.index_in(col, value_set=uniques)
    if isinstance(codes, pa.ChunkedArray):
        codes = codes.combine_chunks() if codes.num_chunks != 1 else codes.chunk(0)
    return codes.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), len(uniques)


def _list_parts(col, name):
    """(offsets int64 [n+1] from 0, flat values Array) of a list column; slices honoured."""
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise _validate.column_type(name, "a list column", t)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ChunkedArray):  # no chunks at all
        arr = pa.array([], type=t)
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        offsets = np.arange(len(arr) + 1, dtype=np.int64) * size
        values = arr.flatten()
    else:
        raw = arr.offsets.to_numpy().astype(np.int64)
        offsets = raw - raw[0]
        values = arr.flatten()  # the slice of the values this (possibly sliced) array spans
    if values.null_count:
        pos = int(pc.index(pc.is_null(values), True).as_py())
        row = int(np.searchsorted(offsets, pos, side="right") - 1)
        raise _validate.null_list_element(name, row, pos - offsets[row])
    return offsets, values


def _state_distance(table, name, n, potential, *, axes=None, axes_of=None):
    """Potentials of a state column (``potential``: the checked options); ``axes``: the
    number of axes the column must have (that of the column ``axes_of``). Returns
    ``(distances, axes)``."""
    col = _column(table, name, "state")
    offsets, values = _list_parts(col, name)
    lengths = np.diff(offsets)
    if n and (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise _validate.state_axes_differ(name, row, lengths[row], lengths[0])
    k = int(lengths[0]) if n else 0
    if n and axes is not None and k != axes:
        # Potentials of states with different axes are not comparable (IDR subtracts them).
        raise _validate.state_axes_mismatch(name, k, axes_of, axes)
    v = _numpy(values, name)
    if n and k == 0:
        raise _validate.empty_states(name)
    if n and potential.weights is not None and len(potential.weights) != k:
        raise _validate.weights_per_axis(len(potential.weights), name, k)
    # Before any square is taken: 1e155 squared is already past float64.
    _validate.check_states(v, name, max(k, 1))
    d = _potential(v.reshape(n, k) if n else np.zeros((0, 1)), potential)
    _validate.check_potentials(d, name)
    return d, k


def _finite(a, name, order=None, *, non_negative=False, allow_missing=False):
    """The value rules of :func:`mica_core.validate.check_range`, naming input rows."""
    _validate.check_range(a, name, allow_negative=not non_negative, allow_missing=allow_missing,
                          order=order)


def _pick_source(table, cols, source, nested):
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    names = table.column_names
    if nested:
        options = [("distance", cols["distances"]), ("reward", cols["rewards"])]
    else:
        options = [("distance", cols["distance"]), ("state", cols["state"]),
                   ("reward", cols["reward"])]
    if source != "auto":
        return source
    for kind, col in options:
        if col in names:
            return kind
    wanted = " or ".join(repr(c) for _, c in options)
    raise _validate.no_value_column(options[0][1], wanted, names)


# --------------------------------------------------------------------------- reading


def ragged_from_table(table, columns: Mapping[str, str] | None = None, *, source="auto",
                      state_weights=None, epsilon=1.0, distance_kind="hinge",
                      need_initial=True, on_missing="raise", need_key=False) -> TableInput:
    """Read a long- or nested-form table into the CSR layout, validating it (docs/architecture.md, "Conventions")."""
    table = to_arrow_table(table)
    cols = dict(DEFAULT_COLUMNS)
    if columns:
        unknown = set(columns) - set(cols)
        if unknown:
            raise ValueError(f"unknown column roles {sorted(unknown)}; known: {sorted(cols)}")
        cols.update(columns)
    names = table.column_names
    nested = (cols["distances"] in names or cols["rewards"] in names) and cols["turn"] not in names
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {', '.join(ON_MISSING)}; got {on_missing!r}")
    src = _pick_source(table, cols, source, nested)
    potential = _validate.potential_options(state_weights, epsilon, distance_kind)
    if nested:
        ti = _read_nested(table, cols, src, need_initial)
    else:
        ti = _read_long(table, cols, src, need_initial, potential, on_missing == "carry")
    if need_key:
        ti.ragged = _with_key(table, cols, ti, nested)
    return ti


def _with_key(table, cols, ti: TableInput, nested: bool) -> Ragged:
    """The layout with the key buckets of the table's per-turn key (sorted row order)."""
    ragged = ti.ragged
    name = cols["keys"] if nested else cols["key"]
    if name not in table.column_names:
        raise _validate.key_column_missing(name, nested)
    col = _column(table, name, "key")
    if nested:
        offsets, values = _list_parts(col, name)
        if not np.array_equal(offsets, ragged.offsets):
            row = int(np.flatnonzero(np.diff(offsets) != np.diff(ragged.offsets))[0])
            raise _validate.keys_per_turn(name, row)
        col = values
    try:
        codes, nlabels = _codes(col, name)
    except MicaInputError as err:
        if nested and err.row is not None:  # name the table row that holds the element
            raise err.with_row(int(np.searchsorted(offsets, err.row, side="right") - 1)) \
                from None
        raise
    if ti.order is not None:
        codes = codes[ti.order]
    buckets, nkeys = _validate.key_buckets(codes, nlabels, ragged.offsets, ragged.group)
    return Ragged(ragged.offsets, ragged.group, ragged.ngroups, buckets, nkeys)


def _read_long(table, cols, src, need_initial, potential, carry):
    n = table.num_rows
    gcol = _column(table, cols["group"], "group")
    tcol = _column(table, cols["traj"], "trajectory")
    turn = _numpy(_column(table, cols["turn"], "turn"), cols["turn"], kind="int")
    ext = _reader_kernels()
    tids = _int_ids(tcol)
    runs = _run_codes(tids) if tids is not None else None
    if runs is not None and ext is not None:
        # Each trajectory's rows are adjacent: the runs are the trajectories, in order.
        traj, n_traj, offsets = runs
        lengths = np.diff(offsets)
        in_order = ext.ragged_check_turns(offsets, np.ascontiguousarray(turn)) < 0
    else:
        traj, n_traj = _codes(tcol, cols["traj"])
        lengths = np.bincount(traj, minlength=n_traj).astype(np.int64)
        offsets = ragged_from_lengths(lengths)
        in_order = n == 0 or (bool(np.all(traj[1:] >= traj[:-1]))
                              and np.array_equal(turn, turn_index(offsets)))
    gcodes, ngroups = _codes(gcol, cols["group"])
    order = None
    if not in_order and ext is not None and n:
        # Rows in any order: each row's place is offsets[traj] + turn (one O(n) pass).
        placed = np.full(n, -1, dtype=np.int64)
        if ext.ragged_place_rows(traj, np.ascontiguousarray(turn), offsets, placed) < 0:
            order = placed
            in_order = True  # sorted now; errors below name input rows through ``order``
    if not in_order:
        expected = turn_index(offsets)
        order = np.lexsort((turn, traj))
        turn_sorted = turn[order]
        bad = np.flatnonzero(turn_sorted != expected)
        if bad.size:
            k = int(bad[0])
            row = int(order[k])
            same_prev = k > 0 and traj[order[k - 1]] == traj[row]
            if turn_sorted[k] < 0:
                raise _validate.negative_turn(cols["turn"], row, turn_sorted[k])
            if same_prev and turn_sorted[k] == turn_sorted[k - 1] \
                    and gcodes[row] != gcodes[order[k - 1]]:
                # One id, two groups: usually rollouts numbered 0, 1, ... within each group.
                raise _validate.trajectory_in_two_groups(cols["group"], row)
            if same_prev and turn_sorted[k] == turn_sorted[k - 1]:
                raise _validate.duplicate_turn(cols["turn"], row, turn_sorted[k])
            raise _validate.missing_turn(cols["turn"], row, turn_sorted[k], expected[k])
    g_rows = gcodes if order is None else gcodes[order]
    g_traj = g_rows[offsets[:-1]] if n else np.zeros(0, dtype=np.int64)
    if n and (ext is None or ext.ragged_first_change(offsets, g_rows) >= 0):
        mismatch = np.flatnonzero(np.repeat(g_traj, lengths) != g_rows)
        if mismatch.size:
            k = int(mismatch[0])
            row = k if order is None else int(order[k])
            raise _validate.trajectory_in_two_groups(cols["group"], row)
    ragged = Ragged(offsets, np.ascontiguousarray(g_traj, dtype=np.int64), ngroups)

    def rows(a):
        return a if order is None else a[order]

    d = d0 = r = init_axes = None
    if src == "reward":
        r = rows(_numpy(_column(table, cols["reward"], "reward", allow_null=carry),
                        cols["reward"]))
        _finite(r, cols["reward"], order, allow_missing=carry)
        if carry:
            r = fill_missing(r, offsets)
        return TableInput(ragged, d, d0, r, order, "long", n)
    if src == "distance":
        init_name = cols["initial_distance"]
    else:
        init_name = cols["initial_state"]
    if need_initial or init_name in table.column_names:
        if src == "distance":
            init_rows = rows(_numpy(_column(table, init_name, "initial distance"), init_name))
            _finite(init_rows, init_name, order, non_negative=True)
        else:
            init_rows, init_axes = _state_distance(table, init_name, n, potential)
            init_rows = rows(init_rows)
        d0 = init_rows[offsets[:-1]] if n else np.zeros(0)
        if ext is not None and init_rows.dtype == np.float64 and init_rows.flags.c_contiguous:
            differs = np.zeros(0, dtype=np.int64)
            if ext.ragged_first_change(offsets, init_rows) >= 0:
                differs = np.flatnonzero(np.repeat(d0, lengths) != init_rows)
        else:
            differs = np.flatnonzero(np.repeat(d0, lengths) != init_rows)
        if differs.size:
            k = int(differs[0])
            row = k if order is None else int(order[k])
            raise _validate.initial_value_changes(init_name, row)
    if src == "distance":
        d = rows(_numpy(_column(table, cols["distance"], "distance", allow_null=carry),
                        cols["distance"]))
        _finite(d, cols["distance"], order, non_negative=True, allow_missing=carry)
    else:
        d = rows(_state_distance(table, cols["state"], n, potential, axes=init_axes,
                                 axes_of=init_name)[0])
    if carry:
        if d0 is None and n and not np.isfinite(d[offsets[:-1]]).all():
            k = int(offsets[:-1][~np.isfinite(d[offsets[:-1]])][0])
            raise _validate.missing_first_value(cols["distance"],
                                                k if order is None else int(order[k]),
                                                "initial value")
        d = fill_missing(d, offsets, d0 if d0 is not None else d)
    return TableInput(ragged, d, d0, r, order, "long", n)


def _read_nested(table, cols, src, need_initial):
    n_traj = table.num_rows
    gcol = _column(table, cols["group"], "group")
    gcodes, ngroups = _codes(gcol, cols["group"])
    if cols["traj"] in table.column_names:
        tcol = _column(table, cols["traj"], "trajectory")
        tcodes, n_unique = _codes(tcol, cols["traj"])
        if n_unique != n_traj:
            seen = np.zeros(n_unique, dtype=bool)
            for row, c in enumerate(tcodes):
                if seen[c]:
                    raise _validate.nested_trajectory_twice(cols["traj"], row)
                seen[c] = True
    name = cols["distances"] if src == "distance" else cols["rewards"]
    offsets, values = _list_parts(_column(table, name, "per-turn values"), name)
    empty = np.flatnonzero(np.diff(offsets) == 0)
    if empty.size:
        raise _validate.empty_list_trajectory(name, int(empty[0]))
    v = _numpy(values, name)
    # errors name the table row (the trajectory) that holds the list element
    _finite(v, name, np.repeat(np.arange(n_traj), np.diff(offsets)),
            non_negative=src != "reward")
    ragged = Ragged(offsets, np.ascontiguousarray(gcodes), ngroups)
    d = d0 = r = None
    if src == "reward":
        r = v
    else:
        d = v
        init_name = cols["initial_distance"]
        if need_initial or init_name in table.column_names:
            d0 = _numpy(_column(table, init_name, "initial distance"), init_name)
            _finite(d0, init_name, non_negative=True)
    return TableInput(ragged, d, d0, r, None, "nested", n_traj)


# --------------------------------------------------------------------------- output


def _attach(table: pa.Table, arrays: dict) -> pa.Table:
    names = table.column_names  # appending keeps the indices of the columns before
    for name, arr in arrays.items():
        if name in names:
            table = table.set_column(names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table


def _restore(original, table: pa.Table, arrays: dict[str, Any]):
    """Give the result back in the caller's container type."""
    mod = type(original).__module__
    if mod.startswith("pandas"):
        out = original.copy(deep=False)
        for name, arr in arrays.items():
            out[name] = arr.to_pylist() if isinstance(arr, pa.Array) else arr
        return out
    if mod.startswith("polars"):
        import polars as pl

        return original.with_columns([pl.from_arrow(arr).alias(name) if isinstance(arr, pa.Array)
                                      else pl.Series(name, arr) for name, arr in arrays.items()])
    if mod.startswith("datasets"):
        import datasets

        return datasets.Dataset(_attach(table, {k: pa.array(v) if isinstance(v, np.ndarray)
                                                else v for k, v in arrays.items()}))
    return _attach(table, {k: pa.array(v) if isinstance(v, np.ndarray) else v
                           for k, v in arrays.items()})


def compute_advantages(table, estimator="mica", columns: Mapping[str, str] | None = None, *,
                       source="auto", gamma=None, weight=0.5, eps=1e-6, ddof=1,
                       baseline="mean", scale="std", singleton="zero", backend="auto",
                       state_weights=None, epsilon=1.0, distance_kind="hinge",
                       on_missing="raise"):
    """Per-turn ``reward``, ``return`` and ``advantage`` columns for a trajectory table.

    Args:
      table: Arrow ``Table``/``RecordBatch``, pandas or polars ``DataFrame``, Hugging Face
        ``datasets.Dataset``, or a mapping of columns; long or nested form (module docstring).
      estimator: a registered name or an ``Estimator``.
      columns: role -> column name overrides; roles are ``group``, ``traj``, ``turn``,
        ``distance``, ``initial_distance``, ``state``, ``initial_state``, ``reward``,
        ``key`` and, for the nested form, ``distances``, ``rewards`` and ``keys``.
      source: which values to read: ``auto`` (distance, else state, else reward),
        ``distance``, ``state`` or ``reward``.
      state_weights, epsilon, distance_kind: the potential for ``state`` input
        (:func:`mica_core.distance_from_state`).
      on_missing: ``"raise"`` or ``"carry"`` (long form: null/NaN distances repeat the
        previous turn's, null/NaN rewards become 0), as in :func:`mica_core.estimate`.
      Other options: as :func:`mica_core.estimate`.

    Returns:
      The input rows in input order with float64 columns ``reward``, ``return`` and
      ``advantage`` appended (columns of those names are replaced). Same container type as
      the input for pandas, polars and ``datasets``; an Arrow ``Table`` otherwise. In the
      nested form the three columns are ``list<double>`` aligned with the input lists.
    """
    original = table
    tab = to_arrow_table(table)
    plan = resolve(estimator, reward_given=False, gamma=gamma, weight=weight, eps=eps,
                   ddof=ddof, baseline=baseline, scale=scale, singleton=singleton)
    ti = ragged_from_table(tab, columns, source=source, state_weights=state_weights,
                           epsilon=epsilon, distance_kind=distance_kind,
                           need_initial=plan.reward == "idr", on_missing=on_missing,
                           need_key=plan.needs_key)
    if ti.reward is not None:
        plan = resolve(estimator, reward_given=True, gamma=gamma, weight=weight, eps=eps,
                       ddof=ddof, baseline=baseline, scale=scale, singleton=singleton)
    results = run_plan(plan, ti.ragged, ti.distance, ti.initial_distance, ti.reward, backend)
    return _restore(original, tab, _arrange(ti, results))


def _arrange(ti: TableInput, results) -> dict:
    """Results (sorted CSR order) back into input row order / list columns."""
    out = {}
    for name, res in zip(OUTPUT_COLUMNS, results):
        if ti.form == "nested":
            off = ti.ragged.offsets
            small = off[-1] < 2**31
            cls = pa.ListArray if small else pa.LargeListArray
            out[name] = cls.from_arrays(pa.array(off.astype(np.int32) if small else off),
                                        pa.array(res, type=pa.float64()))
        elif ti.order is None:
            out[name] = res
        else:
            back = np.empty_like(res)
            back[ti.order] = res
            out[name] = back
    return out
