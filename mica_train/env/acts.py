"""Support acts: the vocabulary the embedded judge recognises and short replies built from it.

Three acts, one per axis (EMPA's cognitive / affective / proactive needs):

- ``validate`` (affective): validating and reflecting feelings;
- ``reframe`` (cognitive): clarifying and reframing the situation;
- ``plan`` (proactive): concrete next steps and encouragement.

A reply shows an act when it contains one of the act's cue words (``ACT_CUES``, whole
lower-case words). The cue sets are disjoint and every reply from ``sample_reply`` shows
exactly one act, so a policy that imitates them speaks the judge's language.
"""

from __future__ import annotations

import re

__all__ = ["SUPPORT_ACTS", "ACT_AXIS", "ACT_CUES", "detect_acts", "sample_reply"]

SUPPORT_ACTS = ("validate", "reframe", "plan")
"""Act names, in axis order A, C, P of their effect (affective, cognitive, proactive)."""

ACT_AXIS = {"validate": "A", "reframe": "C", "plan": "P"}

ACT_CUES = {
    "validate": frozenset({"hear", "feel", "feeling", "feelings", "hard", "painful", "hurt",
                           "understandable", "valid", "heavy", "sorry", "lonely"}),
    "reframe": frozenset({"perhaps", "another", "angle", "means", "pattern", "notice",
                          "consider", "picture", "clearer", "view"}),
    "plan": frozenset({"step", "steps", "try", "plan", "start", "tomorrow", "list", "goal",
                       "small", "today", "week"}),
}

_WORD = re.compile(r"[a-z]+")

_REPLIES = {
    "validate": (
        "That sounds really hard, and it is understandable to feel this way.",
        "I hear you. What you feel is valid.",
        "I am so sorry. That is a heavy thing to carry.",
        "It sounds painful, and your feelings make sense.",
        "I hear how hard {topic} has been for you.",
        "Of course it hurt. Feeling lonely with {topic} is understandable.",
    ),
    "reframe": (
        "Perhaps there is another way to see this.",
        "Consider the bigger picture: one setback is not the whole story.",
        "I notice a pattern here. Perhaps it is not about you at all.",
        "Another angle: this does not mean you failed.",
        "Let us consider what {topic} really means for you.",
        "Perhaps {topic} says more about the situation than about you.",
    ),
    "plan": (
        "One small step: make a list of three things you can do tomorrow.",
        "Let us make a plan. Start with one small goal today.",
        "You can do this. Pick one step and try it tomorrow.",
        "Try this: set one small goal for the week.",
        "A first step for {topic}: try ten minutes on it today.",
        "You can handle {topic}. Start with one small step tomorrow.",
    ),
}


def detect_acts(reply):
    """The support acts a reply shows, as a tuple in ``SUPPORT_ACTS`` order (maybe empty)."""
    words = set(_WORD.findall(reply.lower()))
    return tuple(act for act in SUPPORT_ACTS if not words.isdisjoint(ACT_CUES[act]))


def _choice(rng, n):
    if hasattr(rng, "integers"):  # numpy Generator
        return int(rng.integers(n))
    return rng.randrange(n)  # random.Random


def sample_reply(act, rng, scenario=None):
    """A short reply (under 25 words) showing ``act``.

    Args:
      act: one of ``SUPPORT_ACTS``.
      rng: ``numpy.random.Generator`` or ``random.Random``; one draw picks the variant.
      scenario: optional ``Scenario``; with it some variants name its topic, without it
        only the topic-free variants are used.
    """
    if act not in _REPLIES:
        raise ValueError(f"act must be one of {SUPPORT_ACTS}, got {act!r}")
    variants = _REPLIES[act]
    if scenario is None:
        variants = tuple(v for v in variants if "{topic}" not in v)
    text = variants[_choice(rng, len(variants))]
    if "{topic}" in text:
        text = text.format(topic=scenario.topic)
    return text
