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
  row's turns are found as above; ``algorithm.mica.v1_rows=turn|spans`` overrides. The v1
  advantage step carries only ``uid``, ``response_mask`` and ``rm_scores``: an agent loop
  returns :func:`agent_loop_output`, which writes each turn's reward (IDR or ADR, by the
  preset) on the turn's last assistant token of ``rm_scores``, and
  ``algorithm.mica.turn_rewards=true`` tells mica to read them as per-turn rewards.

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
``batch_keys`` from ``compute_advantage_for_multi_trajectories``); a clone or cast of that
tensor is found by its values. Called outside verl without ``non_tensor_batch=``, it uses the
tensors alone and warns on every call.

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

The options are :class:`mica_core.EstimatorOptions`' (surface ``turns``; :data:`OPTIONS`,
:data:`SPELLING`): a value of the wrong type or range, and a key of ``algorithm.mica`` that is
none of :data:`SECTION_KEYS`, is a one-line :class:`mica_core.MicaInputError` naming it.

mica's own options (``algorithm.mica.<option>`` or keyword arguments):
``require_per_turn`` (true: a multi-turn batch without a per-turn signal, or an ADR preset
without distances, is an error; false: no warning; unset: a warning on every call),
``turn_rewards`` (the token rewards are per-turn rewards), ``lone_rollout`` (``zero`` or
``within``, :mod:`mica_core.turns`; default ``zero``, ``within`` under ``singleton="raw"``),
``v1_rows``.

Never lost without a word: each call puts ``mica/per_turn_signal``,
``mica/frame_lookup_failed``, ``mica/missing_field``, ``mica/empty_rows`` and
``mica/lone_rollouts`` into the calling trainer step's ``metrics`` dict (which verl logs) and
:data:`LAST_METRICS`, and counts every fallback in :data:`COUNTERS`. A row without assistant
tokens gets advantage 0 (counted). Per-row signals are laid out and checked by
:mod:`mica_core.turns`, the adapter layer shared with TRL.

