"""examples/verl_multiturn on CPU, against the real verl package (.venv-verl).

What needs no GPU is run here: the example's config composed by hydra on top of verl's own
ppo_trainer.yaml (as ``main_ppo`` composes it) and checked by verl's ``validate_config``; the
agent loop instantiated the way verl's AgentLoopWorker does, with a scripted stand-in for the
rollout server; its output through verl's own post-processing, the reward function, and verl's
``compute_advantage`` with mica's estimators. The launch script itself needs a GPU and vLLM.
"""

import asyncio
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl.trainer.ppo.core_algos")

from mica_core.integrations import verl as mv

from naive import naive_estimate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "verl_multiturn")
REPLIES = ["I hear you, that sounds hard.", "Why do you think it went that way?", "ok.",
           "Could you try one small step next week?", "Hmm."]


@pytest.fixture(scope="module")
def example_path():
    sys.path.insert(0, EXAMPLE)
    yield EXAMPLE
    sys.path.remove(EXAMPLE)


@pytest.fixture(scope="module")
def config(example_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=example_path, version_base=None):
        return compose("mica_multiturn", overrides=["actor_rollout_ref.model.path=/tmp/m"])


def test_config_composes_on_verls_own_and_validates(config):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    assert config.algorithm.adv_estimator == "mica"
    env = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env.VERL_USE_EXTERNAL_MODULES == "mica_core.integrations.verl"
    assert config.trainer.use_v1 is True and config.algorithm.mica.turn_rewards is True
    # verl's defaults are all there (the file only overrides them)
    assert config.actor_rollout_ref.actor.strategy is not None
    validate_config(config=config, use_reference_policy=need_reference_policy(config),
                    use_critic=need_critic(config))
    for rel in (config.actor_rollout_ref.rollout.agent.agent_loop_config_path,
                config.reward.custom_reward_function.path):
        assert os.path.isfile(os.path.join(ROOT, rel)), rel
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mica.gamma is set: no warning about verl's gamma
        opts = mv.options_from_config("mica", config.algorithm)
    assert (opts["gamma"], opts["weight"]) == (0.85, 0.5)


def _tokenizer():
    from mica_train.tiny import CHAT_TEMPLATE, train_tokenizer

    tok = train_tokenizer(REPLIES * 10 + ["I still don't get why this keeps happening to me.",
                                          "Nobody seems to care how awful this feels.",
                                          "I don't know what to do next."] * 10)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def run_agent_loop(config, tok, states, start=0):
    """The example's agent loop, instantiated as AgentLoopWorker._run_agent_loop does."""
    import hydra
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.workers.rollout.replica import TokenOutput

    class ScriptedServer:  # stands in for the vLLM server: fixed replies, in turn
        def __init__(self, first):
            self.i = first

        async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
            text = REPLIES[self.i % len(REPLIES)]
            self.i += 1
            return TokenOutput(token_ids=tok.encode(text + "<|im_end|>",
                                                    add_special_tokens=False))

    entry = OmegaConf.load(config.actor_rollout_ref.rollout.agent.agent_loop_config_path
                           if os.path.isabs(config.actor_rollout_ref.rollout.agent
                                            .agent_loop_config_path)
                           else os.path.join(ROOT, config.actor_rollout_ref.rollout.agent
                                             .agent_loop_config_path))
    entry = next(e for e in entry if e.name == config.actor_rollout_ref.rollout.agent
                 .default_agent_loop)

    async def one(state, first):
        loop = hydra.utils.instantiate(
            entry, trainer_config=DictConfigWrap(config=config), server_manager=ScriptedServer(first),
            tokenizer=tok, processor=None, hf_model_type=None, dataset_cls=None,
            data_config=DictConfigWrap(config.data), tools=ToolListWrap([]))
        return await loop.run({}, raw_prompt=[{"role": "user", "content": "I feel awful."}],
                              extra_info={"support_state": state})

    async def all_of():
        return [await one(s, start + k) for k, s in enumerate(states)]

    return asyncio.run(all_of())


