"""Estimator registry: every preset is a weighted sum of normalized components.

A component is ``(weight, signal, scope, baseline, scale)`` (docs/architecture.md, "Conventions"):

- ``signal``: what is normalized.
    - ``"reward"``: the per-turn reward ``r_t`` (IDR, ADR or given).
    - ``"return"``: the discounted return ``G_t = sum_{k>=t} gamma^(k-t) r_k``.
    - ``"outcome"``: the trajectory outcome ``R_i = sum_t r_t``, one value per trajectory;
      at scopes ``group``/``batch`` each trajectory counts once (GRPO), at scope ``turn``
      once per turn index it reaches. The result is the same on every turn.
    - ``"outcome_return"``: the return of a sparse reward that pays ``R_i`` on the last turn,
      ``gamma^(T-1-t) * R_i`` (REINFORCE++).
- ``scope``: the bucket the statistics come from, ``"turn"`` (same group, same turn index),
  ``"group"`` (all turns of the group), ``"batch"``, or ``"key"`` (same group and same
  user-given key per turn, e.g. an anchor-state hash: GiGPO's step-level groups; the call
  passes the key as ``key=`` or a ``key`` column).
- ``baseline``: ``"mean"`` or ``"loo"``; ``scale``: ``"std"`` or ``"none"``. ``None`` takes
  the value passed to :func:`mica_core.estimate` (its defaults ``"mean"`` and ``"std"``).
- ``weight``: a number, or ``"w"`` / ``"1-w"``, filled in from the ``weight`` option
  (``mica`` and ``mapo`` use these so ``weight=1`` and ``weight=0`` select one component).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Iterable, Union

from .options import BASELINES, SCALES, check_option
from .validate_options import eps_zero_with_std

__all__ = [
    "Component",
    "Estimator",
    "register_estimator",
    "get_estimator",
    "list_estimators",
    "unregister_estimator",
    "SIGNALS",
    "SCOPES",
    "PRESETS",
]

SIGNALS = ("reward", "return", "outcome", "outcome_return")
SCOPES = ("turn", "group", "batch", "key")
REWARDS = ("idr", "adr")
RETURNS = ("discounted", "outcome", "outcome_discounted")


def _choice(name, value, allowed, *, allow_none=False):
    if value is None and allow_none:
        return
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass(frozen=True)
class Component:
    """One normalized term of an estimator's advantage (see module docstring)."""

    weight: Union[float, str]
    signal: str
    scope: str
    baseline: str | None = None
    scale: str | None = None

    def __post_init__(self):
        if isinstance(self.weight, str):
            _choice("weight", self.weight, ("w", "1-w"))
        else:
            w = float(self.weight)
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"weight must be finite; got {self.weight!r}")
            object.__setattr__(self, "weight", w)
        _choice("signal", self.signal, SIGNALS)
        _choice("scope", self.scope, SCOPES)
        _choice("baseline", self.baseline, BASELINES, allow_none=True)
        _choice("scale", self.scale, SCALES, allow_none=True)


@dataclass(frozen=True)
class Estimator:
    """A named advantage estimator.

    Attributes:
      name: registry key.
      components: the weighted, normalized terms.
      reward: ``"idr"`` (``D_{t-1} - D_t``) or ``"adr"`` (``-D_t``) when distances are given;
        rewards passed directly are used as they are.
      gamma: default discount.
      returns: what the ``return`` output holds: ``"discounted"`` (``G_t``), ``"outcome"``
        (``R_i`` on every turn) or ``"outcome_discounted"`` (``gamma^(T-1-t) R_i``).
      description: one line for listings.
    """

    name: str
    components: tuple[Component, ...]
    reward: str = "idr"
    gamma: float = 0.85
    returns: str = "discounted"
    description: str = ""

    def __post_init__(self):
        if not self.components:
            raise ValueError(f"estimator {self.name!r} needs at least one component")
        _choice("reward", self.reward, REWARDS)
        _choice("returns", self.returns, RETURNS)
        g = float(self.gamma)
        if not 0.0 <= g <= 1.0:
            raise ValueError(f"gamma must be in [0, 1]; got {self.gamma!r}")
        object.__setattr__(self, "gamma", g)


