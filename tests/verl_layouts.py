"""Multi-turn episodes rendered in the layouts verl produces, with mica's expected numbers.

An episode is one rollout: its group (verl's ``uid``), an initial distance and, per turn, the
assistant reply's token count, an optional tool call inside the reply (assistant tokens, tool
tokens, assistant tokens again), the user's reply length and the distance after the turn.
Rendered:

- ``trajectory_rows``: one row per episode, as verl's agent loop lays it out (response tokens
  after the prompt: assistant 1s, tool and user 0s, right padding), with the per-turn fields
  mica reads from ``non_tensor_batch`` (``mica_distance``, ``mica_initial_distance``,
  ``mica_turn_start``) and the outcome score at the last valid response token (where verl's
  agent loop writes ``rm_scores``);
- ``turn_rows``: one row per turn (verl's v1 multi-output agent loop), keyed
  ``{uid}_{session}_{index}``, the session's score on the last token of every row (verl
  copies it), rows of different sessions interleaved.

``expected`` runs tests/naive.py's ``naive_estimate`` on the same episodes: the independent
per-turn computation every layout is compared with.
"""

from __future__ import annotations

import numpy as np

from naive import naive_estimate


def random_episodes(rng, n_groups=3, per_group=(1, 4), max_turns=4, tool_p=0.3):
    episodes = []
    for g in range(n_groups):
        for s in range(int(rng.integers(per_group[0], per_group[1] + 1))):
            T = int(rng.integers(1, max_turns + 1))
            d0 = float(np.float32(rng.uniform(1, 6)))
            turns = []
            for _ in range(T):
                tool = rng.random() < tool_p
                turns.append({
                    "reply": int(rng.integers(1, 4)),
                    "tool": (int(rng.integers(1, 3)), int(rng.integers(1, 3))) if tool else None,
                    "user": int(rng.integers(1, 4)),
                    "distance": float(np.float32(rng.uniform(0, 6))),
                    "key": f"s{int(rng.integers(0, 3))}",  # the anchor state (scope key)
                })
            # a trajectory may end on its last assistant token (no user reply after it)
            if rng.random() < 0.3:
                turns[-1]["user"] = 0
            episodes.append({"uid": f"uid{g}", "session": s, "initial_distance": d0,
                             "turns": turns})
    return episodes


def _turn_tokens(turn):
    """(response_mask list, turn-relative start) of one turn: reply [tool, more reply], user."""
    mask = [1] * turn["reply"]
    if turn["tool"] is not None:
        tool_len, more = turn["tool"]
        mask += [0] * tool_len + [1] * more
    return mask + [0] * turn["user"]


def score_of(ep, kind="idr"):
    """The outcome a reward function would return: D_{-1} - D_{T-1} (the summed IDR)."""
    return ep["initial_distance"] - ep["turns"][-1]["distance"]


def trajectory_rows(episodes, pad=2):
    """verl's one-row-per-trajectory layout as numpy arrays and non-tensor columns."""
    rows = []
    for ep in episodes:
        mask, starts = [], []
        for turn in ep["turns"]:
            starts.append(len(mask))
            mask += _turn_tokens(turn)
        rows.append((mask, starts))
    L = max(len(m) for m, _ in rows) + pad
    B = len(episodes)
    response_mask = np.zeros((B, L), dtype=np.int64)
    valid = np.zeros(B, dtype=np.int64)
    scores = np.zeros((B, L), dtype=np.float32)
    for b, ((mask, _), ep) in enumerate(zip(rows, episodes)):
        response_mask[b, :len(mask)] = mask
        valid[b] = len(mask)
        scores[b, len(mask) - 1] = score_of(ep)
    nt = {
        "uid": np.array([ep["uid"] for ep in episodes], dtype=object),
        "mica_distance": _objects([[t["distance"] for t in ep["turns"]] for ep in episodes]),
        "mica_initial_distance": np.array([ep["initial_distance"] for ep in episodes]),
        "mica_turn_start": _objects([s for _, s in rows]),
        "mica_key": _objects([[t["key"] for t in ep["turns"]] for ep in episodes]),
    }
    return {"response_mask": response_mask, "valid_length": valid, "scores": scores,
            "non_tensor": nt}


