"""mica's estimators as verl advantage estimators.

Each function here has verl's estimator signature::

    fn(token_level_rewards, response_mask, index, config=None, **kwargs) -> (advantages, returns)

and is registered in verl's registry (``verl.trainer.ppo.core_algos.register_adv_est``) when
this module is imported with verl importable, so ``algorithm.adv_estimator=mica`` reaches it
through verl's own ``compute_advantage`` (``verl/trainer/ppo/ray_trainer.py``). verl computes
advantages inside its ``TaskRunner`` Ray actor, so the import has to happen there: set
``VERL_USE_EXTERNAL_MODULES=mica_core.integrations.verl`` in the job's Ray runtime
environment, which ``verl/__init__.py`` reads in every process that imports verl::

    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=mica_core.integrations.verl

Importing this module without verl installed works: registration is skipped.

Layouts (docs/verl.md has the table):

- one row per trajectory (verl's agent loop): the turns of a row are the runs of ones of
  ``response_mask``, or explicit boundaries (``non_tensor_batch["mica_turn_start"]``, per row
  the first token of each turn, or ``batch["mica_turn_index"]``, per token);
- verl's v1 trainer (``trainer.use_v1=True``, the default in 0.9.1): rows keyed
  ``{uid}_{session}_{index}``; the rows of a session are one trajectory in ``index`` order.
  When a session has several rows (a multi-output agent loop) each row is one turn, else the
  row's turns are found as above; ``algorithm.mica.v1_rows=turn|spans`` overrides.

Turn rewards, from the first source present:

1. per-turn signals the rollout left in ``non_tensor_batch`` (an agent loop's
   ``AgentLoopOutput.extra_fields`` or a reward function's extra keys land there):
   ``mica_distance`` + ``mica_initial_distance``, or ``mica_state`` + ``mica_initial_state``
   (distances by :func:`mica_core.distance_from_state`), from which mica computes the
   preset's IDR or ADR itself, or ``mica_reward`` (per-turn rewards given directly). The
   reward function's score is then not used; a KL penalty verl put into the rewards
   (``use_kl_in_reward``: ``token_level_rewards - token_level_scores``) is added per turn;
2. else the token-level rewards, attributed by :func:`mica_core.tokens.turn_rewards_from_tokens`
   (a reward belongs to the latest turn started at or before it; sums per turn).

verl 0.9.1's ``compute_advantage`` hands a registered estimator only ``token_level_rewards``,
``response_mask``, ``index`` (``uid``), ``config`` and ``reward_baselines``; the rollout's fields
stay in ``data.non_tensor_batch`` (verl PR #7473 proposes passing it on). So the estimator
takes ``non_tensor_batch=``, ``batch=`` and ``batch_keys=`` when given, and otherwise reads the
``DataProto`` from verl's ``compute_advantage`` frame: the one whose
``batch["token_level_rewards"]`` is the very tensor it was handed (and, for the v1 trainer,
``batch_keys`` from ``compute_advantage_for_multi_trajectories``). Called outside verl, it
uses the tensors alone.

Registered names: a preset's own name when it starts with ``mica`` (``mica``, ``mica_turn``,
``mica_group``, ``mica_adr``, ``mica_group_adr``), else ``mica_`` + name (``mica_mapo``,
``mica_grpo``, ``mica_reinforce_pp``, ``mica_reinforce_pp_idr``, ``mica_gigpo``), so verl's
own ``grpo`` (and verl-agent's ``gigpo``) are untouched. ``mica_gigpo`` groups turns by
``non_tensor_batch["mica_key"]``: one key per assistant turn of the row, e.g. a hash of the
anchor state the turn answered. With rewards given (token rewards or ``mica_reward``), ``mica_adr`` computes what
``mica`` does: IDR vs ADR needs distances.

Options, each from the first place that has it:

1. keyword arguments of the call: ``gamma``, ``weight``, ``eps``, ``ddof``, ``baseline``,
   ``scale``, ``singleton``; verl's ``epsilon`` means ``eps`` and ``norm_adv_by_std_in_grpo=
   False`` means ``scale="none"``;
2. ``config.mica.<option>`` (``+algorithm.mica.gamma=0.85`` on verl's command line);
3. ``config.gamma``, ``config.weight``, ``config.eps``; for ``mica_grpo`` also
   ``config.norm_adv_by_std_in_grpo``. verl's ``algorithm.gamma`` defaults to 1.0 and is
   always present, so a ``config.gamma`` of exactly 1.0 is used but warns once per preset whose
   own gamma differs (0.85): set ``algorithm.mica.gamma`` to choose;
4. the preset's defaults.

``config.mica.distance_weights``, ``distance_epsilon`` and ``distance_kind`` set how states
become distances (:func:`mica_core.distance_from_state`).

verl's ``index`` is a host array of labels, factorized on the host; the computation runs on the
rewards' device. ``returns`` holds the preset's per-turn return on every token of its turn
(``G_t``; ``R_i`` for ``mica_grpo``), not a copy of the advantages.
"""