verl's ``index`` is a host array of labels; mica's estimate runs on the host (a verl batch
holds few turns) and the advantages are spread over tokens on the rewards' device.
``returns`` holds the preset's per-turn return on every token of its turn
(``G_t``; ``R_i`` for ``mica_grpo``), not a copy of the advantages.
"""

from __future__ import annotations

import functools
import sys
import warnings

import numpy as np

from .. import validate as _v
from .. import validate_rows as _rows
from .. import validate_tokens as _tokens
from ..estimators import PRESETS, get_estimator
from ..options import check_option, option_fields, unknown_option

_ESTIMATE_OPTIONS = tuple(f.name for f in option_fields("estimate"))

__all__ = [
    "COUNTERS",
    "FIELDS",
    "LAST_METRICS",
    "PRESETS",
    "REGISTERED",
    "agent_loop_output",
    "counters",
    "reset_counters",
    "options_from_config",
    "register_with_verl",
    "verl_estimator",
    "verl_name",
] + [f"compute_{name}_advantage" for name in PRESETS]  # defined below, one per preset


#: mica's option names in ``algorithm.mica`` where verl's differ (the state options)
SPELLING = {"state_weights": "distance_weights", "state_epsilon": "distance_epsilon",
            "state_kind": "distance_kind"}
#: the estimator options of ``algorithm.mica`` and keyword arguments that reach
#: :func:`mica_core.estimate` (:class:`mica_core.EstimatorOptions`)
OPTIONS = tuple(f.name for f in option_fields("turns") if f.name in _ESTIMATE_OPTIONS)
#: verl's own ``algorithm.<key>`` read as mica's option of that name
TOP_LEVEL = ("gamma", "weight", "eps")
#: the adapter's own switches in ``algorithm.mica`` (module docstring)
ADAPTER_OPTIONS = ("require_per_turn", "turn_rewards", "v1_rows")
#: every key ``algorithm.mica`` may hold; another is an error
SECTION_KEYS = (*(SPELLING.get(f.name, f.name) for f in option_fields("turns")),
                *ADAPTER_OPTIONS)

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


def _section(config):
    """``config.mica``, its keys checked against :data:`SECTION_KEYS`."""
    section = _get(config, "mica")
    if section is None:
        return None
    keys = getattr(section, "keys", None)
    if callable(keys):
        names = list(keys())
    elif hasattr(section, "__dataclass_fields__"):
        names = list(section.__dataclass_fields__)
    else:
        names = [k for k in vars(section) if not k.startswith("_")]
    for name in names:
        if name not in SECTION_KEYS:
            raise unknown_option("algorithm.mica." + str(name), SECTION_KEYS)
    return section


def options_from_config(estimator: str, config=None, kwargs=None) -> dict:
    """Estimator options from a call's keyword arguments and a verl config (module docstring).

    Warns once per estimator when verl's ``config.gamma`` of 1.0 (its default) replaces a
    preset's own discount.
    """
    opts, source = {}, {}
    for key in TOP_LEVEL:
        v = _get(config, key)
        if v is not None:
            opts[key], source[key] = check_option(key, v, "algorithm." + key), "config"
    if estimator == "grpo":
        norm = _get(config, "norm_adv_by_std_in_grpo")
        if norm is not None:
            opts["scale"] = "std" if norm else "none"
    section = _section(config)
    for key in OPTIONS:
        v = _get(section, key)
        if v is not None:
            opts[key], source[key] = check_option(key, v, "algorithm.mica." + key), "mica"
    kwargs = kwargs or {}
    if kwargs.get("epsilon") is not None:
        opts["eps"] = check_option("eps", kwargs["epsilon"], "epsilon")
    if kwargs.get("norm_adv_by_std_in_grpo") is not None:
        opts["scale"] = "std" if kwargs["norm_adv_by_std_in_grpo"] else "none"
    for key in OPTIONS:
        if kwargs.get(key) is not None:
            opts[key], source[key] = check_option(key, kwargs[key]), "kwargs"
    own = get_estimator(estimator).gamma
    if (source.get("gamma") == "config" and opts["gamma"] == 1.0 and own != 1.0
            and estimator not in _GAMMA_WARNED):
        _GAMMA_WARNED.add(estimator)
        warnings.warn(f"mica: verl's algorithm.gamma=1.0 (its default) replaces preset "
                      f"{estimator!r}'s gamma {own}; set algorithm.mica.gamma (e.g. "
                      f"+algorithm.mica.gamma={own}) to choose the discount explicitly",
                      UserWarning, stacklevel=3)
    return opts


# --------------------------------------------------------------------------- metrics

#: Per-process totals since import (or :func:`reset_counters`): ``calls``, and how often each
#: fallback happened: ``no_per_turn_signal`` (a multi-turn batch trained on its outcome score
#: alone), ``frame_lookup_failed`` (no verl DataProto found, so per-turn fields could not be
#: read), ``missing_field`` (a preset's field absent, e.g. distances for ``mica_adr``),
#: ``empty_rows`` (rows without assistant tokens, given 0) and ``lone_rollouts``
#: (trajectories alone in their group, see ``lone_rollout``).
COUNTERS = {"calls": 0, "no_per_turn_signal": 0, "frame_lookup_failed": 0, "missing_field": 0,
            "empty_rows": 0, "lone_rollouts": 0}
#: The metrics of the latest call (``mica/...`` names, floats), as published to verl.
LAST_METRICS: dict = {}


def counters() -> dict:
    """A copy of :data:`COUNTERS`."""
    return dict(COUNTERS)


def reset_counters() -> None:
    for k in COUNTERS:
        COUNTERS[k] = 0


def _publish(metrics, max_depth=16):
    """Put this call's metrics where verl logs them: the ``metrics`` dict of the trainer step
    that called the estimator (``RayPPOTrainer.fit``'s, or v1's ``_compute_advantage(batch,
    metrics)``), found among the calling frames; every key starts with ``mica/``."""
    LAST_METRICS.clear()
    LAST_METRICS.update(metrics)
    frame = sys._getframe(3)  # _publish <- _advantage <- estimator <- caller
    for _ in range(max_depth):
        if frame is None:
            return False
        target = frame.f_locals.get("metrics")
        if isinstance(target, dict):
            target.update(metrics)
            return True
        frame = frame.f_back
    return False


# --------------------------------------------------------------------------- verl's batch


def _holds_rewards(obj, token_level_rewards, exact=True):
    """Whether ``obj`` is a DataProto whose ``token_level_rewards`` is this very tensor
    (``exact``) or one of the same shape and values (a clone or a cast)."""
    batch = getattr(obj, "batch", None)
    if batch is None or not hasattr(obj, "non_tensor_batch"):
        return False
    try:
        if "token_level_rewards" not in batch.keys():
            return False
        held = batch["token_level_rewards"]
        if exact:
            return held is token_level_rewards
        import torch

        return (tuple(held.shape) == tuple(token_level_rewards.shape) and
                torch.equal(held.detach().to(token_level_rewards.device, torch.float64),
                            token_level_rewards.detach().to(torch.float64)))
    except Exception:  # noqa: BLE001 - anything unexpected is simply not our batch
        return False


def _verl_call_context(token_level_rewards, max_depth=16):
    """``(DataProto, batch_keys)`` from verl's call frames, or ``(None, None)``.

    The DataProto is the one verl's ``compute_advantage`` holds: the nearest whose
    ``token_level_rewards`` is the very tensor handed over, else the nearest whose tensor has
    the same shape and values (the caller cloned or cast it). ``batch_keys`` (v1 trainer) is
    the list of ``{uid}_{session}_{index}`` keys that ``compute_advantage_for_multi_trajectories``
    got along with that same DataProto.
    """
    frames = []
    frame = sys._getframe(3)  # _verl_call_context <- _advantage <- estimator <- caller
    while frame is not None and len(frames) < max_depth:
        frames.append(frame.f_locals)
        frame = frame.f_back
    data = None
    for exact in (True, False):
        data = next((v for local in frames for v in local.values()
                     if _holds_rewards(v, token_level_rewards, exact)), None)
        if data is not None:
            break
    keys = None
    if data is not None:
        for local in frames:
            k = local.get("batch_keys")
            if k is not None and any(v is data for v in local.values()) and \
                    len(k) == len(data) and all(isinstance(x, str) for x in k):
                keys = list(k)
                break
    return data, keys


def _sessions(keys):
    """verl v1 keys ``{uid}_{session}_{index}`` -> ``(session label, index)`` per row."""
    session, index, seen = [], [], {}
    for r, key in enumerate(keys):
        parts = key.rsplit("_", 2)
        if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
            raise _rows.batch_key_format(r, key)
        if key in seen:
            raise _rows.duplicate_batch_key(r, seen[key], key)
        seen[key] = r
        session.append(parts[0] + "_" + parts[1])
        index.append(int(parts[2]))
    return session, np.asarray(index, dtype=np.int64)


def _rows_are_turns(session, setting):
    """v1 rows: is each row one turn (``"turn"``) or a piece holding whole turns (``"spans"``)?

    ``auto`` (default): one turn per row as soon as a session has several rows (a multi-output
    agent loop); with one row per session, rows are whole trajectories whose turns are found
    the usual way.
    """
    setting = "auto" if setting is None else str(setting)
    if setting not in ("auto", "turn", "spans"):
        raise _v.choice("algorithm.mica.v1_rows", setting, ("auto", "turn", "spans"))
    if setting != "auto":
        return setting == "turn"
    return len(set(session)) < len(session)


def _last_of_session(session, index):
    """bool per row: the row with the highest index of its session."""
    best = {}
    for r, (s, i) in enumerate(zip(session, index)):
        if s not in best or index[best[s]] < i:
            best[s] = r
    last = np.zeros(len(session), dtype=bool)
    last[list(best.values())] = True
    return last


def _mica_option(name, config, kwargs):
    v = kwargs.get(name)
    return _get(_section(config), name) if v is None else v


def _state_options(config) -> dict:
    """``weights``, ``epsilon``, ``kind`` of :func:`mica_core.distance_from_state` from
    ``algorithm.mica.distance_*`` (``None``: the default), checked."""
    section = _section(config)
    state = {}
    for name in ("state_weights", "state_epsilon", "state_kind"):
        v = _get(section, SPELLING[name])
        if v is not None:
            v = check_option(name, v, "algorithm.mica." + SPELLING[name])
        state[name[len("state_"):]] = list(v) if name == "state_weights" and v else v
    return state


def _flag(name, value):
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise _v.not_boolean("algorithm.mica." + name, value)


def _needs_per_turn(est):
    """Whether an estimator's advantages use per-turn rewards (not only the outcome)."""
    return any(c.signal in ("reward", "return") for c in est.components)


