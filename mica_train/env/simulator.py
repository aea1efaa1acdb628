"""The embedded (offline) user simulator and judge: the default, no network.

User. Each message is ``opener + primary need [+ "Also, " + secondary need]``, built from the
scenario card's ``needs`` sentences. The opener's intensity follows the affective deficit
``-A``: high for ``-A >= 13``, medium for ``-A >= 6``, low otherwise. The user names the needs
of the axes still below ``satisfied`` (+1); the primary one is the most pressing (the lowest
axis; ties go to the dominant axis, then ``C, A, P``), except with probability ``need_noise``
(0.15) where another unmet need is named first; with probability ``secondary_prob`` (0.4) a
second unmet need follows. With every axis at +1 or more the user says the talk helped.

Judge. It fills EMPA's progress rubric from the acts the reply shows (``acts.detect_acts``),
the needs the user named in the message the reply answers, and hidden pacing-and-leading
state (rapport 0..3, a pending setback, per-act streaks). Per act, a level ``0..2`` for its
axis (``X.Prog``), computed in this order:

1. base: ``validate`` lands at 1 while rapport is 0 and at 2 after; ``reframe`` / ``plan``
   land at 1 while rapport < 2 and at 2 from rapport 2 on;
2. premature leading: ``reframe`` / ``plan`` while the affective deficit ``-A`` exceeds the
   tolerance ``6 + 5 * rapport`` are capped at 1 and cost one rapport point, and the user's
   hurt surfaces on the *next* turn as ``A.Neg = -1`` (a delayed setback);
3. responsiveness: an act on a need the user did not name loses 1 level and one rapport
   point (``validate`` is always welcome while ``A < 0``);
4. dilution: a reply showing ``k`` acts loses ``k - 1`` levels on each;
5. repetition: an act used on each of the ``r`` previous turns loses 1 level when
   ``r >= 3`` and 2 levels when ``r >= 5``;
6. miss: with probability ``miss_prob`` (0.1) the act lands one level lower;
7. saturation: no progress on an axis already at ``>= +1``, at most level 1 at ``>= -1``.

A ``validate`` still at level >= 1 after steps 3-6 adds one rapport point; rapport changes
apply after the turn. A reply showing no act gets ``A.Neg = -1`` (the user feels unheard).
Setbacks on one axis add up (at most -2) and none is given on an axis at or below ``floor``
(-30), which bounds how far a bad policy can drive the state.

Why this matters for credit assignment: on the first turn the greedy reply is advice on the
dominant axis (+1 there now, against +1 on A for a first validation), but it blocks rapport
and brings a setback a turn later; two validations first make every later on-topic reframe
or plan worth +3. The best sequence (pace, then lead, follow the user, vary the acts) is not
the sequence of locally best replies.
"""

from __future__ import annotations

from dataclasses import dataclass

from .acts import ACT_AXIS, SUPPORT_ACTS, detect_acts
from .rubric import AXES

__all__ = ["EmbeddedDynamics", "EmbeddedJudge", "EmbeddedUser", "distress_band"]


@dataclass(frozen=True)
class EmbeddedDynamics:
    """Constants of the embedded simulator (see the module docstring for their roles)."""

    rapport_max: int = 3
    validate_rapport: int = 1        # rapport from which validate lands at level 2
    lead_rapport: int = 2            # rapport from which reframe/plan land at level 2
    tolerance_base: int = 6          # affective deficit tolerated while leading at rapport 0
    tolerance_per_rapport: int = 5   # ... plus this much per rapport point
    repeat_free: int = 2             # previous consecutive uses with full effect
    repeat_heavy: int = 5            # previous consecutive uses from which 2 levels are lost
    miss_prob: float = 0.1
    floor: int = -30
    need_noise: float = 0.15
    secondary_prob: float = 0.4
    distress_high: int = 13          # -A >= this: high distress
    distress_medium: int = 6         # -A >= this: medium distress
    off_topic_rapport: int = 1       # rapport lost by an act the user did not ask for
    satisfied: int = 1               # the user names needs of the axes below this value


def distress_band(state, dynamics=EmbeddedDynamics()):
    """``"high"``, ``"medium"`` or ``"low"`` from the affective value ``state[1]``."""
    deficit = -state[1]
    if deficit >= dynamics.distress_high:
        return "high"
    if deficit >= dynamics.distress_medium:
        return "medium"
    return "low"


