"""mica's per-turn advantages in TRL's GRPO trainer.

TRL's ``GRPOTrainer`` gives every token of a completion the same advantage, the z-score of the
completion's reward in its group. In a multi-turn completion (assistant turns separated by
user or tool tokens) mica credits each assistant turn separately: :class:`MicaGRPOTrainer`
computes mica's per-turn advantages from per-turn signals and hands TRL's loss a ``[B, L]``
advantage tensor, each turn's advantage on that turn's tokens and 0 elsewhere. Nothing else in
TRL's loss changes (clipping, ``loss_type``, ``beta``, importance sampling, masks); TRL's own
``_compute_loss`` accepts ``[B, L]`` advantages as they are.

Per-turn signals, one entry per completion, in fields named:

- ``turn_distances`` (``[T_i]``, residual distance ``D_t >= 0`` after each assistant turn) and
  ``initial_distance`` (``D_{-1}``, a number; IDR presets need it);
- or ``turn_states`` (``[T_i, K]`` support-state vectors) and ``initial_state`` (``[K]``),
  turned into distances by :func:`mica_core.distance_from_state`;
- or ``turn_rewards`` (``[T_i]``, rewards given directly);
- optionally ``turn_starts`` (``[T_i]`` completion-token positions where each turn begins);
- ``turn_keys`` (``[T_i]`` labels, e.g. anchor-state hashes) for estimators with a ``key``
  scope (``gigpo``).

They come from the rollout (extra keys of a ``rollout_func``'s output, which TRL forwards per
completion), from dataset columns (e.g. a scenario's ``initial_distance``), or from a
``turn_signals_func`` with TRL's reward-function signature that returns them (e.g. read from
``environments``); the function's fields win over the others. With TRL's tool loop
(``environment_factory``) they may also be attributes of each completion's environment, which
may instead record one value per executed tool call (``call_distances``, ``call_states``,
``call_rewards``), assigned to turns by :func:`turn_fields_from_calls` (docs/trl.md, "Tool
calling").

Turns in a completion (``loss_mask = completion_mask * tool_mask``, what TRL's loss sums over):

- without ``turn_starts``: the runs of ones of ``loss_mask``, in order, i.e. the assistant
  segments between tool results or ``rollout_func``'s ``env_mask == 0`` segments
  (:func:`mica_core.tokens.turn_spans`);
- with ``turn_starts``: turn ``k`` is every ``loss_mask`` token in
  ``[turn_starts[k], turn_starts[k+1])``, so a tool call inside a reply does not make two turns.

The number of turns found must equal the length of the per-turn list; otherwise
:class:`mica_core.MicaInputError` names the row (the completion's index in the generation
batch). A completion without an assistant token gets advantage 0. The fields go through
:mod:`mica_core.turns`, the adapter layer shared with the verl integration. A completion
that ``mask_truncated_completions`` removed from the loss (``completion_mask`` all 0) still
enters mica's group statistics, as it enters TRL's, and gets no token advantage.

This module imports neither TRL nor torch: :class:`MicaGRPOTrainer` and :class:`MicaGRPOConfig`
are loaded on first access (``pip install 'mica-credit[trl]'``). See docs/trl.md.
"""

from __future__ import annotations

from ._trl_signals import (
    FIELDS,
    MICA_DEFAULTS,
    NAMES,
    TurnSignals,
    collect_turn_signals,
    mica_options,
    token_advantages,
)
from ._trl_tools import CALL_FIELDS, tool_turns, turn_fields_from_calls

__all__ = [
    "CALL_FIELDS",
    "FIELDS",
    "MICA_DEFAULTS",
    "NAMES",
    "MicaGRPOConfig",  # noqa: F822 (loaded on first access, see __getattr__)
    "MicaGRPOTrainer",  # noqa: F822
    "TurnSignals",
    "collect_turn_signals",
    "mica_options",
    "token_advantages",
    "tool_turns",
    "turn_fields_from_calls",
]


def __getattr__(name):
    if name in ("MicaGRPOTrainer", "MicaGRPOConfig"):
        try:
            from . import _trl_trainer
        except ImportError as e:
            if getattr(e, "name", None) and e.name.split(".")[0] in ("trl", "torch",
                                                                     "transformers"):
                raise ImportError(f"{name} needs TRL: pip install 'mica-credit[trl]' ({e})") from e
            raise
        return getattr(_trl_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
