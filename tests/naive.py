"""Slow, obvious references for every quantity mica computes: plain Python loops, float64,
exact sums (math.fsum). Every backend is tested against these.

Trajectories are plain lists; ``trajs`` is a list of dicts with keys ``group`` (any label),
either ``distances`` + ``initial_distance`` or ``rewards``, and ``keys`` (one label per turn)
for estimators with a ``key`` scope.
"""

from __future__ import annotations

import math

# name -> (reward kind, default gamma, returns kind, [(weight, signal, scope, baseline, scale)])
# weight "w" / "1-w" come from the weight option; baseline/scale None come from the options.
PRESETS = {
    "mica": ("idr", 0.85, "discounted", [("w", "return", "turn"), ("1-w", "reward", "group")]),
    "mica_turn": ("idr", 0.85, "discounted", [(1.0, "return", "turn")]),
    "mica_group": ("idr", 0.85, "discounted", [(1.0, "reward", "group")]),
    "mica_adr": ("adr", 0.85, "discounted", [("w", "return", "turn"), ("1-w", "reward", "group")]),
    "mapo": ("idr", 0.85, "discounted", [("w", "return", "turn"), ("1-w", "return", "batch")]),
    "grpo": ("idr", 1.0, "outcome", [(1.0, "outcome", "group")]),
    "reinforce_pp": ("idr", 1.0, "outcome_discounted", [(1.0, "outcome_return", "batch")]),
    "reinforce_pp_idr": ("idr", 0.85, "discounted", [(1.0, "reward", "batch")]),
    "mica_group_adr": ("adr", 0.85, "discounted", [(1.0, "reward", "group")]),
    "gigpo": ("idr", 0.95, "discounted", [(1.0, "outcome", "group"), (1.0, "return", "key")]),
}


#: Presets whose buckets need a key per turn (scope "key").
KEYED = sorted(name for name, spec in PRESETS.items() if any(c[2] == "key" for c in spec[3]))


def rewards_of(traj, kind):
    if "rewards" in traj:
        return [float(x) for x in traj["rewards"]]
    d = [float(x) for x in traj["distances"]]
    if kind == "adr":
        return [-x for x in d]
    prev = [float(traj["initial_distance"])] + d[:-1]
    return [p - x for p, x in zip(prev, d)]


def discounted_return(r, t, gamma):
    """G_t = sum_{k>=t} gamma^(k-t) r_k, term by term."""
    return math.fsum(gamma ** (k - t) * r[k] for k in range(t, len(r)))


def zscore(x, bucket, *, baseline="mean", scale="std", ddof=1, eps=1e-6, singleton="zero"):
    """z of ``x`` within ``bucket`` (a list that contains x once for itself)."""
    n = len(bucket)
    if n == 1:
        if singleton == "zero":
            return 0.0
        return x / (1.0 + eps) if scale == "std" else x
    mean = math.fsum(bucket) / n
    if baseline == "mean":
        b = mean
    else:
        b = (math.fsum(bucket) - x) / (n - 1)
    if scale == "none":
        return x - b
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in bucket) / (n - ddof))
    return (x - b) / (std + eps)


