"""Estimator options: one typed declaration that every front end derives from.

:class:`EstimatorOptions` holds each option's type, default, allowed values and help text.
The front ends take their option names, types, defaults and help from its fields, and check
what users type with :func:`options_from_mapping` / :func:`check_option`, so an unknown or
ill-typed option gets the same one-line :class:`mica_core.MicaInputError` everywhere:

==================================  =======================================================
front end                           spelling of an option
==================================  =======================================================
:func:`mica_core.estimate`          keyword (``gamma=``); surface ``estimate``
:func:`mica_core.compute_advantages` keyword; ``state_epsilon`` is ``epsilon``, ``state_kind``
                                    is ``distance_kind`` (surface ``table``)
``mica advantages``                 ``--gamma``, ``--on-missing``, ``--state-weights`` ...
trainer config                      ``advantage.options: {gamma: 0.9}`` (surface ``table``)
TRL ``MicaGRPOConfig``              ``mica_gamma`` ... (surface ``turns``)
verl ``algorithm.mica``             ``gamma``; ``distance_weights``, ``distance_epsilon``,
                                    ``distance_kind`` for the state options (surface ``turns``)
==================================  =======================================================

This module imports nothing beyond the standard library (``mica advantages --help`` builds
its flags from it without numpy). :data:`BACKENDS` is the one table of backend names.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from . import validate_options as _vo

__all__ = [
    "BACKENDS",
    "EstimatorOptions",
    "OPTION_NAMES",
    "SURFACES",
    "TABLE_SPELLING",
    "add_arguments",
    "options_from_args",
    "check_option",
    "option_fields",
    "options_from_mapping",
    "unknown_option",
]

#: every backend name, ``auto`` first (:func:`mica_core.estimate`'s ``backend``)
BACKENDS = ("auto", "numpy", "cython", "numba", "torch")
BASELINES = ("mean", "loo")
SCALES = ("std", "none")
SINGLETONS = ("zero", "raw")
ON_MISSING = ("raise", "carry")
SOURCES = ("auto", "distance", "state", "reward")
STATE_KINDS = ("hinge", "norm")
LONE_ROLLOUT = ("zero", "within")

#: the front ends: ``estimate`` (arrays), ``table`` (tables: ``compute_advantages``, the CLI,
#: the trainer), ``turns`` (per-turn adapters: TRL, verl)
SURFACES = ("estimate", "table", "turns")
_NORM = ("estimate", "table", "turns")


def _opt(default, help, rule, *, choices=None, surfaces=_NORM, low=None, high=None,
         low_open=False, nullable=False, kind="str"):
    """A field of :class:`EstimatorOptions` with what front ends and checks need (``rule``
    None: "one of" the choices)."""
    if rule is None:
        rule = "one of " + ", ".join(map(repr, choices)) + (" or None" if nullable else "")
    return field(default=default, metadata={
        "help": help, "rule": rule, "choices": choices, "surfaces": surfaces, "low": low,
        "high": high, "low_open": low_open, "nullable": nullable, "kind": kind})


@dataclass(frozen=True)
class EstimatorOptions:
    """Every option of mica's estimators, checked on construction (:func:`check_option`).

    ``EstimatorOptions(weight=0.7)`` holds the defaults for the rest; ``None`` for ``gamma``
    takes the estimator's own discount, for ``lone_rollout`` follows ``singleton``.
    """

    gamma: Optional[float] = _opt(
        None, "discount of the per-turn return (default: the preset's; 0.85, grpo and "
        "reinforce_pp 1.0)", "a number in [0, 1] or None", low=0.0, high=1.0, nullable=True,
        kind="float")
    weight: float = _opt(0.5, "w of the two-component presets (mica, mica_adr, mapo)",
                         "a number in [0, 1]", low=0.0, high=1.0, kind="float")
    eps: float = _opt(1e-6, "added to the std in every z-score", "a finite number >= 0",
                      low=0.0, kind="float")
    ddof: int = _opt(1, "delta degrees of freedom of the std", "0 or 1", choices=(0, 1),
                     kind="int")
    baseline: str = _opt("mean", "'mean', or 'loo' (leave-one-out mean of the others)",
                         None, choices=BASELINES)
    scale: str = _opt("std", "'std' (z-score) or 'none' (centre only)", None,
                      choices=SCALES)
    singleton: str = _opt("zero", "advantage of a bucket of one: 0 ('zero') or the raw value "
                          "('raw', verl's GRPO)", None, choices=SINGLETONS)
    on_missing: str = _opt("raise", "NaN/null values: an error ('raise'), or carry the previous "
                           "distance forward / use reward 0 ('carry')", None,
                           choices=ON_MISSING, surfaces=("estimate", "table"))
    backend: str = _opt("auto", "where the statistics run (torch tensors always run on torch)",
                        None, choices=BACKENDS,
                        surfaces=("estimate", "table"))
    source: str = _opt("auto", "which value columns to read (auto: distance, else state, else "
                       "reward)", None, choices=SOURCES,
                       surfaces=("table",))
    state_weights: Optional[Tuple[float, ...]] = _opt(
        None, "axis weights of distance_from_state for state input (default all ones)",
        "a list of finite numbers >= 0 or None", nullable=True, kind="floats",
        surfaces=("table", "turns"))
    state_epsilon: float = _opt(1.0, "zone width of distance_from_state's hinge for state input",
                                "a finite number >= 0", low=0.0, kind="float",
                                surfaces=("table", "turns"))
    state_kind: str = _opt("hinge", "'hinge' (EMPA's zone hinge) or 'norm' for state input",
                           None, choices=STATE_KINDS,
                           surfaces=("table", "turns"))
    lone_rollout: Optional[str] = _opt(
        None, "a group of one trajectory: 'zero' (its group-relative terms are 0) or 'within' "
        "(buckets over its own turns); None: 'zero', or 'within' under singleton='raw'",
        None, choices=LONE_ROLLOUT, nullable=True,
        surfaces=("turns",))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_option(f.name, getattr(self, f.name)))

    def for_surface(self, surface: str, spelling: Mapping[str, str] | None = None) -> dict:
        """``{name: value}`` of the options ``surface`` takes, under ``spelling``'s names."""
        spelling = spelling or {}
        return {spelling.get(f.name, f.name): getattr(self, f.name)
                for f in option_fields(surface)}


