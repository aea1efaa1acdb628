"""EMPA's rubrics: the 9-indicator initial rubric and the 6-indicator progress rubric.

Keys follow EMPA (arXiv 2603.00552) so that a judge's JSON loads as it is.

Initial rubric (one level ``0..3`` per indicator, three indicators per axis)::

    value(indicator) = -2 * weight(indicator) * level      (level 0 -> 0)
    s0[axis]         = sum of its three indicator values

so weight x1 gives -2/-4/-6, x1.5 gives -3/-6/-9 and x2 gives -4/-8/-12 for levels 1/2/3.
Default weights (``INDICATOR_WEIGHTS``) are EMPA's published IED scoring key
(``IED_SCORING_KEY`` in ``Benchmark/epj/scoring.py`` of the EMPA authors' benchmark code,
github.com/KAYA-HAI/EMPA-Benchmark-EPMSandbox)::

    C.1 x1    C.2 x1    C.3 x1.5
    A.1 x1    A.2 x2    A.3 x1.5
    P.1 x1    P.2 x2    P.3 x1.5

so the cognitive axis lies in ``[-21, 0]`` and the affective and proactive axes in ``[-27, 0]``.

Progress rubric (one judgement per turn)::

    X.Prog in {0, 1, 2}   ->  0 / +1 / +3           on every axis
    C.Neg  in {0, -1, -2} ->  0 / -2 / -4
    A.Neg, P.Neg          ->  0 / -2 / -5
    increment[axis] = value(X.Prog) + value(X.Neg)
"""

from __future__ import annotations

import math
from typing import Mapping

from mica_core import MicaInputError

__all__ = [
    "AXES",
    "INITIAL_KEYS",
    "PROGRESS_KEYS",
    "INDICATOR_WEIGHTS",
    "PROGRESS_VALUES",
    "SETBACK_VALUES",
    "parse_initial_rubric",
    "input_error",
    "parse_progress_rubric",
    "initial_state",
    "progress_increment",
]

AXES = ("C", "A", "P")
"""Axis order of every state vector: cognitive, affective, proactive."""

INITIAL_KEYS = tuple(f"{axis}.{i}" for axis in AXES for i in (1, 2, 3))
PROGRESS_KEYS = tuple(f"{axis}.{kind}" for axis in AXES for kind in ("Prog", "Neg"))

INDICATOR_WEIGHTS = {
    "C.1": 1.0, "C.2": 1.0, "C.3": 1.5,
    "A.1": 1.0, "A.2": 2.0, "A.3": 1.5,
    "P.1": 1.0, "P.2": 2.0, "P.3": 1.5,
}
"""Default weight of each initial indicator: EMPA's IED scoring key (module docstring)."""

_ALLOWED_WEIGHTS = (1.0, 1.5, 2.0)


def input_error(message, *, column=None, row=None, rule=None):
    """A ``MicaInputError`` whose text starts with ``message`` (which already names the file,
    line and key) and whose ``column`` / ``row`` / ``rule`` attributes are still set."""
    err = MicaInputError(message, rule=rule)
    err.column, err.row = column, row
    return err