def naive_estimate(trajs, estimator="mica", *, gamma=None, weight=0.5, eps=1e-6, ddof=1,
                   baseline="mean", scale="std", singleton="zero", spec=None):
    """Per trajectory, a list of (reward, return, advantage) per turn."""
    kind, g_default, returns_kind, comps = spec if spec is not None else PRESETS[estimator]
    gamma = g_default if gamma is None else gamma
    if any("rewards" in t for t in trajs):
        kind = "given"
    r = [rewards_of(t, kind) for t in trajs]
    G = [[discounted_return(ri, t, gamma) for t in range(len(ri))] for ri in r]
    R = [math.fsum(ri) for ri in r]
    OR = [[gamma ** (len(ri) - 1 - t) * R[i] for t in range(len(ri))] for i, ri in enumerate(r)]
    groups = [t["group"] for t in trajs]

    def value(signal, i, t):
        return {"reward": r[i][t], "return": G[i][t], "outcome": R[i],
                "outcome_return": OR[i][t]}[signal]

    def members(signal, scope, i, t):
        """Values of the bucket holding (i, t); outcome buckets at group and batch scope hold
        trajectories, at turn and key scope turns."""
        out = []
        for j in range(len(trajs)):
            if scope in ("group", "turn", "key") and groups[j] != groups[i]:
                continue
            if signal == "outcome" and scope in ("group", "batch"):
                out.append(R[j])
                continue
            for s in range(len(r[j])):
                if scope == "turn" and s != t:
                    continue
                if scope == "key" and trajs[j]["keys"][s] != trajs[i]["keys"][t]:
                    continue
                out.append(value(signal, j, s))
        return out

    results = []
    for i in range(len(trajs)):
        rows = []
        for t in range(len(r[i])):
            adv = 0.0
            for (w, signal, scope, *opts) in comps:
                w = weight if w == "w" else (1.0 - weight) if w == "1-w" else w
                b = opts[0] if len(opts) > 0 and opts[0] else baseline
                s = opts[1] if len(opts) > 1 and opts[1] else scale
                z = zscore(value(signal, i, t), members(signal, scope, i, t), baseline=b,
                           scale=s, ddof=ddof, eps=eps, singleton=singleton)
                adv += w * z
            ret = {"discounted": G[i][t], "outcome": R[i],
                   "outcome_discounted": OR[i][t]}[returns_kind]
            rows.append((r[i][t], ret, adv))
        results.append(rows)
    return results


def flat(results, k):
    """Column k (0 reward, 1 return, 2 advantage) of naive_estimate's output, flattened."""
    return [row[k] for traj in results for row in traj]


def distance_from_state(state, weights=None, epsilon=1.0, kind="hinge"):
    w = weights or [1.0] * len(state)
    if kind == "hinge":
        return math.sqrt(math.fsum(wk * max(0.0, -epsilon - sk) ** 2 for wk, sk in zip(w, state)))
    return math.sqrt(math.fsum(wk * sk * sk for wk, sk in zip(w, state)))


def broadcast_to_tokens(turn_advantage, response_mask):
    """verl layout: row b's k-th run of ones in response_mask gets its k-th turn advantage.

    ``turn_advantage`` is a list (per row) of lists (per turn)."""
    return broadcast_to_turn_tokens(turn_advantage, response_mask)


def turn_of_token(response_mask, turn_start=None, turn_index=None):
    """Per row, the turn of every token under the attribution rule of docs/architecture.md
    ("Conventions"), by plain loops: a token belongs to the latest turn that started at or before it (-1: none yet).

    Turn starts: the first token of each run of ones; or ``turn_start[b]`` (token positions);
    or, with ``turn_index``, every assistant token whose index differs from the previous
    assistant token's in that row."""
    out = []
    for b, mask_row in enumerate(response_mask):
        if turn_start is not None:
            starts = set(int(p) for p in turn_start[b])
        elif turn_index is not None:
            starts, prev = set(), None
            for j, m in enumerate(mask_row):
                if m:
                    if prev is None or turn_index[b][j] != prev:
                        starts.add(j)
                    prev = turn_index[b][j]
        else:
            starts = {j for j, m in enumerate(mask_row) if m and (j == 0 or not mask_row[j - 1])}
        k, row = -1, []
        for j in range(len(mask_row)):
            if j in starts:
                k += 1
            row.append(k)
        out.append(row)
    return out


def turn_rewards_from_tokens(rewards, response_mask, turn_start=None, turn_index=None):
    """Per row, the list of per-turn rewards: exact sums (fsum) of the token rewards that
    belong to each turn. A non-zero reward before a row's first turn raises ValueError."""
    out = []
    for b, ids in enumerate(turn_of_token(response_mask, turn_start, turn_index)):
        n = max(ids) + 1
        parts = [[] for _ in range(n)]
        for j, k in enumerate(ids):
            if k < 0:
                if rewards[b][j] != 0:
                    raise ValueError(f"row {b}: reward before the first turn")
                continue
            parts[k].append(float(rewards[b][j]))
        out.append([math.fsum(p) for p in parts])
    return out


def broadcast_to_turn_tokens(turn_values, response_mask, turn_start=None, turn_index=None):
    """Row b's k-th turn value on every assistant token of that turn, 0 elsewhere."""
    ids = turn_of_token(response_mask, turn_start, turn_index)
    return [[float(turn_values[b][k]) if m else 0.0 for m, k in zip(mask_row, ids[b])]
            for b, mask_row in enumerate(response_mask)]
