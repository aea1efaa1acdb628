"""Turns in token space: find assistant turns, attribute token rewards, spread turn values.

Two layouts (docs/architecture.md, "Conventions", tokens):

- ``"trajectory"`` (verl's): one row per trajectory, ``response_mask [B, L]`` marks assistant
  tokens. The turns of row ``b`` are the runs of ones in ``response_mask[b]``, in order, unless
  explicit boundaries are given: ``turn_start`` (per row, the first token of each turn) or
  ``turn_index`` (per token, the turn number of each assistant token). Explicit boundaries let
  one turn hold several runs of ones (an assistant reply, a tool result, the reply going on).
  Turn ends are never inferred from non-zero rewards: a turn whose reward is 0 is still a turn.
- ``"turn"``: one row per turn; the row's value is a scalar spread over its mask (the mask may
  have gaps, e.g. tool output inside a turn).

Attribution rule for token rewards: a reward on any token belongs to the most recent turn that
starts at or before it. So a score on a trailing user or tool token (verl writes the outcome
score at the last valid response token, which an environment's reply makes a user token)
credits the last turn before it, and dense per-token rewards (a KL penalty on every token) are
summed per turn. A non-zero reward before the first turn of its row is an error naming the row.

Turn order is row-major: all turns of row 0, then row 1, and so on, which is mica's CSR order
(``offsets`` from :func:`turn_spans` are the trajectory offsets of :func:`mica_core.estimate`).

Works on numpy arrays and torch tensors (any device; torch is imported only for tensors).
On CUDA, finding spans is data-dependent in size (``nonzero``): :func:`turn_spans` and
:func:`turn_rewards_from_tokens` synchronise once, plus once more for their checks; sums are
fixed-order (prefix sums, no atomics), so results are deterministic.
:func:`broadcast_to_tokens` is sync-free with ``validate=False`` (its checks need one sync).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import validate_tokens as _rules

__all__ = ["TurnSpans", "broadcast_to_tokens", "turn_of_token", "turn_rewards_from_tokens",
           "turn_spans"]


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


class TurnSpans(NamedTuple):
    """Assistant turns of a ``[B, L]`` response mask, in row-major order.

    Attributes:
      offsets: int64 ``[B + 1]``; row ``b`` owns turns ``offsets[b]:offsets[b+1]``.
      row: int64 ``[n_turns]``, the row of each turn.
      start: int64 ``[n_turns]``, first token of each turn (an assistant token).
      end: int64 ``[n_turns]``, one past its last assistant token. With explicit boundaries a
        turn may have non-assistant tokens (tool output) between ``start`` and ``end``.
    """

    offsets: object
    row: object
    start: object
    end: object

    @property
    def last(self):
        """The last assistant token of each turn."""
        return self.end - 1


def _mask_bool(response_mask, name="response_mask"):
    if _is_torch(response_mask):
        m = response_mask
        if m.ndim != 2:
            raise _rules.not_2d(name, tuple(m.shape))
        return m if m.dtype == _torch().bool else m != 0
    m = np.asarray(response_mask)
    if m.ndim != 2:
        raise _rules.not_2d(name, m.shape)
    return m if m.dtype == bool else m != 0


def _shift_right(x, fill):
    """``x`` shifted one token to the right along rows, ``fill`` entering at token 0."""
    if _is_torch(x):
        torch = _torch()
        return torch.cat([torch.full_like(x[:, :1], fill), x[:, :-1]], dim=1)
    out = np.empty_like(x)
    out[:, :1] = fill
    out[:, 1:] = x[:, :-1]
    return out


def _shift_left(x, fill):
    if _is_torch(x):
        torch = _torch()
        return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)
    out = np.empty_like(x)
    out[:, -1:] = fill
    out[:, :-1] = x[:, 1:]
    return out


def _run_starts(m):
    """Boolean ``[B, L]``: the first token of every run of ones."""
    return m & ~_shift_right(m, False)


def _cumsum(x, dtype=None):
    if _is_torch(x):
        return x.cumsum(1) if dtype is None else x.to(dtype).cumsum(1)
    return np.cumsum(x, axis=1, dtype=dtype)


def _first_true(bad):
    """``(row, token)`` of the first True in row-major order, or None (syncs once on CUDA)."""
    if _is_torch(bad):
        flat = bad.reshape(-1)
        if flat.numel() == 0:
            return None
        import torch

        n = flat.numel()
        idx = torch.where(flat, torch.arange(n, device=flat.device), n).min().item()
        return None if idx == n else divmod(idx, bad.shape[1])
    hits = np.flatnonzero(bad)
    return None if hits.size == 0 else divmod(int(hits[0]), bad.shape[1])


def _starts_from_turn_start(m, turn_start):
    """Boolean ``[B, L]`` turn starts from per-row start positions (checked on the host)."""
    B, L = m.shape
    if _is_torch(turn_start) or isinstance(turn_start, np.ndarray) and turn_start.ndim == 2 \
            and turn_start.dtype.kind in "iu":
        padded = np.asarray(turn_start.cpu() if _is_torch(turn_start) else turn_start)
        if padded.ndim != 2 or padded.shape[0] != B:
            raise _rules.starts_shape(B, padded.shape)
        rows = [r[r >= 0] for r in padded]  # negative entries pad the shorter rows
    else:
        rows = list(turn_start)
        if len(rows) != B:
            raise _rules.starts_rows(B, len(rows))
    host_mask = np.asarray(m.cpu() if _is_torch(m) else m)
    starts = np.zeros((B, L), dtype=bool)
    for b, r in enumerate(rows):
        pos = np.asarray([] if r is None else r).reshape(-1)
        if pos.size and pos.dtype.kind not in "iu":
            if not np.all(np.isfinite(pos)) or np.any(pos != np.round(pos)):
                raise _rules.starts_not_integer(b, pos.tolist())
        pos = pos.astype(np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= L):
            raise _rules.start_outside(b, int(pos.max() if pos.max() >= L else pos.min()), L)
        if np.any(np.diff(pos) <= 0):
            raise _rules.starts_not_increasing(b, pos.tolist())
        off = pos[~host_mask[b, pos]]
        if off.size:
            raise _rules.start_not_assistant(b, int(off[0]))
        first = pos[0] if pos.size else L
        early = np.flatnonzero(host_mask[b, :first])
        if early.size:
            raise _rules.token_before_first_start(b, int(early[0]))
        starts[b, pos] = True
    if _is_torch(m):
        return _torch().as_tensor(starts, device=m.device)
    return starts


def _starts_from_turn_index(m, turn_index, validate):
    """Boolean ``[B, L]``: an assistant token whose turn index differs from the previous
    assistant token's (of the same row) starts a turn. Values on other tokens are ignored."""
    if _is_torch(m):
        torch = _torch()
        ti = turn_index if _is_torch(turn_index) else torch.as_tensor(np.asarray(turn_index))
        ti = ti.to(m.device)
    else:
        ti = np.asarray(turn_index.cpu() if _is_torch(turn_index) else turn_index)
    if tuple(ti.shape) != tuple(m.shape):
        raise _rules.shape_differs("turn_index", tuple(ti.shape), tuple(m.shape))
    B, L = m.shape
    # index of the latest assistant token at or before each token (-1: none yet)
    if _is_torch(m):
        torch = _torch()
        pos = torch.arange(L, device=m.device).expand(B, L)
        last = torch.where(m, pos, -1).cummax(1).values
        prev = _shift_right(last, -1)
        prev_ti = ti.gather(1, prev.clamp(min=0))
    else:
        pos = np.broadcast_to(np.arange(L), (B, L))
        last = np.maximum.accumulate(np.where(m, pos, -1), axis=1)
        prev = _shift_right(last, -1)
        prev_ti = np.take_along_axis(ti, np.clip(prev, 0, None), axis=1)
    has_prev = prev >= 0
    if validate:
        hit = _first_true(m & has_prev & (ti < prev_ti))
        if hit is not None:
            raise _rules.turn_index_decreases(hit[0], hit[1], int(ti[hit]), int(prev_ti[hit]))
    return m & (~has_prev | (ti != prev_ti))