from __future__ import annotations

import functools
import sys
import warnings

import numpy as np

from .._errors import MicaInputError
from ..estimators import get_estimator

__all__ = [
    "FIELDS",
    "PRESETS",
    "REGISTERED",
    "compute_gigpo_advantage",
    "compute_grpo_advantage",
    "compute_mapo_advantage",
    "compute_mica_adr_advantage",
    "compute_mica_group_adr_advantage",
    "compute_mica_advantage",
    "compute_mica_group_advantage",
    "compute_mica_turn_advantage",
    "compute_reinforce_pp_advantage",
    "compute_reinforce_pp_idr_advantage",
    "options_from_config",
    "register_with_verl",
    "verl_estimator",
    "verl_name",
]

PRESETS = ("mica", "mica_turn", "mica_group", "mica_adr", "mapo", "grpo", "reinforce_pp",
           "reinforce_pp_idr", "mica_group_adr", "gigpo")
OPTIONS = ("gamma", "weight", "eps", "ddof", "baseline", "scale", "singleton")
TOP_LEVEL = ("gamma", "weight", "eps")

#: Per-row fields read from ``data.non_tensor_batch`` (``turn_index``: from ``data.batch``).
FIELDS = {
    "distance": "mica_distance",                  # per turn of the row: D_t
    "initial_distance": "mica_initial_distance",  # D_{-1}, one value per row
    "state": "mica_state",                        # per turn: a support-state vector
    "initial_state": "mica_initial_state",        # one vector per row
    "reward": "mica_reward",                      # per turn: rewards given directly
    "turn_start": "mica_turn_start",              # first token of each turn of the row
    "turn_index": "mica_turn_index",              # [B, L] tensor in data.batch
    "key": "mica_key",                            # per turn: a key (scope "key", e.g. gigpo)
}

#: verl names registered by this module (filled by :func:`register_with_verl`).
REGISTERED: dict = {}

_GAMMA_WARNED: set = set()
_CONTEXT_WARNED: list = []


def verl_name(estimator: str) -> str:
    """The name under which an estimator is registered with verl."""
    return estimator if estimator.startswith("mica") else "mica_" + estimator


def _get(config, key):
    """``config[key]`` for dicts, DictConfigs, verl's dataclass configs or plain objects."""
    if config is None:
        return None
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key)
        except (AttributeError, KeyError):  # a struct-mode config refusing unknown keys
            return None
    return getattr(config, key, None)


def options_from_config(estimator: str, config=None, kwargs=None) -> dict:
    """Estimator options from a call's keyword arguments and a verl config (module docstring).

    Warns once per estimator when verl's ``config.gamma`` of 1.0 (its default) replaces a
    preset's own discount.
    """
    opts, source = {}, {}
    for key in TOP_LEVEL:
        v = _get(config, key)
        if v is not None:
            opts[key], source[key] = v, "config"
    if estimator == "grpo":
        norm = _get(config, "norm_adv_by_std_in_grpo")
        if norm is not None:
            opts["scale"] = "std" if norm else "none"
    section = _get(config, "mica")
    for key in OPTIONS:
        v = _get(section, key)
        if v is not None:
            opts[key], source[key] = v, "mica"
    kwargs = kwargs or {}
    if kwargs.get("epsilon") is not None:
        opts["eps"] = kwargs["epsilon"]
    if kwargs.get("norm_adv_by_std_in_grpo") is not None:
        opts["scale"] = "std" if kwargs["norm_adv_by_std_in_grpo"] else "none"
    for key in OPTIONS:
        if kwargs.get(key) is not None:
            opts[key], source[key] = kwargs[key], "kwargs"
    for key in ("gamma", "weight", "eps"):
        if key in opts:
            opts[key] = float(opts[key])
    if "ddof" in opts:
        opts["ddof"] = int(opts["ddof"])
    own = get_estimator(estimator).gamma
    if (source.get("gamma") == "config" and opts["gamma"] == 1.0 and own != 1.0
            and estimator not in _GAMMA_WARNED):
        _GAMMA_WARNED.add(estimator)
        warnings.warn(f"mica: verl's algorithm.gamma=1.0 (its default) replaces preset "
                      f"{estimator!r}'s gamma {own}; set algorithm.mica.gamma (e.g. "
                      f"+algorithm.mica.gamma={own}) to choose the discount explicitly",
                      UserWarning, stacklevel=3)
    return opts


