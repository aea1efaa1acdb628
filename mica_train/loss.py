"""PPO clipped surrogate on assistant tokens, with asymmetric and dual clipping.

For a reply token with log-probability ``logp`` under the current policy, ``old_logp`` under the
policy that sampled it and advantage ``A`` (the advantage of its turn)::

    ratio = exp(logp - old_logp)
    l1    = -A * ratio
    l2    = -A * clip(ratio, 1 - eps_low, 1 + eps_high)        # asymmetric ("clip-higher", DAPO)
    l     = max(l1, l2)                                          # PPO (Schulman et al., 2017)
    l     = min(l, -c * A)          where A < 0                  # dual clip (Ye et al., 2020), c > 1

Token-mean aggregation: the loss of a batch is ``sum(l * mask) / n_tokens``, every assistant
token weighing the same whatever its turn or trajectory (DAPO). ``n_tokens`` defaults to the
mask's sum; pass the token count of the whole minibatch when it is split into micro-batches or
across processes, so the accumulated gradient equals the gradient of one token mean.

KL to the reference uses the non-negative ``k3`` estimator ``exp(ref - logp) - (ref - logp) - 1``
(Schulman, "Approximating KL divergence", 2020); the entropy bonus subtracts
``entropy_coef * mean entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LossTerms", "k3_kl", "masked_token_mean", "policy_loss", "ppo_clip_token_losses"]


def masked_token_mean(x: torch.Tensor, mask: torch.Tensor,
                      n_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    denom = m.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=x.dtype, device=x.device)
    return (x * m).sum() / denom.clamp(min=1.0)


def ppo_clip_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate losses ``[B, R]`` and two boolean masks: where the PPO clip
    binds (``l2 > l1``) and where the dual clip binds. ``dual_clip <= 0`` turns it off."""
    if dual_clip > 0 and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or 0 to turn it off), got {dual_clip}")
    # Clamping the log-ratio only guards exp() against overflow on garbage tokens.
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = l2 > l1
    loss = torch.maximum(l1, l2)
    if dual_clip > 0:
        l3 = -advantages * dual_clip
        dual = (advantages < 0) & (loss > l3)
        loss = torch.where(advantages < 0, torch.minimum(loss, l3), loss)
    else:
        dual = torch.zeros_like(clipped)
    return loss, clipped, dual


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token ``k3`` estimate of KL(policy || reference) on tokens sampled from the policy."""
    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.exp(d) - d - 1.0


@dataclass
class LossTerms:
    loss: torch.Tensor          # the objective to minimise (scaled by the token share)
    pg_loss: torch.Tensor
    clip_frac: torch.Tensor     # share of tokens where the PPO clip binds
    dual_clip_frac: torch.Tensor
    ppo_kl: torch.Tensor        # mean (old_logp - logp): drift since sampling
    kl: torch.Tensor | None     # mean k3 KL to the reference, when given
    entropy: torch.Tensor | None


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float = 10.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    n_tokens: Any = None,
) -> LossTerms:
    """The full token-mean objective ``pg + kl_coef * kl - entropy_coef * entropy``.

    Shapes: every tensor ``[B, R]``; ``advantages`` already broadcast to tokens (the turn's
    advantage on every token of its reply). Statistics are detached token means over ``mask``
    normalised the same way as the loss.
    """
    pg_tok, clipped, dual = ppo_clip_token_losses(logp, old_logp, advantages, eps_low, eps_high, dual_clip)
    pg = masked_token_mean(pg_tok, mask, n_tokens)
    total = pg
    kl = None
    if ref_logp is not None:
        kl = masked_token_mean(k3_kl(logp, ref_logp), mask, n_tokens)
        if kl_coef:
            total = total + kl_coef * kl
    ent = None
    if entropy is not None:
        ent = masked_token_mean(entropy, mask, n_tokens)
        if entropy_coef:
            total = total - entropy_coef * ent
    with torch.no_grad():
        stats = {
            "clip_frac": masked_token_mean(clipped.to(logp.dtype), mask, n_tokens),
            "dual_clip_frac": masked_token_mean(dual.to(logp.dtype), mask, n_tokens),
            "ppo_kl": masked_token_mean(old_logp - logp, mask, n_tokens),
        }
    return LossTerms(
        loss=total,
        pg_loss=pg.detach(),
        kl=None if kl is None else kl.detach(),
        entropy=None if ent is None else ent.detach(),
        **stats,
    )
