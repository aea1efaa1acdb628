"""Scripted policies: baselines that read only the conversation text.

Each policy is ``policy(episode, rng) -> reply`` (``rng`` a ``random.Random``). They read the
user's last message (its distress opener and the needs it names) and their own earlier
replies, never the hidden state.

- ``pacing``: pace, then lead. Validate on the first two turns (rapport); afterwards validate
  while the user is in high distress (at most three times in a row), otherwise answer the
  first need the user names (cognitive -> reframe, affective -> validate, proactive -> plan);
  rather than use one act a fourth time in a row it turns to another need named in the
  message, then to validation, then to needs named earlier.
- ``advice_first``: a fixer. Answers every named need with analysis or advice (reframe for
  cognitive, plan otherwise), never pausing on feelings.
- ``validation_only``: validates on every turn.
- ``random``: a uniformly random act each turn.
"""

from __future__ import annotations

import random

from .acts import SUPPORT_ACTS, detect_acts, sample_reply

__all__ = ["SCRIPTED_POLICIES", "read_needs", "read_distress", "run_episode",
           "evaluate_policy"]

_NEED_CUES = {
    "C": ("understand", "make sense", "confused"),
    "A": ("i feel", "i just feel"),
    "P": ("what to do", "where to start"),
}
_DISTRESS_CUES = {
    "high": ("overwhelmed", "falling apart", "shaking"),
    "medium": ("rough", "tense", "on edge"),
}
NEED_ACT = {"C": "reframe", "A": "validate", "P": "plan"}


def read_needs(message):
    """Axes of the needs a user message names, in the order they appear."""
    text = message.lower()
    found = []
    for axis, cues in _NEED_CUES.items():
        positions = [text.find(c) for c in cues if c in text]
        if positions:
            found.append((min(positions), axis))
    return [axis for _, axis in sorted(found)]


def read_distress(message):
    """``"high"``, ``"medium"`` or ``"low"`` from the message's opener."""
    text = message.lower()
    for band in ("high", "medium"):
        if any(c in text for c in _DISTRESS_CUES[band]):
            return band
    return "low"


def _own_acts(episode):
    return [detect_acts(m["content"]) for m in episode.messages if m["role"] == "assistant"]


def _last_user(episode):
    return next(m["content"] for m in reversed(episode.messages) if m["role"] == "user")


def _run_length(history, act):
    n = 0
    for acts in reversed(history):
        if acts != (act,):
            break
        n += 1
    return n


def pacing(episode, rng):
    history = _own_acts(episode)
    message = _last_user(episode)
    validations = sum("validate" in acts for acts in history)
    if validations < 2:
        act = "validate"
    elif read_distress(message) == "high" and _run_length(history, "validate") < 3:
        act = "validate"
    else:
        # The needs named now, then a breather (feelings are welcome while any remain),
        # then needs named earlier: never one act a fourth time in a row.
        earlier = [a for m in reversed(episode.messages[:-1]) if m["role"] == "user"
                   for a in read_needs(m["content"])]
        candidates = [NEED_ACT[a] for a in read_needs(message)] + ["validate"]
        candidates += [NEED_ACT[a] for a in earlier] + list(SUPPORT_ACTS)
        act = next(a for a in candidates if _run_length(history, a) < 3)
    return sample_reply(act, rng, episode.scenario)


def advice_first(episode, rng):
    needs = read_needs(_last_user(episode))
    act = "reframe" if needs and needs[0] == "C" else "plan"
    return sample_reply(act, rng, episode.scenario)


def validation_only(episode, rng):
    return sample_reply("validate", rng, episode.scenario)


def random_policy(episode, rng):
    return sample_reply(rng.choice(SUPPORT_ACTS), rng, episode.scenario)


SCRIPTED_POLICIES = {
    "pacing": pacing,
    "advice_first": advice_first,
    "validation_only": validation_only,
    "random": random_policy,
}


def run_episode(env, scenario, policy, seed=0):
    """Play one episode with a scripted policy (a name or a callable); returns the Episode."""
    if isinstance(policy, str):
        policy = SCRIPTED_POLICIES[policy]
    ep = env.reset(scenario, seed=seed)
    rng = random.Random(f"mica-policy|{scenario.id}|{seed}")
    while not ep.done:
        ep.step(policy(ep, rng))
    return ep


def evaluate_policy(policy, scenarios, env, seeds=(0,)):
    """Per-episode metrics of ``policy`` on every ``(scenario, seed)`` pair."""
    return [run_episode(env, s, policy, seed).metrics() for s in scenarios for seed in seeds]