def _holds_rewards(obj, token_level_rewards):
    """Whether ``obj`` is a DataProto whose ``token_level_rewards`` is this very tensor."""
    batch = getattr(obj, "batch", None)
    if batch is None or not hasattr(obj, "non_tensor_batch"):
        return False
    try:
        return "token_level_rewards" in batch.keys() and \
            batch["token_level_rewards"] is token_level_rewards
    except Exception:  # noqa: BLE001 - anything unexpected is simply not our batch
        return False


def _verl_call_context(token_level_rewards, max_depth=8):
    """``(DataProto, batch_keys)`` from verl's call frames, or ``(None, None)``.

    The DataProto is the one verl's ``compute_advantage`` holds, identified by identity of its
    ``token_level_rewards`` tensor; ``batch_keys`` (v1 trainer) is the list of
    ``{uid}_{session}_{index}`` keys that ``compute_advantage_for_multi_trajectories`` got
    along with that same DataProto.
    """
    frame = sys._getframe(3)  # _verl_call_context <- _advantage <- estimator <- caller
    data, keys = None, None
    for _ in range(max_depth):
        if frame is None:
            break
        local = frame.f_locals
        if data is None:
            data = next((v for v in local.values() if _holds_rewards(v, token_level_rewards)),
                        None)
        if data is not None and keys is None:
            k = local.get("batch_keys")
            if k is not None and any(v is data for v in local.values()) and \
                    len(k) == len(data) and all(isinstance(x, str) for x in k):
                keys = list(k)
        frame = frame.f_back
    return data, keys


def _session_order(keys, labels):
    """Rows grouped into sessions (``{uid}_{session}``) in ``index`` order.

    Returns ``(row_order, traj_of_row_in_order, n_traj, last_row_mask, group_per_traj)``.
    """
    sessions, order_key = {}, []
    for r, key in enumerate(keys):
        parts = key.rsplit("_", 2)
        if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
            raise MicaInputError(f"batch key {key!r} is not verl's {{uid}}_{{session}}_{{index}}",
                                 column="batch_keys", row=r, rule="v1 key format")
        sid = parts[0] + "_" + parts[1]
        if sid not in sessions:
            sessions[sid] = len(sessions)
        order_key.append((sessions[sid], int(parts[2]), r))
    order_key.sort()
    row_order = np.array([r for _, _, r in order_key], dtype=np.int64)
    traj = np.array([s for s, _, _ in order_key], dtype=np.int64)
    seen = {}
    for (s, idx, r) in order_key:
        if (s, idx) in seen:
            raise MicaInputError(f"rows {seen[s, idx]} and {r} have the same key {keys[r]!r}",
                                 column="batch_keys", row=r, rule="unique keys")
        seen[s, idx] = r
    last = np.zeros(len(keys), dtype=bool)
    last[row_order[np.r_[traj[1:] != traj[:-1], True]]] = True
    group = np.empty(len(sessions), dtype=object)
    for s, r in zip(traj, row_order):
        if group[s] is None:
            group[s] = labels[r]
        elif group[s] != labels[r]:
            raise MicaInputError(f"uid {labels[r]!r} differs from its session's uid "
                                 f"{group[s]!r}", column="index", row=int(r),
                                 rule="a session stays in its group")
    return row_order, traj, len(sessions), last, group


def _rows_are_turns(keys, setting):
    """v1 rows: is each row one turn (``"turn"``) or a piece holding whole turns (``"spans"``)?

    ``auto`` (default): one turn per row as soon as a session has several rows (a multi-output
    agent loop); with one row per session, rows are whole trajectories whose turns are found
    the usual way.
    """
    setting = "auto" if setting is None else str(setting)
    if setting not in ("auto", "turn", "spans"):
        raise MicaInputError(f"must be 'auto', 'turn' or 'spans'; got {setting!r}",
                             column="algorithm.mica.v1_rows", rule="choice")
    if setting != "auto":
        return setting == "turn"
    sessions = {k.rsplit("_", 1)[0] for k in keys}
    return len(sessions) < len(keys)


