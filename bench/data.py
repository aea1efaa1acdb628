"""Synthetic ragged batches for the benchmarks.

A batch is ``n_groups`` rollout groups of ``per_group`` rollouts (8, as in GRPO-style
training); each rollout has a length drawn from one of:

- ``uniform``: uniform in ``1..45`` (mean 23 turns), the default;
- ``skewed``: log-normal (sigma 1) scaled to the same mean, clipped to ``1..400``: most
  rollouts short, a few very long, so groups differ a lot in size.

Distances are uniform in ``[0, 5)`` and the initial distance of each rollout in ``[3, 5)``.
Layouts: ``contiguous`` keeps a group's rollouts adjacent (the usual layout, and the kernels'
fast path); ``shuffled`` permutes the rollouts, so the groups interleave and the kernels take
the counting-sort path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PER_GROUP = 8
MEAN_LEN = 23.0


@dataclass
class Batch:
    offsets: np.ndarray  # int64 [n_traj + 1]
    group: np.ndarray  # int64 [n_traj]
    distance: np.ndarray  # [n_turns]
    initial_distance: np.ndarray  # [n_traj]
    lengths: str
    layout: str

    @property
    def n_turns(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_traj(self) -> int:
        return len(self.group)

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0


def draw_lengths(rng, n, kind):
    if kind == "uniform":
        return rng.integers(1, 46, n)
    if kind == "skewed":
        sigma = 1.0
        raw = rng.lognormal(mean=np.log(MEAN_LEN) - sigma * sigma / 2, sigma=sigma, size=n)
        return np.clip(np.rint(raw), 1, 400).astype(np.int64)
    raise ValueError(f"lengths must be 'uniform' or 'skewed'; got {kind!r}")


def make_batch(n_turns, *, lengths="uniform", layout="contiguous", per_group=PER_GROUP,
               dtype=np.float64, seed=0) -> Batch:
    """About ``n_turns`` turns in whole groups of ``per_group`` rollouts (at least one)."""
    rng = np.random.default_rng(seed)
    n_groups = max(1, round(n_turns / (per_group * MEAN_LEN)))
    n_traj = n_groups * per_group
    lens = draw_lengths(rng, n_traj, lengths)
    group = np.repeat(np.arange(n_groups, dtype=np.int64), per_group)
    if layout == "shuffled":
        perm = rng.permutation(n_traj)
        group, lens = group[perm], lens[perm]
    elif layout != "contiguous":
        raise ValueError(f"layout must be 'contiguous' or 'shuffled'; got {layout!r}")
    offsets = np.zeros(n_traj + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    distance = rng.uniform(0.0, 5.0, int(offsets[-1])).astype(dtype)
    initial = rng.uniform(3.0, 5.0, n_traj).astype(dtype)
    return Batch(offsets, group, distance, initial, lengths, layout)


def groups_of(n_groups, per_group=PER_GROUP, **kwargs) -> Batch:
    """A batch of exactly ``n_groups`` groups (e.g. 64 groups of 8: about 12k turns)."""
    return make_batch(n_groups * per_group * MEAN_LEN, per_group=per_group, **kwargs)


def long_table(batch: Batch, *, shuffle_rows=False, seed=0):
    """The batch as an Arrow long-form table: group_id, traj_id, turn, distance,
    initial_distance (one row per turn). ``shuffle_rows`` permutes every row."""
    import pyarrow as pa

    lengths = np.diff(batch.offsets)
    traj = np.repeat(np.arange(batch.n_traj, dtype=np.int64), lengths)
    turn = np.arange(batch.n_turns, dtype=np.int64) - np.repeat(batch.offsets[:-1], lengths)
    cols = {
        "group_id": np.repeat(batch.group, lengths),
        "traj_id": traj,
        "turn": turn,
        "distance": batch.distance,
        "initial_distance": np.repeat(batch.initial_distance, lengths),
    }
    if shuffle_rows:
        perm = np.random.default_rng(seed).permutation(batch.n_turns)
        cols = {k: v[perm] for k, v in cols.items()}
    return pa.table(cols)
