"""Per-turn signals of TRL completions in mica's layout, and the per-token advantages that
replace TRL's (the part of :mod:`mica_core.integrations.trl` that needs neither TRL nor
torch at import; the trainer classes live in :mod:`mica_core.integrations._trl_trainer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional

import numpy as np

from .. import validate_rows as _rows
from .. import validate_tokens as _tokens
from ..estimators import PRESETS, get_estimator
from ..options import EstimatorOptions, option_fields, options_from_mapping

__all__ = [
    "FIELDS",
    "MICA_DEFAULTS",
    "config_fields",
    "estimator_options",
    "NAMES",
    "TurnSignals",
    "collect_turn_signals",
    "mica_options",
    "token_advantages",
]

#: per-turn signal fields, one of which a batch must carry
SIGNAL_FIELDS = ("turn_distances", "turn_states", "turn_rewards")
#: every field read from the rollout, the dataset or ``turn_signals_func``
FIELDS = (*SIGNAL_FIELDS, "initial_distance", "initial_state", "turn_starts", "turn_keys")

#: TRL's names of mica's options: ``mica_`` + the option's name
#: (:class:`mica_core.EstimatorOptions`, surface ``turns``)
PREFIX = "mica_"
SPELLING = {f.name: PREFIX + f.name for f in option_fields("turns")}

# TRL's config differs from mica's defaults in one place: ``mica_scale=None`` follows TRL's
# ``scale_rewards``.
_TRL_DEFAULTS = {
    "scale": (None, "'std' or 'none'; None follows scale_rewards ('group' -> 'std', 'none' -> "
                    "'none'; 'batch' is refused)"),
}
# ... and says how two options compare with TRL's GRPO.
_TRL_NOTES = {"eps": " (TRL's GRPO adds 1e-4)", "ddof": " (1, as TRL's nanstd)"}
_TRL_TYPES = {"float": float, "int": int, "str": str, "floats": list[float]}


def config_fields() -> list[tuple[str, object, object, str]]:
    """``(name, type, default, help)`` of each mica field of :class:`MicaGRPOConfig`: the
    estimator, then every option of :class:`mica_core.EstimatorOptions` that the per-turn
    adapters take, named ``mica_<option>``."""
    presets = ", ".join(PRESETS)
    out = [(PREFIX + "estimator", str, "mica",
            f"mica estimator (registry name): {presets} (gigpo needs turn_keys), or one "
            f"registered with mica_core.register_estimator.")]
    for f in option_fields("turns"):
        default, text = _TRL_DEFAULTS.get(f.name, (f.default, f.metadata["help"]))
        tp = _TRL_TYPES[f.metadata["kind"]]
        if default is None:
            tp = Optional[tp]
        text += _TRL_NOTES.get(f.name, "")
        out.append((SPELLING[f.name], tp, default, text + "."))
    return out


#: mica's options on :class:`MicaGRPOConfig` and their defaults (also used for a plain
#: ``GRPOConfig``). ``mica_scale=None`` follows TRL's ``scale_rewards``.
MICA_DEFAULTS = {name: default for name, _, default, _ in config_fields()}

_SCALE_FROM_TRL = {"group": "std", "none": "none", True: "std", False: "none"}


def estimator_options(args) -> tuple[str, EstimatorOptions]:
    """The estimator and its :class:`mica_core.EstimatorOptions` from a TRL config
    (``MicaGRPOConfig`` or plain ``GRPOConfig``): ``mica_<option>`` fields, checked (a bad one
    is a one-line :class:`mica_core.MicaInputError` naming the field). ``mica_scale=None``
    maps TRL's ``scale_rewards``: ``"group"`` -> ``"std"``, ``"none"`` -> ``"none"``;
    ``"batch"`` (group mean, batch std) has no mica equivalent and raises ``ValueError``.
    """
    given = {SPELLING[f.name]: getattr(args, SPELLING[f.name], MICA_DEFAULTS[SPELLING[f.name]])
             for f in option_fields("turns")}
    if given[SPELLING["scale"]] is None:
        trl_scale = getattr(args, "scale_rewards", "group")
        if trl_scale not in _SCALE_FROM_TRL:
            raise ValueError(
                f"scale_rewards={trl_scale!r} has no mica equivalent (mica scales each "
                f"normalization bucket by its own std); set mica_scale='std' or 'none', or pick "
                f"a preset whose components use the batch scope (reinforce_pp_idr, mapo)")
        given[SPELLING["scale"]] = _SCALE_FROM_TRL[trl_scale]
    estimator = getattr(args, PREFIX + "estimator", MICA_DEFAULTS[PREFIX + "estimator"])
    get_estimator(estimator)  # an unknown name fails here, not mid-training
    return estimator, options_from_mapping(given, "turns", spelling=SPELLING)


def mica_options(args) -> dict:
    """mica's estimator options from a TRL config (:func:`estimator_options`), as
    ``{"estimator", "gamma", "weight", "eps", "ddof", "baseline", "scale", "singleton"}`` for
    :func:`mica_core.estimate`."""
    estimator, options = estimator_options(args)
    return {"estimator": estimator, **{f.name: getattr(options, f.name)
                                       for f in option_fields("turns")
                                       if f in option_fields("estimate")}}


class TurnSignals(NamedTuple):
    """Validated per-turn signals of ``n`` completions in mica's CSR layout.

    Attributes:
      offsets: int64 ``[n + 1]``; completion ``b`` owns turns ``offsets[b]:offsets[b+1]``.
      distance: float64 ``[n_turns]`` or None (from ``turn_distances`` or ``turn_states``).
      initial_distance: float64 ``[n]`` or None.
      reward: float64 ``[n_turns]`` or None (from ``turn_rewards``).
      turn_starts: None, or a list of ``n`` int64 arrays (explicit turn boundaries).
      source: the field the per-turn values came from.
      key: ``[n_turns]`` labels (``turn_keys``) or None.
      batch: the :class:`mica_core.turns.TurnBatch` they were laid out in.
    """

    offsets: np.ndarray
    distance: np.ndarray | None
    initial_distance: np.ndarray | None
    reward: np.ndarray | None
    turn_starts: list | None
    source: str
    key: np.ndarray | None = None
    batch: object = None

    @property
    def counts(self) -> np.ndarray:
        """Turns per completion, int64 ``[n]``."""
        return np.diff(self.offsets)

    def estimate_inputs(self) -> dict:
        """Keyword arguments ``distance``/``initial_distance``/``reward``/``key`` for
        ``estimate``."""
        out = {"reward": self.reward} if self.reward is not None else {
            "distance": self.distance, "initial_distance": self.initial_distance}
        if self.key is not None:
            out["key"] = self.key
        return out


#: TRL's field names for the shared layer's (mica_core.turns.SIGNALS)
NAMES = {"distance": "turn_distances", "state": "turn_states", "reward": "turn_rewards",
         "initial_distance": "initial_distance", "initial_state": "initial_state",
         "key": "turn_keys", "group": "group"}


def _as_array(field, row, value, dtype=np.float64):
    return _rows.numbers(field, row, value, noun="completion", dtype=dtype)


def collect_turn_signals(fields: Mapping, n: int, *, state_weights=None, state_epsilon=1.0,
                         state_kind="hinge", group=None, estimator="mica") -> TurnSignals:
    """Validate per-completion signal fields and lay them out for :func:`mica_core.estimate`
    (through the shared layer, :func:`mica_core.turns.collect`).

    Args:
      fields: ``{field: list with one entry per completion}``; exactly one of
        ``turn_distances``, ``turn_states``, ``turn_rewards``, plus ``initial_distance`` /
        ``initial_state`` where the signal needs it, ``turn_keys`` for keyed estimators
        (``gigpo``) and optionally ``turn_starts`` (module docstring). Other keys are ignored.
      n: the number of completions.
      state_weights, state_epsilon, state_kind: :func:`mica_core.distance_from_state`
        options for ``turn_states``.
      group: optional ``[n]`` group labels (default: all in one group; only
        :attr:`TurnSignals.batch` uses them).
      estimator: the estimator the signals are for (IDR or ADR; whether keys are required).

    Returns:
      :class:`TurnSignals`. A completion whose list is empty has no turn: it gets advantage 0.

    Raises:
      MicaInputError: naming the field and the completion (row): a missing, non-numeric or
      non-finite list, a negative distance, a state of the wrong width, ``turn_starts`` not
      strictly increasing non-negative integers or of another length than the turns, a
      missing ``turn_keys`` for a keyed estimator.
    """
    from ..turns import collect

    present = [f for f in SIGNAL_FIELDS if fields.get(f) is not None]
    if len(present) != 1:
        got = ", ".join(present) if present else "none"
        raise _rows.several_signals(present[0] if present else SIGNAL_FIELDS[0],
                                    f"needs exactly one of {', '.join(SIGNAL_FIELDS)} per batch "
                                    f"(from the rollout, the dataset or turn_signals_func); got "
                                    f"{got}")
    source = present[0]
    by_mica = {k: fields.get(v) for k, v in NAMES.items() if k != "group"}
    batch = collect(None, np.zeros(n, dtype=np.int64) if group is None else group, by_mica,
                    estimator=estimator, names=NAMES, row_name="completion",
                    state_options={"weights": state_weights, "epsilon": state_epsilon,
                                   "kind": state_kind})
    counts = batch.counts
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    inputs = batch.inputs
    back = batch.to_rows  # row-major turn j is CSR turn back[j]; rows are trajectories here
    take = (lambda a: None if a is None else np.asarray(a)[back])  # noqa: E731
    traj_rows = np.flatnonzero(counts > 0)
    initial = None
    if inputs.get("initial_distance") is not None:
        initial = np.zeros(n)
        initial[traj_rows] = inputs["initial_distance"]
    starts = None
    starts_col = _column(fields, "turn_starts", n)
    if starts_col is not None:
        starts = []
        for b in range(n):
            s = _as_array("turn_starts", b, starts_col[b])
            if s.ndim != 1 or s.shape[0] != counts[b]:
                raise _tokens.starts_per_turn(b, s.size, source, counts[b])
            if not (np.all(s == np.round(s)) and np.all(s >= 0) and np.all(np.diff(s) > 0)):
                raise _tokens.starts_not_positions(b, s.tolist())
            starts.append(s.astype(np.int64))
    return TurnSignals(offsets, take(inputs.get("distance")), initial, take(inputs.get("reward")),
                       starts, source, take(inputs.get("key")), batch)


def _column(fields, name, n):
    col = fields.get(name)
    if col is None:
        return None
    return _rows.entries(name, col, n, noun="completion")


def token_advantages(turn_advantage, counts, loss_mask, *, turn_starts=None, skip_rows=None,
                     column="turn_distances", row_offset=0):
    """Spread per-turn advantages over the tokens of each completion's turns.

    ``A[b, j] = a[b, k]`` when token ``j`` of completion ``b`` belongs to its turn ``k``
    (``loss_mask[b, j] != 0``), else ``0``. This is the tensor TRL's loss multiplies with its
    per-token ratios, in place of the per-completion ``advantages.unsqueeze(1)``.

    Args:
      turn_advantage: flat ``[n_turns]`` (numpy or torch), completion 0's turns first.
      counts: int ``[B]`` turns per completion (the per-turn signal's lengths).
      loss_mask: torch ``[B, L]``, non-zero on the tokens TRL's loss sums over
        (``completion_mask * tool_mask``).
      turn_starts: None (turns are the runs of ones of ``loss_mask``) or a list of ``B`` int
        arrays (turn ``k`` is every ``loss_mask`` token from ``turn_starts[k]`` up to the next
        start).
      skip_rows: optional bool ``[B]``: completions left out of the loss (``completion_mask``
        all 0 under ``mask_truncated_completions``); they get 0 and are not checked.
      column: the signal field named in errors.
      row_offset: added to row numbers in errors (this process's first row in the batch).

    Returns:
      float32 ``[B, L]`` on ``loss_mask``'s device: turn ``k``'s advantage on turn ``k``'s
      tokens, 0 on every other token.

    Raises:
      MicaInputError: naming the row: a count of turns in ``loss_mask`` other than
      ``counts``, assistant tokens before the first of ``turn_starts``, a turn without an
      assistant token. A completion without any ``loss_mask`` token gets 0.
    """
    import torch

    from ..tokens import broadcast_to_tokens, turn_spans

    mask = loss_mask != 0
    B, L = mask.shape
    counts = np.asarray(counts, dtype=np.int64)
    skip = (np.zeros(B, dtype=bool) if skip_rows is None
            else np.asarray(skip_rows.cpu() if hasattr(skip_rows, "cpu") else skip_rows,
                            dtype=bool))
    if counts.shape != (B,) or skip.shape != (B,):
        raise ValueError(f"counts and skip_rows need shape ({B},); got {counts.shape}, "
                         f"{skip.shape}")
    # a completion without any loss token (an empty or aborted reply) gets 0, as TRL's
    # loss gives it nothing to weigh; it is not checked against its signal
    skip = skip | (mask.sum(1).cpu().numpy() == 0)
    mask = mask & torch.as_tensor(~skip, device=mask.device)[:, None]
    K = max(int(counts.max()) if B else 0, 1)
    adv = np.asarray(turn_advantage.cpu() if hasattr(turn_advantage, "cpu") else turn_advantage,
                     dtype=np.float64)
    if adv.shape != (int(counts.sum()),):
        raise ValueError(f"turn_advantage needs {int(counts.sum())} values (sum of counts); got "
                         f"shape {adv.shape}")
    row_of_turn = np.repeat(np.arange(B), counts)
    turn_in_row = np.arange(adv.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    padded = np.zeros((B, K))
    padded[row_of_turn, turn_in_row] = adv
    padded_t = torch.as_tensor(padded, device=mask.device)
    if turn_starts is None:
        found = np.diff(turn_spans(mask).offsets.cpu().numpy())
        bad = np.flatnonzero((found != counts) & ~skip)
        if bad.size:
            b = int(bad[0])
            raise _tokens.turns_for_values(column, b + row_offset, found[b], counts[b],
                                           "runs of ones in completion_mask * tool_mask",
                                           "pass turn_starts if a turn contains tool or "
                                           "environment tokens")
        out = broadcast_to_tokens(padded_t, mask, validate=False)
    else:
        # TRL's turn k runs from turn_starts[k] to the next start; mica's tokens functions
        # start a turn on its first loss token: move each start there
        host = mask.cpu().numpy()
        first = []
        for b in range(B):
            s = np.asarray(turn_starts[b], dtype=np.int64)
            if skip[b]:
                first.append([])
                continue
            ends = np.r_[s[1:], L]
            tok = np.flatnonzero(host[b])
            at = np.searchsorted(tok, s)
            ok = (at < tok.size) & (tok[np.minimum(at, tok.size - 1)] < ends)
            if not ok.all():
                k = int(np.flatnonzero(~ok)[0])
                raise _tokens.turn_without_token(b + row_offset, k, int(s[k]))
            if tok.size and s.size and tok[0] < s[0]:
                raise _tokens.token_before_first_start(b + row_offset, int(tok[0]),
                                                       "turn_starts", int(s[0]))
            first.append(tok[at].tolist())
        out = broadcast_to_tokens(padded_t, mask, validate=False, turn_start=first)
    return out.to(torch.float32)