def _warn_every_call(message: str) -> None:
    """``warnings.warn(message, UserWarning)`` attributed to the estimator's caller, shown on
    every call: Python's default filter shows a message once per code location (its registry),
    which would leave every step after the first silent. A fresh registry per call keeps the
    user's own filters (``ignore``, ``error``) in force."""
    frame = sys._getframe(3)  # _warn_every_call <- _advantage <- the estimator <- its caller
    warnings.warn_explicit(message, UserWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__", "<unknown>"), registry=None,
                           module_globals=frame.f_globals)


def _no_per_turn_message(estimator, why):
    return (f"mica: estimator {estimator!r} got a multi-turn batch ({why}) without a per-turn "
            f"signal, so its advantages come from the outcome score alone: give mica_distance "
            f"(or mica_state, mica_reward) in non_tensor_batch, or, with verl's v1 trainer, "
            f"build the agent loop's outputs with mica_core.integrations.verl.agent_loop_output "
            f"and set algorithm.mica.turn_rewards=true; algorithm.mica.require_per_turn=true "
            f"makes this an error, =false silences it")


def _advantage(estimator, token_level_rewards, response_mask, index, config, kwargs):
    import torch

    from ..tokens import broadcast_to_tokens, turn_rewards_from_tokens
    from ..turns import collect, estimate_turns

    if index is None:
        raise _rows.required("index", "verl passed no index: mica's estimators need verl's uid "
                             "(keep data.non_tensor_batch['uid'], which verl's "
                             "compute_advantage passes as index) to know each row's rollout "
                             "group")
    est = get_estimator(estimator)
    opts = options_from_config(estimator, config, kwargs)
    require = _flag("require_per_turn", _mica_option("require_per_turn", config, kwargs))
    turn_rewards = _flag("turn_rewards", _mica_option("turn_rewards", config, kwargs))
    # a lone rollout follows the singleton rule unless set (mica_core.turns.estimate_turns):
    # singleton="raw" (verl's GRPO convention) keeps the within-trajectory buckets, the
    # default "zero" gives it 0
    lone_rollout = check_option("lone_rollout", _mica_option("lone_rollout", config, kwargs),
                                "algorithm.mica.lone_rollout")
    COUNTERS["calls"] += 1
    metrics = {"mica/frame_lookup_failed": 0.0}

    nt = kwargs.get("non_tensor_batch")
    batch = kwargs.get("batch")
    keys = kwargs.get("batch_keys")
    data = found_keys = None
    if nt is None or (keys is None and batch is None):
        data, found_keys = _verl_call_context(token_level_rewards)
    if nt is None:
        metrics["mica/frame_lookup_failed"] = float(data is None)
        if data is None:
            # Outside verl's compute_advantage (or in a verl that calls estimators
            # differently) the rollout's per-turn fields cannot be read: say so every time.
            COUNTERS["frame_lookup_failed"] += 1
            _warn_every_call("mica: no verl DataProto found for this call (and no "
                             "non_tensor_batch= given): per-turn fields such as mica_distance "
                             "are not read; the advantages come from the token-level rewards "
                             "(pass non_tensor_batch=, {} for none, to say there are none)")
        else:
            nt = data.non_tensor_batch
    nt = nt or {}
    if batch is None and data is not None:
        batch = data.batch
    keys = list(keys) if keys is not None else found_keys

    B = token_level_rewards.shape[0]
    labels = np.asarray(index.cpu() if isinstance(index, torch.Tensor)
                        and index.device.type != "cpu" else index)
    if labels.ndim != 1 or labels.shape[0] != B:
        raise _rows.labels_per_row("index", B, f"shape {labels.shape}", "label (uid)")
    if keys is not None and len(keys) != B:
        raise _rows.labels_per_row("batch_keys", B, len(keys), "key")
    session = order = last = None
    if keys is not None:
        session, order = _sessions(keys)
        last = _last_of_session(session, order)
    mask = response_mask
    bounds = {}
    if FIELDS["turn_start"] in nt:
        bounds["turn_start"] = list(nt[FIELDS["turn_start"]])
    elif batch is not None and FIELDS["turn_index"] in batch.keys():
        bounds["turn_index"] = batch[FIELDS["turn_index"]]
    elif session is not None and _rows_are_turns(session, _get(_get(config, "mica"), "v1_rows")):
        bounds["turn_index"] = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
    if any(c.scope == "key" for c in est.components) and FIELDS["key"] not in nt and \
            keys is not None:
        raise _rows.required(FIELDS["key"], f"estimator {estimator!r} needs a key per turn "
                             f"({FIELDS['key']}), which verl's v1 trainer does not carry to the "
                             f"advantage step: run it with trainer.use_v1=false and "
                             f"{FIELDS['key']} in the agent loop's extra_fields")
    scores = None
    if batch is not None and "token_level_scores" in batch.keys():
        scores = batch["token_level_scores"]
    fields = {name: nt.get(FIELDS[name]) for name in ("distance", "initial_distance", "state",
                                                      "initial_state", "reward", "key")}
    has_signal = any(fields[k] is not None for k in ("distance", "state", "reward"))

    with torch.no_grad():
        has_token = (mask != 0).any(1)
        if has_signal:
            # the score is replaced by the signals; what verl added to it (KL) stays
            dense = (token_level_rewards - scores if scores is not None
                     else torch.zeros_like(token_level_rewards))
        elif session is not None and scores is not None and not turn_rewards:
            # verl's v1 agent loop copies the session's score onto every row of the session
            # (agent_loop_tq._agent_loop_postprocess): count it once, on the last row
            keep = torch.as_tensor(last, device=scores.device)[:, None]
            dense = torch.where(keep, token_level_rewards, token_level_rewards - scores)
        else:
            dense = token_level_rewards
        # a row without assistant tokens (an empty or aborted response) has no turn: its
        # rewards go nowhere and its advantage is 0
        dense = torch.where(has_token[:, None], dense, torch.zeros((), dtype=dense.dtype,
                                                                   device=dense.device))
        token_reward, spans = turn_rewards_from_tokens(dense, mask, **bounds)
        counts = np.diff(spans.offsets.cpu().numpy())
        state = _state_options(config)
        tb = collect(counts, labels, fields, estimator=est, trajectory=session, order=order,
                     names={**FIELDS, "group": "index"}, state_options=state)

        # --- is there a per-turn signal? (never lose it without saying so)
        several_rows = session is not None and len(set(session)) < len(session)
        v1_turn_rows = several_rows and "turn_index" in bounds and FIELDS["turn_index"] not in (
            batch.keys() if batch is not None else ())
        if has_signal or turn_rewards:
            per_turn = True
        elif v1_turn_rows:
            per_turn = False  # verl's copied session score: one value per session
        else:  # rewards on a turn other than a row's last: turn rewards on span ends
            src = scores if scores is not None else token_level_rewards
            src = torch.where(has_token[:, None], src, torch.zeros((), dtype=src.dtype,
                                                                   device=src.device))
            by_turn, _ = turn_rewards_from_tokens(src, mask, validate=False, **bounds)
            host = by_turn.detach().cpu().numpy()
            not_last = np.ones(host.shape[0], dtype=bool)
            not_last[np.cumsum(counts)[counts > 0] - 1] = False
            per_turn = bool(np.any(host[not_last] != 0))
        multi_turn = tb.n_turns > len(tb.group)
        lacking = multi_turn and not per_turn and _needs_per_turn(est)
        metrics["mica/per_turn_signal"] = float(not lacking)
        if lacking:
            COUNTERS["no_per_turn_signal"] += 1
            why = "v1 sessions of several rows" if several_rows else "rows of several turns"
            if require:
                raise _rows.per_turn_signal_required(
                    "token_level_rewards", f"estimator {estimator!r} got a multi-turn batch "
                    f"({why}) without a per-turn signal (algorithm.mica.require_per_turn=true): "
                    f"give {FIELDS['distance']}, {FIELDS['state']} or {FIELDS['reward']}, or v1 "
                    f"outputs from agent_loop_output with algorithm.mica.turn_rewards=true")
            if require is None:
                _warn_every_call(_no_per_turn_message(estimator, why))
        missing = (est.reward == "adr" and _needs_per_turn(est) and not turn_rewards and
                   fields["distance"] is None and fields["state"] is None)
        metrics["mica/missing_field"] = float(missing)
        if missing:
            COUNTERS["missing_field"] += 1
            msg = (f"estimator {estimator!r} computes ADR (-D_t) from distances and this batch "
                   f"has none ({FIELDS['distance']} or {FIELDS['state']}): it computes what its "
                   f"IDR twin does from the rewards given")
            if require:
                raise _rows.required(FIELDS["distance"], msg)
            if require is None:
                _warn_every_call("mica: " + msg)

        row_major = token_reward.detach().to(torch.float64).cpu().numpy()
        extra = row_major if has_signal and np.any(row_major != 0) else None
        res = estimate_turns(tb, est, reward=None if has_signal else row_major,
                             extra_reward=extra,
                             lone_rollout=lone_rollout, **opts)
        COUNTERS["empty_rows"] += res.empty_rows
        COUNTERS["lone_rollouts"] += res.lone_rollouts
        metrics["mica/empty_rows"] = float(res.empty_rows)
        metrics["mica/lone_rollouts"] = float(res.lone_rollouts)
        dev = token_level_rewards.device
        advantages = broadcast_to_tokens(torch.as_tensor(res.advantage, device=dev), mask,
                                         validate=False, **bounds)
        returns = broadcast_to_tokens(torch.as_tensor(res.returns, device=dev), mask,
                                      validate=False, **bounds)
    _publish(metrics)
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


