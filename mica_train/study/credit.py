"""Credit-assignment quality without training: which turns does each estimator credit?

Rollouts come from a behaviour policy that picks a uniformly random support act on every turn
(as the warm-started policy does: it speaks every kind of reply and prefers none). On every
turn we also ask the scripted ``pacing`` policy, which passes every evaluation card at 45
turns (docs/env.md section 4), which act *it* would use in that conversation; a turn is
labelled *good* when the random act is pacing's act. Each estimator's turn advantages are then
scored by how well they separate good from other turns:

- ``auc``: the probability that a random good turn gets a larger advantage than a random other
  turn (ties count one half); 0.5 is no credit signal at all;
- ``effect``: (mean advantage of good turns - mean of the others) / the advantages' std.

Everything is the embedded simulator and ``mica_core``: no model, about a second, deterministic
by ``seed``. ``mica study`` stores the result under ``credit_diagnostic`` in ``study.json``.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["credit_diagnostic", "label_rollouts"]


def label_rollouts(n_scenarios: int = 64, group_size: int = 8, seed: int = 0, max_turns: int = 15,
                   min_turns: int = 12) -> dict[str, list]:
    """Random-act episodes on generated training cards, ``group_size`` per card; the long-form
    columns of ``mica_core.compute_advantages`` plus ``good`` (the act is pacing's act)."""
    from ..env import SUPPORT_ACTS, EnvConfig, generate_scenarios, make_env, sample_reply
    from ..env.acts import detect_acts
    from ..env.policies import pacing

    env = make_env(EnvConfig(max_turns=max_turns, min_turns=min_turns))
    cols: dict[str, list] = {k: [] for k in ("group_id", "traj_id", "turn", "distance", "initial_distance", "good")}
    rng = random.Random(f"mica-study-credit|{seed}")
    for g, sc in enumerate(generate_scenarios(n_scenarios, seed=1000 + seed, prefix="credit")):
        for k in range(group_size):
            traj = g * group_size + k
            ep = env.reset(sc, seed=rng.randrange(2**31))
            t = 0
            while not ep.done:
                wanted = detect_acts(pacing(ep, random.Random(0)))
                act = rng.choice(SUPPORT_ACTS)
                res = ep.step(sample_reply(act, rng, sc))
                cols["group_id"].append(g)
                cols["traj_id"].append(traj)
                cols["turn"].append(t)
                cols["distance"].append(float(res.distance))
                cols["initial_distance"].append(float(ep.initial_distance))
                cols["good"].append(act in wanted)
                t += 1
    return cols


def _auc(pos, neg) -> float:
    """Mann-Whitney AUC with ties counted one half (average ranks)."""
    import numpy as np

    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def credit_diagnostic(estimators, n_scenarios: int = 64, group_size: int = 8, seed: int = 0,
                      max_turns: int = 15, min_turns: int = 12) -> dict[str, Any]:
    """AUC and effect size of each estimator's advantages for pacing-consistent turns."""
    import numpy as np
    import pyarrow as pa

    import mica_core as mc

    cols = label_rollouts(n_scenarios, group_size, seed, max_turns, min_turns)
    good = np.asarray(cols.pop("good"), bool)
    table = pa.table({
        "group_id": pa.array(cols["group_id"], pa.int64()),
        "traj_id": pa.array(cols["traj_id"], pa.int64()),
        "turn": pa.array(cols["turn"], pa.int32()),
        "distance": pa.array(cols["distance"], pa.float64()),
        "initial_distance": pa.array(cols["initial_distance"], pa.float64()),
    })
    out: dict[str, Any] = {
        "behaviour": "uniformly random act per turn",
        "label": "the act equals the scripted pacing policy's act in that conversation",
        "scenarios": n_scenarios,
        "group_size": group_size,
        "turns": len(good),
        "good_share": float(good.mean()) if len(good) else float("nan"),
        "max_turns": max_turns,
        "min_turns": min_turns,
        "seed": seed,
        "estimators": {},
    }
    for est in estimators:
        adv = mc.compute_advantages(table, estimator=est).column("advantage").to_numpy()
        sd = float(adv.std())
        out["estimators"][est] = {
            "auc": _auc(adv[good], adv[~good]),
            "effect": float((adv[good].mean() - adv[~good].mean()) / sd) if sd > 0 else 0.0,
        }
    return out