def _row_values(field, column, b, width=None):
    """Row ``b`` of a per-row signal field as float64: ``[T]`` (or ``[T, width]``)."""
    try:
        v = np.asarray(column[b], dtype=np.float64)
    except (TypeError, ValueError):
        raise MicaInputError(f"expected numbers, got {column[b]!r}", column=field, row=b,
                             rule="numeric") from None
    v = v.reshape(-1) if width is None else v.reshape(-1, v.shape[-1] if v.ndim else 1)
    if not np.all(np.isfinite(v)):
        raise MicaInputError(f"values {v.tolist()} are not all finite", column=field, row=b,
                             rule="finite")
    return v


def _signals(nt, config):
    """``(kind, field, per-row values, per-row initial values)`` of the first signal present."""
    if not nt:
        return None
    section = _get(config, "mica")
    if FIELDS["distance"] in nt:
        return ("distance", FIELDS["distance"], nt[FIELDS["distance"]],
                nt.get(FIELDS["initial_distance"]))
    if FIELDS["state"] in nt:
        from ..signals import distance_from_state

        kw = {k: _get(section, "distance_" + k) for k in ("weights", "epsilon", "kind")}
        kw = {k: (list(v) if k == "weights" else v) for k, v in kw.items() if v is not None}
        col, init = nt[FIELDS["state"]], nt.get(FIELDS["initial_state"])
        if init is None:
            raise MicaInputError(f"{FIELDS['state']} needs {FIELDS['initial_state']} (the "
                                 f"state before the first reply)",
                                 column=FIELDS["initial_state"], rule="required")
        dist = [distance_from_state(_row_values(FIELDS["state"], col, b, 1), **kw)
                for b in range(len(col))]
        d0 = [float(distance_from_state(_row_values(FIELDS["initial_state"], init, b), **kw))
              for b in range(len(init))]
        return "distance", FIELDS["state"], dist, d0
    if FIELDS["reward"] in nt:
        return "reward", FIELDS["reward"], nt[FIELDS["reward"]], None
    return None


def _turn_rewards_from_signals(kind, field, values, initial, estimator, per_row, row_order,
                               traj, offsets):
    """Per-turn rewards (host float64, trajectory order) from per-row signal lists;
    ``offsets`` [n_traj + 1] are the trajectories' turn offsets."""
    from ..signals import absolute_distance_reward, incremental_distance_reward

    chunks = []
    for b in row_order:
        v = _row_values(field, values, int(b))
        if v.shape[0] != per_row[b]:
            raise MicaInputError(f"has {v.shape[0]} values but the row has {per_row[b]} "
                                 f"assistant turns", column=field, row=int(b),
                                 rule="one value per turn")
        if kind == "distance" and np.any(v < 0):
            raise MicaInputError(f"distance {float(v[v < 0][0])} is negative", column=field,
                                 row=int(b), rule="non-negative")
        chunks.append(v)
    flat = np.concatenate(chunks) if chunks else np.zeros(0)
    if kind == "reward":
        return flat
    if get_estimator(estimator).reward == "adr":
        return absolute_distance_reward(flat)
    if initial is None:
        raise MicaInputError(f"{field} needs {FIELDS['initial_distance']} (D before the first "
                             f"reply) for IDR", column=FIELDS["initial_distance"],
                             rule="required")
    first = row_order[np.diff(traj, prepend=-1) != 0]  # a session's first row holds D_{-1}
    d0 = np.array([float(np.asarray(initial[b], dtype=np.float64).reshape(-1)[0])
                   for b in first])
    bad = np.flatnonzero(~np.isfinite(d0) | (d0 < 0))
    if bad.size:
        raise MicaInputError(f"initial distance {d0[bad[0]]} is not a finite non-negative "
                             f"number", column=FIELDS["initial_distance"],
                             row=int(first[bad[0]]), rule="non-negative")
    return incremental_distance_reward(offsets, flat, d0)


def _turn_keys(nt, estimator, per_row, row_order):
    """Per-turn keys in trajectory order (``mica_key``), for estimators with a component of
    scope ``key``; ``None`` for the others."""
    if not any(c.scope == "key" for c in get_estimator(estimator).components):
        return None
    field = FIELDS["key"]
    if not nt or field not in nt:
        raise MicaInputError(f"estimator {estimator!r} groups turns by a key: put one key per "
                             f"assistant turn of each row (e.g. an anchor-state hash) in "
                             f"non_tensor_batch[{field!r}]", column=field, rule="required")
    keys = []
    for b in row_order:
        row = list(nt[field][int(b)])
        if len(row) != per_row[b]:
            raise MicaInputError(f"has {len(row)} keys but the row has {per_row[b]} assistant "
                                 f"turns", column=field, row=int(b), rule="one key per turn")
        keys.extend(row)
    out = np.empty(len(keys), dtype=object)
    out[:] = keys
    return out