# compute_mica_advantage, compute_grpo_advantage, ...: one per preset (mica_core.estimators)
for _name in PRESETS:
    globals()[f"compute_{_name}_advantage"] = verl_estimator(_name)
del _name


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


# --------------------------------------------------------------------------- v1 agent loops


def _preset_of(estimator):
    """mica's estimator for a verl name (``mica_grpo`` -> ``grpo``) or a mica name."""
    from ..estimators import list_estimators

    names = list_estimators()
    by_verl = {verl_name(n): n for n in names}
    if estimator in by_verl:
        return by_verl[estimator]
    return get_estimator(estimator).name


def _make_output_class():
    import torch
    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput

    class MicaAgentLoopOutput(AgentLoopOutput):
        """verl's ``AgentLoopOutput`` whose ``rm_scores`` are mica's per-turn rewards, each on
        its turn's last assistant token (:func:`agent_loop_output`)."""

        mica_rm_scores: list[float] | None = None
        """One value per response token; replaces ``rm_scores`` in :meth:`as_dict`."""

        def as_dict(self):
            out = super().as_dict()
            dense = out.pop("mica_rm_scores", None)
            if dense is not None:
                out["rm_scores"] = torch.tensor(dense, dtype=torch.float32)
            return out

    MicaAgentLoopOutput.__module__ = __name__
    MicaAgentLoopOutput.__qualname__ = "MicaAgentLoopOutput"
    return MicaAgentLoopOutput


