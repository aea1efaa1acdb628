"""Advantages of Parquet (or any ``pyarrow.dataset``) data larger than memory.

The dataset is read in storage order, batch by batch, and cut into *chunks* of whole rollout
groups of about ``batch_rows`` rows; each chunk goes through
:func:`mica_core.compute_advantages` and comes out as an Arrow table (the chunk's rows, in
storage order, with ``reward``, ``return`` and ``advantage`` appended). Memory stays bounded
by about ``batch_rows`` rows plus the largest group plus one scanner batch, whatever the size
of the dataset.

Requirement: **the rows of a group must be stored together** (all rows with one
``group_id`` adjacent in the dataset's order; within a group, rows may come in any order).
That is how rollouts are usually written (group by group). When a group's rows come back
after other groups, :class:`mica_core.MicaInputError` names the group column, the row (in
storage order, counted from 0) and the rule ``rows of a group stored together``. Sort such a
dataset by group first (e.g. ``pyarrow.dataset`` + ``sort_by``, or DuckDB/Polars out of core).

Every group is complete in one chunk, so scopes ``turn`` and ``group`` give exactly what
:func:`~mica_core.compute_advantages` gives on the whole table. Components with scope
``batch`` (``mapo``, ``reinforce_pp``, ``reinforce_pp_idr``) normalize over each chunk (the
chunk is the batch); a warning says so when there is more than one chunk. Validity does not
depend on the chunk size: a trajectory id used in two groups is an error whether the groups
fall in one chunk or in two (the ids of finished chunks are remembered, 8 bytes per group and
per trajectory, 16 for string ids), and ids follow the label rule of
:func:`mica_core.validate.factorize` (``0.0`` and ``-0.0`` are one id, NaN is an error).

Order: files given as a list are read in that order; a directory is read in the order the
dataset discovers its files (by path). Long form only (one row per turn); the nested form has
one row per trajectory and rarely outgrows memory (read it with ``pyarrow.parquet`` and call
``compute_advantages``).

The ``mica advantages`` command streams large Parquet inputs through
:func:`write_advantages`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._errors import MicaInputError
from .arrow import (
    DEFAULT_COLUMNS,
    OUTPUT_COLUMNS,
    check_label_type,
    compute_advantages,
    float_labels,
)
from .estimators import get_estimator
from .io import open_dataset, parquet_write_options
from .validate import (
    group_not_together,
    missing_column,
    null_value,
    trajectory_in_two_groups,
)

__all__ = ["DEFAULT_BATCH_ROWS", "iter_advantages", "write_advantages"]

DEFAULT_BATCH_ROWS = 1 << 20


class _SeenIds:
    """The ids already processed (groups, or the trajectories of finished chunks), to catch
    one that comes back later.

    Integer ids are kept as they are, floating-point ids as the bits of their float64 value
    (``-0.0`` made ``0.0``); other ids (strings, binary) as 128-bit BLAKE2b digests (a false
    match has probability about ``n^2 / 2^129``). Sorted int64 arrays in levels (merged when a
    level doubles), so adding and looking up ``n`` ids costs ``O(n log n)`` overall and 8
    (16) bytes per id.
    """

    def __init__(self):
        self._levels = []  # sorted key arrays (int64 [k] or [k, 2])

    @staticmethod
    def keys(ids: pa.Array, name: str = ""):
        """int64 keys of the given ids (``[n]`` for numbers, ``[n, 2]`` digests otherwise).
        NaN and infinite ids are errors naming ``name`` and the row in ``ids``."""
        if pa.types.is_integer(ids.type):
            return np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64)
        if pa.types.is_floating(ids.type):
            return float_labels(ids, name).view(np.int64)
        out = np.empty((len(ids), 2), dtype=np.int64)
        for i, value in enumerate(ids.to_pylist()):
            data = value if isinstance(value, bytes) else repr(value).encode()
            out[i] = np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), np.int64)
        return out

    @staticmethod
    def _view(keys):
        return keys if keys.ndim == 1 else keys.view([("hi", np.int64), ("lo", np.int64)])[:, 0]

    def seen(self, keys) -> np.ndarray:
        """Whether each key was already added (bool ``[len(keys)]``)."""
        hit = np.zeros(len(keys), dtype=bool)
        if not len(keys) or not self._levels:
            return hit
        probe = self._view(keys)
        for level in self._levels:
            pos = np.searchsorted(level, probe)
            pos = np.minimum(pos, len(level) - 1)
            hit |= level[pos] == probe
        return hit

    def first_seen(self, keys) -> int:
        """Index of the first key already added, or -1."""
        found = np.flatnonzero(self.seen(keys))
        return int(found[0]) if found.size else -1

    def add(self, keys):
        if not len(keys):
            return
        new = np.sort(self._view(keys))
        while self._levels and len(self._levels[-1]) <= len(new):
            new = np.sort(np.concatenate([self._levels.pop(), new]))
        self._levels.append(new)


def _runs(keys):
    """Start of every run of equal keys (``keys`` [n] or [n, 2])."""
    if keys.ndim == 1:
        change = keys[1:] != keys[:-1]
    else:
        change = (keys[1:] != keys[:-1]).any(axis=1)
    return np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)


def _label(ids: pa.Array, i: int):
    return ids[i].as_py()


def _shift_rows(err: MicaInputError, base: int) -> MicaInputError:
    """The same error with its row counted from the start of the dataset."""
    if err.row is None or base == 0:
        return err
    return err.with_row(err.row + base)


def _ids(table: pa.Table, name: str) -> pa.Array:
    """The id column ``name`` of a chunk as one array, dictionary-decoded."""
    col = table.column(name)
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _check_trajectories(seen: _SeenIds, head: pa.Table, tname: str, gname: str, start: int):
    """Refuse a chunk that reuses a trajectory id of an earlier chunk (another group, since
    groups are whole in a chunk), naming the chunk's first row with such an id; then
    remember the chunk's ids."""
    if tname not in head.column_names or head.num_rows == 0:
        return
    ids = _ids(head, tname)
    unique = pc.unique(ids)
    keys = _SeenIds.keys(unique, tname)
    again = seen.seen(keys)
    if again.any():
        reused = pc.is_in(ids, value_set=unique.filter(pa.array(again)))
        row = int(np.flatnonzero(reused.to_numpy(zero_copy_only=False))[0])
        raise trajectory_in_two_groups(gname, start + row)
    seen.add(keys)


