"""The ``mica`` command line.

``mica advantages IN OUT`` mirrors :func:`mica_core.compute_advantages`: it reads Parquet,
Arrow IPC or CSV (by extension), writes Parquet atomically (a temporary file in OUT's folder,
then a rename) and keeps an existing OUT unless ``--force``. Bad input, and an OUT that cannot
be written (a missing folder, a directory, no permission), exit with status 2 and one line
naming the column, the first offending row and the rule (or the path and the reason).
SIGTERM and SIGINT stop the command with one line and status 143 or 130; the temporary file
is removed and OUT keeps its old content (or stays absent).

Commands load lazily (docs/architecture.md, "Commands"). ``mica advantages`` and ``mica
estimators`` import only what they run (numpy and pyarrow; never torch, never another
package's command). Other packages add subcommands through the entry-point group
``mica.commands``: each entry point's name is the command, its object a callable
``main(argv: list[str]) -> int``. They are listed from the installed distributions' metadata
alone and imported only when invoked, so a broken one cannot break the others:

- ``mica --help`` lists each added command as "see `mica NAME --help`" with its distribution:
  a one-line help text would need the command's module imported, and the command's own
  ``--help`` has the full text. A command whose top-level package is not installed is not
  listed.
- Whatever an added command raises while it is imported or while it runs (``SystemExit``
  at import, a syntax error, a missing attribute, a bad entry-point spec, any exception) is
  one line naming the command, its entry point and its distribution, exit status 2
  (``MICA_TRACEBACK=1`` prints the traceback too). A ``SystemExit`` with a status while the
  command runs is its exit status (``--help``, usage errors).
- Built-in commands cannot be taken over: an entry point named ``advantages`` or
  ``estimators`` is ignored. When several distributions register one name, the one of the
  distribution that ships ``mica`` itself wins (mica_train's ``env``, ``train``, ``eval``,
  ``tiny-model``, ``warm-start``, ``study`` and ``report``), else the first found. Each
  ignored entry point is named in a warning on stderr by ``mica --help`` and by the command
  it contended for.

The core never imports ``mica_train``; without it ``mica`` lists and runs the core commands
alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

COMMAND_GROUP = "mica.commands"
BUILTIN_COMMANDS = {
    "advantages": "per-turn reward, return and advantage of a trajectory table (Parquet, "
                  "Arrow IPC or CSV in; Parquet out)",
    "estimators": "list the registered estimators",
}
CORE_COMMANDS = tuple(BUILTIN_COMMANDS)
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


# --------------------------------------------------------------------------- added commands


@dataclass(frozen=True)
class Plugin:
    """An added command as its distribution's metadata declares it (nothing imported)."""

    name: str
    value: str  # the entry point's ``module:attribute``
    dist: str  # the distribution's name ("?" when unknown)
    entry_point: Any

    def describe(self) -> str:
        return f"{self.value!r} of distribution {self.dist!r}"


def _dist_name(ep) -> str:
    try:
        return ep.dist.name or "?"
    except Exception:  # no distribution, or unreadable metadata
        return "?"


def _home_distribution(eps) -> str | None:
    """The distribution that ships this ``mica`` (its console script runs this module)."""
    for ep in eps.select(group="console_scripts", name="mica"):
        if ep.value.replace(" ", "") == "mica_core.cli:main":
            return _dist_name(ep)
    return None


def _installed(value: str) -> bool:
    """Whether the top-level package of ``module:attribute`` can be found (nothing is
    imported; an error of the import system counts as absent)."""
    from importlib.util import find_spec

    top = value.split(":")[0].strip().split(".")[0]
    try:
        return bool(top) and find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def plugin_commands(ignored: list | None = None) -> dict[str, Plugin]:
    """``{name: Plugin}`` of the commands other packages add (group ``mica.commands``), from
    metadata only. Built-in names are ignored; of several entry points with one name, that
    of mica's own distribution wins, else the first found. ``ignored`` collects
    ``(name, one line saying why)`` per ignored entry point."""
    from importlib.metadata import entry_points

    eps = entry_points()
    home = _home_distribution(eps)
    found: dict[str, Plugin] = {}
    notes = [] if ignored is None else ignored
    for ep in eps.select(group=COMMAND_GROUP):
        plugin = Plugin(ep.name, ep.value, _dist_name(ep), ep)
        if ep.name in BUILTIN_COMMANDS:
            notes.append((ep.name, f"ignored the command {ep.name!r} ({plugin.describe()}): "
                                   f"{ep.name!r} is a built-in command"))
            continue
        other = found.get(ep.name)
        if other is None:
            found[ep.name] = plugin
            continue
        if (other.value, other.dist) == (plugin.value, plugin.dist):
            continue  # one distribution found twice on the path
        keep, drop = (plugin, other) if plugin.dist == home != other.dist else (other, plugin)
        found[ep.name] = keep
        notes.append((ep.name, f"ignored the command {ep.name!r} ({drop.describe()}): "
                               f"{keep.describe()} provides it"))
    return found


