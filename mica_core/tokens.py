"""Turns in token space: find assistant spans, read turn rewards, spread turn advantages.

Two layouts (design §5):

- ``"trajectory"`` (verl's): one row per trajectory, ``response_mask [B, L]`` marks assistant
  tokens, and the turns of row ``b`` are the runs of ones in ``response_mask[b]``, in order.
  A turn's reward sits on the last token of its span. Turn ends are never inferred from
  non-zero rewards: a turn whose reward is exactly 0 is still a turn.
- ``"turn"``: one row per turn; the row's advantage is a scalar spread over its mask (the mask
  may have gaps, e.g. tool output inside a turn).

Turn order is row-major: all turns of row 0, then row 1, and so on, which is mica's CSR order
(``offsets`` from :func:`turn_spans` are the trajectory offsets of :func:`mica_core.estimate`).

Works on numpy arrays and torch tensors (any device; torch is imported only for tensors).
On CUDA, finding spans is data-dependent in size (``nonzero``): :func:`turn_spans` and
:func:`turn_rewards_from_tokens` synchronise once, plus once more for their checks.
:func:`broadcast_to_tokens` is sync-free with ``validate=False`` (its checks need one sync).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._errors import MicaInputError

__all__ = ["TurnSpans", "broadcast_to_tokens", "turn_rewards_from_tokens", "turn_spans"]


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


class TurnSpans(NamedTuple):
    """Assistant spans of a ``[B, L]`` response mask, in row-major order.

    Attributes:
      offsets: int64 ``[B + 1]``; row ``b`` owns spans ``offsets[b]:offsets[b+1]`` (its turns).
      row: int64 ``[n_spans]``, the row of each span.
      start: int64 ``[n_spans]``, first token of each span.
      end: int64 ``[n_spans]``, one past its last token (the last token is ``end - 1``).
    """

    offsets: object
    row: object
    start: object
    end: object

    @property
    def last(self):
        """The last token of each span, where its turn reward is read."""
        return self.end - 1


def _mask_bool(response_mask, name="response_mask"):
    if _is_torch(response_mask):
        m = response_mask
        if m.ndim != 2:
            raise MicaInputError(f"must be 2-D [rows, tokens]; got shape {tuple(m.shape)}",
                                 column=name, rule="shape")
        return m if m.dtype == _torch().bool else m != 0
    m = np.asarray(response_mask)
    if m.ndim != 2:
        raise MicaInputError(f"must be 2-D [rows, tokens]; got shape {m.shape}", column=name,
                             rule="shape")
    return m if m.dtype == bool else m != 0


def _edges(m):
    """``(starts, ends)`` boolean ``[B, L]``: first and last token of every run of ones."""
    if _is_torch(m):
        import torch

        before = torch.nn.functional.pad(m[:, :-1], (1, 0), value=False)
        after = torch.nn.functional.pad(m[:, 1:], (0, 1), value=False)
    else:
        before = np.zeros_like(m)
        before[:, 1:] = m[:, :-1]
        after = np.zeros_like(m)
        after[:, :-1] = m[:, 1:]
    return m & ~before, m & ~after


def turn_spans(response_mask) -> TurnSpans:
    """The turns of every row: runs of ones in ``response_mask`` (verl's layout).

    Args:
      response_mask: ``[B, L]``, non-zero on assistant tokens (bool, int or float).

    Returns:
      :class:`TurnSpans` of arrays of the input's kind (on its device for torch).

    Example::

        mask = [[1, 1, 0, 0, 1, 0],      # row 0: turns at tokens 0-1 and 4
                [0, 1, 1, 1, 0, 0]]      # row 1: one turn, tokens 1-3
        s = turn_spans(mask)
        s.offsets -> [0, 2, 3]; s.row -> [0, 0, 1]; s.start -> [0, 4, 1]; s.end -> [2, 5, 4]
    """
    m = _mask_bool(response_mask)
    starts, ends = _edges(m)
    if _is_torch(m):
        import torch

        sr = starts.nonzero()
        er = ends.nonzero()
        per_row = starts.sum(1)
        offsets = torch.zeros(m.shape[0] + 1, dtype=torch.int64, device=m.device)
        torch.cumsum(per_row, 0, out=offsets[1:])
        return TurnSpans(offsets, sr[:, 0], sr[:, 1], er[:, 1] + 1)
    sr, sc = np.nonzero(starts)
    _, ec = np.nonzero(ends)
    offsets = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.cumsum(starts.sum(1), out=offsets[1:])
    return TurnSpans(offsets, sr.astype(np.int64), sc.astype(np.int64),
                     ec.astype(np.int64) + 1)


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


def turn_rewards_from_tokens(token_level_rewards, response_mask, *, reward_mask=None,
                             validate=True):
    """Per-turn rewards read at the last token of each assistant span (verl's layout).

    Args:
      token_level_rewards: ``[B, L]`` float; turn ``k`` of row ``b`` has its reward on the last
        token of the ``k``-th run of ones in ``response_mask[b]``, every other token holds 0.
      response_mask: ``[B, L]``, non-zero on assistant tokens.
      reward_mask: optional ``[B, L]`` bool, True where the environment wrote a reward. A dense
        reward tensor cannot tell a missing reward from a reward of 0; with this mask a span
        without a reward is reported. Without it, a 0 on a span's last token is reward 0.
      validate: check that no reward lies off a span's last token (and, with
        ``reward_mask``, that every span has one) and that rewards are finite.

    Returns:
      ``(reward, spans)``: ``reward [n_spans]`` in row-major turn order (the CSR order of
      :func:`mica_core.estimate`, with ``spans.offsets`` as its trajectory offsets) and the
      :class:`TurnSpans`.

    Raises:
      MicaInputError: naming ``token_level_rewards`` (or ``reward_mask``), the row and token:
      a non-zero reward outside any assistant span or inside one but not on its last token, a
      span without a reward (with ``reward_mask``), a non-finite reward, or shape mismatch.
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
        raise MicaInputError(f"shape {tuple(rew.shape)} differs from response_mask's "
                             f"{tuple(m.shape)}", column="token_level_rewards", rule="shape")
    spans = turn_spans(m)
    if validate:
        _, ends = _edges(m)
        rm = None if reward_mask is None else _mask_bool(reward_mask, "reward_mask")
        if rm is not None and tuple(rm.shape) != tuple(m.shape):
            raise MicaInputError(f"shape {tuple(rm.shape)} differs from response_mask's "
                                 f"{tuple(m.shape)}", column="reward_mask", rule="shape")
        finite = np.isfinite(rew) if not _is_torch(rew) else _torch().isfinite(rew)
        hit = _first_true(~finite)
        if hit is not None:
            raise MicaInputError(f"token {hit[1]}: reward {float(rew[hit])} is not finite",
                                 column="token_level_rewards", row=hit[0], rule="finite")
        placed = (rew != 0) if rm is None else (rm | (rew != 0))
        hit = _first_true(placed & ~ends)
        if hit is not None:
            inside = bool(m[hit])
            where = ("inside an assistant span but not on its last token" if inside
                     else "outside any assistant span (response_mask is 0 there)")
            raise MicaInputError(
                f"token {hit[1]}: reward {float(rew[hit])} lies {where}; turn rewards belong on "
                f"the last token of each span", column="token_level_rewards", row=hit[0],
                rule="reward on a span's last token")
        if rm is not None:
            hit = _first_true(ends & ~rm)
            if hit is not None:
                raise MicaInputError(f"the assistant span ending at token {hit[1]} has no "
                                     f"reward (reward_mask is False there)",
                                     column="reward_mask", row=hit[0], rule="a reward per turn")
    if _is_torch(rew):
        reward = rew[spans.row, spans.last]
    else:
        reward = np.asarray(rew)[spans.row, spans.last]
    return reward, spans


def _torch():
    import torch

    return torch


def _as_torch_like(x, like):
    torch = _torch()
    return torch.as_tensor(np.asarray(x), device=like.device)


def broadcast_to_tokens(turn_advantage, response_mask, *, layout="trajectory", offsets=None,
                        validate=True):
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

    Returns:
      ``[B, L]`` of ``turn_advantage``'s float dtype (float64 for integers; torch: the default
      float dtype), on the mask's device.

    Raises:
      MicaInputError: a count of turns that does not match the mask, naming the row.
    """
    m = _mask_bool(response_mask)
    if layout not in ("trajectory", "turn"):
        raise ValueError(f"layout must be 'trajectory' or 'turn'; got {layout!r}")
    if _is_torch(m):
        return _broadcast_torch(turn_advantage, m, layout, offsets, validate)
    return _broadcast_numpy(turn_advantage, m, layout, offsets, validate)


def _check_counts(per_row_spans, adv_len, flat, K, offsets, B):
    """Turn-count checks shared by both array kinds (``per_row_spans`` on the host)."""
    if offsets is not None:
        o = np.asarray(offsets.cpu() if _is_torch(offsets) else offsets, dtype=np.int64)
        if o.shape != (B + 1,):
            raise MicaInputError(f"needs shape ({B + 1},); got {o.shape}", column="offsets",
                                 rule="length")
        bad = np.flatnonzero(np.diff(o) != per_row_spans)
        if bad.size:
            b = int(bad[0])
            raise MicaInputError(f"offsets give {int(o[b + 1] - o[b])} turns but "
                                 f"response_mask has {int(per_row_spans[b])} assistant spans",
                                 column="response_mask", row=b, rule="one span per turn")
    if flat:
        total = int(per_row_spans.sum())
        if adv_len != total:
            raise MicaInputError(f"turn_advantage has {adv_len} values but response_mask has "
                                 f"{total} assistant spans (turns)", column="turn_advantage",
                                 rule="one value per turn")
    else:
        bad = np.flatnonzero(per_row_spans > K)
        if bad.size:
            b = int(bad[0])
            raise MicaInputError(f"response_mask has {int(per_row_spans[b])} assistant spans "
                                 f"but turn_advantage holds {K} per row",
                                 column="turn_advantage", row=b, rule="one value per turn")


def _broadcast_numpy(turn_advantage, m, layout, offsets, validate):
    adv = np.asarray(turn_advantage)
    if adv.dtype.kind not in "fc":
        adv = adv.astype(np.float64)
    B = m.shape[0]
    if layout == "turn":
        if adv.shape not in ((B,), (B, 1)):
            raise MicaInputError(f"layout 'turn' needs one value per row, shape ({B},); got "
                                 f"{adv.shape}", column="turn_advantage", rule="shape")
        return np.where(m, adv.reshape(B, 1), np.zeros((), adv.dtype)).astype(adv.dtype)
    starts, _ = _edges(m)
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
        raise MicaInputError(f"layout 'trajectory' needs [n_turns] or [{B}, K]; got shape "
                             f"{adv.shape}", column="turn_advantage", rule="shape")
    return np.where(m, vals, np.zeros((), adv.dtype))


def _broadcast_torch(turn_advantage, m, layout, offsets, validate):
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
            raise MicaInputError(f"layout 'turn' needs one value per row, shape ({B},); got "
                                 f"{tuple(adv.shape)}", column="turn_advantage", rule="shape")
        return torch.where(m, adv.reshape(B, 1), zero)
    starts, _ = _edges(m)
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
        raise MicaInputError(f"layout 'trajectory' needs [n_turns] or [{B}, K]; got shape "
                             f"{tuple(adv.shape)}", column="turn_advantage", rule="shape")
    return torch.where(m, vals, zero)