@dataclass(frozen=True)
class ResolvedComponent:
    weight: float
    signal: str
    scope: str
    baseline: str
    scale: str


@dataclass(frozen=True)
class Plan:
    """An estimator with every option filled in: what the backends execute."""

    reward: str  # "idr", "adr" or "given"
    gamma: float
    returns: str
    components: tuple[ResolvedComponent, ...]
    eps: float
    ddof: int
    singleton: str
    name: str = ""

    @property
    def needs_key(self) -> bool:
        """Whether some component has scope ``key`` (the call must pass a key per turn)."""
        return any(c.scope == "key" for c in self.components)


_REGISTRY: dict[str, Estimator] = {}
_LOCK = threading.Lock()


def _as_component(c) -> Component:
    if isinstance(c, Component):
        return c
    if isinstance(c, dict):
        return Component(**c)
    return Component(*c)


def register_estimator(name: str, components: Iterable, *, reward: str = "idr",
                       gamma: float = 0.85, returns: str | None = None,
                       description: str = "", overwrite: bool = False) -> Estimator:
    """Register a user estimator built from components.

    ``components`` items are :class:`Component`, tuples ``(weight, signal, scope[, baseline
    [, scale]])`` or dicts of those fields. ``returns`` defaults to ``"outcome_discounted"``
    when a component uses ``outcome_return``, else ``"outcome"`` when one uses ``outcome``,
    else ``"discounted"``.

    Example::

        mc.register_estimator("turn_heavy", [(0.8, "return", "turn"), (0.2, "reward", "group", "loo")])
        mc.estimate(offsets, group, distance=d, initial_distance=d0, estimator="turn_heavy")
    """
    if not isinstance(name, str) or not name:
        raise ValueError("estimator name must be a non-empty string")
    comps = tuple(_as_component(c) for c in components)
    if returns is None:
        signals = {c.signal for c in comps}
        returns = ("outcome_discounted" if "outcome_return" in signals
                   else "outcome" if "outcome" in signals else "discounted")
    est = Estimator(name, comps, reward=reward, gamma=gamma, returns=returns,
                    description=description)
    with _LOCK:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"estimator {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = est
    return est


def unregister_estimator(name: str) -> None:
    """Remove a user estimator (presets can be removed too; re-import does not restore them)."""
    with _LOCK:
        if name not in _REGISTRY:
            raise KeyError(f"no estimator named {name!r}")
        del _REGISTRY[name]


def get_estimator(name_or_estimator) -> Estimator:
    if isinstance(name_or_estimator, Estimator):
        return name_or_estimator
    try:
        return _REGISTRY[name_or_estimator]
    except KeyError:
        raise ValueError(f"unknown estimator {name_or_estimator!r}; registered: "
                         f"{', '.join(sorted(_REGISTRY))}") from None


def list_estimators() -> list[str]:
    """Registered estimator names, presets first in their documented order."""
    return list(_REGISTRY)


def resolve(estimator, options=None, *, reward_given: bool, gamma=None, weight=0.5, eps=1e-6,
            ddof=1, baseline="mean", scale="std", singleton="zero") -> Plan:
    """Fill an estimator's open options: from ``options`` (an
    :class:`mica_core.options.EstimatorOptions`, already checked) when given, else from the
    keyword options (checked by :func:`mica_core.options.check_option`).

    Raises:
      MicaInputError: an ill-typed option, or ``eps=0`` with a ``std`` scale.
    """
    est = get_estimator(estimator)
    if options is not None:
        gamma, weight, eps, ddof = options.gamma, options.weight, options.eps, options.ddof
        baseline, scale, singleton = options.baseline, options.scale, options.singleton
    try:
        return _resolve_cached(est, reward_given, gamma, weight, eps, ddof, baseline, scale,
                               singleton)
    except TypeError:  # an unhashable option value: resolve without the cache
        return _resolve(est, reward_given, gamma, weight, eps, ddof, baseline, scale, singleton)


