"""The PPO-clip loss against numbers worked out by hand."""

import math

import pytest

torch = pytest.importorskip("torch")

from mica_train.loss import k3_kl, masked_token_mean, policy_loss, ppo_clip_token_losses


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_clip_cases_by_hand():
    # One token per case; old_logp = 0 so ratio = exp(logp).
    #   case  A    ratio   l1=-A*r   l2=-A*clip(r,0.8,1.28)   max       dual (A<0: min(.,10*|A|))
    #   0    +1    1.5     -1.5      -1.28                     -1.28     -
    #   1    +1    0.5     -0.5      -0.8                      -0.5      -
    #   2    -1    0.5     +0.5      +0.8                      +0.8      0.8 (not binding)
    #   3    -1    1.5     +1.5      +1.28                     +1.5      -
    #   4    -1    20.0    +20       +1.28                     +20       10 (binding)
    #   5    +2    1.0     -2        -2                        -2        -
    ratios = [1.5, 0.5, 0.5, 1.5, 20.0, 1.0]
    adv = _t([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0]])
    logp = _t([[math.log(r) for r in ratios]])
    old = torch.zeros_like(logp)
    loss, clipped, dual = ppo_clip_token_losses(logp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=10.0)
    expected = [-1.28, -0.5, 0.8, 1.5, 10.0, -2.0]
    assert torch.allclose(loss, _t([expected]), atol=1e-12)
    assert clipped.tolist() == [[True, False, True, False, False, False]]
    assert dual.tolist() == [[False, False, False, False, True, False]]


def test_dual_clip_off_and_invalid():
    logp = _t([[math.log(20.0)]])
    loss, _, dual = ppo_clip_token_losses(logp, torch.zeros_like(logp), _t([[-1.0]]), dual_clip=0.0)
    assert loss.item() == pytest.approx(20.0)
    assert not dual.any()
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_token_losses(logp, logp, _t([[-1.0]]), dual_clip=0.5)


def test_token_mean_aggregation_and_stats():
    # Two rows (two turns): 3 tokens and 1 token. Ratio 1 everywhere, so l = -A per token.
    logp = _t([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    adv = _t([[0.5, 0.5, 0.5], [-2.0, -2.0, -2.0]]) * mask
    terms = policy_loss(logp, logp.clone(), adv, mask)
    # token mean: (3 * -0.5 + 1 * 2.0) / 4 = 0.125 ; a row mean would give (-0.5 + 2) / 2 = 0.75
    assert terms.loss.item() == pytest.approx(0.125)
    assert terms.pg_loss.item() == pytest.approx(0.125)
    assert terms.clip_frac.item() == 0.0
    assert terms.ppo_kl.item() == 0.0
    # An external token count (the whole minibatch over micro-batches): 8 tokens in all.
    assert policy_loss(logp, logp.clone(), adv, mask, n_tokens=8).loss.item() == pytest.approx(0.5 / 8)


def test_gradient_is_minus_advantage_times_ratio_where_unclipped():
    logp = _t([[math.log(1.1), math.log(1.5)]]).requires_grad_(True)
    old = torch.zeros_like(logp)
    adv = _t([[2.0, 2.0]])
    mask = torch.ones_like(adv)
    policy_loss(logp, old, adv, mask).loss.backward()
    # token 0 unclipped: d(-A r)/dlogp = -A r / 2 tokens; token 1 clipped at 1.28: zero gradient.
    assert logp.grad[0, 0].item() == pytest.approx(-2.0 * 1.1 / 2)
    assert logp.grad[0, 1].item() == 0.0


def test_k3_kl_and_total_objective():
    logp = _t([[-1.0, -2.0]])
    ref = _t([[-1.5, -1.0]])
    # k3 = exp(ref - logp) - (ref - logp) - 1
    k = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert torch.allclose(k3_kl(logp, ref), _t([k]))
    mask = _t([[1.0, 1.0]])
    ent = _t([[0.7, 0.3]])
    adv = _t([[1.0, -1.0]])
    terms = policy_loss(logp, logp.clone(), adv, mask, ref_logp=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    pg = (-1.0 + 1.0) / 2
    kl = sum(k) / 2
    assert terms.kl.item() == pytest.approx(kl)
    assert terms.entropy.item() == pytest.approx(0.5)
    assert terms.loss.item() == pytest.approx(pg + 0.1 * kl - 0.01 * 0.5)


def test_masked_tokens_do_not_count():
    logp = _t([[-1.0, 5.0]])
    old = _t([[-1.0, -9.0]])  # a wild ratio on the padding token
    adv = _t([[1.0, 100.0]])
    mask = _t([[1.0, 0.0]])
    terms = policy_loss(logp, old, adv, mask)
    assert terms.loss.item() == pytest.approx(-1.0)
    assert masked_token_mean(adv, mask).item() == 1.0
