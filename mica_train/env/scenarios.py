"""Scenarios: persona cards of users seeking support, generated from a seed.

A card holds the initial rubric levels (``C.1`` .. ``P.3``, ``0..3``), the dominant axis (the
deepest deficit), a difficulty, a topic and what the user says about each need. Difficulty
bands on the initial state (axis values; the dominant axis is strictly the deepest)::

    difficulty   dominant axis     other axes
    easy         -14 .. -10        -8 .. -4
    medium       -19 .. -15        -10 .. -5
    hard         -27 .. -20        -13 .. -6

Under EMPA's scoring key the cognitive axis reaches only -21 (``C.1`` and ``C.2`` weigh x1,
``C.3`` x1.5), so a hard cognitive-dominant card always has ``C = -21`` (levels 3/3/3).

The evaluation set (``eval_scenarios``) is 30 fixed cards, 10 per dominant axis (3 easy,
4 medium, 3 hard), frozen in ``_eval_set.py``. ``generate_scenarios`` never returns a card whose
rubric levels equal an evaluation card's, so training and evaluation stay apart.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass, field

from mica_core.atomic import atomic_write_text

from .rubric import AXES, INDICATOR_WEIGHTS, INITIAL_KEYS, initial_state, input_error, iter_jsonl, parse_initial_rubric

__all__ = [
    "DIFFICULTIES",
    "DIFFICULTY_BANDS",
    "TOPICS",
    "Scenario",
    "generate_scenarios",
    "eval_scenarios",
    "save_scenarios",
    "load_scenarios",
]

DIFFICULTIES = ("easy", "medium", "hard")
DIFFICULTY_BANDS = {
    # difficulty: ((dominant low, high), (others low, high)), inclusive, axis values
    "easy": ((-14, -10), (-8, -4)),
    "medium": ((-19, -15), (-10, -5)),
    "hard": ((-27, -20), (-13, -6)),
}

# topic: (what is not understood, how it feels, what is to be done)
TOPICS = {
    "work": ("my manager keeps rejecting my work", "invisible and worn out",
             "the review next month"),
    "the exam": ("I failed after studying so much", "stupid and ashamed", "the retake"),
    "the breakup": ("it ended so suddenly", "empty and unwanted", "living on my own again"),
    "the move": ("the new city feels so wrong", "lonely and lost", "meeting people here"),
    "money": ("the debt keeps growing", "scared and ashamed", "the bills this month"),
    "the diagnosis": ("this is happening to me", "frightened and fragile",
                      "the treatment choices"),
    "the family fight": ("my sister turned on me", "hurt and angry", "the family dinner"),
    "the layoff": ("they let me go and not the others", "useless and anxious",
                   "finding a new job"),
    "caregiving": ("I resent my own mother sometimes", "guilty and drained",
                   "getting some help at home"),
    "the friendship": ("my best friend stopped talking to me", "rejected and sad",
                       "reaching out again"),
}

NEED_PREFIXES = {
    "C": ("I don't understand why", "I can't make sense of why", "I'm confused about why"),
    "A": ("I feel", "Honestly, I feel", "I just feel"),
    "P": ("I don't know what to do about", "I don't know where to start with"),
}

_CARD_KEYS = ("id", "rubric", "dominant", "difficulty", "topic", "needs")


@dataclass(frozen=True, eq=True)
class Scenario:
    """A persona card.

    Attributes:
      id: unique name (``eval-C-01``, ``train-<seed>-<i>``, or any string from a file).
      rubric: initial rubric levels, ``{"C.1": 0..3, ..., "P.3": 0..3}``.
      dominant: ``"C"``, ``"A"`` or ``"P"``, the axis with the deepest initial deficit.
      difficulty: ``"easy"``, ``"medium"`` or ``"hard"``.
      topic: a short noun phrase (``"the breakup"``).
      needs: ``{"C": ..., "A": ..., "P": ...}``, one sentence the user says about each need.
    """

    id: str
    rubric: dict = field(compare=True)
    dominant: str = "C"
    difficulty: str = "medium"
    topic: str = "work"
    needs: dict = field(default_factory=dict)

    def __hash__(self):
        return hash(self.id)

    @property
    def initial_state(self):
        """``P_0`` (tuple of 3 ints) from the rubric."""
        return initial_state(self.rubric)

    def to_dict(self):
        return {"id": self.id, "rubric": {k: self.rubric[k] for k in INITIAL_KEYS},
                "dominant": self.dominant, "difficulty": self.difficulty, "topic": self.topic,
                "needs": {a: self.needs[a] for a in AXES}}

    @classmethod
    def from_dict(cls, obj, *, where=""):
        """Build and validate a card; raises ``MicaInputError`` naming the field."""
        if not isinstance(obj, dict):
            raise input_error(f"{where}a scenario must be a JSON object, got "
                              f"{type(obj).__name__}", rule="object")
        missing = [k for k in _CARD_KEYS if k not in obj]
        if missing:
            raise input_error(f"{where}scenario is missing {missing}", column=missing[0],
                              rule="missing key")
        for k in ("id", "topic"):
            if not isinstance(obj[k], str) or not obj[k].strip():
                raise input_error(f"{where}{k!r} must be a non-empty string", column=k,
                                  rule="string")
        rubric = parse_initial_rubric(obj["rubric"], where=f"{where}rubric: ")
        if obj["dominant"] not in AXES:
            raise input_error(f"{where}'dominant' must be one of {AXES}, got "
                              f"{obj['dominant']!r}", column="dominant", rule="choice")
        if obj["difficulty"] not in DIFFICULTIES:
            raise input_error(f"{where}'difficulty' must be one of {DIFFICULTIES}, got "
                              f"{obj['difficulty']!r}", column="difficulty", rule="choice")
        needs = obj["needs"]
        if (not isinstance(needs, dict) or set(needs) != set(AXES)
                or not all(isinstance(v, str) and v.strip() for v in needs.values())):
            raise input_error(f"{where}'needs' must map each of {AXES} to a non-empty "
                              f"string", column="needs", rule="needs")
        state = initial_state(rubric)
        d = state[AXES.index(obj["dominant"])]
        if d > min(state):
            raise input_error(f"{where}'dominant' is {obj['dominant']!r} but the rubric gives "
                              f"the state {dict(zip(AXES, state))}: the dominant axis must "
                              f"have the deepest deficit", column="dominant",
                              rule="dominant axis")
        return cls(id=obj["id"], rubric=rubric, dominant=obj["dominant"],
                   difficulty=obj["difficulty"], topic=obj["topic"],
                   needs={a: needs[a] for a in AXES})


# ---------------------------------------------------------------------- generation
def _axis_levels(rng, axis, band):
    """Three indicator levels of ``axis`` whose value (under ``INDICATOR_WEIGHTS``) lies in
    ``band`` (rejection sampling)."""
    low, high = band
    weights = [INDICATOR_WEIGHTS[f"{axis}.{i}"] for i in (1, 2, 3)]
    while True:
        levels = [rng.randrange(4) for _ in range(3)]
        value = sum(-2 * w * level for w, level in zip(weights, levels))
        if low <= value <= high:
            return levels


def _card(rng, card_id, dominant, difficulty):
    dom_band, other_band = DIFFICULTY_BANDS[difficulty]
    rubric = {}
    for axis in AXES:
        levels = _axis_levels(rng, axis, dom_band if axis == dominant else other_band)
        for i, level in enumerate(levels, start=1):
            rubric[f"{axis}.{i}"] = level
    topic = rng.choice(sorted(TOPICS))
    details = dict(zip(AXES, TOPICS[topic]))
    needs = {a: f"{rng.choice(NEED_PREFIXES[a])} {details[a]}." for a in AXES}
    return Scenario(id=card_id, rubric=rubric, dominant=dominant, difficulty=difficulty,
                    topic=topic, needs=needs)


def _signature(rubric):
    return tuple(rubric[k] for k in INITIAL_KEYS)


def generate_scenarios(n, seed=0, *, dominant=None, difficulty=None, prefix="train"):
    """``n`` training persona cards, reproducible from ``seed``.

    Card ``i`` has dominant axis ``"CAP"[i % 3]`` and difficulty
    ``("easy", "medium", "hard")[(i // 3) % 3]`` unless fixed by ``dominant`` /
    ``difficulty``, so every 9 cards hold each pair once. Cards whose rubric equals an
    evaluation card's are skipped. Ids are ``f"{prefix}-{seed}-{i}"``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise input_error(f"n must be an integer >= 0, got {n!r}", column="n", rule="range")
    if dominant is not None and dominant not in AXES:
        raise input_error(f"dominant must be one of {AXES}", column="dominant",
                          rule="choice")
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise input_error(f"difficulty must be one of {DIFFICULTIES}", column="difficulty",
                          rule="choice")
    rng = random.Random(f"mica-train-scenarios-{seed}")
    held_out = _held_out_signatures()
    out = []
    while len(out) < n:
        i = len(out)
        dom = dominant or AXES[i % 3]
        diff = difficulty or DIFFICULTIES[(i // 3) % 3]
        card = _card(rng, f"{prefix}-{seed}-{i}", dom, diff)
        if _signature(card.rubric) not in held_out:
            out.append(card)
    return out


def _build_eval_set():
    """How ``_eval_set.py`` was made (kept to document it; the frozen file is the truth)."""
    # v2: drawn under EMPA's IED scoring key (v1 used x2/x1.5/x1 on every axis).
    rng = random.Random("mica-eval-scenarios-v2")
    cards = []
    for axis in AXES:
        for j, diff in enumerate(("easy",) * 3 + ("medium",) * 4 + ("hard",) * 3, start=1):
            cards.append(_card(rng, f"eval-{axis}-{j:02d}", axis, diff))
    return cards


def eval_scenarios():
    """The fixed evaluation set: 30 cards, 10 per dominant axis, mixed difficulty (new
    objects on each call)."""
    from ._eval_set import EVAL_SET

    return [Scenario.from_dict(d) for d in EVAL_SET]


@functools.lru_cache(maxsize=1)
def _held_out_signatures():
    return frozenset(_signature(s.rubric) for s in eval_scenarios())


# ---------------------------------------------------------------------- files
def save_scenarios(scenarios, path):
    """Write cards as JSONL, one per line, atomically (:mod:`mica_core.atomic`)."""
    atomic_write_text(path, "".join(json.dumps(s.to_dict(), ensure_ascii=False) + "\n"
                                    for s in scenarios))


def load_scenarios(path):
    """Read and validate a JSONL file of cards (blank lines skipped, ids must be unique).

    Raises ``MicaInputError`` naming the line and the field.
    """
    path = os.fspath(path)
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for _, where, obj in iter_jsonl(f, path):
            card = Scenario.from_dict(obj, where=where)
            if card.id in seen:
                raise input_error(f"{where}duplicate scenario id {card.id!r}",
                                  rule="unique id")
            seen.add(card.id)
            out.append(card)
    if not out:
        raise input_error(f"{path}: no scenarios in the file", rule="empty")
    return out
