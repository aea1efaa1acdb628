"""A scripted user whose support state answers the assistant's replies (no model, no network).

The state has EMPA's three axes (cognitive, affective, proactive; deficits negative). Each
reply that carries an axis' cues ("why", "feel", "try", ...) moves that axis up; an axis the
reply ignores slips back a little. The distance to the fully supported state is EMPA's zone
hinge (``mica_core.distance_from_state``). The user's next message voices its weakest axis.

This stands in for a real user simulator and judge (mica_train's environment, or an LLM judge
over an endpoint); everything mica needs from it is one distance per assistant turn.
"""

from __future__ import annotations

import numpy as np

AXES = ("cognitive", "affective", "proactive")
CUES = {
    "cognitive": ("why", "what", "understand", "because", "mean"),
    "affective": ("feel", "sorry", "hear", "hard", "sounds"),
    "proactive": ("try", "plan", "next", "step", "could"),
}
ASKS = {
    "cognitive": "I still don't get why this keeps happening to me.",
    "affective": "Nobody seems to care how awful this feels.",
    "proactive": "I don't know what to do next.",
}


class ScriptedSupportUser:
    """``step(reply) -> (user_message, state, distance)``; ``distance()`` is the current D."""

    def __init__(self, initial_state, *, gain=1.5, slip=0.25, epsilon=1.0):
        self.state = np.asarray(initial_state, dtype=np.float64).copy()
        if self.state.shape != (len(AXES),):
            raise ValueError(f"initial_state needs {len(AXES)} values {AXES}; got "
                             f"{list(initial_state)}")
        self.gain, self.slip, self.epsilon = gain, slip, epsilon

    def distance(self) -> float:
        from mica_core import distance_from_state

        return float(distance_from_state(self.state, epsilon=self.epsilon))

    def step(self, reply: str):
        text = reply.lower()
        for k, axis in enumerate(AXES):
            hit = any(cue in text for cue in CUES[axis])
            self.state[k] = min(self.state[k] + self.gain, 1.0) if hit else \
                self.state[k] - self.slip
        weakest = AXES[int(np.argmin(self.state))]
        return ASKS[weakest], self.state.tolist(), self.distance()