def __getattr__(name):
    if name == "MicaAgentLoopOutput":
        cls = _make_output_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def agent_loop_output(*, prompt_ids, response_ids, response_mask, estimator, turn_start=None,
                      distances=None, initial_distance=None, states=None, initial_state=None,
                      rewards=None, keys=None, layout="trajectory", response_logprobs=None,
                      num_turns=0, metrics=None, extra_fields=None, state_options=None):
    """An agent loop's result with mica's per-turn rewards in the tokens verl trains on.

    verl 0.9.1's v1 trainer hands the advantage step only ``uid``, ``response_mask`` and the
    ``rm_scores`` token tensor (``trainer/ppo/v1/trainer_base.py``, ``_compute_advantage``), and
    its agent-loop worker writes one ``reward_score`` per output at the last response token,
    copying the session's final score onto every earlier output (``agent_loop_tq.py``). So the
    per-turn signal has to travel in the tokens: this helper computes each turn's reward for
    ``estimator`` from the rollout's distances, states or rewards (IDR ``D_{t-1} - D_t`` or ADR
    ``-D_t``, by the preset) and returns :class:`MicaAgentLoopOutput` objects whose
    ``rm_scores`` hold turn ``t``'s reward on turn ``t``'s last assistant token, whatever verl
    copies into ``reward_score``. Set ``algorithm.mica.turn_rewards=true`` so that mica reads
    them as per-turn rewards.

    Args:
      prompt_ids, response_ids, response_mask: as for ``AgentLoopOutput`` (the whole
        conversation after the prompt; ``response_mask`` 1 on the model's tokens).
      estimator: the estimator the run trains with, verl's name (pass
        ``self.config.algorithm.adv_estimator``): it decides IDR or ADR.
      turn_start: optional response positions where each assistant turn starts (default: the
        runs of ones of ``response_mask``).
      distances + initial_distance, or states + initial_state, or rewards: one value (state
        vector) per assistant turn.
      keys: optional key per turn (``mica_key``; read by ``trainer.use_v1=false`` only).
      layout: ``"trajectory"`` (default): one output holding the whole conversation (works in
        both trainers: the legacy one reads the ``mica_*`` extra fields it also carries);
        ``"turn"``: one output per turn (verl v1's multi-output agent loops; rows keyed
        ``{uid}_{session}_{index}``), needed when a turn holds a tool call (several runs of
        ones), since the v1 advantage step sees no turn boundaries.
      response_logprobs, num_turns, metrics, extra_fields: as for ``AgentLoopOutput``
        (``metrics`` defaults to an empty ``AgentLoopMetrics``).
      state_options: ``weights``, ``epsilon``, ``kind`` for ``distance_from_state``.

    Returns:
      one :class:`MicaAgentLoopOutput` (``layout="trajectory"``) or a list, one per turn.

    Raises:
      MicaInputError: naming the argument: a signal whose length differs from the turns, an
      ADR preset given rewards instead of distances, a trajectory layout whose turns hold
      several runs of assistant tokens, a bad ``layout``.
    """
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics

    from ..signals import absolute_distance_reward, incremental_distance_reward
    from ..tokens import turn_spans
    from ..turns import collect

    if layout not in ("trajectory", "turn"):
        raise _v.choice("layout", layout, ("trajectory", "turn"))
    est = get_estimator(_preset_of(estimator))
    mask = np.asarray(response_mask, dtype=np.int64).reshape(1, -1)
    if mask.shape[1] != len(response_ids):
        raise _tokens.mask_length(mask.shape[1], len(response_ids))
    bounds = {} if turn_start is None else {"turn_start": [list(turn_start)]}
    spans = turn_spans(mask, **bounds)
    T = int(spans.offsets[-1])
    if rewards is not None and est.reward == "adr":
        raise _rows.adr_needs_distances(estimator)
    names = {"distance": "distances", "initial_distance": "initial_distance",
             "state": "states", "initial_state": "initial_state", "reward": "rewards",
             "key": "keys"}
    wrap = lambda v: None if v is None else [v]  # noqa: E731 - one row
    tb = collect([T], ["session"], {"distance": wrap(distances), "state": wrap(states),
                                    "reward": wrap(rewards), "key": wrap(keys),
                                    "initial_distance": wrap(initial_distance),
                                    "initial_state": wrap(initial_state)},
                 estimator=est, names=names, state_options=state_options)
    if tb.source is None:
        raise _rows.per_turn_signal_required("distances", "give distances (+ initial_distance), "
                                             "states (+ initial_state) or rewards, one per "
                                             "assistant turn")
    if "reward" in tb.inputs:
        reward = tb.inputs["reward"]
    elif est.reward == "adr":
        reward = absolute_distance_reward(tb.inputs["distance"])
    else:
        reward = incremental_distance_reward(tb.offsets, tb.inputs["distance"],
                                             tb.inputs["initial_distance"])
    reward = [float(x) for x in reward]
    last = [int(x) for x in np.asarray(spans.last)]
    start = [int(x) for x in np.asarray(spans.start)]
    cls = globals().get("MicaAgentLoopOutput") or __getattr__("MicaAgentLoopOutput")
    extra = dict(extra_fields or {})
    extra.setdefault("reward_extra_info", {})  # verl's v1 worker copies it between outputs

    def make(prompt, lo, hi, turns, score):
        dense = [0.0] * (hi - lo)
        for k in turns:
            dense[last[k] - lo] += reward[k]
        return cls(prompt_ids=list(prompt), response_ids=list(response_ids[lo:hi]),
                   response_mask=[int(x) for x in mask[0, lo:hi]],
                   response_logprobs=(None if response_logprobs is None
                                      else list(response_logprobs[lo:hi])),
                   reward_score=score, num_turns=num_turns,
                   metrics=AgentLoopMetrics(**(metrics.model_dump() if hasattr(
                       metrics, "model_dump") else (metrics or {}))),  # one per output
                   extra_fields=dict(extra), mica_rm_scores=dense)

    if layout == "trajectory":
        runs = int(turn_spans(mask).offsets[-1])
        if runs != T:
            raise _tokens.runs_in_turns(T, runs)
        out = make(prompt_ids, 0, len(response_ids), range(T), float(sum(reward)))
        fields = {FIELDS["turn_start"]: start}
        if distances is not None:
            fields[FIELDS["distance"]] = [float(x) for x in distances]
            fields[FIELDS["initial_distance"]] = float(initial_distance) \
                if initial_distance is not None else None
        elif states is not None:
            fields[FIELDS["state"]] = [list(map(float, s)) for s in states]
            fields[FIELDS["initial_state"]] = None if initial_state is None else \
                [float(x) for x in initial_state]
        else:
            fields[FIELDS["reward"]] = reward
        if keys is not None:
            fields[FIELDS["key"]] = list(keys)
        out.extra_fields.update({k: v for k, v in fields.items() if v is not None})
        return out
    ends = start[1:] + [len(response_ids)]
    return [make(list(prompt_ids) + list(response_ids[:start[k]]), start[k], ends[k], [k],
                 reward[k]) for k in range(T)]


def _register_presets_if_verl():
    try:
        import verl.trainer.ppo.core_algos  # noqa: F401
    except ImportError:
        return
    register_with_verl()


_register_presets_if_verl()