#: the keyword of :func:`mica_core.compute_advantages` (and the trainer's
#: ``advantage.options`` key) of each option where it differs from the option's name
TABLE_SPELLING = {"state_epsilon": "epsilon", "state_kind": "distance_kind"}

_FIELDS = {f.name: f for f in dataclasses.fields(EstimatorOptions)}
#: every option name, in declaration order
OPTION_NAMES = tuple(_FIELDS)


def option_fields(surface: str | None = None) -> list:
    """The :class:`dataclasses.Field` of each option, of one surface or all."""
    if surface is not None and surface not in SURFACES:
        raise ValueError(f"surface must be one of {', '.join(SURFACES)}; got {surface!r}")
    return [f for f in _FIELDS.values()
            if surface is None or surface in f.metadata["surfaces"]]


_bad = _vo.bad_option
unknown_option = _vo.unknown_option


def _number(value):
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def check_option(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` checked (and normalized: floats, an int, a tuple) as option ``name``.

    Raises :class:`MicaInputError` ``"<label> must be <rule>; got <value>"``, ``label`` being
    the option as the caller's user spells it (default: ``name``); an unknown name is
    ``"unknown option <label>; known: ..."``.
    """
    label = name if label is None else label
    f = _FIELDS.get(name)
    if f is None:
        raise unknown_option(label, OPTION_NAMES)
    m = f.metadata
    if value is None:
        if m["nullable"]:
            return None
        raise _bad(label, m["rule"], value)
    kind = m["kind"]
    if kind == "float":
        if not _number(value):
            raise _bad(label, m["rule"], value)
        v = float(value)
        low_ok = m["low"] is None or (v > m["low"] if m["low_open"] else v >= m["low"])
        if not low_ok or (m["high"] is not None and v > m["high"]):
            raise _bad(label, m["rule"], value)
        return v
    if kind == "int":  # an integral number (1.0 counts as 1)
        if not _number(value) or float(value) not in m["choices"]:
            raise _bad(label, m["rule"], value)
        return int(value)
    if kind == "floats":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise _bad(label, m["rule"], value)
        items = tuple(value)
        if not all(_number(x) and float(x) >= 0 for x in items):
            raise _bad(label, m["rule"], value)
        return tuple(float(x) for x in items)
    if not isinstance(value, str) or (m["choices"] is not None and value not in m["choices"]):
        raise _bad(label, m["rule"], value)
    return value


def options_from_mapping(mapping: Mapping[str, Any] | None, surface: str, *,
                         spelling: Mapping[str, str] | None = None,
                         prefix: str = "") -> EstimatorOptions:
    """:class:`EstimatorOptions` from a mapping of user-given options of one front end.

    Args:
      mapping: ``{name: value}`` under the front end's names (``None`` values keep the
        default); keys not of ``surface`` are unknown options.
      surface: ``estimate``, ``table`` or ``turns`` (:data:`SURFACES`).
      spelling: ``{option name: the front end's name}`` where they differ.
      prefix: prepended to names in messages (``"advantage.options."``).

    Raises:
      MicaInputError: one line naming the first unknown or ill-typed option and the rule.
    """
    spelling = dict(spelling or {})
    names = {spelling.get(f.name, f.name): f.name for f in option_fields(surface)}
    values = {}
    for key, value in (mapping or {}).items():
        if key not in names:
            raise unknown_option(prefix + str(key), names)
        if value is not None:
            values[names[key]] = check_option(names[key], value, prefix + key)
    return EstimatorOptions(**values)


def add_arguments(parser, surface: str = "table") -> None:
    """Add a ``--name`` flag (``_`` as ``-``) per option of ``surface`` to an argparse parser,
    with the option's type, default, choices and help; :func:`options_from_args` reads them."""
    for f in option_fields(surface):
        m = f.metadata
        kw: dict[str, Any] = {"default": f.default, "dest": f.name}
        if m["kind"] == "float":
            kw["type"] = float
        elif m["kind"] == "int":
            kw["type"], kw["choices"] = int, m["choices"]
        elif m["kind"] == "floats":
            kw["type"], kw["nargs"], kw["metavar"] = float, "+", "W"
        else:
            kw["choices"] = m["choices"]
        default = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument("--" + f.name.replace("_", "-"), help=m["help"] + default, **kw)


def options_from_args(args, surface: str = "table") -> EstimatorOptions:
    """The :class:`EstimatorOptions` of flags added by :func:`add_arguments`, checked (a
    flag's name in messages)."""
    return EstimatorOptions(**{
        f.name: check_option(f.name, getattr(args, f.name), "--" + f.name.replace("_", "-"))
        for f in option_fields(surface)})
