"""What a user would write without mica, for the ``mica`` preset.

Each baseline computes, from the same ragged batch, the IDR reward
``r_t = D_{t-1} - D_t``, the discounted return ``G_t = sum_{k>=t} gamma^(k-t) r_k``
(gamma 0.85) and the advantage ``0.5 z_turn(G) + 0.5 z_group(r)`` (std with ddof 1,
eps 1e-6, singleton buckets 0), and returns ``(reward, return, advantage)`` as float64 numpy
arrays in the batch's row order. The runner checks every baseline against mica before timing
it.

- :func:`numpy_bincount`: vectorized numpy, bucket sums with ``np.bincount``, returns by the
  reverse recursion one turn index at a time.
- :func:`pandas_groupby`: a long-form DataFrame, ``groupby(...).shift``/``cumsum`` for the
  signals and ``groupby(...).transform("mean"/"std")`` for the z-scores.
- :func:`polars_window`: the same with polars window expressions (``.over(...)``).
- :func:`python_loop`: the shape of verl's GRPO advantage (``compute_grpo_outcome_advantage``)
  grown to turns: a Python loop over the rows of the input arrays gathers each bucket's values
  in a dict of lists keyed by (uid, turn) and by uid, the array library computes each key's
  mean and std (verl: ``torch.mean``/``torch.std`` per uid; here ``np.mean``/``np.std``), and
  a second loop writes the normalized values back.
- :func:`python_lists`: the fastest plain-Python version, for reference: rollouts as Python
  lists of floats, hand-written mean and std.

The pandas and polars versions compute ``G_t`` the way a dataframe user does, as a reversed
cumulative sum of ``gamma^t r_t`` divided by ``gamma^t``; fine for these lengths (mica itself
never rescales by ``gamma^-t``).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

GAMMA = 0.85
WEIGHT = 0.5
EPS = 1e-6


# --------------------------------------------------------------------------- numpy


def _bucket_z(x, labels, nbuckets):
    count = np.bincount(labels, minlength=nbuckets)
    mean = np.bincount(labels, weights=x, minlength=nbuckets) / np.maximum(count, 1)
    dev = x - mean[labels]
    var = np.bincount(labels, weights=dev * dev, minlength=nbuckets) / np.maximum(count - 1, 1)
    z = dev / (np.sqrt(var)[labels] + EPS)
    return np.where(count[labels] > 1, z, 0.0)


def numpy_bincount(offsets, group, distance, initial_distance):
    lengths = np.diff(offsets)
    n = int(offsets[-1])
    starts = offsets[:-1]
    d = np.asarray(distance, dtype=np.float64)
    prev = np.empty(n)
    prev[1:] = d[:-1]
    prev[starts] = initial_distance
    reward = prev - d
    ret = reward.copy()
    ends = offsets[1:]
    for k in range(1, int(lengths.max())):
        rows = (ends - 1 - k)[lengths > k]
        ret[rows] += GAMMA * ret[rows + 1]
    turn = np.arange(n) - np.repeat(starts, lengths)
    ngroups = int(group.max()) + 1
    g_rows = np.repeat(group, lengths)
    max_t = int(lengths.max())
    adv = WEIGHT * _bucket_z(ret, g_rows * max_t + turn, ngroups * max_t) \
        + (1 - WEIGHT) * _bucket_z(reward, g_rows, ngroups)
    return reward, ret, adv


# --------------------------------------------------------------------------- pandas


def pandas_frame(offsets, group, distance, initial_distance):
    """The long-form DataFrame a pandas user starts from (built outside the timing)."""
    import pandas as pd

    lengths = np.diff(offsets)
    n = int(offsets[-1])
    return pd.DataFrame({
        "group_id": np.repeat(group, lengths),
        "traj_id": np.repeat(np.arange(len(lengths)), lengths),
        "turn": np.arange(n) - np.repeat(offsets[:-1], lengths),
        "distance": np.asarray(distance, dtype=np.float64),
        "initial_distance": np.repeat(np.asarray(initial_distance, dtype=np.float64), lengths),
    })


def pandas_groupby(df):
    by_traj = df.groupby("traj_id", sort=False)
    reward = by_traj["distance"].shift(1).fillna(df["initial_distance"]) - df["distance"]
    scale = GAMMA ** df["turn"]
    scaled = (reward * scale)[::-1]
    ret = scaled.groupby(df["traj_id"][::-1], sort=False).cumsum()[::-1] / scale
    frame = df[["group_id", "turn"]].assign(G=ret, r=reward)
    by_turn = frame.groupby(["group_id", "turn"], sort=False)["G"]
    z_turn = ((frame["G"] - by_turn.transform("mean")) / (by_turn.transform("std") + EPS))
    by_group = frame.groupby("group_id", sort=False)["r"]
    z_group = ((frame["r"] - by_group.transform("mean")) / (by_group.transform("std") + EPS))
    adv = WEIGHT * z_turn.fillna(0.0) + (1 - WEIGHT) * z_group.fillna(0.0)
    return reward.to_numpy(), ret.to_numpy(), adv.to_numpy()


# --------------------------------------------------------------------------- polars


def polars_frame(offsets, group, distance, initial_distance):
    import polars as pl

    return pl.from_pandas(pandas_frame(offsets, group, distance, initial_distance))


def polars_window(df):
    import polars as pl

    col = pl.col
    out = (
        df.lazy()
        .with_columns(
            reward=col("distance").shift(1).over("traj_id").fill_null(col("initial_distance"))
            - col("distance"),
            scale=pl.lit(GAMMA).pow(col("turn")),
        )
        .with_columns(
            G=(col("reward") * col("scale")).cum_sum(reverse=True).over("traj_id")
            / col("scale"))
        .with_columns(
            z_turn=((col("G") - col("G").mean().over("group_id", "turn"))
                    / (col("G").std().over("group_id", "turn") + EPS)).fill_null(0.0),
            z_group=((col("reward") - col("reward").mean().over("group_id"))
                     / (col("reward").std().over("group_id") + EPS)).fill_null(0.0),
        )
        .select("reward", "G", adv=WEIGHT * col("z_turn") + (1 - WEIGHT) * col("z_group"))
        .collect()
    )
    return out["reward"].to_numpy(), out["G"].to_numpy(), out["adv"].to_numpy()


# --------------------------------------------------------------------------- Python


def python_loop(offsets, group, distance, initial_distance):
    n = int(offsets[-1])
    reward = np.empty(n)
    ret = np.empty(n)
    adv = np.empty(n)
    id2turn = defaultdict(list)
    id2group = defaultdict(list)
    for i in range(len(group)):
        a, b = offsets[i], offsets[i + 1]
        prev = initial_distance[i]
        for k in range(a, b):
            reward[k] = prev - distance[k]
            prev = distance[k]
        acc = 0.0
        for k in range(b - 1, a - 1, -1):
            acc = reward[k] + GAMMA * acc
            ret[k] = acc
        for k in range(a, b):
            id2turn[(group[i], k - a)].append(ret[k])
            id2group[group[i]].append(reward[k])
    turn_stats = {key: (np.mean(v), np.std(v, ddof=1)) if len(v) > 1 else None
                  for key, v in id2turn.items()}
    group_stats = {key: (np.mean(v), np.std(v, ddof=1)) if len(v) > 1 else None
                   for key, v in id2group.items()}
    for i in range(len(group)):
        a, b = offsets[i], offsets[i + 1]
        gs = group_stats[group[i]]
        for k in range(a, b):
            ts = turn_stats[(group[i], k - a)]
            zt = 0.0 if ts is None else (ret[k] - ts[0]) / (ts[1] + EPS)
            zg = 0.0 if gs is None else (reward[k] - gs[0]) / (gs[1] + EPS)
            adv[k] = WEIGHT * zt + (1 - WEIGHT) * zg
    return reward, ret, adv


def python_rollout_lists(offsets, group, distance, initial_distance):
    """Per-rollout Python lists (what a rollout loop hands over; built outside the timing)."""
    d = np.asarray(distance, dtype=np.float64).tolist()
    return [(int(group[i]), float(initial_distance[i]), d[offsets[i]:offsets[i + 1]])
            for i in range(len(group))]


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def python_lists(rollouts):
    rewards, returns = [], []
    by_turn = defaultdict(list)
    by_group = defaultdict(list)
    for g, d0, ds in rollouts:
        prev = d0
        r = []
        for x in ds:
            r.append(prev - x)
            prev = x
        ret = [0.0] * len(r)
        acc = 0.0
        for t in range(len(r) - 1, -1, -1):
            acc = r[t] + GAMMA * acc
            ret[t] = acc
        for t, (rt, gt) in enumerate(zip(r, ret)):
            by_turn[(g, t)].append(gt)
            by_group[g].append(rt)
        rewards.append(r)
        returns.append(ret)
    turn_stats = {k: _mean_std(v) for k, v in by_turn.items()}
    group_stats = {k: _mean_std(v) for k, v in by_group.items()}
    adv = []
    for (g, _, _), r, ret in zip(rollouts, rewards, returns):
        gm, gs = group_stats[g]
        for t, (rt, gt) in enumerate(zip(r, ret)):
            tm, ts = turn_stats[(g, t)]
            zt = 0.0 if ts is None else (gt - tm) / (ts + EPS)
            zg = 0.0 if gs is None else (rt - gm) / (gs + EPS)
            adv.append(WEIGHT * zt + (1 - WEIGHT) * zg)
    flat_r = [x for r in rewards for x in r]
    flat_g = [x for g in returns for x in g]
    return np.array(flat_r), np.array(flat_g), np.array(adv)


# name -> (prepare(offsets, group, distance, initial) -> input, run(input) -> outputs)
BASELINES = {
    "numpy_bincount": (lambda *a: a, lambda a: numpy_bincount(*a)),
    "pandas_groupby": (pandas_frame, pandas_groupby),
    "polars_window": (polars_frame, polars_window),
    "python_loop": (lambda *a: a, lambda a: python_loop(*a)),
    "python_lists": (python_rollout_lists, python_lists),
}
