"""Rollouts: episodes of the policy against the environment, run in lockstep so that every
turn of every live episode is one batched ``generate`` call, and the trajectory table.

The trajectory table (Arrow, long form, one row per turn) is what ``mica_core`` reads::

    group_id int64, traj_id int64, turn int32, distance float64, initial_distance float64,
    prompt_ids list<int32>, response_ids list<int32>, reply string
    [logprobs list<float32>, entropies list<float32>]   (rollouts run with_logprobs)

``prompt_ids`` is exactly what the policy was conditioned on and ``response_ids`` exactly what
it sampled (the reply span, end-of-turn token included); the text sent to the environment is
``reply``. The turn's advantage applies to every token of ``response_ids`` and nothing else.

The environment steps of one lockstep turn go through ``env.step_episodes``, which runs them
concurrently for the LLM simulators (their judge and user requests are in flight together);
the policy still makes one batched ``generate`` call per turn.

``logprobs`` and ``entropies`` (one per token of ``response_ids``) are the sampling policy's
log-probabilities and next-token entropies, from ``generate``'s logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["EpisodeRecord", "Turn", "derive_seed", "run_episodes", "trajectory_table"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (``SeedSequence`` mixing; stable across runs)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class Turn:
    prompt_ids: list[int]
    response_ids: list[int]
    reply: str
    distance: float
    user_message: str = ""             # the message the reply answers
    state: tuple | None = None         # support state after the turn
    rubric: dict | None = None         # the judge's progress rubric (None: the judge failed)
    judge_failed: bool = False
    logprobs: list[float] | None = None
    entropies: list[float] | None = None


@dataclass
class EpisodeRecord:
    group: int
    traj: int
    initial_distance: float
    turns: list[Turn] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    scenario_id: str = ""
    topic: str = ""
    initial_state: tuple | None = None


def run_episodes(
    policy,
    env,
    scenarios: Sequence[Any],
    seeds: Sequence[int],
    groups: Sequence[int],
    trajs: Sequence[int],
    rollout_cfg,
    temperature: float | None = None,
    with_logprobs: bool = False,
    progress=None,
) -> list[EpisodeRecord]:
    """Play one episode per ``(scenario, seed)`` to its end; all live episodes advance together.

    ``with_logprobs`` also records each reply token's log-probability and entropy;
    ``progress(finished, total, turn)`` is called after every lockstep turn when given.
    """
    from .policy import encode_prompts, generate_replies, prompt_messages

    tok = policy.tokenizer
    temp = rollout_cfg.temperature if temperature is None else temperature
    episodes = _reset_episodes(env, scenarios, [int(s) for s in seeds])
    records = [
        EpisodeRecord(group=int(g), traj=int(t), initial_distance=float(ep.initial_distance),
                      scenario_id=str(ep.scenario.id), topic=str(getattr(ep.scenario, "topic", "")),
                      initial_state=tuple(ep.initial_state))
        for g, t, ep in zip(groups, trajs, episodes)
    ]
    live = [i for i, ep in enumerate(episodes) if not ep.done]
    turn = 0
    while live:
        convs = [
            prompt_messages(episodes[i].messages, rollout_cfg.context_messages, rollout_cfg.system_prompt,
                            rollout_cfg.context_replies)
            for i in live
        ]
        prompts = encode_prompts(tok, convs, rollout_cfg.max_prompt_tokens)
        generated = generate_replies(
            policy,
            prompts,
            temperature=temp,
            top_p=rollout_cfg.top_p,
            max_new_tokens=rollout_cfg.max_new_tokens,
            batch_size=rollout_cfg.batch_size,
            with_logprobs=with_logprobs,
            sampler=rollout_cfg.sampler,
        )
        replies, logprobs, entropies = generated if with_logprobs else (generated, None, None)
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in replies]
        asked = [episodes[i].messages[-1]["content"] for i in live]
        results = _step_episodes(env, [episodes[i] for i in live], texts)
        for j, (i, p, r, text, question, result) in enumerate(
                zip(live, prompts, replies, texts, asked, results)):
            records[i].turns.append(Turn(
                prompt_ids=p, response_ids=r, reply=text, distance=float(result.distance),
                user_message=question, state=tuple(result.state), rubric=result.rubric,
                judge_failed=bool(result.judge_failed),
                logprobs=None if logprobs is None else logprobs[j],
                entropies=None if entropies is None else entropies[j]))
        live = [i for i in live if not episodes[i].done]
        turn += 1
        if progress is not None:
            progress(len(episodes) - len(live), len(episodes), turn)
    for rec, ep in zip(records, episodes):
        rec.metrics = dict(ep.metrics())
    return records


def _reset_episodes(env, scenarios, seeds):
    if hasattr(env, "reset_episodes"):
        return env.reset_episodes(scenarios, seeds)
    return [env.reset(sc, seed=s) for sc, s in zip(scenarios, seeds)]


def _step_episodes(env, episodes, replies):
    if hasattr(env, "step_episodes"):
        return env.step_episodes(episodes, replies)
    return [ep.step(r) for ep, r in zip(episodes, replies)]


def trajectory_table(records: Sequence[EpisodeRecord]):
    """The long-form Arrow table of ``records`` (module docstring), rows in trajectory-turn order."""
    import pyarrow as pa

    group, traj, turn, dist, init, prompts, responses, replies = [], [], [], [], [], [], [], []
    logprobs, entropies = [], []
    for rec in records:
        for t, tr in enumerate(rec.turns):
            group.append(rec.group)
            traj.append(rec.traj)
            turn.append(t)
            dist.append(tr.distance)
            init.append(rec.initial_distance)
            prompts.append(tr.prompt_ids)
            responses.append(tr.response_ids)
            replies.append(tr.reply)
            logprobs.append(tr.logprobs)
            entropies.append(tr.entropies)
    table = pa.table(
        {
            "group_id": pa.array(group, pa.int64()),
            "traj_id": pa.array(traj, pa.int64()),
            "turn": pa.array(turn, pa.int32()),
            "distance": pa.array(dist, pa.float64()),
            "initial_distance": pa.array(init, pa.float64()),
            "prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
            "response_ids": pa.array(responses, pa.list_(pa.int32())),
            "reply": pa.array(replies, pa.string()),
        }
    )
    if logprobs and all(x is not None for x in logprobs):
        table = table.append_column("logprobs", pa.array(logprobs, pa.list_(pa.float32())))
        table = table.append_column("entropies", pa.array(entropies, pa.list_(pa.float32())))
    return table