def _turn_starts(m, turn_start, turn_index, validate=True):
    if turn_start is not None and turn_index is not None:
        raise ValueError("pass turn_start or turn_index, not both")
    if turn_start is not None:
        return _starts_from_turn_start(m, turn_start)
    if turn_index is not None:
        return _starts_from_turn_index(m, turn_index, validate)
    return _run_starts(m)


def _turn_ends(m, tid):
    """Boolean ``[B, L]``: the last assistant token of each turn."""
    B, L = m.shape
    if _is_torch(m):
        torch = _torch()
        pos = torch.arange(L, device=m.device).expand(B, L)
        # index of the earliest assistant token at or after each token (L: none)
        nxt = torch.where(m, pos, L).flip(1).cummin(1).values.flip(1)
        nxt = _shift_left(nxt, L)
        nxt_tid = tid.gather(1, nxt.clamp(max=L - 1))
    else:
        pos = np.broadcast_to(np.arange(L), (B, L))
        nxt = np.minimum.accumulate(np.where(m, pos, L)[:, ::-1], axis=1)[:, ::-1]
        nxt = _shift_left(nxt, L)
        nxt_tid = np.take_along_axis(tid, np.clip(nxt, None, L - 1), axis=1)
    return m & ((nxt == L) | (nxt_tid != tid))


