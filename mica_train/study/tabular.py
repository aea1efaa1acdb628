"""The study's fast policy class (``mica study --policy tabular``): a softmax policy over
one-hot features of what the language-model policy sees, trained like it.

What it sees. The language-model policy's prompt (the ``study`` config: ``context_messages:
1``, ``context_replies: 2``) holds the user's latest message and its own last two replies.
The features are read from the same text:

- the needs the message names, in order (``policies.read_needs``): the first and the second
  named need, each ``C`` / ``A`` / ``P`` / none (8 columns);
- the distress its opener shows (``policies.read_distress``): high / medium / low (3);
- the turn index, bucketed 0, 1, 2, 3, 4-5, 6-8, 9-11, 12+ (8);
- its own last act and the act before, each ``validate`` / ``reframe`` / ``plan`` / none
  (8), and whether its last two replies showed the same act, per act (3);
- a constant (1).

What it does. ``logits = phi(s) @ W.T`` over the three support acts (``env.SUPPORT_ACTS``),
``W`` of shape ``[3, 31]`` starting at zero (a uniformly random act: like the warm start, it
prefers no act). The chosen act becomes a reply with ``env.sample_reply``, which the
environment judges as it judges the language model's replies.

How it learns. Exactly the trainer's step with the act as the reply's single token: the
rollout batch (``data.scenarios_per_step`` cards x ``data.group_size`` episodes, cards drawn as
the trainer draws them), ``mica_core.estimate`` with ``advantage.estimator`` on the turns'
distances, then ``optim.epochs`` x ``optim.minibatches`` AdamW updates (``optim.lr``,
``betas``, ``weight_decay``, warm-up and cosine schedule, gradient clipping) of
``mica_train.loss.policy_loss`` (PPO-clip with ``loss.eps_low`` / ``eps_high`` / ``dual_clip``,
``kl_coef`` and ``entropy_coef`` as configured; a KL term compares with the initial uniform
policy). Old log-probabilities are those the acts were sampled with.

Cost: the environment dominates (about 15 us a turn in the policy, 60-80 us in the embedded
simulator); the policy evaluates all live episodes of a batch in one matrix product per turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FEATURES", "TabularPolicy", "evaluate_tabular", "features", "train_tabular"]

_NEEDS = ("C", "A", "P", None)
_DISTRESS = ("high", "medium", "low")
_TURN_EDGES = (1, 2, 3, 4, 6, 9, 12)  # bucket k holds turns t with edges[k-1] <= t < edges[k]
_LAST = ("validate", "reframe", "plan", None)
_ACT_INDEX = {"validate": 0, "reframe": 1, "plan": 2}


def _names() -> tuple[str, ...]:
    turn = ("0", "1", "2", "3", "4-5", "6-8", "9-11", "12+")
    return (
        *(f"need1={n}" for n in _NEEDS), *(f"need2={n}" for n in _NEEDS),
        *(f"distress={d}" for d in _DISTRESS), *(f"turn={t}" for t in turn),
        *(f"last={a}" for a in _LAST), *(f"before_last={a}" for a in _LAST),
        *(f"twice={a}" for a in _LAST[:3]), "bias",
    )


FEATURES = _names()
"""Column names of the feature vector."""

_OFF = {"need1": 0, "need2": 4, "distress": 8, "turn": 11, "last": 19, "before": 23, "twice": 27, "bias": 30}


_MESSAGE_COLUMNS: dict[str, tuple[int, int, int]] = {}


def _message_columns(message: str) -> tuple[int, int, int]:
    """The columns that ``message`` sets (first need, second need, distress), cached: the
    embedded user's messages come from a few hundred templates."""
    cols = _MESSAGE_COLUMNS.get(message)
    if cols is None:
        from ..env.policies import read_distress, read_needs

        needs = read_needs(message)
        cols = (_OFF["need1"] + _NEEDS.index(needs[0] if needs else None),
                _OFF["need2"] + _NEEDS.index(needs[1] if len(needs) > 1 else None),
                _OFF["distress"] + _DISTRESS.index(read_distress(message)))
        if len(_MESSAGE_COLUMNS) < 100_000:
            _MESSAGE_COLUMNS[message] = cols
    return cols


def features(message: str, turn: int, own_acts: list) -> np.ndarray:
    """The feature vector (``FEATURES``) of one decision: the user's latest ``message``, the
    0-based ``turn`` and the acts of the policy's earlier replies (``own_acts``, act names or
    None for a reply that showed none or several)."""
    x = np.zeros(len(FEATURES), np.float32)
    x[list(_message_columns(message))] = 1.0
    x[_OFF["turn"] + int(np.searchsorted(_TURN_EDGES, turn, side="right"))] = 1.0
    last = own_acts[-1] if own_acts else None
    before = own_acts[-2] if len(own_acts) > 1 else None
    x[_OFF["last"] + _LAST.index(last)] = 1.0
    x[_OFF["before"] + _LAST.index(before)] = 1.0
    if last is not None and last == before:
        x[_OFF["twice"] + _ACT_INDEX[last]] = 1.0
    x[_OFF["bias"]] = 1.0
    return x


