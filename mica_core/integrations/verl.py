"""mica's estimators as verl advantage estimators.

Each function here has verl's estimator signature::

    fn(token_level_rewards, response_mask, index, config=None, **kwargs) -> (advantages, returns)

and is registered in verl's registry (``verl.trainer.ppo.core_algos.register_adv_est``) when
verl is importable, so ``algorithm.adv_estimator=mica`` in a verl config reaches it through
verl's own ``compute_advantage``. Importing this module without verl installed works: the
functions are plain torch code and registration is skipped.

verl's layout: one row per trajectory. ``response_mask [B, L]`` marks assistant tokens; the
turns of a row are the runs of ones in it. There are no distances in this layout: the
environment's reward function has already turned each turn's state into a reward (IDR
``D_{t-1} - D_t`` for MICA) and written it on the last token of that turn's span. So the
adapters call :func:`mica_core.estimate` with ``reward=`` (the per-turn rewards) and
``group=index`` (verl's ``uid``), and spread the per-turn advantage and return over every
token of the turn (:func:`mica_core.broadcast_to_tokens`). A non-zero reward anywhere else, or
a row without an assistant token, raises :class:`mica_core.MicaInputError` naming the row.

Registered names: a preset's own name when it starts with ``mica`` (``mica``, ``mica_turn``,
``mica_group``, ``mica_adr``), else ``mica_`` + name (``mica_mapo``, ``mica_grpo``,
``mica_reinforce_pp``, ``mica_reinforce_pp_idr``), so verl's own ``grpo`` is untouched. With
rewards given, ``mica_adr`` computes what ``mica`` does: IDR or ADR is the reward function's
choice in this layout.

Options, each from the first place that has it:

1. keyword arguments of the call: ``gamma``, ``weight``, ``eps``, ``ddof``, ``baseline``,
   ``scale``, ``singleton``; verl's ``epsilon`` means ``eps`` and ``norm_adv_by_std_in_grpo=
   False`` means ``scale="none"``;
2. ``config.mica.<option>`` (e.g. ``+algorithm.mica.weight=0.3`` on verl's command line);
3. ``config.gamma``, ``config.weight``, ``config.eps``; for ``mica_grpo`` also
   ``config.norm_adv_by_std_in_grpo``. verl's ``algorithm.gamma`` defaults to 1.0: set it
   (or ``algorithm.mica.gamma``) to 0.85 for the paper's discount;
4. the preset's defaults.

verl's ``index`` is a host array of labels, factorized on the host; the computation then runs
on the rewards' device. ``returns`` holds the preset's per-turn return on every token of its
turn (``G_t``; ``R_i`` for ``mica_grpo``), not a copy of the advantages.
"""

from __future__ import annotations

import functools

from .._errors import MicaInputError
from ..estimators import get_estimator

__all__ = [
    "PRESETS",
    "REGISTERED",
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
           "reinforce_pp_idr", "mica_group_adr")
OPTIONS = ("gamma", "weight", "eps", "ddof", "baseline", "scale", "singleton")
TOP_LEVEL = ("gamma", "weight", "eps")

#: verl names registered by this module (filled by :func:`register_with_verl`).
REGISTERED: dict = {}


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
    """Estimator options from a call's keyword arguments and a verl config (module docstring)."""
    opts = {}
    for key in TOP_LEVEL:
        v = _get(config, key)
        if v is not None:
            opts[key] = v
    if estimator == "grpo":
        norm = _get(config, "norm_adv_by_std_in_grpo")
        if norm is not None:
            opts["scale"] = "std" if norm else "none"
    section = _get(config, "mica")
    for key in OPTIONS:
        v = _get(section, key)
        if v is not None:
            opts[key] = v
    kwargs = kwargs or {}
    if kwargs.get("epsilon") is not None:
        opts["eps"] = kwargs["epsilon"]
    if kwargs.get("norm_adv_by_std_in_grpo") is not None:
        opts["scale"] = "std" if kwargs["norm_adv_by_std_in_grpo"] else "none"
    for key in OPTIONS:
        if kwargs.get(key) is not None:
            opts[key] = kwargs[key]
    for key in ("gamma", "weight", "eps"):
        if key in opts:
            opts[key] = float(opts[key])
    if "ddof" in opts:
        opts["ddof"] = int(opts["ddof"])
    return opts


def _advantage(estimator, token_level_rewards, response_mask, index, config, kwargs):
    import numpy as np
    import torch

    from ..api import estimate
    from ..tokens import broadcast_to_tokens, turn_rewards_from_tokens

    opts = options_from_config(estimator, config, kwargs)
    B = token_level_rewards.shape[0]
    labels = np.asarray(index.cpu() if isinstance(index, torch.Tensor)
                        and index.device.type != "cpu" else index)
    if labels.ndim != 1 or labels.shape[0] != B:
        raise MicaInputError(f"needs one label (uid) per row ({B}); got shape {labels.shape}",
                             column="index", rule="length")
    with torch.no_grad():
        reward, spans = turn_rewards_from_tokens(token_level_rewards, response_mask)
        per_row = (spans.offsets[1:] - spans.offsets[:-1]).cpu().numpy()
        empty = np.flatnonzero(per_row == 0)
        if empty.size:
            raise MicaInputError("this row has no assistant token (response_mask is all 0): "
                                 "it has no turn to credit", column="response_mask",
                                 row=int(empty[0]), rule="at least one turn")
        res = estimate(spans.offsets, labels, reward=reward,
                                      estimator=estimator, max_turns=int(per_row.max()),
                                      **opts)
        advantages = broadcast_to_tokens(res.advantage, response_mask, validate=False)
        returns = broadcast_to_tokens(res.returns, response_mask, validate=False)
    dt = token_level_rewards.dtype if token_level_rewards.is_floating_point() else None
    if dt is not None:
        advantages, returns = advantages.to(dt), returns.to(dt)
    return advantages, returns


@functools.cache
def verl_estimator(estimator: str):
    """A function with verl's estimator signature computing ``estimator`` (cached, so
    registering twice registers the same object)."""
    get_estimator(estimator)  # fail early on an unknown name

    def compute_advantage(token_level_rewards, response_mask, index, config=None, **kwargs):
        return _advantage(estimator, token_level_rewards, response_mask, index, config, kwargs)

    compute_advantage.__name__ = f"compute_{estimator}_advantage"
    compute_advantage.__qualname__ = compute_advantage.__name__
    compute_advantage.__doc__ = f"""mica's ``{estimator}`` estimator in verl's layout.

    Args:
      token_level_rewards: ``[B, L]`` float, each turn's reward on the last token of its span.
      response_mask: ``[B, L]``, non-zero on assistant tokens (runs of ones are turns).
      index: ``[B]`` group labels (verl's ``uid``).
      config: verl's algorithm config (optional); see :mod:`mica_core.integrations.verl`
        for the options read from it.
      **kwargs: estimator options (``gamma``, ``weight``, ``eps``, ...); other keys verl
        passes (e.g. ``reward_baselines``) are ignored.

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

