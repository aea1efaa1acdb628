"""The one Hypothesis strategy for random ragged trajectory batches, and option dictionaries.

Every property test draws its batches here (tests/test_backends.py against tests/naive.py on
every backend, identities, the torch options, the Arrow paths).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

from mica_core.estimators import Component, Estimator

from naive import PRESETS


class Batch(NamedTuple):
    """A ragged batch in mica's CSR layout, and the same batch as tests/naive.py reads it."""

    offsets: np.ndarray  # int64 [n_traj + 1]
    group: list  # one label per trajectory (ints or strings)
    distance: np.ndarray  # float64 [n_turns]
    initial_distance: np.ndarray  # float64 [n_traj]
    key: list | None = None  # one label per turn (scope "key"), from a small set

    def keys(self):
        """The key labels (every turn its own trajectory-independent key when unset)."""
        return self.key if self.key is not None else [0] * int(self.offsets[-1])

    @property
    def n_traj(self):
        return len(self.offsets) - 1

    def trajs(self, dtype=np.float64, reward=None):
        """tests/naive.py's form, values rounded to ``dtype`` as the backend will see them;
        with ``reward`` (flat per-turn rewards) the trajectories carry rewards instead."""
        out = []
        for i in range(self.n_traj):
            a, b = self.offsets[i], self.offsets[i + 1]
            t = {"group": self.group[i], "keys": self.keys()[a:b]}
            if reward is not None:
                t["rewards"] = [float(x) for x in np.asarray(reward, dtype)[a:b]]
            else:
                t["distances"] = [float(x) for x in self.distance.astype(dtype)[a:b]]
                t["initial_distance"] = float(self.initial_distance.astype(dtype)[i])
            out.append(t)
        return out


# Distances on a 1/8 grid: rewards are exact, so buckets whose values are mathematically equal
# are equal in floating point too (their z is 0 in the reference and in every backend, not
# rounding noise divided by eps).
grid_values = st.integers(0, 80).map(lambda k: k / 8.0)


@st.composite
def ragged_batches(draw, *, max_traj=10, max_len=6, max_groups=4, allow_empty=True,
                   values="grid"):
    """A :class:`Batch`: trajectories of 1..max_len turns (length 1 included), groups of
    unequal sizes, contiguous or interleaved, labelled by ints or strings; empty batches
    unless ``allow_empty=False``.

    ``values="grid"``: distances on a 1/8 grid (with dyadic discounts every return is exact,
    see :data:`grid_options`). ``"continuous"``: uniform random distances in [0, 10), where
    equal values have probability zero (any discount, :data:`any_options`).
    """
    n_traj = draw(st.integers(0 if allow_empty else 1, max_traj))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=n_traj, max_size=n_traj))
    labels = draw(st.lists(st.integers(0, max_groups - 1), min_size=n_traj, max_size=n_traj))
    if draw(st.booleans()):
        labels = sorted(labels)  # contiguous groups (the kernels' in-place path)
    if draw(st.booleans()):
        labels = [f"g{x}" for x in labels]
    offsets = np.zeros(n_traj + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = int(offsets[-1])
    if values == "grid":
        d = np.array(draw(st.lists(grid_values, min_size=n, max_size=n)), dtype=np.float64)
        d0 = np.array(draw(st.lists(grid_values, min_size=n_traj, max_size=n_traj)),
                      dtype=np.float64)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        d, d0 = rng.uniform(0.0, 10.0, n), rng.uniform(0.0, 10.0, n_traj)
    keys = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    if draw(st.booleans()):
        keys = [f"s{x}" for x in keys]
    return Batch(offsets, labels, d, d0, keys)


_NORMALIZATION = {
    "baseline": st.sampled_from(["mean", "loo"]),
    "scale": st.sampled_from(["std", "none"]),
    "ddof": st.sampled_from([0, 1]),
    "singleton": st.sampled_from(["zero", "raw"]),
    "eps": st.sampled_from([1e-6, 1e-3, 0.5]),
    "weight": st.sampled_from([0.0, 0.3, 0.5, 1.0]),
}
#: Options for grid batches. Dyadic discounts keep every return on the grid exact, so backends
#: and the reference agree to the last bit before normalizing: a bucket of mathematically equal
#: returns is exactly equal in both (its z is 0), instead of rounding noise divided by eps
#: (which differs with the order of operations, e.g. a fused multiply-add).
grid_options = st.fixed_dictionaries({"gamma": st.sampled_from([0.0, 0.5, 0.75, 1.0])},
                                     optional=_NORMALIZATION)
#: Options for continuous batches: any discount, the presets' 0.85 included.
any_options = st.fixed_dictionaries({}, optional=_NORMALIZATION | {
    "gamma": st.sampled_from([0.0, 0.3, 0.85, 0.99, 1.0])})


# User estimators covering what the presets do not: outcome at turn and batch scope,
# outcome_return at turn scope, return at group scope, reward at turn scope, three and four
# components, per-component baseline/scale overrides.
CUSTOM = {
    "t_outcome_turn": ("idr", 0.9, [(0.3, "outcome", "turn"),
                                    (0.7, "reward", "turn", "loo", "none")]),
    "t_mixed": ("idr", 0.7, [(0.2, "return", "group"), (0.3, "outcome_return", "turn"),
                             (0.5, "outcome", "batch")]),
    "t_four": ("adr", 0.95, [(0.25, "reward", "batch", "loo"), (0.25, "return", "turn"),
                             (0.25, "outcome", "group", None, "none"),
                             (0.25, "outcome_return", "batch")]),
    "t_batch_only": ("idr", 0.8, [(0.6, "return", "batch"), (0.4, "reward", "batch")]),
    # scope key: every signal, with per-component overrides, alone and with batch scope
    "t_key": ("idr", 0.8, [(0.5, "reward", "key", "loo"), (0.3, "outcome", "key", None, "none"),
                           (0.2, "outcome_return", "key")]),
    "t_key_batch": ("adr", 0.9, [(0.5, "return", "key"), (0.5, "reward", "batch")]),
}
ESTIMATORS = sorted(PRESETS) + list(CUSTOM)


def _returns_kind(comps):
    signals = {c[1] for c in comps}
    return ("outcome_discounted" if "outcome_return" in signals
            else "outcome" if "outcome" in signals else "discounted")


def estimator_of(name):
    """(argument for estimate, spec for naive_estimate or None)."""
    if name in PRESETS:
        return name, None
    reward, gamma, comps = CUSTOM[name]
    returns = _returns_kind(comps)
    est = Estimator(name, tuple(Component(*c) for c in comps), reward=reward, gamma=gamma,
                    returns=returns)
    spec = (reward, gamma, returns, [tuple(c) + (None,) * (5 - len(c)) for c in comps])
    return est, spec