class TabularPolicy:
    """``W`` (``[3, len(FEATURES)]``, a torch parameter) and how to sample from it."""

    def __init__(self):
        import torch

        self.weight = torch.nn.Parameter(torch.zeros(3, len(FEATURES), dtype=torch.float64))

    def logits(self, x):
        import torch

        return torch.as_tensor(x, dtype=torch.float64) @ self.weight.T

    def sample(self, x: np.ndarray, rng: np.random.Generator, temperature: float = 1.0):
        """Acts (indices into ``SUPPORT_ACTS``) for the rows of ``x`` and their log-probabilities
        at ``temperature`` (0: the most likely act, log-probability 0)."""
        w = self.weight.detach().numpy()
        z = x.astype(np.float64) @ w.T
        if temperature <= 0:
            return z.argmax(axis=1), np.zeros(len(x))
        z = z / temperature
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        u = rng.random(len(x))
        acts = (np.exp(logp).cumsum(axis=1) < u[:, None]).sum(axis=1).clip(max=2)
        return acts, logp[np.arange(len(x)), acts]

    def state(self) -> list[list[float]]:
        return self.weight.detach().numpy().tolist()


@dataclass
class _Batch:
    x: np.ndarray          # [n_turns, F]
    act: np.ndarray        # [n_turns]
    logp: np.ndarray       # [n_turns]
    distance: np.ndarray   # [n_turns]
    initial: np.ndarray    # [n_traj]
    offsets: np.ndarray    # [n_traj + 1]
    group: np.ndarray      # [n_traj]
    metrics: list          # per episode
    records: list          # per episode: (replies, distances) for the behaviour summary