def turn_of_token(response_mask, *, turn_start=None, turn_index=None):
    """The turn each token belongs to under the attribution rule (module docstring).

    Args:
      response_mask: ``[B, L]``, non-zero on assistant tokens.
      turn_start: optional per-row first tokens of the turns (a list of int lists, or a
        ``[B, K]`` int array padded with negative values); overrides runs of ones.
      turn_index: optional ``[B, L]`` int, the turn number of each assistant token (values on
        other tokens are ignored); a new turn starts where it changes.

    Returns:
      int64 ``[B, L]``: ``k`` for every token from the start of the row's turn ``k`` up to the
      start of turn ``k + 1`` (so user and tool tokens after a turn belong to it), ``-1``
      before the row's first turn.

    Example::

        mask = [[0, 1, 1, 0, 0, 1, 0]]
        turn_of_token(mask)                      -> [[-1, 0, 0, 0, 0, 1, 1]]
        turn_of_token(mask, turn_start=[[1]])    -> [[-1, 0, 0, 0, 0, 0, 0]]  # one turn
    """
    m = _mask_bool(response_mask)
    starts = _turn_starts(m, turn_start, turn_index)
    return _cumsum(starts, np.int64 if not _is_torch(m) else _torch().int64) - 1


def _spans(m, starts):
    tid = _cumsum(starts, _torch().int64 if _is_torch(m) else np.int64) - 1
    ends = _turn_ends(m, tid)
    if _is_torch(m):
        torch = _torch()
        sr = starts.nonzero()
        er = ends.nonzero()
        offsets = torch.zeros(m.shape[0] + 1, dtype=torch.int64, device=m.device)
        torch.cumsum(starts.sum(1), 0, out=offsets[1:])
        return TurnSpans(offsets, sr[:, 0], sr[:, 1], er[:, 1] + 1), tid
    sr, sc = np.nonzero(starts)
    _, ec = np.nonzero(ends)
    offsets = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.cumsum(starts.sum(1), out=offsets[1:])
    return TurnSpans(offsets, sr.astype(np.int64), sc.astype(np.int64),
                     ec.astype(np.int64) + 1), tid


def turn_spans(response_mask, *, turn_start=None, turn_index=None) -> TurnSpans:
    """The turns of every row: runs of ones in ``response_mask`` (verl's layout), or the turns
    given by ``turn_start`` / ``turn_index`` (see :func:`turn_of_token`).

    Args:
      response_mask: ``[B, L]``, non-zero on assistant tokens (bool, int or float).
      turn_start, turn_index: optional explicit boundaries (:func:`turn_of_token`).

    Returns:
      :class:`TurnSpans` of arrays of the input's kind (on its device for torch).

    Example::

        mask = [[1, 1, 0, 0, 1, 0],      # row 0: turns at tokens 0-1 and 4
                [0, 1, 1, 1, 0, 0]]      # row 1: one turn, tokens 1-3
        s = turn_spans(mask)
        s.offsets -> [0, 2, 3]; s.row -> [0, 0, 1]; s.start -> [0, 4, 1]; s.end -> [2, 5, 4]
        turn_spans(mask, turn_start=[[0], [1]]).end -> [5, 4]   # row 0 is one turn
    """
    m = _mask_bool(response_mask)
    return _spans(m, _turn_starts(m, turn_start, turn_index))[0]


