"""``MicaGRPOTrainer`` and ``MicaGRPOConfig``: the TRL classes of :mod:`mica_core.integrations.trl`.

Imported on first access of those names (this module imports TRL). The two override points in
TRL's ``GRPOTrainer`` (read in TRL 1.16's ``trl/trainer/grpo_trainer.py``):

- ``_calculate_rewards(inputs, prompts, completions, completion_ids_list)``: where TRL hands
  reward functions their view of the batch (input columns with the rollout's extra fields
  merged in, ``environments``). Here the per-turn signal fields are read (and
  ``turn_signals_func`` called with the same arguments), gathered across processes as TRL
  gathers rewards (a group's completions may sit on several processes), and mica's per-turn
  advantages computed for the whole generation batch. TRL's reward functions then run as usual.
- ``_generate_and_score_completions(inputs)``: TRL's output dict holds ``advantages [B]``;
  they are replaced by mica's ``[B, L]`` token advantages, spread over the turns of
  ``completion_mask * tool_mask``. TRL's ``_compute_loss`` uses ``[B, L]`` advantages as they
  are (it unsqueezes only 1-D ones), and its buffering (``steps_per_generation``,
  ``num_iterations``) shuffles and splits them with the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field, make_dataclass

import numpy as np
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer

from .. import validate_rows as _rows
from ..turns import estimate_turns
from ._trl_signals import (
    FIELDS,
    collect_turn_signals,
    config_fields,
    estimator_options,
    token_advantages,
)
from ._trl_tools import CALL_FIELDS, turn_fields_from_calls

__all__ = ["MicaGRPOConfig", "MicaGRPOTrainer"]

_KNOWN = (*FIELDS, *CALL_FIELDS)  # fields read from columns, environments, turn_signals_func


MicaGRPOConfig = make_dataclass(
    "MicaGRPOConfig",
    [(name, tp, field(default=default, metadata={"help": text}))
     for name, tp, default, text in config_fields()],
    bases=(GRPOConfig,),
    namespace={"__doc__": """``GRPOConfig`` plus mica's estimator options (``mica_*``); see docs/trl.md.

    The ``mica_*`` fields are derived from :class:`mica_core.EstimatorOptions` (names, types,
    defaults, help; :func:`mica_core.integrations.trl.config_fields`) and checked by it when
    the trainer starts. TRL's own options keep their meaning. ``scale_rewards`` sets mica's
    ``scale`` unless ``mica_scale`` is given; TRL's reward normalization
    (``multi_objective_aggregation``, ``reward_weights``) applies only to the reward functions
    TRL logs, not to the advantages.
    """, "__module__": __name__})


class MicaGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with mica's per-turn advantages on each turn's tokens.

    Takes every argument of ``GRPOTrainer`` plus ``turn_signals_func``; ``args`` may be a
    :class:`MicaGRPOConfig` (mica's options) or a plain ``GRPOConfig`` (mica's defaults).

    Args:
      turn_signals_func: optional, called once per generation batch on each process with TRL's
        reward-function arguments (``prompts``, ``completions``, ``completion_ids``, every input
        column including the rollout's extra fields, ``trainer_state`` and, with an
        ``environment_factory``, ``environments``); returns ``{field: list with one entry per
        completion}`` with the fields of :mod:`mica_core.integrations.trl`. Its fields win over
        input columns of the same name.

    With ``environment_factory``, each environment's attributes named like those fields, or
    ``call_distances`` / ``call_states`` / ``call_rewards`` (one value per executed tool call,
    assigned to turns by :func:`mica_core.integrations.trl.turn_fields_from_calls`), are read for
    its completion; they win over input columns, ``turn_signals_func``'s fields over them.
      reward_funcs: as in TRL; they are evaluated and logged but do not enter the advantages.
        When omitted, ``mica_outcome`` (each completion's sum of mica turn rewards, i.e.
        ``D_{-1} - D_{T-1}`` under IDR) is logged as the reward.

    Per-token advantages: float32 ``[B, L]`` in the output of
    ``_generate_and_score_completions`` under ``"advantages"``, which TRL's loss multiplies
    with its per-token ratios.
    """

    def __init__(self, model, reward_funcs=None, args=None, *more, turn_signals_func=None,
                 **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(
                getattr(model, "config", None), "_name_or_path", "") or "model"
            args = MicaGRPOConfig(f"{str(name).split('/')[-1]}-GRPO")
        self.mica_estimator, self.mica_options = estimator_options(args)
        self.turn_signals_func = turn_signals_func
        self._mica_batch = None
        if reward_funcs is None:
            reward_funcs = [self._outcome_reward_func()]
        super().__init__(model, reward_funcs, args, *more, **kwargs)

    def _outcome_reward_func(self):
        trainer = self

        def mica_outcome(prompts, completions, **kwargs):
            batch = trainer._mica_batch
            return batch["outcome"][batch["rows"]].tolist()

        return mica_outcome

    def _turn_signal_fields(self, inputs, prompts, completions, completion_ids_list):
        """Signal fields of this process's completions: input columns, then the environments'
        attributes, then the function's; per-call fields become per-turn ones (_trl_tools)."""
        fields = {k: [x.get(k) for x in inputs] for k in _KNOWN if any(k in x for x in inputs)}
        environments = getattr(self, "environments", None)
        if environments is not None:
            fields.update({k: [getattr(e, k, None) for e in environments] for k in _KNOWN
                           if any(hasattr(e, k) for e in environments)})
        if self.turn_signals_func is not None:
            fields.update(self._turn_signals_from_func(inputs, prompts, completions,
                                                       completion_ids_list))
        if any(fields.get(k) is not None for k in CALL_FIELDS):
            if not self.tools:
                raise _rows.calls_without_tool_loop(next(k for k in CALL_FIELDS if k in fields))
            fields = turn_fields_from_calls(fields, completions,
                                            row_offset=self.accelerator.process_index
                                            * len(prompts))
        return fields

    def _turn_signals_from_func(self, inputs, prompts, completions, completion_ids_list):
        skip = ("prompt", "completion", "completion_ids")
        kwargs = {k: [x.get(k) for x in inputs] for k in inputs[0] if k not in skip}
        kwargs["trainer_state"] = self.state
        if getattr(self, "environments", None) is not None:
            kwargs["environments"] = self.environments
        out = self.turn_signals_func(prompts=prompts, completions=completions,
                                     completion_ids=completion_ids_list, **kwargs)
        if not isinstance(out, Mapping):
            raise TypeError(f"turn_signals_func must return a dict of fields; got "
                            f"{type(out).__name__}")
        for key, values in out.items():
            if key not in _KNOWN:
                raise _rows.unknown_field(key, "turn_signals_func", _KNOWN)
            if values is not None:
                _rows.entries(key, values, len(prompts), noun="completion",
                              source="turn_signals_func")
        return {k: v for k, v in out.items() if v is not None}

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        local = self._turn_signal_fields(inputs, prompts, completions, completion_ids_list)
        rows = gather_object([{k: v[i] for k, v in local.items()} for i in range(len(prompts))])
        fields = {k: [r.get(k) for r in rows] for k in FIELDS if any(k in r for r in rows)}
        opts, estimator = self.mica_options, self.mica_estimator
        group = np.arange(len(rows)) // group_size  # TRL's groups: consecutive completions
        signals = collect_turn_signals(fields, len(rows), state_weights=opts.state_weights,
                                       state_epsilon=opts.state_epsilon,
                                       state_kind=opts.state_kind, group=group,
                                       estimator=estimator)
        result = estimate_turns(signals.batch, estimator, lone_rollout=opts.lone_rollout,
                                **opts.for_surface("estimate"))
        outcome = np.zeros(len(rows))
        np.add.at(outcome, np.repeat(np.arange(len(rows)), signals.counts), result.reward)
        start = self.accelerator.process_index * len(prompts)
        self._mica_batch = {
            "signals": signals,
            "result": result,
            "outcome": outcome,
            "rows": slice(start, start + len(prompts)),
        }
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        batch, self._mica_batch = self._mica_batch, None
        signals, result, rows = batch["signals"], batch["result"], batch["rows"]
        offsets = signals.offsets
        completion_mask = output["completion_mask"]
        loss_mask = completion_mask
        if output.get("tool_mask") is not None:
            loss_mask = completion_mask * output["tool_mask"]
        skip = (completion_mask.sum(1) == 0) if self.mask_truncated_completions else None
        output["advantages"] = token_advantages(
            result.advantage[offsets[rows.start]:offsets[rows.stop]],
            signals.counts[rows], loss_mask,
            turn_starts=None if signals.turn_starts is None else signals.turn_starts[rows],
            skip_rows=skip, column=signals.source, row_offset=rows.start)

        # TRL logged one advantage per completion; log mica's, one per turn.
        n = len(signals.counts)
        logged = self._logs["advantages"]
        for _ in range(min(n, len(logged))):
            logged.pop()
        logged.extend(result.advantage[offsets[b]:offsets[b + 1]].tolist() for b in range(n))
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["mica/turns/mean"].append(float(signals.counts.mean()))
        self._metrics[mode]["mica/outcome/mean"].append(float(batch["outcome"].mean()))
        self._metrics[mode]["mica/empty_rows"].append(float(result.empty_rows))
        self._metrics[mode]["mica/lone_rollouts"].append(float(result.lone_rollouts))
        return output
