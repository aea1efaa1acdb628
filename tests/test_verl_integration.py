"""mica's estimators inside the real verl package.

Runs in .venv-verl (``bash scripts/test-verl.sh``); in an environment without verl the whole
module is skipped.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from naive import PRESETS, naive_estimate
from naive import broadcast_to_tokens as naive_broadcast

from mica_core.integrations import verl as mv


def _batch(seed=0, B=12, L=24, dtype=torch.float32):
    """Multi-turn rows: assistant spans separated by user tokens, a reward at each span end."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, L), dtype=np.int64)
    rew = np.zeros((B, L))
    trajs = []
    uids = np.array([f"uid-{i // 3}" for i in range(B)], dtype=object)
    uids[-1] = "uid-alone"  # a group of one
    for b in range(B):
        t, rs = 0, []
        while t < L - 2:
            span = int(rng.integers(1, 4))
            mask[b, t:t + span] = 1
            r = float(np.float32(rng.normal()))
            rew[b, t + span - 1] = r
            rs.append(r)
            t += span + int(rng.integers(1, 4))
            if rng.random() < 0.3:
                break
        trajs.append({"group": uids[b], "rewards": rs})
    return (torch.as_tensor(rew, dtype=dtype), torch.as_tensor(mask), uids, trajs)


def test_presets_are_registered_with_verl():
    for name in PRESETS:
        fn = core_algos.get_adv_estimator_fn(mv.verl_name(name))
        assert fn is mv.verl_estimator(name)
    # verl's own estimators keep their names
    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage
    # registering again is a no-op (same function objects)
    assert mv.register_with_verl()["mica"] is mv.compute_mica_advantage


def test_user_estimator_registers_too():
    import mica_core as mc

    mc.register_estimator("turn_heavy_verl", [(0.8, "return", "turn"),
                                              (0.2, "reward", "group", "loo")], overwrite=True)
    try:
        done = mv.register_with_verl(["turn_heavy_verl"])
        assert core_algos.get_adv_estimator_fn("mica_turn_heavy_verl") is \
            done["mica_turn_heavy_verl"]
    finally:
        mc.unregister_estimator("turn_heavy_verl")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_verl_compute_advantage_dispatch_reaches_mica(name):
    """verl's trainer-side compute_advantage, by registry name, on a DataProto."""
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rew, mask, uids, trajs = _batch(seed=1)
    data = DataProto.from_dict(tensors={"token_level_rewards": rew, "response_mask": mask},
                               non_tensors={"uid": uids})
    out = compute_advantage(data, adv_estimator=mv.verl_name(name),
                            config=AlgoConfig(gamma=0.85))
    want = naive_estimate(trajs, name, gamma=0.85)
    want_adv = naive_broadcast([[t[2] for t in row] for row in want], mask.tolist())
    np.testing.assert_allclose(out.batch["advantages"].numpy(), want_adv, rtol=1e-5, atol=1e-5)
    direct, _ = mv.verl_estimator(name)(rew, mask, uids, gamma=0.85)
    assert torch.equal(out.batch["advantages"], direct)


def test_algo_config_gamma_is_read():
    from verl.trainer.config import AlgoConfig

    rew, mask, uids, _ = _batch(seed=2)
    a, ra = mv.compute_mica_turn_advantage(rew, mask, uids, config=AlgoConfig(gamma=0.5))
    b, rb = mv.compute_mica_turn_advantage(rew, mask, uids, gamma=0.5)
    assert torch.equal(a, b) and torch.equal(ra, rb)


def test_dictconfig_mica_section_is_read():
    from omegaconf import OmegaConf

    rew, mask, uids, _ = _batch(seed=3)
    cfg = OmegaConf.create({"gamma": 0.85, "adv_estimator": "mica",
                            "mica": {"weight": 0.3, "eps": 1e-4}})
    a, _ = mv.compute_mica_advantage(rew, mask, uids, config=cfg)
    b, _ = mv.compute_mica_advantage(rew, mask, uids, gamma=0.85, weight=0.3, eps=1e-4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("seed", [0, 4, 5])
def test_our_grpo_equals_verls_grpo(norm, seed):
    """mica's grpo with singleton="raw" == verl's compute_grpo_outcome_advantage."""
    rew, mask, uids, _ = _batch(seed=seed)
    want, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=rew.clone(), response_mask=mask, index=uids,
        norm_adv_by_std_in_grpo=norm)
    got, _ = mv.compute_grpo_advantage(rew, mask, uids, singleton="raw",
                                       norm_adv_by_std_in_grpo=norm)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)


def test_our_grpo_equals_verls_grpo_through_its_dispatch():
    """verl's compute_advantage routes "grpo" to its own function; "mica_grpo" to ours."""
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rew, mask, uids, _ = _batch(seed=6)

    def run(name):
        data = DataProto.from_dict(tensors={"token_level_rewards": rew.clone(),
                                            "response_mask": mask},
                                   non_tensors={"uid": uids})
        return compute_advantage(data, adv_estimator=name, config=AlgoConfig(),
                                 norm_adv_by_std_in_grpo=True).batch["advantages"]

    theirs = run("grpo")
    ours_default = run("mica_grpo")  # singleton="zero": the lone row gets 0
    lone = torch.as_tensor(uids == "uid-alone")
    torch.testing.assert_close(ours_default[~lone], theirs[~lone], rtol=1e-5, atol=1e-6)
    assert torch.all(ours_default[lone] == 0)