def _resolve(est, reward_given, gamma, weight, eps, ddof, baseline, scale, singleton) -> Plan:
    g = est.gamma if gamma is None else check_option("gamma", gamma)
    w = check_option("weight", weight)
    e = check_option("eps", eps)
    ddof = check_option("ddof", ddof)
    baseline = check_option("baseline", baseline)
    scale = check_option("scale", scale)
    singleton = check_option("singleton", singleton)
    comps = []
    for c in est.components:
        cw = w if c.weight == "w" else (1.0 - w) if c.weight == "1-w" else c.weight
        comps.append(ResolvedComponent(cw, c.signal, c.scope, c.baseline or baseline,
                                       c.scale or scale))
    # A component of weight 0 adds nothing: leave it out, so that weight=1 and weight=0
    # select one component exactly (and its statistics are not computed at all).
    kept = [c for c in comps if c.weight != 0.0] or comps[:1]
    if e == 0.0 and any(c.scale == "std" for c in kept):
        raise eps_zero_with_std()
    comps = kept
    return Plan(reward="given" if reward_given else est.reward, gamma=g, returns=est.returns,
                components=tuple(comps), eps=e, ddof=int(ddof), singleton=singleton,
                name=est.name)


# Plans are immutable; the cache key holds the Estimator itself, so re-registering a name
# under another definition never returns a stale plan.
_resolve_cached = functools.lru_cache(maxsize=256, typed=True)(_resolve)


def _presets():
    C = Component
    presets = [
        ("mica", [C("w", "return", "turn"), C("1-w", "reward", "group")], "idr", 0.85,
         "w * z_turn(G) + (1-w) * z_group(r), IDR"),
        ("mica_turn", [C(1.0, "return", "turn")], "idr", 0.85, "z_turn(G), IDR"),
        ("mica_group", [C(1.0, "reward", "group")], "idr", 0.85, "z_group(r), IDR"),
        ("mica_adr", [C("w", "return", "turn"), C("1-w", "reward", "group")], "adr", 0.85,
         "mica with ADR rewards r_t = -D_t"),
        ("mapo", [C("w", "return", "turn"), C("1-w", "return", "batch")], "idr", 0.85,
         "w * z_turn(G) + (1-w) * z_batch(G)"),
        ("grpo", [C(1.0, "outcome", "group")], "idr", 1.0,
         "z of the outcome R_i among the group's trajectories, on every turn"),
        ("reinforce_pp", [C(1.0, "outcome_return", "batch")], "idr", 1.0,
         "z_batch over turns of gamma^(T-1-t) R_i"),
        ("reinforce_pp_idr", [C(1.0, "reward", "batch")], "idr", 0.85, "z_batch(r), IDR"),
        ("mica_group_adr", [C(1.0, "reward", "group")], "adr", 0.85,
         "z_group(r), ADR r_t = -D_t (the paper's reward ablation of mica_group)"),
        ("gigpo", [C(1.0, "outcome", "group"), C(1.0, "return", "key")], "idr", 0.95,
         "GiGPO: z_group(R_i) + z_key(G_t), step groups by a per-turn key (anchor state)"),
    ]
    # gigpo's return output is its step-level signal G_t (the rule for outcome presets would
    # give R_i, which its episode component already carries).
    returns = {"gigpo": "discounted"}
    for name, comps, reward, gamma, desc in presets:
        register_estimator(name, comps, reward=reward, gamma=gamma, description=desc,
                           returns=returns.get(name))
    return tuple(p[0] for p in presets)


#: the built-in estimators' names in their documented order (the first entries of
#: :func:`list_estimators`; integrations register these)
PRESETS = _presets()
