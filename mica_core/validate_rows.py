"""The rules of per-row turn signals, as trainers hand them to mica: one entry per row (verl)
or per completion (TRL), each a number, a list per turn or a list of state vectors. The
shared adapter layer (:mod:`mica_core.turns`) and the framework integrations
(:mod:`mica_core.integrations`) check their fields through this module; the value rules
(finite, non-negative distances...) are :mod:`mica_core.validate`'s.
"""

from __future__ import annotations

import numpy as np

from ._errors import MicaInputError

__all__ = ["entries", "host", "numbers"]


def host(value):
    """A torch tensor (on any device) as a numpy array; anything else as it is."""
    if hasattr(value, "detach"):  # a torch tensor, possibly on an accelerator
        return value.detach().cpu().numpy()
    return value


def numbers(column, row, value, *, noun="row", dtype=np.float64, hint=""):
    """The entry of row ``row`` of ``column`` as an array: present (``hint`` says what to
    give instead of nothing) and numeric."""
    if value is None:
        raise MicaInputError(f"no value for this {noun}{hint}", column=column, row=row,
                             rule=f"a value per {noun}")
    try:
        return np.asarray(host(value), dtype=dtype)
    except (TypeError, ValueError):
        raise MicaInputError(f"not numeric: {type(value).__name__} {str(value)[:60]!r}",
                             column=column, row=row, rule="numbers") from None


def entries(column, col, n, *, noun="row", source=None):
    """``col``, checked to hold one entry per row (``n`` rows); ``source`` names what
    returned it (e.g. ``turn_signals_func``)."""
    if isinstance(col, (str, bytes)) or not hasattr(col, "__len__"):
        raise MicaInputError(f"needs one entry per {noun}; got {type(col).__name__}",
                             column=column, rule=f"one entry per {noun}")
    if len(col) != n:
        who = f"{source} returned" if source else "has"
        raise MicaInputError(f"{who} {len(col)} entries for {n} {noun}s", column=column,
                             rule=f"one entry per {noun}")
    return col


def row_shape(column, row, what, shape, noun="row") -> MicaInputError:
    """An entry of the wrong shape: ``what`` it needs (``"a list of numbers"``...)."""
    return MicaInputError(f"needs {what} per {noun}; got shape {shape}", column=column, row=row,
                          rule="shape")


def initial_shape(column, row, shape, got) -> MicaInputError:
    return MicaInputError(f"needs shape {shape}; got {got}", column=column, row=row,
                          rule="shape")


def several_signals(column, detail) -> MicaInputError:
    """More than one per-turn signal (or none of several required ones); ``detail`` names
    what was given."""
    return MicaInputError(detail, column=column, rule="one per-turn signal")


def labels_per_row(column, n, got, what="label") -> MicaInputError:
    return MicaInputError(f"needs one {what} per row ({n}); got {got}", column=column,
                          rule="length")


def values_per_turn(column, row, got, turns, what="values") -> MicaInputError:
    """A row's list holds another number of values than the row has turns."""
    rule = "one key per turn" if what == "keys" else "one value per turn"
    return MicaInputError(f"has {got} {what} but the row has {turns} turns", column=column,
                          row=row, rule=rule)


def state_width(column, row, width, first_row, first_width) -> MicaInputError:
    return MicaInputError(f"state vectors of {width} values; row {first_row} has {first_width}",
                          column=column, row=row, rule="one state width")


def initial_required(column, signal) -> MicaInputError:
    """IDR from ``signal`` (distances or states) without the value before the first reply."""
    return MicaInputError(f"{signal} needs {column} (the value before the first reply) for IDR",
                          column=column, rule="required")


def keys_required(column, estimator, detail="give one key per turn of each row (e.g. an "
                                            "anchor-state hash)") -> MicaInputError:
    return MicaInputError(f"estimator {estimator!r} groups turns by a key: {detail}",
                          column=column, rule="required")


def required(column, detail) -> MicaInputError:
    """A field an integration needs and did not get; ``detail`` says what to pass and how."""
    return MicaInputError(detail, column=column, rule="required")


def unknown_field(column, source, known) -> MicaInputError:
    return MicaInputError(f"{source} returned an unknown field; known: {', '.join(known)}",
                          column=column, rule="known field")


# --------------------------------------------------------------------------- tool calls
# Per-call signals (TRL's tool loop): one value per executed tool call, assigned to turns.


def tool_messages(row, detail) -> MicaInputError:
    """A completion that is not assistant and tool messages, starting with an assistant
    message; ``detail`` says what was found."""
    return MicaInputError(detail, column="completions", row=row,
                          rule="assistant and tool messages")


def values_per_call(column, row, values, executed, also="") -> MicaInputError:
    return MicaInputError(f"{values} values but the completion has {executed} executed tool "
                          f"calls{also}; record one value per call the environment executes",
                          column=column, row=row, rule="one value per executed tool call")


def no_value_before(column, row, turn) -> MicaInputError:
    return MicaInputError(f"turn {turn} executed no tool call, so it keeps the value before it, "
                          f"but there is none; give {column}", column=column, row=row,
                          rule="a value before a turn without a call")


def calls_without_tool_loop(column) -> MicaInputError:
    return MicaInputError("per-call signals need TRL's tool loop (tools= or "
                          "environment_factory=); give per-turn fields instead", column=column,
                          rule="tool loop")


# --------------------------------------------------------------------------- verl
# verl's batches: v1 rows keyed {uid}_{session}_{index}, the algorithm.mica options.


def batch_key_format(row, key) -> MicaInputError:
    return MicaInputError(f"batch key {key!r} is not verl's {{uid}}_{{session}}_{{index}}",
                          column="batch_keys", row=row, rule="v1 key format")


def duplicate_batch_key(row, first, key) -> MicaInputError:
    return MicaInputError(f"rows {first} and {row} have the same key {key!r}",
                          column="batch_keys", row=row, rule="unique keys")


def per_turn_signal_required(column, detail) -> MicaInputError:
    """A multi-turn batch (or turn) without any per-turn signal where one is required."""
    return MicaInputError(detail, column=column, rule="per-turn signal required")


def adr_needs_distances(estimator) -> MicaInputError:
    return MicaInputError(f"estimator {estimator!r} computes ADR (-D_t) from distances: pass "
                          f"distances= (or states=), not rewards=", column="rewards",
                          rule="distances for ADR")
