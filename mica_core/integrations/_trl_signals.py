"""Per-turn signals of TRL completions in mica's layout, and the per-token advantages that
replace TRL's (the part of :mod:`mica_core.integrations.trl` that needs neither TRL nor
torch at import; the trainer classes live in :mod:`mica_core.integrations._trl_trainer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from .._errors import MicaInputError
from ..estimators import get_estimator
from ..signals import distance_from_state

__all__ = [
    "FIELDS",
    "MICA_DEFAULTS",
    "TurnSignals",
    "collect_turn_signals",
    "mica_options",
    "token_advantages",
]

#: per-turn signal fields, one of which a batch must carry
SIGNAL_FIELDS = ("turn_distances", "turn_states", "turn_rewards")
#: every field read from the rollout, the dataset or ``turn_signals_func``
FIELDS = (*SIGNAL_FIELDS, "initial_distance", "initial_state", "turn_starts")

#: mica's options on :class:`MicaGRPOConfig` and their defaults (also used for a plain
#: ``GRPOConfig``). ``mica_scale=None`` follows TRL's ``scale_rewards``.
MICA_DEFAULTS = {
    "mica_estimator": "mica",
    "mica_gamma": None,
    "mica_weight": 0.5,
    "mica_eps": 1e-6,
    "mica_ddof": 1,
    "mica_baseline": "mean",
    "mica_scale": None,
    "mica_singleton": "zero",
    "mica_state_weights": None,
    "mica_state_epsilon": 1.0,
    "mica_state_kind": "hinge",
}

_SCALE_FROM_TRL = {"group": "std", "none": "none", True: "std", False: "none"}


def mica_options(args) -> dict:
    """mica's estimator options from a TRL config (``MicaGRPOConfig`` or plain ``GRPOConfig``).

    Returns ``{"estimator", "gamma", "weight", "eps", "ddof", "baseline", "scale",
    "singleton"}`` for :func:`mica_core.estimate`. ``mica_scale=None`` maps TRL's
    ``scale_rewards``: ``"group"`` -> ``"std"``, ``"none"`` -> ``"none"``; ``"batch"`` (group
    mean, batch std) has no mica equivalent and raises ``ValueError``.
    """
    opt = {k: getattr(args, k, v) for k, v in MICA_DEFAULTS.items()}
    scale = opt["mica_scale"]
    if scale is None:
        trl_scale = getattr(args, "scale_rewards", "group")
        if trl_scale not in _SCALE_FROM_TRL:
            raise ValueError(
                f"scale_rewards={trl_scale!r} has no mica equivalent (mica scales each "
                f"normalization bucket by its own std); set mica_scale='std' or 'none', or pick "
                f"a preset whose components use the batch scope (reinforce_pp_idr, mapo)")
        scale = _SCALE_FROM_TRL[trl_scale]
    get_estimator(opt["mica_estimator"])  # an unknown name fails here, not mid-training
    return {
        "estimator": opt["mica_estimator"],
        "gamma": opt["mica_gamma"],
        "weight": float(opt["mica_weight"]),
        "eps": float(opt["mica_eps"]),
        "ddof": int(opt["mica_ddof"]),
        "baseline": opt["mica_baseline"],
        "scale": scale,
        "singleton": opt["mica_singleton"],
    }


class TurnSignals(NamedTuple):
    """Validated per-turn signals of ``n`` completions in mica's CSR layout.

    Attributes:
      offsets: int64 ``[n + 1]``; completion ``b`` owns turns ``offsets[b]:offsets[b+1]``.
      distance: float64 ``[n_turns]`` or None (from ``turn_distances`` or ``turn_states``).
      initial_distance: float64 ``[n]`` or None.
      reward: float64 ``[n_turns]`` or None (from ``turn_rewards``).
      turn_starts: None, or a list of ``n`` int64 arrays (explicit turn boundaries).
      source: the field the per-turn values came from.
    """

    offsets: np.ndarray
    distance: np.ndarray | None
    initial_distance: np.ndarray | None
    reward: np.ndarray | None
    turn_starts: list | None
    source: str

    @property
    def counts(self) -> np.ndarray:
        """Turns per completion, int64 ``[n]``."""
        return np.diff(self.offsets)

    def estimate_inputs(self) -> dict:
        """Keyword arguments ``distance``/``initial_distance``/``reward`` for ``estimate``."""
        if self.reward is not None:
            return {"reward": self.reward}
        return {"distance": self.distance, "initial_distance": self.initial_distance}


def _as_array(field, row, value, dtype=np.float64):
    if value is None:
        raise MicaInputError("no value for this completion", column=field, row=row,
                             rule="a value per completion")
    if hasattr(value, "detach"):  # a torch tensor, possibly on an accelerator
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise MicaInputError(f"not numeric: {type(value).__name__} {str(value)[:60]!r}",
                             column=field, row=row, rule="numbers") from None


def _per_turn(field, row, value, ndim):
    a = _as_array(field, row, value)
    what = "a list of numbers" if ndim == 1 else "a list of state vectors [turns, K]"
    if a.ndim != ndim:
        raise MicaInputError(f"needs {what} per completion; got shape {a.shape}", column=field,
                             row=row, rule="shape")
    if a.shape[0] == 0:
        raise MicaInputError("an empty list: the completion has no turn", column=field,
                             row=row, rule="at least one turn")
    bad = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1))
    if bad.size:
        t = int(bad[0])
        raise MicaInputError(f"turn {t}: {a[t].tolist()} is not finite", column=field, row=row,
                             rule="finite")
    return a


def _initial(field, row, value, shape):
    a = _as_array(field, row, value)
    if a.shape != shape:
        want = "a number" if shape == () else f"a vector of {shape[0]} values"
        raise MicaInputError(f"needs {want} per completion; got shape {a.shape}", column=field,
                             row=row, rule="shape")
    if not np.isfinite(a).all():
        raise MicaInputError(f"{a.tolist()} is not finite", column=field, row=row,
                             rule="finite")
    return a


def _column(fields, name, n):
    col = fields.get(name)
    if col is None:
        return None
    if isinstance(col, (str, bytes)) or not hasattr(col, "__len__"):
        raise MicaInputError(f"needs one entry per completion; got {type(col).__name__}",
                             column=name, rule="one entry per completion")
    if len(col) != n:
        raise MicaInputError(f"has {len(col)} entries for {n} completions", column=name,
                             rule="one entry per completion")
    return col


def collect_turn_signals(fields: Mapping, n: int, *, state_weights=None, state_epsilon=1.0,
                         state_kind="hinge") -> TurnSignals:
    """Validate per-completion signal fields and lay them out for :func:`mica_core.estimate`.

    Args:
      fields: ``{field: list with one entry per completion}``; exactly one of
        ``turn_distances``, ``turn_states``, ``turn_rewards``, plus ``initial_distance`` /
        ``initial_state`` where the signal needs it and optionally ``turn_starts`` (module
        docstring). Other keys are ignored.
      n: the number of completions.
      state_weights, state_epsilon, state_kind: :func:`mica_core.distance_from_state`
        options for ``turn_states``.

    Returns:
      :class:`TurnSignals`.

    Raises:
      MicaInputError: naming the field and the completion (row): a missing, empty, non-numeric
      or non-finite list, a negative distance, a state of the wrong width, ``turn_starts`` not
      strictly increasing non-negative integers or of another length than the turns.
    """
    present = [f for f in SIGNAL_FIELDS if fields.get(f) is not None]
    if len(present) != 1:
        got = ", ".join(present) if present else "none"
        raise MicaInputError(f"needs exactly one of {', '.join(SIGNAL_FIELDS)} per batch (from "
                             f"the rollout, the dataset or turn_signals_func); got {got}",
                             column=present[0] if present else SIGNAL_FIELDS[0],
                             rule="one per-turn signal")
    source = present[0]
    col = _column(fields, source, n)
    per_row = [_per_turn(source, b, col[b], 2 if source == "turn_states" else 1)
               for b in range(n)]
    counts = np.array([a.shape[0] for a in per_row], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    width = per_row[0].shape[1] if source == "turn_states" and n else 0
    if source == "turn_states":
        for b, a in enumerate(per_row):
            if a.shape[1] != width:
                raise MicaInputError(f"state vectors of {a.shape[1]} values; completion 0 has "
                                     f"{width}", column=source, row=b, rule="one state width")
    values = (np.concatenate(per_row) if n else np.zeros((0, width) if source == "turn_states"
                                                          else 0))
    distance = initial = reward = None
    if source == "turn_rewards":
        reward = values
    elif source == "turn_distances":
        bad = np.flatnonzero(values < 0)
        if bad.size:
            b = int(np.searchsorted(offsets, bad[0], side="right") - 1)
            t = int(bad[0] - offsets[b])
            raise MicaInputError(f"turn {t}: distance {values[bad[0]]} is negative",
                                 column=source, row=b, rule="distance >= 0")
        distance = values
        init_col = _column(fields, "initial_distance", n)
        if init_col is not None:
            initial = np.array([_initial("initial_distance", b, init_col[b], ())
                                for b in range(n)], dtype=np.float64)
            bad = np.flatnonzero(initial < 0)
            if bad.size:
                raise MicaInputError(f"distance {initial[bad[0]]} is negative",
                                     column="initial_distance", row=int(bad[0]),
                                     rule="distance >= 0")
    else:
        kw = {"weights": state_weights, "epsilon": state_epsilon, "kind": state_kind}
        distance = distance_from_state(values, **kw) if n else np.zeros(0)
        init_col = _column(fields, "initial_state", n)
        if init_col is not None:
            init = np.stack([_initial("initial_state", b, init_col[b], (width,))
                             for b in range(n)]) if n else np.zeros((0, width))
            initial = distance_from_state(init, **kw) if n else np.zeros(0)
    starts = None
    starts_col = _column(fields, "turn_starts", n)
    if starts_col is not None:
        starts = []
        for b in range(n):
            s = _as_array("turn_starts", b, starts_col[b])
            if s.ndim != 1 or s.shape[0] != counts[b]:
                raise MicaInputError(f"{s.size} turn starts but {source} has {counts[b]} turns",
                                     column="turn_starts", row=b, rule="one start per turn")
            if not (np.all(s == np.round(s)) and np.all(s >= 0) and np.all(np.diff(s) > 0)):
                raise MicaInputError(f"{s.tolist()} are not strictly increasing token "
                                     f"positions >= 0", column="turn_starts", row=b,
                                     rule="increasing positions")
            starts.append(s.astype(np.int64))
    return TurnSignals(offsets, distance, initial, reward, starts, source)


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
      MicaInputError: naming the row: a completion without an assistant token, a count of
      turns in ``loss_mask`` other than ``counts``, assistant tokens before the first of
      ``turn_starts``, a turn without an assistant token.
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
    tokens = mask.sum(1).cpu().numpy()
    empty = np.flatnonzero((tokens == 0) & ~skip)
    if empty.size:
        raise MicaInputError("the completion has no assistant token (completion_mask * "
                             "tool_mask is all 0), so no turn to credit", column="loss_mask",
                             row=int(empty[0]) + row_offset, rule="at least one turn")
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
            raise MicaInputError(
                f"the completion has {found[b]} assistant turns (runs of ones in completion_mask"
                f" * tool_mask) but {column} has {counts[b]} values; pass turn_starts if a turn "
                f"contains tool or environment tokens", column=column, row=b + row_offset,
                rule="one value per turn")
        out = broadcast_to_tokens(padded_t, mask, validate=False)
    else:
        starts = torch.full((B, K), L, dtype=torch.int64)
        for b in range(B):
            starts[b, :counts[b]] = torch.as_tensor(turn_starts[b][:K])
        starts = starts.to(mask.device)
        pos = torch.arange(L, device=mask.device)
        turn = (pos[None, None, :] >= starts[:, :, None]).sum(1) - 1  # [B, L], -1 before turn 0
        before = (mask & (turn < 0)).cpu().numpy()
        hit = np.argwhere(before)
        if hit.size:
            b, j = (int(x) for x in hit[0])
            raise MicaInputError(f"token {j} is an assistant token before the first turn start "
                                 f"{int(turn_starts[b][0])}", column="turn_starts",
                                 row=b + row_offset, rule="every assistant token in a turn")
        has_token = torch.zeros((B, K + 1), dtype=torch.int64, device=mask.device)
        has_token.scatter_add_(1, (turn + 1).clamp(min=0), mask.to(torch.int64))
        has_token = has_token[:, 1:].cpu().numpy() > 0
        for b in np.flatnonzero(~skip):
            k = np.flatnonzero(~has_token[b, :counts[b]])
            if k.size:
                raise MicaInputError(
                    f"turn {int(k[0])} (from token {int(turn_starts[b][k[0]])}) has no "
                    f"assistant token (completion_mask * tool_mask is 0 there)",
                    column="turn_starts", row=int(b) + row_offset, rule="a token per turn")
        vals = torch.gather(padded_t, 1, turn.clamp(min=0))
        out = torch.where(mask, vals, torch.zeros((), dtype=vals.dtype, device=mask.device))
    return out.to(torch.float32)