def _advantage(estimator, token_level_rewards, response_mask, index, config, kwargs):
    import torch

    from .. import estimate
    from ..tokens import broadcast_to_tokens, turn_rewards_from_tokens

    if index is None:
        raise MicaInputError("verl passed no index: mica's estimators need verl's uid (keep "
                             "data.non_tensor_batch['uid'], which verl's compute_advantage "
                             "passes as index) to know each row's rollout group",
                             column="index", rule="required")
    opts = options_from_config(estimator, config, kwargs)
    data, keys = _verl_call_context(token_level_rewards)
    if data is None and kwargs.get("non_tensor_batch") is None and not _CONTEXT_WARNED:
        # Outside verl's compute_advantage (or in a verl that calls estimators differently)
        # the rollout's per-turn fields cannot be read: say so once rather than silently use
        # the token rewards where distances were meant.
        _CONTEXT_WARNED.append(True)
        warnings.warn("mica: no verl DataProto found for this call (and no non_tensor_batch= "
                      "given): per-turn fields such as mica_distance are not read; the "
                      "advantages come from the token-level rewards", stacklevel=3)
    nt = kwargs.get("non_tensor_batch")
    batch = kwargs.get("batch")
    if nt is None and data is not None:
        nt = data.non_tensor_batch
    if batch is None and data is not None:
        batch = data.batch
    if kwargs.get("batch_keys") is not None:
        keys = list(kwargs["batch_keys"])

    B = token_level_rewards.shape[0]
    labels = np.asarray(index.cpu() if isinstance(index, torch.Tensor)
                        and index.device.type != "cpu" else index)
    if labels.ndim != 1 or labels.shape[0] != B:
        raise MicaInputError(f"needs one label (uid) per row ({B}); got shape {labels.shape}",
                             column="index", rule="length")
    if keys is not None and len(keys) != B:
        raise MicaInputError(f"needs one key per row ({B}); got {len(keys)}",
                             column="batch_keys", rule="length")
    mask = response_mask
    bounds = {}
    if nt is not None and FIELDS["turn_start"] in nt:
        bounds["turn_start"] = list(nt[FIELDS["turn_start"]])
    elif batch is not None and FIELDS["turn_index"] in batch.keys():
        bounds["turn_index"] = batch[FIELDS["turn_index"]]
    elif keys is not None and _rows_are_turns(keys, _get(_get(config, "mica"), "v1_rows")):
        bounds["turn_index"] = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
    scores = None
    if batch is not None and "token_level_scores" in batch.keys():
        scores = batch["token_level_scores"]
    signal = _signals(nt, config)

    if keys is not None:
        row_order, traj, n_traj, last, group = _session_order(keys, labels)
    else:
        row_order, traj, n_traj, last, group = np.arange(B), np.arange(B), B, None, labels

    with torch.no_grad():
        if signal is not None:
            # the score is replaced by the signals; what verl added to it (KL) stays
            dense = (token_level_rewards - scores if scores is not None
                     else torch.zeros_like(token_level_rewards))
        elif keys is not None and scores is not None:
            # verl's v1 agent loop copies the session's score onto every row of the session
            # (agent_loop_tq._agent_loop_postprocess): count it once, on the last row
            keep = torch.as_tensor(last, device=scores.device)[:, None]
            dense = torch.where(keep, token_level_rewards, token_level_rewards - scores)
        else:
            dense = token_level_rewards
        token_reward, spans = turn_rewards_from_tokens(dense, mask, **bounds)
        host_off = spans.offsets.cpu().numpy()  # the one host copy of the turn offsets
        per_row = np.diff(host_off)
        empty = np.flatnonzero(per_row == 0)
        if empty.size:
            raise MicaInputError("this row has no assistant token (response_mask is all 0): "
                                 "it has no turn to credit", column="response_mask",
                                 row=int(empty[0]), rule="at least one turn")
        counts = np.bincount(traj, weights=per_row[row_order], minlength=n_traj).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        # Turns in trajectory order (rows in session/index order). With one row per
        # trajectory that is the rows' own order; v1 sessions need a permutation.
        perm_t = None
        if keys is not None:
            perm = np.concatenate([np.arange(host_off[b], host_off[b + 1]) for b in row_order])
            perm_t = torch.as_tensor(perm, device=token_reward.device)
            token_reward = token_reward[perm_t]
        reward = token_reward.to(torch.float64)
        if signal is not None:
            sig = _turn_rewards_from_signals(*signal, estimator, per_row, row_order, traj,
                                             offsets)
            reward = reward + torch.as_tensor(sig, device=reward.device)
        res = estimate(torch.as_tensor(offsets, device=reward.device), group, reward=reward,
                       estimator=estimator, max_turns=int(counts.max()),
                       key=_turn_keys(nt, estimator, per_row, row_order), **opts)
        adv, ret = res.advantage, res.returns
        if perm_t is not None:  # back to the rows' order
            adv, ret = torch.empty_like(adv), torch.empty_like(ret)
            adv[perm_t] = res.advantage
            ret[perm_t] = res.returns
        advantages = broadcast_to_tokens(adv, mask, validate=False, **bounds)
        returns = broadcast_to_tokens(ret, mask, validate=False, **bounds)
    dt = token_level_rewards.dtype if token_level_rewards.is_floating_point() else None
    if dt is not None:
        advantages, returns = advantages.to(dt), returns.to(dt)
    return advantages, returns