def iter_advantages(source, /, estimator="mica", columns: Mapping[str, str] | None = None, *,
                    batch_rows: int = DEFAULT_BATCH_ROWS, format: str = "parquet",
                    **options) -> Iterator[pa.Table]:
    """Yield the advantages of a dataset chunk by chunk (see the module docstring).

    Args:
      source: a Parquet file or directory, a list of files, or a ``pyarrow.dataset.Dataset``
        (positional: ``source=`` in ``**options`` is the value-column choice, as in
        ``compute_advantages``).
      estimator, columns, **options: as :func:`mica_core.compute_advantages` (``source=``,
        ``gamma=``, ``backend=``, ...).
      batch_rows: rows per chunk (a chunk ends at the first group boundary past it).
      format: the dataset format for paths (``parquet``, ``ipc``, ``csv``...).

    Yields:
      Arrow tables: the input rows in storage order plus float64 ``reward``, ``return`` and
      ``advantage``; together they cover the dataset exactly once.

    Raises:
      MicaInputError: rows of a group not stored together, or any error of
        ``compute_advantages`` (rows counted from the start of the dataset).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1; got {batch_rows!r}")
    dataset = open_dataset(source, format)
    cols = dict(DEFAULT_COLUMNS)
    if columns:
        cols.update(columns)
    gname, tname = cols["group"], cols["traj"]
    if gname not in dataset.schema.names:
        raise missing_column(gname, "group", dataset.schema.names)
    gtype = dataset.schema.field(gname).type
    check_label_type(gtype.value_type if pa.types.is_dictionary(gtype) else gtype, gname)
    est = get_estimator(estimator)
    # The options and the columns, checked once before any row is read: the same call on
    # no rows (an empty dataset then fails as a full one would).
    compute_advantages(dataset.schema.empty_table(), estimator, columns, **options)
    batch_scope = any(c.scope == "batch" for c in est.components)

    seen = _SeenIds()
    seen_trajectories = _SeenIds()
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    pending_start = 0  # dataset row of pending's first row
    last_key = None  # key of the group pending ends with (it may go on)
    last_start = 0  # pending row where that group begins
    chunks = 0

    def emit(upto):
        """Compute and drop the first ``upto`` pending rows (whole groups)."""
        nonlocal pending, pending_rows, pending_start, chunks
        table = pa.Table.from_batches(pending, schema=dataset.schema)
        head, tail = table.slice(0, upto), table.slice(upto)
        if chunks == 1 and batch_scope:
            warnings.warn(f"estimator {est.name!r} has batch-scope components: each chunk of "
                          f"about {batch_rows:,} rows is normalized as its own batch",
                          stacklevel=3)
        chunks += 1
        try:
            out = compute_advantages(head, estimator, columns, **options)
        except MicaInputError as err:
            raise _shift_rows(err, pending_start) from None
        _check_trajectories(seen_trajectories, head, tname, gname, pending_start)
        pending = tail.to_batches()
        pending_rows = tail.num_rows
        pending_start += upto
        return out

    row = 0  # dataset row of the incoming batch's first row
    # Little read-ahead: the scanner's buffers count against the memory bound.
    scan = dataset.to_batches(batch_size=min(batch_rows, 1 << 17), batch_readahead=2,
                              fragment_readahead=1)
    for batch in scan:
        n = batch.num_rows
        if n == 0:
            continue
        ids = batch.column(gname)
        if ids.null_count:
            first = int(np.flatnonzero(np.asarray(ids.is_null()))[0])
            raise null_value(gname, row + first)
        if pa.types.is_dictionary(ids.type):
            ids = ids.cast(ids.type.value_type)
        try:
            keys = _SeenIds.keys(ids, gname)
        except MicaInputError as err:
            raise _shift_rows(err, row) from None
        starts = _runs(keys)
        # A first run that continues the group pending ends with is not a new appearance;
        # otherwise that group is finished.
        continued = last_key is not None and np.array_equal(keys[0], last_key)
        fresh = starts[1:] if continued else starts
        fresh_keys = keys[fresh]
        finished = [] if continued or last_key is None else [last_key]
        again = seen.first_seen(fresh_keys)
        probe = _SeenIds._view(fresh_keys)
        if finished:
            lk = _SeenIds._view(np.asarray(last_key).reshape((1,) + keys.shape[1:]))
            hits = np.flatnonzero(probe == lk[0])
            if hits.size and (again < 0 or hits[0] < again):
                again = int(hits[0])
        if len(probe) > 1:
            _, first_idx, counts = np.unique(probe, return_index=True, return_counts=True)
            for d in probe[first_idx[counts > 1]]:
                second = int(np.flatnonzero(probe == d)[1])
                if again < 0 or second < again:
                    again = second
        if again >= 0:
            r = int(fresh[again])
            raise group_not_together(gname, row + r, _label(ids, r))
        # Every run but the batch's last one is finished now.
        done = fresh_keys[:-1] if len(fresh_keys) else fresh_keys
        if finished:
            done = np.concatenate([np.asarray(finished).reshape((1,) + keys.shape[1:]), done])
        seen.add(done)
        if len(starts) > 1 or not continued:
            last_start = pending_rows + int(starts[-1])  # pending row where it begins
        pending.append(batch)
        pending_rows += n
        last_key = keys[-1].copy()
        row += n
        if pending_rows >= batch_rows and last_start > 0:
            # Everything before the last group (which may go on) is complete.
            cut = last_start
            yield emit(cut)
            last_start = 0
    if pending_rows:
        yield emit(pending_rows)


def _output_schema(schema: pa.Schema) -> pa.Schema:
    fields = [f for f in schema if f.name not in OUTPUT_COLUMNS]
    return pa.schema(fields + [pa.field(n, pa.float64()) for n in OUTPUT_COLUMNS])


def write_advantages(in_path, out_path, estimator="mica",
                     columns: Mapping[str, str] | None = None, *, overwrite: bool = False,
                     batch_rows: int = DEFAULT_BATCH_ROWS, format: str = "parquet",
                     compression: str = "zstd", on_chunk=None, **options) -> int:
    """Stream ``in_path`` through :func:`iter_advantages` into the Parquet file ``out_path``.

    ``on_chunk(rows_written)``, when given, is called after each chunk (progress reporting).

    Written to a temporary file in the output's folder, then renamed into place: a failed
    run leaves no partial output, and an existing ``out_path`` is never replaced unless
    ``overwrite=True``. Returns the number of rows written.
    """
    import pyarrow.parquet as pq

    from .atomic import atomic_path

    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True to replace it")
    writer = None
    rows = 0
    try:
        with atomic_path(out_path, overwrite=overwrite, suffix=".parquet.tmp") as tmp:
            try:
                for table in iter_advantages(in_path, estimator, columns,
                                             batch_rows=batch_rows, format=format, **options):
                    if writer is None:
                        schema = table.schema
                        writer = pq.ParquetWriter(tmp, schema, compression=compression,
                                                  **parquet_write_options(schema))
                    elif table.schema != schema:
                        table = table.cast(schema)
                    writer.write_table(table)
                    rows += table.num_rows
                    if on_chunk is not None:
                        on_chunk(rows)
                if writer is None:  # no rows: an empty file with the output columns
                    schema = _output_schema(open_dataset(in_path, format).schema)
                    writer = pq.ParquetWriter(tmp, schema, compression=compression,
                                              **parquet_write_options(schema))
            finally:
                if writer is not None:
                    writer.close()
    except FileExistsError:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True to replace it") from None
    return rows