def turn_rewards_from_tokens(token_level_rewards, response_mask, *, reward_mask=None,
                             validate=True, turn_start=None, turn_index=None):
    """Per-turn rewards: the sum of the token rewards attributed to each turn.

    A reward on token ``j`` of row ``b`` belongs to the row's most recent turn that starts at
    or before ``j`` (module docstring): turn ``k`` owns tokens ``start_k .. start_{k+1} - 1``
    (the last turn up to the row's end), assistant or not, and its reward is their sum. A
    turn reward written on the turn's last token is read as it is; a score verl writes on a
    trailing user token credits the last turn; a KL penalty on every token is summed per turn.

    Args:
      token_level_rewards: ``[B, L]`` float.
      response_mask: ``[B, L]``, non-zero on assistant tokens.
      reward_mask: optional ``[B, L]`` bool, True where the environment wrote a reward. A dense
        reward tensor cannot tell a missing reward from a reward of 0; with this mask a turn
        none of whose tokens holds a reward is reported. Without it, such a turn has reward 0.
      validate: check that rewards are finite and none lies before its row's first turn.
      turn_start, turn_index: optional explicit turn boundaries overriding runs of ones
        (:func:`turn_of_token`), so a tool call inside a turn does not make two turns.

    Returns:
      ``(reward, spans)``: ``reward [n_turns]`` in row-major turn order (the CSR order of
      :func:`mica_core.estimate`, with ``spans.offsets`` as its trajectory offsets), in the
      rewards' float dtype (float64 for integers; sums accumulate in float64), and the
      :class:`TurnSpans`.

    Raises:
      MicaInputError: naming ``token_level_rewards`` (or ``reward_mask``, ``turn_start``,
        ``turn_index``), the row and token: a non-zero reward before the row's first turn (a
        row without turns has nothing to credit), a non-finite reward, a turn without a reward
        (with ``reward_mask``), bad boundaries, or a shape mismatch.
    """
    rew = token_level_rewards
    if _is_torch(rew) and not _is_torch(response_mask):
        response_mask = _as_torch_like(response_mask, rew)
    elif _is_torch(response_mask) and not _is_torch(rew):
        rew = _as_torch_like(rew, response_mask)
    elif not _is_torch(rew):
        rew = np.asarray(rew)
    m = _mask_bool(response_mask)
    if tuple(rew.shape) != tuple(m.shape):
        raise _rules.shape_differs("token_level_rewards", tuple(rew.shape), tuple(m.shape))
    spans, tid = _spans(m, _turn_starts(m, turn_start, turn_index, validate))
    before = tid < 0
    rm = None if reward_mask is None else _mask_bool(reward_mask, "reward_mask")
    if rm is not None and tuple(rm.shape) != tuple(m.shape):
        raise _rules.shape_differs("reward_mask", tuple(rm.shape), tuple(m.shape))
    if _is_torch(rew):
        torch = _torch()
        out_dt = rew.dtype if rew.is_floating_point() else torch.float64
        acc = rew.to(torch.float64)
    else:
        out_dt = rew.dtype if rew.dtype.kind == "f" else np.float64
        acc = rew.astype(np.float64)
    if validate:
        finite = np.isfinite(acc) if not _is_torch(acc) else _torch().isfinite(acc)
        hit = _first_true(~finite)
        if hit is not None:
            raise _rules.token_reward_not_finite(hit[0], hit[1], float(rew[hit]))
        placed = (acc != 0) if rm is None else (rm | (acc != 0))
        hit = _first_true(placed & before)
        if hit is not None:
            where = ("before the row's first assistant turn" if bool(m[hit[0]].any())
                     else "in a row without any assistant token")
            raise _rules.reward_before_turns(hit[0], hit[1], float(rew[hit]), where)
    # Segmented sums over the flattened tokens, each turn one contiguous segment from its
    # start to the next turn's start: sequential within a segment (exact when a turn holds
    # one reward), fixed order and no atomics on CUDA. Tokens before a row's first turn are
    # zeroed so that they add nothing to the previous row's last turn.
    B, L = m.shape
    row, start = spans.row, spans.start
    seg = row * L + start
    if _is_torch(m):
        torch = _torch()
        flat = torch.where(before, torch.zeros((), dtype=acc.dtype, device=acc.device),
                           acc).reshape(-1)
        if seg.shape[0]:
            lengths = torch.diff(seg, append=seg.new_full((1,), B * L))
            # a leading segment holds the tokens before the first turn; dropped
            reward = torch.segment_reduce(flat, "sum", lengths=torch.cat([seg[:1], lengths]),
                                          unsafe=True)[1:]
        else:
            reward = flat.new_zeros(0)
    else:
        flat = np.where(before, 0.0, acc).reshape(-1)
        reward = np.add.reduceat(flat, seg) if seg.size else np.zeros(0)
    if validate and rm is not None and spans.row.shape[0]:
        # each turn's last token: the token before the next turn of its row, else the row's end
        if _is_torch(m):
            nxt = torch.cat([start[1:], start.new_full((1,), L)])
            same = torch.cat([row[1:] == row[:-1], row.new_zeros(1, dtype=torch.bool)])
            stop = torch.where(same, nxt, L) - 1
        else:
            nxt = np.concatenate([start[1:], [L]])
            same = np.concatenate([row[1:] == row[:-1], [False]])
            stop = np.where(same, nxt, L) - 1
        got = _cumsum(rm, _torch().int64 if _is_torch(rm) else np.int64)
        prev = (start - 1).clamp(min=0) if _is_torch(rm) else np.maximum(start - 1, 0)
        missing = (got[row, stop] - got[row, prev] * (start > 0)) == 0
        hit = _first_true(missing.reshape(1, -1))
        if hit is not None:
            i = hit[1]
            raise _rules.turn_without_reward(int(row[i]), int(start[i]))
    return reward.to(out_dt) if _is_torch(reward) else reward.astype(out_dt), spans