@functools.cache
def verl_estimator(estimator: str):
    """A function with verl's estimator signature computing ``estimator`` (cached, so
    registering twice registers the same object)."""
    get_estimator(estimator)  # fail early on an unknown name

    def compute_advantage(token_level_rewards, response_mask, index=None, config=None,
                          **kwargs):
        return _advantage(estimator, token_level_rewards, response_mask, index, config, kwargs)

    compute_advantage.__name__ = f"compute_{estimator}_advantage"
    compute_advantage.__qualname__ = compute_advantage.__name__
    compute_advantage.__doc__ = f"""mica's ``{estimator}`` estimator in verl's layout.

    Args:
      token_level_rewards: ``[B, L]`` float; a reward belongs to the latest turn started at
        or before its token (summed per turn).
      response_mask: ``[B, L]``, non-zero on assistant tokens (runs of ones are turns unless
        explicit boundaries are given).
      index: ``[B]`` group labels (verl's ``uid``); required.
      config: verl's algorithm config (optional); see :mod:`mica_core.integrations.verl`
        for the options read from it.
      **kwargs: estimator options (``gamma``, ``weight``, ``eps``, ...); ``non_tensor_batch``,
        ``batch`` (a DataProto's parts) and ``batch_keys`` (verl v1 row keys) when the caller
        has them; other keys verl passes (e.g. ``reward_baselines``) are ignored.

    Returns:
      ``(advantages, returns)``, both ``[B, L]`` in the rewards' dtype and device, 0 off the
      assistant tokens.
    """
    return compute_advantage


compute_mica_advantage = verl_estimator("mica")
compute_mica_turn_advantage = verl_estimator("mica_turn")
compute_mica_group_advantage = verl_estimator("mica_group")
compute_mica_adr_advantage = verl_estimator("mica_adr")
compute_mapo_advantage = verl_estimator("mapo")
compute_grpo_advantage = verl_estimator("grpo")
compute_reinforce_pp_advantage = verl_estimator("reinforce_pp")
compute_reinforce_pp_idr_advantage = verl_estimator("reinforce_pp_idr")
compute_mica_group_adr_advantage = verl_estimator("mica_group_adr")
compute_gigpo_advantage = verl_estimator("gigpo")


def register_with_verl(estimators=None) -> dict:
    """Register estimators in verl's advantage-estimator registry.

    Args:
      estimators: names (default: the presets; pass ``mica_core.list_estimators()`` to
        include your own registered estimators).

    Returns:
      ``{verl name: function}`` of what was registered.

    Raises:
      ImportError: verl is not installed.
      ValueError: (verl's) a different function already holds one of the names.
    """
    from verl.trainer.ppo.core_algos import register_adv_est

    names = PRESETS if estimators is None else tuple(estimators)
    done = {}
    for est in names:
        fn = verl_estimator(est)
        register_adv_est(verl_name(est))(fn)
        done[verl_name(est)] = fn
    REGISTERED.update(done)
    return done


def _register_presets_if_verl():
    try:
        import verl.trainer.ppo.core_algos  # noqa: F401
    except ImportError:
        return
    register_with_verl()


_register_presets_if_verl()

