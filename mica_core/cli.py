"""The ``mica`` command line.

``mica advantages IN OUT`` mirrors :func:`mica_core.compute_advantages`: it reads Parquet,
Arrow IPC or CSV (by extension), writes Parquet atomically (a temporary file in OUT's folder,
then a rename) and keeps an existing OUT unless ``--force``. Bad input, and an OUT that cannot
be written (a missing folder, a directory, no permission), exit with status 2 and one line
naming the column, the first offending row and the rule (or the path and the reason).
SIGTERM and SIGINT stop the command with one line and status 143 or 130; the temporary file
is removed and OUT keeps its old content (or stays absent).

Other packages add subcommands through the entry-point group ``mica.commands``: each entry
point's name is the command, its object a callable ``main(argv: list[str]) -> int`` whose
docstring's first line is the help text. ``mica_train`` adds ``env``, ``train``, ``eval``,
``tiny-model``, ``warm-start`` and ``study`` this way; the core never imports it, and without
it ``mica`` lists and runs the core commands alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

COMMAND_GROUP = "mica.commands"
CORE_COMMANDS = ("advantages", "estimators")
READ_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "ipc", ".ipc": "ipc",
                   ".feather": "ipc", ".arrows": "ipc", ".csv": "csv"}
PROGRESS_MIN_ROWS = 1_000_000
STREAM_MIN_ROWS = 16_000_000  # --stream auto: about 1 GiB of value columns and outputs


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that ``finally`` blocks and :mod:`mica_core.atomic`
    clean up. A ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` does not
    swallow it."""


def _raise_terminated(signum, frame):
    raise Terminated()


def plugin_commands() -> dict:
    """``{name: entry point}`` of the subcommands other packages add (group ``mica.commands``).

    Core command names cannot be taken over; of two entry points with one name the first
    found wins."""
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=COMMAND_GROUP):
        if ep.name not in CORE_COMMANDS and ep.name not in found:
            found[ep.name] = ep
    return found


def _load_command(ep):
    """``(callable, None)``, or ``(None, why)`` when its package cannot be imported (a
    distribution that declares the command but lacks its optional package or a dependency)."""
    try:
        fn = ep.load()
    except ImportError as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not callable(fn):
        return None, f"{ep.value} is not callable"
    return fn, None


def _parser(plugins: dict | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mica",
        description="mica: multi-turn credit assignment (MICA) for RL on language models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser("advantages", help="per-turn reward, return and advantage of a "
                       "trajectory table (Parquet, Arrow IPC or CSV in; Parquet out)",
                       description="Compute per-turn reward, return and advantage columns. "
                       "Rows may come in any order; the output keeps the input order.")
    a.add_argument("input", metavar="IN", help="trajectory table: .parquet/.pq (a file or a "
                   "folder of Parquet files), .arrow/.ipc/.feather (Arrow IPC) or .csv")
    a.add_argument("output", metavar="OUT", help="output Parquet file (.parquet or .pq)")
    a.add_argument("--estimator", default="mica", help="registered estimator (default: mica; "
                   "see `mica estimators`)")
    a.add_argument("--gamma", type=float, default=None, help="discount (default: the preset's)")
    a.add_argument("--weight", type=float, default=0.5, help="w of mica/mica_adr/mapo (0.5)")
    a.add_argument("--eps", type=float, default=1e-6, help="added to the std (1e-6)")
    a.add_argument("--ddof", type=int, default=1, choices=(0, 1), help="std degrees of freedom")
    a.add_argument("--baseline", default="mean", choices=("mean", "loo"))
    a.add_argument("--scale", default="std", choices=("std", "none"))
    a.add_argument("--singleton", default="zero", choices=("zero", "raw"),
                   help="advantage of a bucket of one: 0, or the raw value (verl's GRPO)")
    a.add_argument("--backend", default="auto",
                   choices=("auto", "numpy", "cython", "numba", "torch"))
    a.add_argument("--source", default="auto", choices=("auto", "distance", "state", "reward"),
                   help="which value columns to read (auto: distance, else state, else reward)")
    for role, default in (("group", "group_id"), ("traj", "traj_id"), ("turn", "turn"),
                          ("distance", "distance"), ("initial-distance", "initial_distance"),
                          ("state", "state"), ("initial-state", "initial_state"),
                          ("reward", "reward"), ("distances", "distances"),
                          ("rewards", "rewards"), ("key", "key"), ("keys", "keys")):
        a.add_argument(f"--{role}-col", default=default, metavar="NAME",
                       help=f"{role.replace('-', ' ')} column (default: {default})")
    a.add_argument("--on-missing", default="raise", choices=("raise", "carry"),
                   help="NaN/null values: error (raise), or carry the previous distance "
                   "forward / use reward 0 (carry)")
    a.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                   help="process the input chunk by chunk of whole groups, with bounded memory "
                   "(rows of a group must be stored together). auto: Parquet inputs of "
                   f"{STREAM_MIN_ROWS:,}+ rows when the estimator has no batch-scope component "
                   "(batch statistics would become per-chunk)")
    a.add_argument("--batch-rows", type=int, default=None, metavar="N",
                   help="rows per streamed chunk, at least 1 (default 1,048,576)")
    a.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    a.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress on stderr (auto: for large inputs on a terminal)")

    sub.add_parser("estimators", help="list the registered estimators")
    for name, ep in sorted((plugins or {}).items()):
        fn, _ = _load_command(ep)
        if fn is not None:
            text = (fn.__doc__ or "").strip().splitlines()
            sub.add_parser(name, help=text[0] if text else None, add_help=False)
    return p