def _plugin_failure(plugin: Plugin, when: str, exc: BaseException) -> int:
    if os.environ.get("MICA_TRACEBACK", "") not in ("", "0"):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
    if isinstance(exc, SystemExit):
        what = f"exited with status {exc.code!r}"
    else:
        text = str(exc).strip().splitlines()
        what = type(exc).__name__ + (f": {text[0]}" if text else "")
    sys.stderr.write(f"mica: error: the {plugin.name!r} command ({plugin.describe()}) "
                     f"failed {when}: {what}\n")
    return 2


def _exit_status(code) -> int | None:
    """An exit status given as ``None`` or an int in 0..255, else ``None``."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 255:
        return code
    return None


def _run_plugin(plugin: Plugin, argv: list[str]) -> int:
    """Import and run an added command. Everything it raises becomes one line and status 2,
    except ``KeyboardInterrupt`` and SIGTERM (handled as for the built-in commands) and a
    ``SystemExit`` with a status while it runs (its exit status: ``--help``, usage errors)."""
    try:
        fn = plugin.entry_point.load()
    except (KeyboardInterrupt, Terminated):
        raise
    except ImportError as exc:
        text = str(exc).strip().splitlines()
        sys.stderr.write(f"mica: error: the {plugin.name!r} command cannot be loaded "
                         f"({plugin.describe()}): {text[0] if text else type(exc).__name__}\n")
        return 2
    except BaseException as exc:  # noqa: BLE001 - SystemExit and syntax errors included
        return _plugin_failure(plugin, "while loading", exc)
    if not callable(fn):
        sys.stderr.write(f"mica: error: the {plugin.name!r} command ({plugin.describe()}) "
                         f"is not callable\n")
        return 2
    try:
        code = fn(argv)
    except (KeyboardInterrupt, Terminated):
        raise
    except SystemExit as exc:
        status = _exit_status(exc.code)
        return status if status is not None else _plugin_failure(plugin, "while running", exc)
    except BaseException as exc:  # noqa: BLE001
        return _plugin_failure(plugin, "while running", exc)
    status = _exit_status(code)
    if status is None:
        sys.stderr.write(f"mica: error: the {plugin.name!r} command ({plugin.describe()}) "
                         f"returned {code!r}, not an exit status\n")
        return 2
    return status


# --------------------------------------------------------------------------- parsers


def _top_parser(plugins: dict[str, Plugin]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mica",
        description="mica: multi-turn credit assignment (MICA) for RL on language models.",
        epilog="Commands added by other packages are imported only when they run; "
               "`mica NAME --help` shows a command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in BUILTIN_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    for name, plugin in sorted(plugins.items()):
        if _installed(plugin.value):
            sub.add_parser(name, add_help=False,
                           help=f"see `mica {name} --help` (from {plugin.dist})")
    return p


def _advantages_parser() -> argparse.ArgumentParser:
    a = argparse.ArgumentParser(
        prog="mica advantages",
        description="Compute per-turn reward, return and advantage columns. Rows may come "
                    "in any order; the output keeps the input order.")
    a.add_argument("input", metavar="IN", help="trajectory table: .parquet/.pq (a file or a "
                   "folder of Parquet files), .arrow/.ipc/.feather (Arrow IPC) or .csv")
    a.add_argument("output", metavar="OUT", help="output Parquet file (.parquet or .pq)")
    a.add_argument("--estimator", default="mica", help="registered estimator (default: mica; "
                   "see `mica estimators`)")
    from .options import add_arguments

    add_arguments(a, "table")  # --gamma, --weight, ..., --backend: mica_core.options
    for role, default in (("group", "group_id"), ("traj", "traj_id"), ("turn", "turn"),
                          ("distance", "distance"), ("initial-distance", "initial_distance"),
                          ("state", "state"), ("initial-state", "initial_state"),
                          ("reward", "reward"), ("distances", "distances"),
                          ("rewards", "rewards"), ("key", "key"), ("keys", "keys")):
        a.add_argument(f"--{role}-col", default=default, metavar="NAME",
                       help=f"{role.replace('-', ' ')} column (default: {default})")
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
    return a


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
    from .io import UnreadableInput, input_format

    try:
        return input_format(path)
    except UnreadableInput as exc:
        raise CliError(str(exc)) from None


def _read_table(path: str):
    from .io import UnreadableInput, read_table

    try:
        return read_table(path, _input_format(path))
    except UnreadableInput as exc:
        raise CliError(str(exc)) from None


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
    """Write ``table`` to ``path`` as Parquet, atomically (:func:`mica_core.io.write_parquet_atomic`):
    an existing ``path`` is kept unless ``force``; a failed write leaves nothing behind."""
    from .io import write_parquet_atomic as write

    try:
        write(table, path, overwrite=force)
    except FileExistsError:
        raise CliError(f"{path} exists; pass --force to overwrite it") from None


def _advantages(args) -> int:
    from . import compute_advantages
    from .options import TABLE_SPELLING, options_from_args

    _check_output(args.output, args.force)
    if args.batch_rows is not None and args.batch_rows < 1:
        raise CliError(f"--batch-rows must be >= 1; got {args.batch_rows}")
    columns = {"group": args.group_col, "traj": args.traj_col, "turn": args.turn_col,
               "distance": args.distance_col, "initial_distance": args.initial_distance_col,
               "state": args.state_col, "initial_state": args.initial_state_col,
               "reward": args.reward_col, "distances": args.distances_col,
               "rewards": args.rewards_col, "key": args.key_col, "keys": args.keys_col}
    options = options_from_args(args, "table").for_surface("table", TABLE_SPELLING)
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


def _should_stream(args) -> bool:
    from .estimators import get_estimator
    from .io import count_rows

    if args.stream == "off":
        return False
    fmt = _input_format(args.input)
    if args.stream == "on":
        return True
    has_batch_scope = any(c.scope == "batch" for c in get_estimator(args.estimator).components)
    rows = count_rows(args.input, fmt)
    return not has_batch_scope and rows is not None and rows >= STREAM_MIN_ROWS


def _advantages_streamed(args, columns, options) -> int:
    from .io import count_rows
    from .stream import DEFAULT_BATCH_ROWS, write_advantages

    fmt = _input_format(args.input)
    total = count_rows(args.input, fmt)
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
    except BrokenPipeError:
        # The reader of stdout closed it (`mica estimators | head`): stop quietly, as a
        # program killed by SIGPIPE does; stdout goes to devnull so the interpreter's final
        # flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _warn(ignored, command=None):
    for name, line in ignored:
        if command is None or name == command:
            sys.stderr.write(f"mica: warning: {line}\n")


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command in BUILTIN_COMMANDS:
        return _builtin(command, argv[1:])
    ignored: list[tuple[str, str]] = []
    plugins = plugin_commands(ignored)
    if command in plugins:
        _warn(ignored, command)
        return _run_plugin(plugins[command], argv[1:])
    parser = _top_parser(plugins)
    if command in ("-h", "--help"):
        _warn(ignored)
    parser.parse_args(argv)  # --help, or a usage error naming the commands
    parser.print_help()  # no command at all
    return 2


def _builtin(command: str, argv: list[str]) -> int:
    if command == "advantages":
        args = _advantages_parser().parse_args(argv)
    else:
        args = argparse.ArgumentParser(prog="mica estimators",
                                       description=BUILTIN_COMMANDS[command]).parse_args(argv)
    from ._errors import MicaInputError

    try:
        if command == "advantages":
            return _advantages(args)
        return _estimators()
    except BrokenPipeError:  # the reader went away (`mica estimators | head`): main handles it
        raise
    except (CliError, MicaInputError, ValueError, OSError) as exc:
        text = _os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        msg = text.splitlines()[0] if text else type(exc).__name__
        sys.stderr.write(f"mica: error: {msg}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