def test_agent_loop_distances_reach_mica_through_verl(config):
    """Legacy trainer (trainer.use_v1=false): the example's per-turn distances, through verl's
    agent-loop post-processing and compute_advantage: mica's advantages equal the naive
    per-turn computation on them."""
    from test_verl_integration import agent_loop_worker, trainer_rewards
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker  # noqa: F401
    from verl.trainer.ppo.ray_trainer import compute_advantage

    tok = _tokenizer()
    rng = np.random.default_rng(0)
    states = [list(np.round(rng.uniform(-4, -1.5, 3), 2)) for _ in range(6)]
    outputs = run_agent_loop(config, tok, states)
    import reward as example_reward

    trajs = []
    for k, out in enumerate(outputs):
        ef = out.extra_fields
        assert len(ef["mica_distance"]) == len(ef["mica_turn_start"]) >= 1
        mask = out.response_mask
        for s in ef["mica_turn_start"]:
            assert mask[s] == 1 and (s == 0 or mask[s - 1] == 0)
        assert mask[-1] == 0  # the episode ends on the user's reply: trailing user tokens
        score = example_reward.compute_score("mica_support", tok.decode(out.response_ids), "",
                                             extra_info=dict(ef))
        assert score["score"] == pytest.approx(ef["mica_initial_distance"] -
                                               ef["mica_distance"][-1])
        out.reward_score = score["score"]
        trajs.append({"group": f"g{k // 3}", "distances": ef["mica_distance"],
                      "initial_distance": ef["mica_initial_distance"]})
    worker = agent_loop_worker(tok, prompt_length=config.actor_rollout_ref.rollout.prompt_length,
                               response_length=config.actor_rollout_ref.rollout.response_length)
    post = [asyncio.run(worker._agent_loop_postprocess(o, validate=False, raw_prompt=[]))
            for o in outputs]
    data = worker._postprocess(post)
    data.non_tensor_batch["uid"] = np.array([t["group"] for t in trajs], dtype=object)
    data = trainer_rewards(data, kl=False)
    mask = data.batch["response_mask"]
    results = {}
    for name in ("mica", "mica_adr"):
        out = compute_advantage(data, adv_estimator=name, config=config.algorithm)
        want = naive_estimate(trajs, name, gamma=0.85)
        adv = out.batch["advantages"]
        for b, ep in enumerate(outputs):
            starts = list(ep.extra_fields["mica_turn_start"]) + [mask.shape[1]]
            for k in range(len(starts) - 1):
                seg = slice(starts[k], starts[k + 1])
                m = mask[b, seg].bool()
                np.testing.assert_allclose(adv[b, seg][m].numpy(), want[b][k][2], rtol=1e-5,
                                           atol=1e-5)
        results[name] = adv
    assert not torch.allclose(results["mica"], results["mica_adr"])


@pytest.mark.parametrize("name", ["mica", "mica_adr"])
def test_agent_loop_reaches_mica_through_verls_v1_trainer(example_path, name, monkeypatch):
    """verl's default (v1) trainer: the example's agent loop, verl's AgentLoopWorkerTQ
    post-processing and the v1 trainer's _compute_advantage with the example's config
    (TransferQueue replaced by an in-memory store): per-token advantages equal the naive
    per-turn computation on the distances the scripted user reported."""
    from hydra import compose, initialize_config_dir
    from test_verl_integration import InMemoryTQ, v1_advantage_step, v1_trainer, v1_worker

    with initialize_config_dir(config_dir=example_path, version_base=None):
        cfg = compose("mica_multiturn", overrides=["actor_rollout_ref.model.path=/tmp/m",
                                                   f"algorithm.adv_estimator={name}"])
    tok = _tokenizer()
    rng = np.random.default_rng(1)
    states = [list(np.round(rng.uniform(-4, -1.5, 3), 2)) for _ in range(6)]
    outputs = run_agent_loop(cfg, tok, states, start=2)
    store = InMemoryTQ()
    store.install(monkeypatch)
    worker = v1_worker()
    trajs = []
    for k, out in enumerate(outputs):
        ef = out.extra_fields
        trajs.append({"group": f"g{k // 3}", "distances": ef["mica_distance"],
                      "initial_distance": ef["mica_initial_distance"],
                      "starts": list(ef["mica_turn_start"])})
        asyncio.run(worker._agent_loop_postprocess(out, False, uid=f"g{k // 3}",
                                                   session_id=k % 3, global_steps=1))
    keys = list(store.rows)
    metrics = v1_advantage_step(v1_trainer(cfg=cfg), keys)
    assert metrics["mica/per_turn_signal"] == 1.0
    want = naive_estimate(trajs, name, gamma=0.85)
    adv = store.puts[-1][1]["advantages"]
    assert max(len(t["distances"]) for t in trajs) > 1
    for b, key in enumerate(keys):
        t = trajs[int(key.split("_")[0][1:]) * 3 + int(key.split("_")[1])]
        mask = store.rows[key]["response_mask"].bool()
        starts = t["starts"] + [mask.shape[0]]
        for k in range(len(starts) - 1):
            seg = slice(starts[k], starts[k + 1])
            np.testing.assert_allclose(adv[b][seg][mask[seg]].numpy(),
                                       want[trajs.index(t)][k][2], rtol=1e-5, atol=1e-5)
        assert not adv[b][~mask].any()