def turn_rows(episodes, rng, pad=1):
    """verl v1's one-row-per-turn layout; rows shuffled across sessions."""
    items = []
    for ep in episodes:
        for i, turn in enumerate(ep["turns"]):
            items.append((f"{ep['uid']}_{ep['session']}_{i}", ep, i, _turn_tokens(turn)))
    order = rng.permutation(len(items))
    items = [items[k] for k in order]
    L = max(len(m) for *_, m in items) + pad
    B = len(items)
    response_mask = np.zeros((B, L), dtype=np.int64)
    scores = np.zeros((B, L), dtype=np.float32)
    for b, (_, ep, _, mask) in enumerate(items):
        response_mask[b, :len(mask)] = mask
        scores[b, len(mask) - 1] = score_of(ep)  # verl copies the session's score to each row
    nt = {
        "uid": np.array([ep["uid"] for _, ep, _, _ in items], dtype=object),
        "mica_distance": _objects([[ep["turns"][i]["distance"]] for _, ep, i, _ in items]),
        "mica_initial_distance": np.array([ep["initial_distance"] for _, ep, _, _ in items]),
        "mica_key": _objects([[ep["turns"][i]["key"]] for _, ep, i, _ in items]),
    }
    return {"response_mask": response_mask, "scores": scores, "non_tensor": nt,
            "keys": [k for k, *_ in items], "turn": [(ep, i) for _, ep, i, _ in items]}


def _objects(lists):
    out = np.empty(len(lists), dtype=object)
    out[:] = lists
    return out


def lone_rule(trajs, estimator, results, lone_rollout="zero", **opts):
    """``results`` (naive_estimate of ``trajs``) with the lone-rollout rule applied: under
    ``"zero"`` a trajectory alone in its group keeps only its batch-scope components (naive
    again, on a spec holding those components alone), or 0 when there are none."""
    if lone_rollout == "within":
        return results
    from naive import PRESETS

    kind, gamma, returns, comps = PRESETS[estimator]
    kept = [c for c in comps if c[2] == "batch"]
    part = naive_estimate(trajs, spec=(kind, gamma, returns, kept), **opts) if kept else None
    sizes = {}
    for t in trajs:
        sizes[t["group"]] = sizes.get(t["group"], 0) + 1
    out = []
    for i, (t, res) in enumerate(zip(trajs, results)):
        if sizes[t["group"]] == 1:
            res = [(r, g, part[i][k][2] if part else 0.0) for k, (r, g, _) in enumerate(res)]
        out.append(res)
    return out


def expected(episodes, estimator, *, signal="distance", kl=None, lone_rollout="zero", **opts):
    """Per episode, naive (reward, return, advantage) per turn.

    ``signal="distance"``: mica computes IDR/ADR from the distances; ``"score"``: the outcome
    score is the only reward, on the last turn; ``"turn_reward"``: the preset's own per-turn
    reward (IDR or ADR) given as rewards, as mica's v1 agent-loop outputs carry it. ``kl``: per
    episode, per turn, an extra reward (the per-turn sum of a dense KL term) added to each
    turn's reward. ``lone_rollout``: see :func:`lone_rule`.
    """
    trajs = []
    for e, ep in enumerate(episodes):
        d = [t["distance"] for t in ep["turns"]]
        if signal in ("distance", "turn_reward"):
            from naive import PRESETS, rewards_of

            kind = PRESETS[estimator][0]
            r = rewards_of({"distances": d, "initial_distance": ep["initial_distance"]}, kind)
        else:
            r = [0.0] * (len(d) - 1) + [float(np.float32(score_of(ep)))]
        if kl is not None:
            r = [x + k for x, k in zip(r, kl[e])]
        trajs.append({"group": ep["uid"], "rewards": r,
                      "keys": [t.get("key") for t in ep["turns"]]})
    return lone_rule(trajs, estimator, naive_estimate(trajs, estimator, **opts), lone_rollout,
                     **opts)


def expected_tokens(episodes, results, column, layout):
    """naive per-turn values (column 0 reward, 1 return, 2 advantage) on their tokens."""
    if layout == "trajectory":
        out = []
        for ep, res in zip(episodes, results):
            row = []
            for turn, vals in zip(ep["turns"], res):
                row += [vals[column] if m else 0.0 for m in _turn_tokens(turn)]
            out.append(row)
        return out
    raise ValueError(layout)
