"""mica's per-token advantages in a hand-written PPO-clip loss (verl's layout, one row per
trajectory, several assistant turns per row).

    python examples/ppo_loss.py

No model is downloaded: a tiny embedding + linear "policy" over a 32-token vocabulary stands
in for a language model so the script runs anywhere in a second. Swap in your model's
per-token log-probabilities; everything from "credit assignment" on stays the same.
"""

from __future__ import annotations


def masked_mean(x, mask):
    """Mean of ``x`` over the tokens where ``mask`` is 1 (TRL's and verl's token-mean)."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, clip=0.2):
    """PPO's clipped surrogate, per token, averaged over assistant tokens::

        ratio = exp(logp - logp_old)
        loss  = -mean_tokens( min(ratio * A, clip(ratio, 1-c, 1+c) * A) )

    ``advantages`` is ``[B, L]``: each assistant token carries its turn's advantage
    (``mica_core.broadcast_to_tokens``), every other token 0 and masked out.
    """
    import torch

    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    return -masked_mean(torch.minimum(unclipped, clipped), mask)


def main():
    import torch

    import mica_core as mc
    from mica_core.tokens import turn_rewards_from_tokens, turn_spans

    torch.manual_seed(0)
    vocab, B, L = 32, 6, 20

    # A rollout batch in verl's layout: assistant spans (1) between user tokens (0).
    response_mask = torch.zeros(B, L, dtype=torch.int64)
    for b in range(B):
        t = 0
        while t < L - 3:
            span = int(torch.randint(2, 5, ()))
            response_mask[b, t:t + span] = 1
            t += span + int(torch.randint(1, 4, ()))
    tokens = torch.randint(0, vocab, (B, L))
    uid = ["scenario-a"] * 3 + ["scenario-b"] * 3  # rollout groups (GRPO's uid)

    # The environment wrote each turn's reward (IDR: D_{t-1} - D_t) on the turn's last token.
    token_level_rewards = torch.zeros(B, L)
    spans = turn_spans(response_mask)
    token_level_rewards[spans.row, spans.last] = torch.randn(spans.row.shape[0])

    # Credit assignment: per-turn rewards -> per-turn MICA advantages -> per-token advantages.
    reward, spans = turn_rewards_from_tokens(token_level_rewards, response_mask)
    res = mc.estimate(spans.offsets, uid, reward=reward, estimator="mica")
    advantages = mc.broadcast_to_tokens(res.advantage, response_mask)  # [B, L]

    # A stand-in policy and one PPO step.
    policy = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)

    def token_logprobs():
        logits = policy(tokens[:, :-1])  # predict token t+1 from token t
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return torch.nn.functional.pad(lp, (1, 0))  # align with tokens; token 0 has no logp

    mask = response_mask.float()
    mask[:, 0] = 0.0
    with torch.no_grad():
        old = token_logprobs()
    for step in range(3):
        loss = ppo_clip_loss(token_logprobs(), old, advantages, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():+.4f}")
    print(f"{spans.row.shape[0]} turns in {B} rows; advantages of row 0 per token:")
    print(advantages[0].numpy().round(3))


if __name__ == "__main__":
    main()