def _torch():
    import torch

    return torch


def _as_torch_like(x, like):
    torch = _torch()
    return torch.as_tensor(np.asarray(x), device=like.device)


def broadcast_to_tokens(turn_advantage, response_mask, *, layout="trajectory", offsets=None,
                        validate=True, turn_start=None, turn_index=None):
    """Spread per-turn values (advantages, returns) over the tokens of their turns.

    Every token of an assistant turn gets its turn's value; every other token gets 0.

    Args:
      turn_advantage: for ``layout="trajectory"`` either flat ``[n_turns]`` in row-major turn
        order (the output of :func:`mica_core.estimate` on spans from :func:`turn_spans`), or
        padded ``[B, K]`` with row ``b``'s ``k``-th turn at ``[b, k]`` (``K`` at least the most
        turns in a row; extra entries are ignored). For ``layout="turn"``: ``[B]`` (or
        ``[B, 1]``), one value per row.
      response_mask: ``[B, L]``, non-zero on assistant tokens.
      layout: ``"trajectory"`` (verl: turns are the runs of ones of a row) or ``"turn"``
        (one row per turn: the row's value times its mask, gaps allowed).
      offsets: optional ``[B + 1]`` turns per row in CSR form (trajectory layout, flat input);
        checked against the spans so a row with a turn too many or too few is named.
      validate: check the turn counts (one sync on CUDA); ``False`` is sync-free.
      turn_start, turn_index: optional explicit turn boundaries (trajectory layout; see
        :func:`turn_of_token`): a turn's value goes to every assistant token of that turn,
        whatever gaps lie between them.

    Returns:
      ``[B, L]`` of ``turn_advantage``'s float dtype (float64 for integers; torch: the default
      float dtype), on the mask's device.

    Raises:
      MicaInputError: a count of turns that does not match the mask, naming the row.
    """
    m = _mask_bool(response_mask)
    if layout not in ("trajectory", "turn"):
        raise ValueError(f"layout must be 'trajectory' or 'turn'; got {layout!r}")
    starts = None
    if layout == "trajectory":
        starts = _turn_starts(m, turn_start, turn_index, validate)
    elif turn_start is not None or turn_index is not None:
        raise ValueError("turn_start / turn_index apply to layout 'trajectory' only")
    if _is_torch(m):
        return _broadcast_torch(turn_advantage, m, starts, layout, offsets, validate)
    return _broadcast_numpy(turn_advantage, m, starts, layout, offsets, validate)


