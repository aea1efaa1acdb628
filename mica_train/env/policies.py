"""Scripted policies: baselines that read only the conversation text (and one oracle).

Each policy is ``policy(episode, rng) -> reply`` (``rng`` a ``random.Random``). They read the
user's last message (its distress opener and the needs it names) and their own earlier
replies, never the hidden state; ``greedy`` is the exception, an oracle of the embedded
simulator.

- ``pacing``: pace, then lead. Validate on the first two turns (rapport); afterwards validate
  while the user is in high distress (at most three times in a row), otherwise answer the
  first need the user names (cognitive -> reframe, affective -> validate, proactive -> plan);
  rather than use one act a fourth time in a row it turns to another need named in the
  message, then to validation, then to needs named earlier.
- ``advice_first``: a fixer. Answers every named need with analysis or advice (reframe for
  cognitive, plan otherwise), never pausing on feelings.
- ``validation_only``: validates on every turn.
- ``random``: a uniformly random act each turn.
- ``pacing_recent``: ``pacing`` reading only what a trained policy sees by default
  (``rollout.context_messages: 1``, ``context_replies: 2``): the user's latest message and its
  own last two replies. Validates while fewer than two replies are visible (the first two
  turns), then as ``pacing``, never using one act a third time in a row.
- ``reactive``: reads only the user's latest message: validates when its opener shows high
  distress, otherwise answers the first need it names. The best memoryless rule we found.
- ``greedy``: the locally greedy oracle: on each turn it tries one reply of each act on a
  copy of the episode (the true embedded simulator, its random draws included) and sends the
  one whose next distance is lowest (ties: ``SUPPORT_ACTS`` order). Embedded simulator only.
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


def pacing_recent(episode, rng):
    replies = [detect_acts(m["content"]) for m in episode.messages if m["role"] == "assistant"][-2:]
    message = _last_user(episode)
    if len(replies) < 2:
        act = "validate"
    elif read_distress(message) == "high" and _run_length(replies, "validate") < 2:
        act = "validate"
    else:
        candidates = [NEED_ACT[a] for a in read_needs(message)] + ["validate"] + list(SUPPORT_ACTS)
        act = next(a for a in candidates if _run_length(replies, a) < 2)
    return sample_reply(act, rng, episode.scenario)


def reactive(episode, rng):
    message = _last_user(episode)
    needs = read_needs(message)
    if read_distress(message) == "high" or not needs:
        act = "validate"
    else:
        act = NEED_ACT[needs[0]]
    return sample_reply(act, rng, episode.scenario)


def greedy(episode, rng):
    options = [sample_reply(act, rng, episode.scenario) for act in SUPPORT_ACTS]
    return min(options, key=lambda reply: episode.fork().step(reply).distance)


def validation_only(episode, rng):
    return sample_reply("validate", rng, episode.scenario)


def random_policy(episode, rng):
    return sample_reply(rng.choice(SUPPORT_ACTS), rng, episode.scenario)


SCRIPTED_POLICIES = {
    "pacing": pacing,
    "advice_first": advice_first,
    "validation_only": validation_only,
    "random": random_policy,
    "pacing_recent": pacing_recent,
    "reactive": reactive,
    "greedy": greedy,
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