class _Progress:
    """One updating line on stderr: ``mica: [2/3] computing 12,000,000 rows   0.8s``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def show(self, text: str):
        if self.enabled:
            sys.stderr.write(f"\rmica: {text:<48} {time.perf_counter() - self.t0:6.1f}s")
            sys.stderr.flush()

    def done(self):
        if self.enabled:
            sys.stderr.write("\n")


def _input_format(path: str) -> str:
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    fmt = READ_EXTENSIONS.get(ext)
    if fmt is None and os.path.isdir(path):
        fmt = "parquet"  # a folder of Parquet files (a pyarrow dataset)
    if fmt is None:
        raise CliError(f"{path}: unknown input extension {ext!r} (use "
                       f"{', '.join(sorted(READ_EXTENSIONS))}, or a folder of Parquet files)")
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    return fmt


def _read_table(path: str):
    import pyarrow as pa

    fmt = _input_format(path)
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
        raise CliError(f"{path}: cannot read as {fmt}: {exc}".splitlines()[0]) from None


def _check_output(path: str, force: bool):
    """Refuse, before any work, an OUT that cannot or must not be written."""
    if os.path.splitext(path)[1].lower() not in (".parquet", ".pq"):
        raise CliError(f"{path}: OUT is written as Parquet; name it .parquet or .pq")
    if os.path.isdir(path):
        raise CliError(f"{path} is a directory; OUT names the Parquet file to write")
    if os.path.exists(path) and not force:
        raise CliError(f"{path} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{folder}: no such folder (OUT's folder must exist)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"{folder}: permission denied (cannot create OUT there)")


def _os_error_line(exc: OSError) -> str:
    """``path: reason`` of an OSError, without Python's ``[Errno N]`` prefix."""
    reason = exc.strerror or str(exc)
    path = exc.filename
    if path is not None and os.path.basename(os.fspath(path)).startswith("."):
        # A temporary sibling of OUT: name the folder the user chose instead.
        path = os.path.dirname(os.fspath(path)) or "."
    return f"{os.fspath(path)}: {reason}" if path is not None else reason


def write_parquet_atomic(table, path: str, *, force: bool = False):
    """Write ``table`` to ``path`` as Parquet, atomically (:mod:`mica_core.atomic`).

    An existing ``path`` is kept unless ``force``, also when another writer creates it while
    this one is writing; a failed write leaves nothing behind.
    """
    import pyarrow.parquet as pq

    from .arrow import parquet_write_options
    from .atomic import atomic_path

    if os.path.exists(path) and not force:
        raise CliError(f"{path} exists; pass --force to overwrite it")
    try:
        with atomic_path(path, overwrite=force, suffix=".parquet.tmp") as tmp:
            pq.write_table(table, tmp, **parquet_write_options(table.schema))
    except FileExistsError:
        raise CliError(f"{path} exists; pass --force to overwrite it") from None