def _check_counts(per_row_spans, adv_len, flat, K, offsets, B):
    """Turn-count checks shared by both array kinds (``per_row_spans`` on the host)."""
    if offsets is not None:
        o = np.asarray(offsets.cpu() if _is_torch(offsets) else offsets, dtype=np.int64)
        if o.shape != (B + 1,):
            raise _rules.offsets_length(B, o.shape)
        bad = np.flatnonzero(np.diff(o) != per_row_spans)
        if bad.size:
            b = int(bad[0])
            raise _rules.spans_differ(b, int(o[b + 1] - o[b]), int(per_row_spans[b]))
    if flat:
        total = int(per_row_spans.sum())
        if adv_len != total:
            raise _rules.values_for_spans(adv_len, total)
    else:
        bad = np.flatnonzero(per_row_spans > K)
        if bad.size:
            b = int(bad[0])
            raise _rules.spans_for_values(b, int(per_row_spans[b]), K)


def _broadcast_numpy(turn_advantage, m, starts, layout, offsets, validate):
    adv = np.asarray(turn_advantage)
    if adv.dtype.kind not in "fc":
        adv = adv.astype(np.float64)
    B = m.shape[0]
    if layout == "turn":
        if adv.shape not in ((B,), (B, 1)):
            raise _rules.layout_shape("turn", f"one value per row, shape ({B},)", adv.shape)
        return np.where(m, adv.reshape(B, 1), np.zeros((), adv.dtype)).astype(adv.dtype)
    if adv.ndim == 1:
        if validate:
            _check_counts(starts.sum(1), adv.shape[0], True, None, offsets, B)
        if adv.shape[0] == 0:
            return np.zeros(m.shape, dtype=adv.dtype)
        span_id = np.cumsum(starts.reshape(-1)).reshape(m.shape) - 1
        vals = adv[np.clip(span_id, 0, adv.shape[0] - 1)]
    elif adv.ndim == 2 and adv.shape[0] == B:
        K = adv.shape[1]
        if validate:
            _check_counts(starts.sum(1), None, False, K, offsets, B)
        if K == 0:
            return np.zeros(m.shape, dtype=adv.dtype)
        k = np.cumsum(starts, axis=1) - 1
        vals = np.take_along_axis(adv, np.clip(k, 0, K - 1), axis=1)
    else:
        raise _rules.layout_shape("trajectory", f"[n_turns] or [{B}, K]", adv.shape)
    return np.where(m, vals, np.zeros((), adv.dtype))


def _broadcast_torch(turn_advantage, m, starts, layout, offsets, validate):
    torch = _torch()
    adv = turn_advantage if _is_torch(turn_advantage) else torch.as_tensor(
        np.asarray(turn_advantage))
    adv = adv.to(m.device)
    if not (adv.is_floating_point() or adv.is_complex()):
        adv = adv.to(torch.get_default_dtype())
    B = m.shape[0]
    zero = torch.zeros((), dtype=adv.dtype, device=m.device)
    if layout == "turn":
        if tuple(adv.shape) not in ((B,), (B, 1)):
            raise _rules.layout_shape("turn", f"one value per row, shape ({B},)",
                                      tuple(adv.shape))
        return torch.where(m, adv.reshape(B, 1), zero)
    if adv.ndim == 1:
        if validate:
            _check_counts(starts.sum(1).cpu().numpy(), adv.shape[0], True, None, offsets, B)
        if adv.shape[0] == 0:
            return torch.zeros(m.shape, dtype=adv.dtype, device=m.device)
        span_id = torch.cumsum(starts.reshape(-1), 0).reshape(m.shape) - 1
        vals = adv[span_id.clamp(0, adv.shape[0] - 1)]
    elif adv.ndim == 2 and adv.shape[0] == B:
        K = adv.shape[1]
        if validate:
            _check_counts(starts.sum(1).cpu().numpy(), None, False, K, offsets, B)
        if K == 0:
            return torch.zeros(m.shape, dtype=adv.dtype, device=m.device)
        k = torch.cumsum(starts, dim=1) - 1
        vals = torch.gather(adv, 1, k.clamp(0, K - 1))
    else:
        raise _rules.layout_shape("trajectory", f"[n_turns] or [{B}, K]", tuple(adv.shape))
    return torch.where(m, vals, zero)
