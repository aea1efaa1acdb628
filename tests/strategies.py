"""Hypothesis strategies for random ragged trajectory batches."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def ragged_batches(draw, *, max_traj=12, max_len=7, allow_empty=True, rewards=False):
    """A batch as ``(trajs, offsets, group_labels, distance, initial_distance)``.

    Groups are interleaved (not contiguous) and of unequal sizes; lengths include 1; values
    include repeats (zero-variance buckets) and large magnitudes.
    """
    n_traj = draw(st.integers(0 if allow_empty else 1, max_traj))
    n_groups = draw(st.integers(1, max(1, n_traj)))
    labels = draw(st.lists(st.integers(0, n_groups - 1), min_size=n_traj, max_size=n_traj))
    group_names = [f"g{x}" for x in labels]
    lengths = draw(st.lists(st.integers(1, max_len), min_size=n_traj, max_size=n_traj))
    value = st.one_of(
        st.sampled_from([0.0, 1.0, 2.5, 10.0]),
        st.floats(0, 50, allow_nan=False, allow_infinity=False, width=32),
    )
    trajs, dist, init = [], [], []
    for i in range(n_traj):
        d0 = draw(value)
        ds = draw(st.lists(value, min_size=lengths[i], max_size=lengths[i]))
        if rewards:
            trajs.append({"group": group_names[i], "rewards": [d - 25.0 for d in ds]})
        else:
            trajs.append({"group": group_names[i], "distances": ds, "initial_distance": d0})
        dist.extend(ds)
        init.append(d0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return trajs, offsets, group_names, np.array(dist, dtype=np.float64), np.array(init)


options = st.fixed_dictionaries({}, optional={
    "gamma": st.sampled_from([0.0, 0.5, 0.85, 1.0]),
    "weight": st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    "eps": st.sampled_from([0.0, 1e-6, 1e-3]),
    "ddof": st.sampled_from([0, 1]),
    "baseline": st.sampled_from(["mean", "loo"]),
    "scale": st.sampled_from(["std", "none"]),
    "singleton": st.sampled_from(["zero", "raw"]),
})