def _advantages(args) -> int:
    from . import compute_advantages

    _check_output(args.output, args.force)
    if args.batch_rows is not None and args.batch_rows < 1:
        raise CliError(f"--batch-rows must be >= 1; got {args.batch_rows}")
    columns = {"group": args.group_col, "traj": args.traj_col, "turn": args.turn_col,
               "distance": args.distance_col, "initial_distance": args.initial_distance_col,
               "state": args.state_col, "initial_state": args.initial_state_col,
               "reward": args.reward_col, "distances": args.distances_col,
               "rewards": args.rewards_col, "key": args.key_col, "keys": args.keys_col}
    options = dict(source=args.source, gamma=args.gamma, weight=args.weight, eps=args.eps,
                   ddof=args.ddof, baseline=args.baseline, scale=args.scale,
                   singleton=args.singleton, backend=args.backend, on_missing=args.on_missing)
    if _should_stream(args):
        return _advantages_streamed(args, columns, options)
    table = _read_table(args.input)
    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()
                                     and table.num_rows >= PROGRESS_MIN_ROWS)
    progress = _Progress(show)
    progress.show(f"[1/3] computing {table.num_rows:,} rows")
    out = compute_advantages(table, args.estimator, columns, **options)
    progress.show("[2/3] writing " + args.output)
    write_parquet_atomic(out, args.output, force=args.force)
    progress.show("[3/3] done")
    progress.done()
    return 0


def _count_rows(path: str, fmt: str) -> int | None:
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


def _should_stream(args) -> bool:
    from .estimators import get_estimator

    if args.stream == "off":
        return False
    fmt = _input_format(args.input)
    if args.stream == "on":
        return True
    has_batch_scope = any(c.scope == "batch" for c in get_estimator(args.estimator).components)
    rows = _count_rows(args.input, fmt)
    return not has_batch_scope and rows is not None and rows >= STREAM_MIN_ROWS


def _advantages_streamed(args, columns, options) -> int:
    from .stream import DEFAULT_BATCH_ROWS, write_advantages

    fmt = _input_format(args.input)
    total = _count_rows(args.input, fmt)
    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    progress = _Progress(show)

    def on_chunk(rows: int):
        if total:  # Parquet: counted from the footers; CSV and IPC: not known in advance
            progress.show(f"{rows:,} / {total:,} rows ({100.0 * rows / total:3.0f}%)")
        else:
            progress.show(f"{rows:,} rows")

    batch_rows = DEFAULT_BATCH_ROWS if args.batch_rows is None else args.batch_rows
    try:
        write_advantages(args.input, args.output, args.estimator, columns,
                         overwrite=args.force, batch_rows=batch_rows, format=fmt,
                         on_chunk=on_chunk, **options)
    except FileExistsError as exc:
        raise CliError(str(exc).replace("overwrite=True", "--force")) from None
    progress.done()
    return 0


def _estimators() -> int:
    from .estimators import get_estimator, list_estimators

    for name in list_estimators():
        est = get_estimator(name)
        print(f"{name:<18} gamma={est.gamma:<5} {est.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``mica``; returns the exit status.

    SIGTERM becomes :class:`Terminated` while the command runs (where the process has not
    chosen to ignore it), so that a run stopped by a job scheduler or ``kill`` cleans up like
    one stopped by Ctrl-C: both print one line and exit with 128 + the signal number.
    """
    previous = None
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        return _main(argv)
    except KeyboardInterrupt:
        sys.stderr.write("mica: interrupted (SIGINT)\n")
        return 128 + signal.SIGINT
    except Terminated:
        sys.stderr.write("mica: interrupted (SIGTERM)\n")
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    if argv and argv[0] in plugins:
        fn, why = _load_command(plugins[argv[0]])
        if fn is None:
            sys.stderr.write(f"mica: error: the {argv[0]!r} command cannot be loaded "
                             f"({plugins[argv[0]].value}): {why}\n")
            return 2
        return fn(argv[1:])
    parser = _parser(plugins)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ._errors import MicaInputError

    try:
        if args.command == "advantages":
            return _advantages(args)
        return _estimators()
    except (CliError, MicaInputError, ValueError, OSError) as exc:
        text = _os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        msg = text.splitlines()[0] if text else type(exc).__name__
        sys.stderr.write(f"mica: error: {msg}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
