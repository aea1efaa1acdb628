"""The study's evaluation: ``mica_train.trainer.evaluate``'s episodes and metrics, plus what the
policy does in them.

``evaluate_with_behaviour`` plays exactly the episodes of ``evaluate`` (same scenarios, seeds,
torch generator and merged adapter; a test checks the metrics agree) and keeps the replies. Each episode is then
replayed in the deterministic embedded simulator, asking the scripted ``pacing`` policy
(docs/env.md section 4) which act it would use on every turn. The behaviour summary:

- ``pacing_agreement``: share of turns whose reply shows exactly pacing's act;
- ``act_shares``: share of turns whose reply shows only ``validate``, only ``reframe``, only
  ``plan``, several acts (diluted) or none (a setback in the simulator);
- ``opening_validation``: share of episodes whose first two replies only validate (pacing's
  opening, which builds the rapport that makes later advice count).
"""

from __future__ import annotations

import random
from typing import Any

from .plan import ACT_KEYS

__all__ = ["behaviour_summary", "evaluate_with_behaviour", "evaluation_episodes"]


def behaviour_summary(records, scenarios, seeds, env) -> dict[str, Any]:
    """Replay ``records`` (from ``run_episodes``) and summarize the acts of their replies."""
    from ..env.acts import detect_acts
    from ..env.policies import pacing

    n_turns = agree = opening = mismatches = 0
    shares = dict.fromkeys(ACT_KEYS, 0)
    for rec, sc, seed in zip(records, scenarios, seeds):
        ep = env.reset(sc, seed=int(seed))
        first = []
        for turn in rec.turns:
            wanted = detect_acts(pacing(ep, random.Random(0)))
            acts = detect_acts(turn.reply)
            key = acts[0] if len(acts) == 1 else ("none" if not acts else "multiple")
            shares[key] += 1
            agree += acts == wanted
            n_turns += 1
            if len(first) < 2:
                first.append(acts)
            res = ep.step(turn.reply)
            mismatches += abs(float(res.distance) - turn.distance) > 1e-9
        opening += first == [("validate",), ("validate",)]
    return {
        "turns": n_turns,
        "pacing_agreement": agree / n_turns if n_turns else float("nan"),
        "act_shares": {k: v / n_turns if n_turns else float("nan") for k, v in shares.items()},
        "opening_validation": opening / len(records) if records else float("nan"),
        "replay_mismatches": mismatches,
    }


def evaluation_episodes(cfg, eval_seed: int | None = None):
    """What the trainer's evaluation plays: ``(base_seed, env, jobs, cards, seeds)``, ``jobs``
    the ``(card index, episode)`` pairs, ``cards`` and ``seeds`` the episodes' cards and seeds;
    ``eval_seed`` replaces ``cfg.eval.seed``."""
    from ..config import make_env_config
    from ..env import eval_scenarios, make_env
    from ..rollout import derive_seed

    base = cfg.eval.seed if eval_seed is None else int(eval_seed)
    scenarios = list(eval_scenarios())
    env = make_env(make_env_config(cfg.env, cfg.eval.max_turns or None))
    jobs = [(i, k) for i in range(len(scenarios)) for k in range(cfg.eval.episodes_per_scenario)]
    return base, env, jobs, [scenarios[i] for i, _ in jobs], [derive_seed(base, i, k) for i, k in jobs]


def evaluate_with_behaviour(policy, cfg, eval_seed: int | None = None) -> dict[str, Any]:
    """``evaluate(policy, cfg)`` on the evaluation set (one process) plus ``behaviour``;
    ``eval_seed`` replaces ``cfg.eval.seed`` (other episodes of the same cards)."""
    import torch

    from ..env import aggregate_metrics
    from ..rollout import derive_seed, run_episodes
    from ..trainer import generation_context

    base, env, jobs, cards, seeds = evaluation_episodes(cfg, eval_seed)
    with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []), \
            generation_context(policy, cfg.rollout):
        torch.manual_seed(derive_seed(base, 0))
        records = run_episodes(policy, env, cards, seeds, [i for i, _ in jobs], list(range(len(jobs))),
                               cfg.rollout, temperature=cfg.eval.temperature)
    out = dict(aggregate_metrics([r.metrics for r in records]))
    out["behaviour"] = behaviour_summary(records, cards, seeds, env)
    return out
