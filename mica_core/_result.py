"""The result type of :func:`mica_core.estimate` (a leaf module: imports nothing of mica)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["EstimateResult"]


@dataclass(frozen=True)
class EstimateResult:
    """Flat per-turn outputs, aligned with the input rows.

    ``reward``: IDR, ADR or the given reward; ``returns``: the preset's return (``G_t``,
    or ``R_i`` for ``grpo``, ``gamma^(T-1-t) R_i`` for ``reinforce_pp``); ``advantage``.
    Unpacks as ``reward, returns, advantage = result``.
    """

    reward: Any
    returns: Any
    advantage: Any

    def __iter__(self):
        return iter((self.reward, self.returns, self.advantage))