def play(policy: TabularPolicy, env, scenarios, seeds, groups, rng: np.random.Generator,
         temperature: float = 1.0, keep_replies: bool = False) -> _Batch:
    """Play one episode per ``(scenario, seed)`` with ``policy``, all live episodes deciding
    together each turn. Replies come from ``sample_reply`` with a generator seeded by the
    episode's seed; acts from ``rng``."""
    from ..env import SUPPORT_ACTS, sample_reply

    eps = [env.reset(sc, seed=int(s)) for sc, s in zip(scenarios, seeds)]
    reply_rng = [random.Random(f"mica-study-tabular|{s}") for s in seeds]
    own: list[list] = [[] for _ in eps]
    rows: list[list] = [[] for _ in eps]  # per episode: (x, act, logp, distance)
    replies: list[list] = [[] for _ in eps]
    live = list(range(len(eps)))
    while live:
        x = np.stack([features(eps[i].messages[-1]["content"], eps[i].turn, own[i]) for i in live])
        acts, logps = policy.sample(x, rng, temperature)
        still = []
        for j, i in enumerate(live):
            act = SUPPORT_ACTS[int(acts[j])]
            reply = sample_reply(act, reply_rng[i], eps[i].scenario)
            res = eps[i].step(reply)
            own[i].append(act)
            rows[i].append((x[j], int(acts[j]), float(logps[j]), float(res.distance)))
            if keep_replies:
                replies[i].append((reply, float(res.distance)))
            if not res.done:
                still.append(i)
        live = still
    flat = [r for ep_rows in rows for r in ep_rows]
    lengths = [len(r) for r in rows]
    return _Batch(
        x=np.stack([r[0] for r in flat]),
        act=np.array([r[1] for r in flat], np.int64),
        logp=np.array([r[2] for r in flat]),
        distance=np.array([r[3] for r in flat]),
        initial=np.array([ep.initial_distance for ep in eps]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        group=np.asarray(groups, np.int64),
        metrics=[ep.metrics() for ep in eps],
        records=replies,
    )


class _Turn:
    __slots__ = ("reply", "distance")

    def __init__(self, reply, distance):
        self.reply, self.distance = reply, distance


class _Record:
    __slots__ = ("turns",)

    def __init__(self, turns):
        self.turns = [_Turn(r, d) for r, d in turns]


def evaluate_tabular(policy: TabularPolicy, cfg, eval_seed: int | None = None, *,
                     behaviour: bool = True) -> dict[str, Any]:
    """The evaluation of ``evaluation.evaluate_with_behaviour`` for a tabular policy: the 30
    evaluation cards x ``eval.episodes_per_scenario`` at ``eval.max_turns`` and
    ``eval.temperature``, the same episode seeds and metrics, and (``behaviour``) the behaviour
    summary, which replays every episode."""
    from ..env import aggregate_metrics
    from ..rollout import derive_seed
    from .evaluation import behaviour_summary, evaluation_episodes

    base, env, jobs, cards, seeds = evaluation_episodes(cfg, eval_seed)
    batch = play(policy, env, cards, seeds, [i for i, _ in jobs], np.random.default_rng(derive_seed(base, 0)),
                 temperature=cfg.eval.temperature, keep_replies=behaviour)
    out = dict(aggregate_metrics(batch.metrics))
    if behaviour:
        out["behaviour"] = behaviour_summary([_Record(r) for r in batch.records], cards, seeds, env)
    return out


def _scenario_index(cfg, n: int, step: int, group: int) -> int:
    """The trainer's draw (``Trainer._scenario_index``): without replacement, a fresh
    permutation of the pool per pass."""
    from ..rollout import derive_seed

    k = (step - 1) * cfg.data.scenarios_per_step + group
    perm = np.random.default_rng(derive_seed(cfg.seed, 7, k // n)).permutation(n)
    return int(perm[k % n])


def train_tabular(cfg, on_step=None) -> dict[str, Any]:
    """Train a :class:`TabularPolicy` under ``cfg`` (module docstring); ``on_step(step, record,
    policy)`` after each step. Returns ``{"policy", "records"}``."""
    import torch

    import mica_core as mc

    from ..config import make_env_config
    from ..env import aggregate_metrics, make_env
    from ..loss import policy_loss
    from ..rollout import derive_seed
    from ..trainer import training_scenarios, warmup_cosine

    torch.manual_seed(derive_seed(cfg.seed, 0, 0))
    policy = TabularPolicy()
    env = make_env(make_env_config(cfg.env))
    pool = training_scenarios(cfg.data)
    oc, lc = cfg.optim, cfg.loss
    opt = torch.optim.AdamW([policy.weight], lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)
    total = cfg.steps * oc.epochs * oc.minibatches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, round(oc.warmup_ratio * total),
                                                                 oc.min_lr_ratio))
    G = cfg.data.group_size
    records = []
    for step in range(1, cfg.steps + 1):
        cards, seeds, groups = [], [], []
        for g in range(cfg.data.scenarios_per_step):
            sc = pool[_scenario_index(cfg, len(pool), step, g)]
            for k in range(G):
                cards.append(sc)
                seeds.append(derive_seed(cfg.seed, step, g, k))
                groups.append(g)
        batch = play(policy, env, cards, seeds, groups, np.random.default_rng(derive_seed(cfg.seed, step, 3)),
                     temperature=cfg.rollout.temperature)
        est = mc.estimate(batch.offsets, batch.group, distance=batch.distance, initial_distance=batch.initial,
                          estimator=cfg.advantage.estimator, **cfg.advantage.options)
        adv = torch.as_tensor(np.asarray(est.advantage, np.float64))
        x = torch.as_tensor(batch.x, dtype=torch.float64)
        act = torch.as_tensor(batch.act)
        old = torch.as_tensor(batch.logp)
        n = len(act)
        sums = dict.fromkeys(("loss", "clip_frac", "ppo_kl", "entropy", "grad_norm"), 0.0)
        updates = 0
        for epoch in range(oc.epochs):
            order = np.random.default_rng(derive_seed(cfg.seed, step, epoch, 11, 0)).permutation(n)
            for mb in np.array_split(order, oc.minibatches):
                if not len(mb):
                    continue
                idx = torch.as_tensor(mb)
                logits = policy.logits(x[idx]) / cfg.rollout.temperature
                logp_all = torch.log_softmax(logits, dim=1)
                logp = logp_all.gather(1, act[idx, None])
                ent = -(logp_all.exp() * logp_all).sum(dim=1, keepdim=True)
                ref = None
                if lc.kl_coef > 0:
                    ref = torch.full_like(logp, -float(np.log(3.0)))
                mask = torch.ones_like(logp)
                terms = policy_loss(logp, old[idx, None], adv[idx, None], mask, eps_low=lc.eps_low,
                                    eps_high=lc.eps_high, dual_clip=lc.dual_clip, ref_logp=ref, kl_coef=lc.kl_coef,
                                    entropy=ent, entropy_coef=lc.entropy_coef)
                opt.zero_grad(set_to_none=True)
                terms.loss.backward()
                if oc.max_grad_norm > 0:
                    gn = torch.nn.utils.clip_grad_norm_([policy.weight], oc.max_grad_norm)
                else:
                    gn = policy.weight.grad.norm()
                opt.step()
                sched.step()
                sums["loss"] += float(terms.loss.detach())
                sums["clip_frac"] += float(terms.clip_frac)
                sums["ppo_kl"] += float(terms.ppo_kl)
                sums["entropy"] += float(terms.entropy)
                sums["grad_norm"] += float(gn)
                updates += 1
        agg = aggregate_metrics(batch.metrics)
        rec = {
            "step": step,
            "pass_rate": float(agg["pass_rate"]),
            "mean_final_distance": float(agg["mean_final_distance"]),
            "mean_turns": float(agg["mean_turns"]),
            "reward_mean": float(np.mean(est.reward)),
            "advantage_std": float(np.std(est.advantage)),
            **{k: v / max(updates, 1) for k, v in sums.items()},
        }
        records.append(rec)
        if on_step is not None:
            on_step(step, rec, policy)
    return {"policy": policy, "records": records}
