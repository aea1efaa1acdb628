"""The support-state engine: state, distance, energy and end rule of one episode.

Pure and deterministic: increments in, states, distances, energies and a status out. It knows
nothing about text; the simulators and judges turn replies into increments.

Time index: turn ``t = 1 .. T`` is the ``t``-th assistant reply and the judge's verdict on it.
``P_0`` is the initial state (its distance is ``D_{-1}`` of docs/architecture.md,
"Conventions"), ``P_t`` the state after turn ``t``::

    P_t   = P_{t-1} + dP_t                      (dP_t from the progress rubric)
    D_t   = sqrt(sum_k w_k max(0, -eps - P_t[k])^2)   (mica_core.signals.distance_from_state)
    v0    = -P_0 / |P_0|                        (direction of full support)
    e_t   = dP_t . v0                           (energy of turn t)
    E_t   = sum_{u<=t} e_u                      (cumulative energy)

End rule (EMPA, arXiv 2603.00552), checked after each turn ``t >= min_turns`` in this order:

- ``success`` (``success="empa"``): ``(|P_t| <= tol |P_0| or P_t . v0 >= -tol |P_0|)`` and
  ``E_t >= |P_0|``, with ``tol = 0.05``; or (``success="zone"``) every axis ``>= -eps``;
- ``failure``: the energy was negative (``e_u < 0``) on each of the last ``failure_streak``
  (5) scored turns;

then, at ``t == max_turns`` and still running: ``max_turns``. Because ``E_t = P_t . v0 + |P_0|``
when every turn is scored, the EMPA rule amounts to ``P_t . v0 >= 0``: the state has crossed
the hyperplane through the origin orthogonal to the initial deficit.

If ``P_0 = 0`` (a user without needs), ``v0`` is taken as ``(1, 1, 1) / sqrt(3)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mica_core import MicaInputError
from mica_core.signals import distance_from_state

from .rubric import initial_state as _initial_state
from .rubric import parse_initial_rubric, parse_progress_rubric, progress_increment

__all__ = ["STATUSES", "TurnRecord", "SupportTrajectory", "replay_episode", "mean_increment"]

STATUSES = ("running", "success", "failure", "max_turns")
SUCCESS_RULES = ("empa", "zone")

# Float slack for E_t >= |P_0| and e_t < 0: both sides are sums of a few products of
# small integers with v0, exact up to rounding.
_SLACK = 1e-9


@dataclass(frozen=True)
class TurnRecord:
    """What one turn did. ``turn`` counts from 1."""

    turn: int
    state: tuple
    distance: float
    energy: float
    cumulative_energy: float
    status: str
    scored: bool

    @property
    def done(self):
        return self.status != "running"


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MicaInputError(f"{name} must be an integer >= {low}, got {value!r}",
                             column=name, rule="range")


def validate_end_rule(max_turns, min_turns, success, failure_streak, success_tolerance, epsilon):
    """Raise ``MicaInputError`` for an invalid end-rule configuration."""
    _check_int("max_turns", max_turns, 1)
    _check_int("min_turns", min_turns, 1)
    _check_int("failure_streak", failure_streak, 1)
    if min_turns > max_turns:
        raise MicaInputError(f"min_turns ({min_turns}) must be <= max_turns ({max_turns})",
                             column="min_turns", rule="range")
    if success not in SUCCESS_RULES:
        raise MicaInputError(f"success must be one of {SUCCESS_RULES}, got {success!r}",
                             column="success", rule="choice")
    for name, v in (("success_tolerance", success_tolerance), ("epsilon", epsilon)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise MicaInputError(f"{name} must be a finite number >= 0, got {v!r}",
                                 column=name, rule="range")


class SupportTrajectory:
    """Support states of one episode under EMPA's dynamics and end rule (see module doc).

    Args:
      initial_state: ``P_0``, three integers (order ``C, A, P``).
      max_turns, min_turns: the episode ends at ``max_turns``; success and failure are
        declared only from turn ``min_turns`` on.
      success: ``"empa"`` (default) or ``"zone"``.
      epsilon: width of the target zone (hinge distance and zone rule).
      weights: axis weights of the distance (default all ones).
      failure_streak: consecutive negative-energy turns that make a failure (5).
      success_tolerance: EMPA's 0.05.
    """

    def __init__(self, initial_state, *, max_turns=15, min_turns=12, success="empa",
                 epsilon=1.0, weights=None, failure_streak=5, success_tolerance=0.05):
        validate_end_rule(max_turns, min_turns, success, failure_streak, success_tolerance,
                          epsilon)
        p0 = tuple(initial_state)
        if len(p0) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer))
                               for x in p0):
            raise MicaInputError(f"initial_state must be three integers, got {initial_state!r}",
                                 column="initial_state", rule="shape")
        self.initial_state = tuple(int(x) for x in p0)
        self.max_turns = max_turns
        self.min_turns = min_turns
        self.success = success
        self.epsilon = float(epsilon)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.failure_streak = failure_streak
        self.success_tolerance = float(success_tolerance)

        norm0 = math.sqrt(sum(x * x for x in self.initial_state))
        self.initial_norm = norm0
        if norm0 > 0:
            self.direction = tuple(-x / norm0 for x in self.initial_state)
        else:
            self.direction = (1 / math.sqrt(3),) * 3
        self.initial_distance = self._distance(self.initial_state)

        self.state = self.initial_state
        self.states = []
        self.distances = []
        self.energies = []
        self.scored = []
        self.cumulative_energy = 0.0
        self.negative_streak = 0
        self.status = "running"
        self.end_turn = None

    # ------------------------------------------------------------------ helpers
    def _distance(self, state):
        return float(distance_from_state(state, self.weights, self.epsilon))

    def _projection(self, state):
        return sum(s * v for s, v in zip(state, self.direction))

    @property
    def turn(self):
        """Number of completed turns."""
        return len(self.states)

    @property
    def done(self):
        return self.status != "running"

    @property
    def distance(self):
        """Current distance (``D_{-1}`` before the first turn)."""
        return self.distances[-1] if self.distances else self.initial_distance

    def success_reached(self, state=None, cumulative_energy=None):
        """Whether ``state`` (default: the current one) meets the success rule."""
        state = self.state if state is None else state
        e = self.cumulative_energy if cumulative_energy is None else cumulative_energy
        if self.success == "zone":
            return all(s >= -self.epsilon for s in state)
        norm0, tol = self.initial_norm, self.success_tolerance
        norm = math.sqrt(sum(s * s for s in state))
        close = norm <= tol * norm0 or self._projection(state) >= -tol * norm0 - _SLACK
        return close and e >= norm0 - _SLACK * max(1.0, norm0)

    # ------------------------------------------------------------------ dynamics
    def apply(self, increment, *, scored=True):
        """Apply one turn's increment ``dP_t`` (three integers) and return its ``TurnRecord``.

        ``scored=False`` records a turn whose judgement was dropped: the state does not move,
        its energy is 0 and it neither extends nor breaks the negative-energy streak; it still
        counts toward ``max_turns``.
        """
        if self.done:
            raise RuntimeError(f"the episode has ended ({self.status} at turn {self.end_turn})")
        inc = tuple(increment)
        if len(inc) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer))
                                for x in inc):
            raise MicaInputError(f"increment must be three integers, got {increment!r}",
                                 column="increment", rule="shape")
        if not scored:
            inc = (0, 0, 0)
        self.state = tuple(int(s + d) for s, d in zip(self.state, inc))
        energy = self._projection(inc)
        self.cumulative_energy += energy
        if scored:
            self.negative_streak = self.negative_streak + 1 if energy < -_SLACK else 0
        self.states.append(self.state)
        self.distances.append(self._distance(self.state))
        self.energies.append(energy)
        self.scored.append(bool(scored))

        t = self.turn
        if t >= self.min_turns:
            if self.success_reached():
                self.status = "success"
            elif self.negative_streak >= self.failure_streak:
                self.status = "failure"
        if self.status == "running" and t >= self.max_turns:
            self.status = "max_turns"
        if self.status != "running":
            self.end_turn = t
        return TurnRecord(t, self.state, self.distances[-1], energy, self.cumulative_energy,
                          self.status, bool(scored))

    def apply_rubric(self, rubric):
        """Apply a progress rubric (EMPA keys); see ``rubric.progress_increment``."""
        return self.apply(progress_increment(rubric))

    def metrics(self):
        """Per-episode metrics (see ``mica_train.env.aggregate_metrics``)."""
        n = self.turn
        return {
            "pass": self.status == "success",
            "status": self.status,
            "turns": n,
            "initial_distance": self.initial_distance,
            "final_distance": self.distance,
            "energy": self.cumulative_energy,
            "positive_energy_ratio": (sum(e > _SLACK for e in self.energies) / n) if n else 0.0,
        }


def replay_episode(record, *, max_turns=45, min_turns=12, success="empa", epsilon=1.0,
                   on_judge_failure="mean", where=""):
    """Replay one recorded episode ``{"initial": {...}, "turns": [{...}, ...]}``.

    ``initial`` is an initial rubric (``C.1`` .. ``P.3``), each turn a progress rubric
    (``C.Prog`` .. ``P.Neg``) or ``null`` for a judge turn that failed, handled by
    ``on_judge_failure`` (``"mean"``: the mean of the valid increments so far, rounded to
    integers, zero before any; ``"drop"``: the turn is not scored). Turns after the episode
    ended are not applied and are counted in ``turns_after_end``.

    Returns a JSON-ready dict: ``initial_state``, ``initial_distance``, per-turn ``states``,
    ``distances``, ``energies``, ``cumulative_energy``, ``status``, ``end_turn`` (``None``
    while running), ``turns`` (applied), ``judge_failures``, ``turns_after_end``.
    """
    if not isinstance(record, dict):
        raise MicaInputError(f"{where}an episode must be a JSON object with 'initial' and "
                             f"'turns', got {type(record).__name__}", rule="object")
    for key in ("initial", "turns"):
        if key not in record:
            raise MicaInputError(f"{where}episode is missing {key!r}", column=key,
                                 rule="missing key")
    if not isinstance(record["turns"], list):
        raise MicaInputError(f"{where}'turns' must be a list", column="turns", rule="list")
    if on_judge_failure not in ("mean", "drop"):
        raise MicaInputError(f"on_judge_failure must be 'mean' or 'drop', got "
                             f"{on_judge_failure!r}", column="on_judge_failure", rule="choice")
    p0 = _initial_state(parse_initial_rubric(record["initial"], where=f"{where}initial: "))
    traj = SupportTrajectory(p0, max_turns=max_turns, min_turns=min_turns, success=success,
                             epsilon=epsilon)
    valid = []
    failures = 0
    turns = record["turns"]
    # Every turn is checked, also those after the episode ends: whether a record is valid
    # must not depend on --max-turns or the end rule.
    increments = [None if turn is None else
                  progress_increment(parse_progress_rubric(turn, where=f"{where}turn {i + 1}: "))
                  for i, turn in enumerate(turns)]
    for inc in increments:
        if traj.done:
            break
        if inc is None:
            failures += 1
            if on_judge_failure == "drop":
                traj.apply((0, 0, 0), scored=False)
            else:
                traj.apply(mean_increment(valid))
            continue
        valid.append(inc)
        traj.apply(inc)
    return {
        "initial_state": list(traj.initial_state),
        "initial_distance": traj.initial_distance,
        "states": [list(s) for s in traj.states],
        "distances": traj.distances,
        "energies": traj.energies,
        "cumulative_energy": traj.cumulative_energy,
        "status": traj.status,
        "end_turn": traj.end_turn,
        "turns": traj.turn,
        "judge_failures": failures,
        "turns_after_end": len(turns) - traj.turn,
    }


def mean_increment(valid_increments):
    """Fallback increment for a failed judge turn: the mean of the trajectory's valid
    increments so far, each axis rounded half away from zero; ``(0, 0, 0)`` before any."""
    if not valid_increments:
        return (0, 0, 0)
    n = len(valid_increments)
    out = []
    for k in range(3):
        m = sum(inc[k] for inc in valid_increments) / n
        out.append(int(math.copysign(math.floor(abs(m) + 0.5), m)))
    return tuple(out)