def iter_jsonl(lines, name):
    """``(lineno, where, obj)`` for each non-blank line of a JSON-lines file, where ``where``
    is the ``"name:lineno: "`` prefix of error messages. ``lines`` may be text or bytes (a
    file opened in binary mode, so that bad UTF-8 is reported with its line); a line that is
    not UTF-8, not JSON, or nested too deeply to read raises naming the line."""
    import json

    for lineno, line in enumerate(lines, start=1):
        where = f"{name}:{lineno}: "
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise input_error(f"{where}not valid UTF-8 (byte {e.start + 1} of the line)",
                                  rule="utf-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise input_error(f"{where}not valid JSON ({e.msg})", rule="json") from None
        except RecursionError:
            raise input_error(f"{where}nested too deeply to read as JSON", rule="json") from None
        yield lineno, where, obj

PROGRESS_VALUES = {0: 0, 1: 1, 2: 3}
"""``X.Prog`` level -> state change, the same on every axis."""

SETBACK_VALUES = {
    "C": {0: 0, -1: -2, -2: -4},
    "A": {0: 0, -1: -2, -2: -5},
    "P": {0: 0, -1: -2, -2: -5},
}
"""``X.Neg`` level -> state change, per axis."""


def _as_level(value, key, allowed, where):
    """An integer level from a JSON value; bools, strings and fractions are rejected."""
    if isinstance(value, bool):
        raise input_error(f"{where}{key} must be an integer in {allowed}, got {value!r}",
                          column=key, rule="integer level")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise input_error(f"{where}{key} must be an integer in {allowed}, got {value!r}",
                          column=key, rule="integer level")
    if value not in allowed:
        raise input_error(f"{where}{key} = {value} is out of range {allowed}",
                          column=key, rule="level range")
    return value


def _parse(obj, keys, allowed_for, where):
    if not isinstance(obj, Mapping):
        raise input_error(f"{where}rubric must be a JSON object, got {type(obj).__name__}",
                          rule="object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise input_error(f"{where}rubric is missing keys {missing} (expected {list(keys)})",
                          column=missing[0], rule="missing key")
    return {k: _as_level(obj[k], k, allowed_for(k), where) for k in keys}


def parse_initial_rubric(obj, *, where=""):
    """Validate an initial rubric ``{"C.1": level, ..., "P.3": level}`` (levels ``0..3``).

    Extra keys (a judge's ``"reason"``) are ignored. Raises ``MicaInputError`` naming the key.
    Returns a new dict with exactly ``INITIAL_KEYS``.
    """
    return _parse(obj, INITIAL_KEYS, lambda k: (0, 1, 2, 3), where)


def parse_progress_rubric(obj, *, where=""):
    """Validate a progress rubric: ``X.Prog`` in ``{0, 1, 2}``, ``X.Neg`` in ``{0, -1, -2}``.

    Extra keys are ignored. Raises ``MicaInputError`` naming the key.
    """
    return _parse(obj, PROGRESS_KEYS,
                  lambda k: (0, 1, 2) if k.endswith("Prog") else (0, -1, -2), where)


def initial_state(rubric, weights=None):
    """Initial support state ``s0`` (tuple of 3 ints, order ``AXES``) from an initial rubric.

    ``s0[axis] = sum_i -2 * weight(axis.i) * level(axis.i)``.

    Args:
      rubric: mapping with the keys ``INITIAL_KEYS`` (levels ``0..3``).
      weights: optional mapping indicator -> weight in ``{1, 1.5, 2}``; defaults to
        ``INDICATOR_WEIGHTS``.
    """
    levels = parse_initial_rubric(rubric)
    w = dict(INDICATOR_WEIGHTS)
    if weights is not None:
        for k, v in weights.items():
            if k not in w or float(v) not in _ALLOWED_WEIGHTS:
                raise input_error(f"indicator weight {k!r}={v!r}: keys are {list(INITIAL_KEYS)}, "
                                  f"weights one of {_ALLOWED_WEIGHTS}", column=k, rule="weight")
            w[k] = float(v)
    # -2 * w * level is an integer for w in {1, 1.5, 2} only when 2w*level is: always true.
    return tuple(int(round(sum(-2.0 * w[f"{a}.{i}"] * levels[f"{a}.{i}"] for i in (1, 2, 3))))
                 for a in AXES)


def progress_increment(rubric):
    """State increment (tuple of 3 ints, order ``AXES``) from a progress rubric."""
    levels = parse_progress_rubric(rubric)
    return tuple(PROGRESS_VALUES[levels[f"{a}.Prog"]] + SETBACK_VALUES[a][levels[f"{a}.Neg"]]
                 for a in AXES)
