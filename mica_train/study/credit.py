"""Credit-assignment quality without training: which turns does each estimator credit, and how
well do its advantages track the true advantage of the reply?

Rollouts come from a behaviour policy that picks a uniformly random support act on every turn
(as the warm-started policy does: it speaks every kind of reply and prefers none), on generated
training cards, ``group_size`` rollouts per card at the training turn limits. Each estimator's
turn advantages are computed on these groups exactly as in training, then scored two ways.

**Pacing label.** On every turn the scripted ``pacing`` policy (which passes every evaluation
card at 45 turns, docs/env.md section 4) is asked which act *it* would use; a turn is *good*
when the random act is pacing's act.

- ``auc``: the probability that a random good turn gets a larger advantage than a random other
  turn (ties count one half); 0.5 is no credit signal at all;
- ``effect``: (mean advantage of good turns - mean of the others) / the advantages' std.

**True advantage by forking** (:func:`fork_true_advantage`). The embedded simulator is
deterministic given its random draws, so the value of a reply can be measured directly: from
the state ``s_t`` before turn ``t`` (conversation, support state and the simulator's hidden
state, ``Episode.fork``), for each act ``a`` and ``k = 1..K``, send a reply showing ``a`` and
let the behaviour policy continue to the episode's end; ``Y_k(a) = D_{t-1} - D_end`` is the
distance the rest of the episode removes (the undiscounted IDR return from ``t``). Fork ``k``
of every act uses the same random draws (simulator and continuation: common random numbers);
different ``k`` use different ones. Then::

    Q(s_t, a) = mean_k Y_k(a)        V(s_t) = mean_a Q(s_t, a)        A*_t = Q(s_t, a_t) - V(s_t)

``V`` is the mean over the three acts because the behaviour policy picks each act with
probability 1/3 and the judge reads only the acts of a reply. ``A*`` is the advantage a policy
gradient at the behaviour policy needs; each estimator is scored by the Pearson and Spearman
correlation of its advantages with ``A*`` over the forked turns. ``A*`` from halves of the
forks (``k`` odd, ``k`` even) gives its split-half reliability, the ceiling of any correlation.

Everything is the embedded simulator and ``mica_core``: no model, deterministic by ``seed``.
``mica study`` runs one diagnostic per study seed and stores the summary under
``credit_diagnostic`` in ``study.json``.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["credit_diagnostic", "fork_true_advantage", "label_rollouts", "pearson", "spearman"]


def _play_random(ep, rng) -> float:
    """Continue ``ep`` with a uniformly random act per turn to its end; the final distance."""
    from ..env import SUPPORT_ACTS, sample_reply

    res_distance = ep.distances[-1] if ep.distances else ep.initial_distance
    while not ep.done:
        res_distance = ep.step(sample_reply(rng.choice(SUPPORT_ACTS), rng, ep.scenario)).distance
    return float(res_distance)


def fork_true_advantage(ep, act: str, forks: int, key: str) -> dict[str, float]:
    """The true advantage of ``act`` at the current state of ``ep`` (module docstring): ``A*``
    from ``forks`` forks per act, and from the odd and even forks alone (``a_half``,
    ``b_half``). ``ep`` itself is not advanced. ``key`` names the turn; fork ``k`` of every act
    draws from generators seeded by ``(key, k)``."""
    from ..env import SUPPORT_ACTS, sample_reply

    before = float(ep.distances[-1] if ep.distances else ep.initial_distance)
    q = {a: [] for a in SUPPORT_ACTS}
    for k in range(forks):
        fork_seed = random.Random(f"mica-study-fork|{key}|{k}").randrange(2**31)
        for a in SUPPORT_ACTS:
            rng = random.Random(fork_seed)  # the same continuation draws for every act
            f = ep.fork(seed=fork_seed)
            f.step(sample_reply(a, rng, ep.scenario))
            q[a].append(before - _play_random(f, rng))

    def adv(ks):
        means = {a: sum(q[a][k] for k in ks) / len(ks) for a in SUPPORT_ACTS}
        return means[act] - sum(means.values()) / len(means)

    out = {"true_advantage": adv(range(forks))}
    if forks >= 2:
        out["a_half"] = adv(range(0, forks, 2))
        out["b_half"] = adv(range(1, forks, 2))
    return out


def label_rollouts(n_scenarios: int = 64, group_size: int = 8, seed: int = 0, max_turns: int = 15,
                   min_turns: int = 12, forks: int = 0, fork_scenarios: int = 0) -> dict[str, list]:
    """Random-act episodes on generated training cards, ``group_size`` per card; the long-form
    columns of ``mica_core.compute_advantages`` plus ``good`` (the act is pacing's act) and,
    with ``forks`` > 0, ``true_advantage`` (and its halves ``a_half``, ``b_half``) on the turns
    of the first ``fork_scenarios`` cards (NaN elsewhere). The rollouts themselves do not depend
    on ``forks``."""
    from ..env import SUPPORT_ACTS, EnvConfig, generate_scenarios, make_env, sample_reply
    from ..env.acts import detect_acts
    from ..env.policies import pacing

    env = make_env(EnvConfig(max_turns=max_turns, min_turns=min_turns))
    keys = ("group_id", "traj_id", "turn", "distance", "initial_distance", "good")
    if forks:
        keys += ("true_advantage", "a_half", "b_half")
    cols: dict[str, list] = {k: [] for k in keys}
    nan = float("nan")
    rng = random.Random(f"mica-study-credit|{seed}")
    for g, sc in enumerate(generate_scenarios(n_scenarios, seed=1000 + seed, prefix="credit")):
        for k in range(group_size):
            traj = g * group_size + k
            ep = env.reset(sc, seed=rng.randrange(2**31))
            t = 0
            while not ep.done:
                wanted = detect_acts(pacing(ep, random.Random(0)))
                act = rng.choice(SUPPORT_ACTS)
                if forks:
                    star = (fork_true_advantage(ep, act, forks, f"{seed}|{traj}|{t}") if g < fork_scenarios
                            else {})
                    for name in ("true_advantage", "a_half", "b_half"):
                        cols[name].append(star.get(name, nan))
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
    ranks = _average_ranks(np.concatenate([pos, neg]))
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def _average_ranks(values):
    """Ranks 1..n of ``values``, ties given their average rank."""
    import numpy as np

    values = np.asarray(values, float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_v = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x, y) -> float:
    """Pearson's correlation of ``x`` and ``y`` (NaN when either is constant)."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    dx, dy = x - x.mean(), y - y.mean()
    den = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's of the average ranks)."""
    return pearson(_average_ranks(x), _average_ranks(y))


def credit_diagnostic(estimators, n_scenarios: int = 64, group_size: int = 8, seed: int = 0,
                      max_turns: int = 15, min_turns: int = 12, forks: int = 0,
                      fork_scenarios: int = 0) -> dict[str, Any]:
    """AUC and effect size of each estimator's advantages for pacing-consistent turns; with
    ``forks`` > 0 also their correlation with the forked true advantage ``A*`` on the turns of
    the first ``fork_scenarios`` cards, the pacing label's correlation with ``A*`` and ``A*``'s
    split-half reliability (module docstring)."""
    import numpy as np
    import pyarrow as pa

    import mica_core as mc

    cols = label_rollouts(n_scenarios, group_size, seed, max_turns, min_turns, forks, fork_scenarios)
    good = np.asarray(cols.pop("good"), bool)
    star = {k: np.asarray(cols.pop(k), float) for k in ("true_advantage", "a_half", "b_half") if k in cols}
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
    forked = None
    if star:
        forked = ~np.isnan(star["true_advantage"])
        a_star = star["true_advantage"][forked]
        out["true_advantage"] = {
            "forks_per_act": forks,
            "fork_scenarios": fork_scenarios,
            "turns": int(forked.sum()),
            "sd": float(a_star.std(ddof=1)) if len(a_star) > 1 else float("nan"),
            "split_half_r": pearson(star["a_half"][forked], star["b_half"][forked]) if forks >= 2 else None,
            "good_label_pearson": pearson(good[forked].astype(float), a_star),
            "good_mean": float(a_star[good[forked]].mean()) if good[forked].any() else float("nan"),
            "other_mean": float(a_star[~good[forked]].mean()) if (~good[forked]).any() else float("nan"),
        }
        r = out["true_advantage"]["split_half_r"]
        # Spearman-Brown: the reliability of the mean of both halves.
        out["true_advantage"]["reliability"] = 2 * r / (1 + r) if r is not None and r > -1 else None
    for est in estimators:
        adv = mc.compute_advantages(table, estimator=est).column("advantage").to_numpy()
        sd = float(adv.std())
        entry = {
            "auc": _auc(adv[good], adv[~good]),
            "effect": float((adv[good].mean() - adv[~good].mean()) / sd) if sd > 0 else 0.0,
        }
        if forked is not None:
            entry["true_pearson"] = pearson(adv[forked], a_star)
            entry["true_spearman"] = spearman(adv[forked], a_star)
        out["estimators"][est] = entry
    return out