_OPENERS = {
    "high": ("I'm completely overwhelmed and I can barely hold it together.",
             "Everything is falling apart and I can't stop crying.",
             "I'm shaking, this is too much."),
    "medium": ("It's been a rough few days.", "I'm pretty tense about all this.",
               "I'm tired and on edge."),
    "low": ("Okay, that helps a little.", "Thanks, I'm calmer now.", "Alright."),
}
_CLOSINGS = ("That really helps. I think I can handle {topic} now.",
             "Thank you. I see {topic} differently and I know my next step.")


class EmbeddedUser:
    """Template user: reveals the most pressing need, with noise (module docstring)."""

    def __init__(self, scenario, rng, dynamics=EmbeddedDynamics()):
        self.scenario = scenario
        self.rng = rng
        self.dynamics = dynamics
        self.named = ()  # axes of the needs named in the last message

    def message(self, state):
        rng, dyn = self.rng, self.dynamics
        unmet = [a for a, s in zip(AXES, state) if s < dyn.satisfied]
        if not unmet:
            self.named = ()
            return rng.choice(_CLOSINGS).format(topic=self.scenario.topic)
        value = dict(zip(AXES, state))
        order = sorted(unmet, key=lambda a: (value[a], a != self.scenario.dominant,
                                             AXES.index(a)))
        primary = order[0]
        if len(order) > 1 and rng.random() < dyn.need_noise:
            primary = rng.choice(order[1:])
        parts = [rng.choice(_OPENERS[distress_band(state, dyn)]), self.scenario.needs[primary]]
        named = [primary]
        rest = [a for a in order if a != primary]
        if rest and rng.random() < dyn.secondary_prob:
            named.append(rng.choice(rest))
            second = self.scenario.needs[named[-1]]
            parts.append("Also, " + second[0].lower() + second[1:])
        self.named = tuple(named)
        return " ".join(parts)


class EmbeddedJudge:
    """Rubric judge with hidden rapport, delayed setbacks and diminishing returns.

    ``judge(reply, state)`` returns EMPA's progress rubric (``C.Prog`` .. ``P.Neg``) for
    the reply given the state before it, and updates the hidden variables.
    """

    def __init__(self, rng, dynamics=EmbeddedDynamics(), user=None):
        self.rng = rng
        self.dynamics = dynamics
        self.user = user  # the EmbeddedUser whose last message the reply answers
        self.rapport = 0
        self.pending_a_setback = 0     # A.Neg carried to the next turn
        self.streak = dict.fromkeys(SUPPORT_ACTS, 0)  # consecutive previous uses per act
        self.last_acts = ()

    def judge(self, reply, state):
        dyn, rng = self.dynamics, self.rng
        acts = detect_acts(reply)
        value = dict(zip(AXES, state))
        prog = dict.fromkeys(AXES, 0)
        neg = dict.fromkeys(AXES, 0)
        neg["A"] = self.pending_a_setback
        self.pending_a_setback = 0
        if not acts:
            neg["A"] -= 1

        named = self.user.named if self.user is not None else AXES
        rapport = self.rapport
        rapport_change = 0
        tolerance = dyn.tolerance_base + dyn.tolerance_per_rapport * rapport
        for act in acts:
            if act == "validate":
                level = 2 if rapport >= dyn.validate_rapport else 1
            else:
                level = 2 if rapport >= dyn.lead_rapport else 1
                if -value["A"] > tolerance:
                    level = min(level, 1)
                    rapport_change -= 1
                    self.pending_a_setback = -1
            axis = ACT_AXIS[act]
            # Reflecting feelings is welcome while any affective need remains.
            if axis not in named and not (act == "validate" and value["A"] < 0):
                level -= 1
                rapport_change -= dyn.off_topic_rapport
            level -= len(acts) - 1
            r = self.streak[act]
            if r >= dyn.repeat_heavy:
                level -= 2
            elif r > dyn.repeat_free:
                level -= 1
            if rng.random() < dyn.miss_prob:
                level -= 1
            if act == "validate" and level >= 1:
                rapport_change += 1
            if value[axis] >= 1:
                level = 0
            elif value[axis] >= -1:
                level = min(level, 1)
            prog[axis] = max(prog[axis], min(2, max(0, level)))

        self.rapport = min(dyn.rapport_max, max(0, rapport + rapport_change))
        for act in SUPPORT_ACTS:
            self.streak[act] = self.streak[act] + 1 if act in acts else 0
        self.last_acts = acts
        out = {}
        for a in AXES:
            n = max(-2, neg[a]) if value[a] > dyn.floor else 0
            out[f"{a}.Prog"] = prog[a]
            out[f"{a}.Neg"] = n
        return out
