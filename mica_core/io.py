"""Input formats and containers: the one place that knows how tables are read and written.

- Files: :func:`input_format` (the format of a path, from its extension; a folder is a
  Parquet dataset), :func:`read_table` (Parquet, CSV, Arrow IPC file or stream),
  :func:`count_rows` (from Parquet footers, without reading data), :func:`open_dataset` (a
  ``pyarrow.dataset.Dataset`` for streaming a file, a folder or a list of files in batches).
- Containers: :func:`to_arrow_table` (pandas, polars, ``datasets``, mappings, anything with
  ``__arrow_c_stream__``, to an Arrow table).
- Writing: :func:`parquet_write_options` (how a table of advantages is encoded) and
  :func:`write_parquet_atomic` (a whole table, atomically, never over an existing file unless
  asked).

Used by ``compute_advantages`` (:mod:`mica_core.arrow`), streaming (:mod:`mica_core.stream`)
and the ``mica advantages`` command (:mod:`mica_core.cli`). docs/architecture.md, "Adding an
input format", says what to change for a new one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pyarrow as pa

from . import validate

__all__ = ["READ_EXTENSIONS", "UnreadableInput", "count_rows", "input_format", "open_dataset",
           "parquet_write_options", "read_table", "to_arrow_table", "write_parquet_atomic"]

#: file extension -> format name (``pyarrow.dataset``'s names: ``parquet``, ``ipc``, ``csv``)
READ_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "ipc", ".ipc": "ipc",
                   ".feather": "ipc", ".arrows": "ipc", ".csv": "csv"}


class UnreadableInput(ValueError):
    """A path that names no readable input: unknown extension, absent, or not in its format.
    The message is one line naming the path."""


# --------------------------------------------------------------------------- files


def input_format(path: str) -> str:
    """The format of ``path`` from its extension (:data:`READ_EXTENSIONS`); a folder is a
    Parquet dataset. Raises :class:`UnreadableInput` for another extension or an absent
    path."""
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    fmt = READ_EXTENSIONS.get(ext)
    if fmt is None and os.path.isdir(path):
        fmt = "parquet"  # a folder of Parquet files (a pyarrow dataset)
    if fmt is None:
        raise UnreadableInput(f"{path}: unknown input extension {ext!r} (use "
                              f"{', '.join(sorted(READ_EXTENSIONS))}, or a folder of Parquet "
                              f"files)")
    if not os.path.exists(path):
        raise UnreadableInput(f"{path}: no such file")
    return fmt


def read_table(path: str, fmt: str | None = None) -> pa.Table:
    """The whole of ``path`` as an Arrow table (``fmt``: default from the extension)."""
    fmt = fmt or input_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if fmt == "csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        with pa.memory_map(path) as src:
            try:
                return pa.ipc.open_file(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                return pa.ipc.open_stream(src).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableInput(f"{path}: cannot read as {fmt}: {exc}".splitlines()[0]) from None


def count_rows(path: str, fmt: str) -> int | None:
    """Rows of a Parquet file or folder, from the footers only; None for other formats (their
    rows are not known without reading them) or an unreadable path (the reader reports it)."""
    if fmt != "parquet":
        return None
    try:
        if os.path.isfile(path):  # the footer only, without importing pyarrow.dataset
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows
        import pyarrow.dataset as ds

        return ds.dataset(path, format="parquet").count_rows()  # footers only
    except Exception:  # unreadable: let the reader report it
        return None


def open_dataset(source, format):
    """A ``pyarrow.dataset.Dataset`` over a path (file or folder), a list of paths, or a
    dataset (returned as it is), to read in batches (``dataset.to_batches``)."""
    import pyarrow.dataset as ds

    if isinstance(source, ds.Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
        paths = path
    elif isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
    else:
        raise TypeError(f"source must be a path, a list of paths or a pyarrow.dataset.Dataset; "
                        f"got {type(source).__name__}")
    try:
        return ds.dataset(paths, format=format)
    except pa.ArrowInvalid as exc:
        if "duplicate field names" in str(exc):
            _raise_duplicate_column(paths, format)
        raise


def _raise_duplicate_column(paths, format):
    """Name the repeated column of the first file that has one (the dataset's own error
    does not say which)."""
    import pyarrow.dataset as ds
    from pyarrow.fs import LocalFileSystem

    if isinstance(paths, str) and os.path.isdir(paths):
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(paths)
                       for f in files if not f.startswith((".", "_")))
    # The FileFormat object for a format name, as ds.dataset resolves it.
    file_format = ds.dataset([], format=format).format if isinstance(format, str) else format
    local = LocalFileSystem()
    for path in [paths] if isinstance(paths, str) else paths:
        names = file_format.inspect(os.path.abspath(path), filesystem=local).names
        for name in names:
            if names.count(name) > 1:
                raise validate.duplicate_column(name, names.count(name))


# --------------------------------------------------------------------------- containers


def to_arrow_table(obj) -> pa.Table:
    """An Arrow table from a Table, RecordBatch, pandas/polars DataFrame, datasets.Dataset,
    a mapping of columns, or any object with ``__arrow_c_stream__``."""
    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    mod = type(obj).__module__
    if mod.startswith("pandas"):
        try:
            return pa.Table.from_pandas(obj, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            _raise_unconvertible_column(obj)
            raise
    if mod.startswith("polars"):
        return obj.to_arrow()
    if mod.startswith("datasets"):
        ds = obj if obj._indices is None else obj.flatten_indices()
        return ds.data.table
    if isinstance(obj, Mapping):
        return pa.table(dict(obj))
    if hasattr(obj, "__arrow_c_stream__"):
        return pa.table(obj)
    raise TypeError(f"expected an Arrow table, RecordBatch, pandas/polars DataFrame or "
                    f"datasets.Dataset; got {type(obj).__name__}")


def _raise_unconvertible_column(frame):
    """Name the first column of a pandas DataFrame that Arrow cannot hold, and its first row
    whose value is of another kind than the column's first value (``1`` and ``"1"`` in one
    object column: Arrow columns hold one type)."""
    for name in frame.columns:
        try:
            pa.array(frame[name], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            values = frame[name].tolist()
            kinds = [type(v) for v in values if v is not None]
            row = next((i for i, v in enumerate(values)
                        if v is not None and type(v) is not kinds[0]), None) if kinds else None
            found = f"{kinds[0].__name__} and {type(values[row]).__name__}" if row is not None \
                else str(exc).splitlines()[0]
            raise validate.mixed_kinds(str(name), row, found) from None


# --------------------------------------------------------------------------- writing


def parquet_write_options(schema: pa.Schema) -> dict:
    """Keyword arguments of ``pyarrow.parquet.write_table``/``ParquetWriter`` for a table of
    advantages: floating-point columns (the computed outputs, distances) are written plain,
    other columns (ids, turns, keys) with pyarrow's dictionary encoding. Measured on 10M
    turns: measured values rarely repeat, so a dictionary attempt on them costs a third of the
    write and makes the file no smaller (docs/performance.md)."""
    return {"use_dictionary": [f.name for f in schema if not pa.types.is_floating(f.type)]}


def write_parquet_atomic(table: pa.Table, path: str, *, overwrite: bool = False):
    """Write ``table`` to ``path`` as Parquet, atomically (:mod:`mica_core.atomic`).

    An existing ``path`` is kept unless ``overwrite``, also when another writer creates it
    while this one is writing (``FileExistsError``); a failed write leaves nothing behind.
    """
    import pyarrow.parquet as pq

    from .atomic import atomic_path

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(path)
    with atomic_path(path, overwrite=overwrite, suffix=".parquet.tmp") as tmp:
        pq.write_table(table, tmp, **parquet_write_options(table.schema))
