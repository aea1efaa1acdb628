"""mica's estimators inside the real verl package.

Runs in .venv-verl (``bash scripts/test-verl.sh``); in an environment without verl the whole
module is skipped.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

import verl_layouts as L

from mica_core import MicaInputError
from mica_core.integrations import verl as mv

from naive import PRESETS, naive_estimate
from naive import broadcast_to_tokens as naive_broadcast


def _batch(seed=0, B=12, L=24, dtype=torch.float32):
    """Multi-turn rows: assistant spans separated by user tokens, a reward at each span end."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, L), dtype=np.int64)
    rew = np.zeros((B, L))
    trajs = []
    uids = np.array([f"uid-{i // 3}" for i in range(B)], dtype=object)
    uids[-1] = "uid-alone"  # a group of one
    for b in range(B):
        t, rs, ks = 0, [], []
        while t < L - 2:
            span = int(rng.integers(1, 4))
            mask[b, t:t + span] = 1
            r = float(np.float32(rng.normal()))
            rew[b, t + span - 1] = r
            rs.append(r)
            ks.append(f"s{int(rng.integers(0, 3))}")
            t += span + int(rng.integers(1, 4))
            if rng.random() < 0.3:
                break
        trajs.append({"group": uids[b], "rewards": rs, "keys": ks})
    return (torch.as_tensor(rew, dtype=dtype), torch.as_tensor(mask), uids, trajs)


def _non_tensors(uids, trajs):
    """verl's non_tensor_batch of a _batch: uid, and the per-turn keys gigpo groups by."""
    keys = np.empty(len(trajs), dtype=object)
    keys[:] = [t["keys"] for t in trajs]
    return {"uid": uids, "mica_key": keys}


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
    nt = _non_tensors(uids, trajs)
    data = DataProto.from_dict(tensors={"token_level_rewards": rew, "response_mask": mask},
                               non_tensors=nt)
    out = compute_advantage(data, adv_estimator=mv.verl_name(name),
                            config=AlgoConfig(gamma=0.85))
    want = naive_estimate(trajs, name, gamma=0.85)
    want_adv = naive_broadcast([[t[2] for t in row] for row in want], mask.tolist())
    np.testing.assert_allclose(out.batch["advantages"].numpy(), want_adv, rtol=1e-5, atol=1e-5)
    direct, _ = mv.verl_estimator(name)(rew, mask, uids, gamma=0.85, non_tensor_batch=nt)
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


# --- registration inside verl's TaskRunner actor --------------------------------------------

#: The documented line (docs/verl.md): verl/__init__.py imports the modules named in
#: VERL_USE_EXTERNAL_MODULES in every process that imports verl; Ray's runtime_env puts the
#: variable into every worker of the job, the TaskRunner actor included.
REGISTRATION = ("+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES="
                "mica_core.integrations.verl")


def compose_verl_config(overrides):
    """verl's own ppo_trainer config, composed by hydra the way main_ppo's @hydra.main does."""
    import os

    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=list(overrides))


def _make_probe():
    """A TaskRunner stand-in for verl's run_ppo: inside its Ray actor it runs verl's
    compute_advantage for every name it is given and writes what happened to a JSON file.
    Defined in a function so that Ray ships it by value (the worker cannot import tests/)."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def run(self, config):
            import json
            import os

            import numpy as np
            import torch
            from verl import DataProto
            from verl.trainer.ppo.ray_trainer import compute_advantage

            p = config.mica_probe
            out = {"pid": os.getpid(), "results": {}}
            metrics = {}  # a trainer step's metrics dict, as in RayPPOTrainer.fit
            keys = np.empty(len(p.turn_keys), dtype=object)
            keys[:] = [list(k) for k in p.turn_keys]
            for name in p.names:
                data = DataProto.from_dict(
                    tensors={"token_level_rewards": torch.tensor(list(p.rewards)),
                             "response_mask": torch.tensor(list(p.mask))},
                    non_tensors={"uid": np.array(list(p.uid), dtype=object),
                                 "mica_key": keys})
                try:
                    res = compute_advantage(data, adv_estimator=name, config=config.algorithm)
                    out["results"][name] = res.batch["advantages"].tolist()
                except Exception as e:  # noqa: BLE001 - the driver reads the message
                    out["results"][name] = f"{type(e).__name__}: {e}"
            out["metrics"] = metrics
            with open(p.out, "w") as f:
                json.dump(out, f)

    return Probe


@pytest.fixture(scope="module")
def ray_task_runner(tmp_path_factory):
    """Runs a probe through verl's run_ppo (which starts Ray from the config's ray_kwargs,
    one local session for the module: 1 CPU, no dashboard) and returns its report."""
    import json
    import os

    import ray
    from omegaconf import OmegaConf, open_dict
    from verl.trainer.main_ppo import run_ppo

    rew, mask, uids, trajs = _batch(seed=8)
    cfg = compose_verl_config([
        REGISTRATION, "+algorithm.mica.gamma=0.85", "ray_kwargs.ray_init.num_cpus=1",
        "+ray_kwargs.ray_init.include_dashboard=false"])
    names = [mv.verl_name(n) for n in PRESETS]
    probe = _make_probe()
    calls = 0

    def run(actor_options=None):
        nonlocal calls
        calls += 1
        out = tmp_path_factory.mktemp("probe") / f"report{calls}.json"
        c = OmegaConf.create(OmegaConf.to_container(cfg))
        with open_dict(c):
            c.mica_probe = {"names": names, "rewards": rew.tolist(), "mask": mask.tolist(),
                            "uid": [str(u) for u in uids], "turn_keys": [t["keys"] for t in trajs],
                            "out": str(out)}
        runner = probe if actor_options is None else probe.options(**actor_options)
        run_ppo(c, task_runner_class=runner)
        return json.loads(out.read_text())

    yield run, (rew, mask, uids, cfg, _non_tensors(uids, trajs))
    ray.shutdown()
    os.environ.pop("VERL_USE_EXTERNAL_MODULES", None)


def test_registration_reaches_verls_task_runner_actor(ray_task_runner):
    import os

    run, (rew, mask, uids, cfg, nt) = ray_task_runner
    report = run()
    assert report["pid"] != os.getpid()  # it ran in another process: the Ray actor
    for name in PRESETS:
        got = report["results"][mv.verl_name(name)]
        assert not isinstance(got, str), got
        want, _ = mv.verl_estimator(name)(rew, mask, uids, config=cfg.algorithm,
                                           non_tensor_batch=nt)
        np.testing.assert_allclose(np.array(got), want.numpy(), rtol=1e-6, atol=1e-6)
    # mica's metrics reached the step's metrics dict inside the actor (what verl logs)
    assert report["metrics"]["mica/frame_lookup_failed"] == 0.0
    assert {"mica/per_turn_signal", "mica/empty_rows", "mica/lone_rollouts"} <= set(
        report["metrics"])


def test_importing_in_the_driver_alone_does_not_reach_the_actor(ray_task_runner):
    """Control: this process imported mica_core.integrations.verl (so verl's registry here has
    every preset); an actor whose environment lacks the variable does not."""
    run, _ = ray_task_runner
    assert core_algos.get_adv_estimator_fn("mica") is mv.compute_mica_advantage
    report = run({"runtime_env": {"env_vars": {"VERL_USE_EXTERNAL_MODULES": ""}}})
    for name in PRESETS:
        got = report["results"][mv.verl_name(name)]
        assert isinstance(got, str) and "Unknown advantage estimator" in got, got


# --- verl's agent-loop batches through verl's compute_advantage ------------------------------

def _tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, 16)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>")


def agent_loop_worker(tokenizer, prompt_length, response_length):
    """verl's AgentLoopWorker without Ray or servers: its post-processing methods only."""
    from types import SimpleNamespace

    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    worker = AgentLoopWorker.__new__(AgentLoopWorker)
    worker.rollout_config = SimpleNamespace(prompt_length=prompt_length,
                                            response_length=response_length)
    worker.tokenizer = tokenizer
    worker.processor = None
    worker.mm_processor_kwargs = {}
    worker.reward_loop_worker_handles = None
    worker.distillation_enabled = False
    return worker


def agent_loop_batch(episodes, response_length, with_signals=True):
    """The DataProto verl's agent loop hands the trainer, made by verl's own
    AgentLoopWorker._agent_loop_postprocess (padding, masks, the score at the last valid
    response token) and AgentLoopWorker._postprocess (extra_fields -> non_tensor_batch)."""
    import asyncio

    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    worker = agent_loop_worker(_tiny_tokenizer(), prompt_length=4,
                               response_length=response_length)
    rows = L.trajectory_rows(episodes)
    outputs = []
    for b, ep in enumerate(episodes):
        n = int(rows["valid_length"][b])
        extra = {}
        if with_signals:
            extra = {k: rows["non_tensor"][k][b] for k in
                     ("mica_distance", "mica_initial_distance", "mica_turn_start", "mica_key")}
        out = AgentLoopOutput(
            prompt_ids=[1, 2, 3], response_ids=[5 + (j % 7) for j in range(n)],
            response_mask=rows["response_mask"][b, :n].tolist(),
            reward_score=L.score_of(ep), num_turns=2 * len(ep["turns"]) + 1,
            metrics=AgentLoopMetrics(), extra_fields=extra)
        outputs.append(asyncio.run(worker._agent_loop_postprocess(
            out, validate=False, raw_prompt=[{"role": "user", "content": "t1"}])))
    data = worker._postprocess(outputs)
    data.non_tensor_batch["uid"] = np.array([ep["uid"] for ep in episodes], dtype=object)
    return data, rows


def trainer_rewards(data, kl):
    """What RayPPOTrainer.fit does between the rollout and compute_advantage (ray_trainer.py):
    extract_reward, the reward extra info into non_tensor_batch, apply_kl_penalty."""
    import torch
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty
    from verl.trainer.ppo.reward import extract_reward

    reward_tensor, extra = extract_reward(data)
    data.batch["token_level_scores"] = reward_tensor
    if extra:
        data.non_tensor_batch.update({k: np.array(v) for k, v in extra.items()})
    if kl:
        g = torch.Generator().manual_seed(0)
        shape = data.batch["response_mask"].shape
        data.batch["old_log_probs"] = -torch.rand(shape, generator=g)
        data.batch["ref_log_prob"] = -torch.rand(shape, generator=g)
        data, _ = apply_kl_penalty(data, kl_ctrl=core_algos.FixedKLController(kl_coef=0.1),
                                   kl_penalty="kl")
    else:
        data.batch["token_level_rewards"] = data.batch["token_level_scores"]
    return data


def kl_per_turn(data, episodes, starts):
    """Naive per-turn sums of what apply_kl_penalty added (rewards - scores)."""
    dense = (data.batch["token_level_rewards"] - data.batch["token_level_scores"]).double()
    L_ = dense.shape[1]
    out = []
    for b, ep in enumerate(episodes):
        s = list(starts[b]) + [L_]
        out.append([float(dense[b, s[k]:s[k + 1]].sum()) for k in range(len(ep["turns"]))])
    return out


@pytest.mark.parametrize("kl", [False, True], ids=["scores", "kl_in_reward"])
@pytest.mark.parametrize("signals", [True, False], ids=["distances", "score_only"])
def test_agent_loop_batches_through_verls_compute_advantage(signals, kl):
    """Every preset, by name, through verl's compute_advantage on the agent loop's own batch:
    tool calls inside turns (turn starts given), user tokens after turns, the score on the
    last valid (often user) token, per-turn distances in non_tensor_batch, KL in reward."""
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rng = np.random.default_rng(21)
    episodes = L.random_episodes(rng, tool_p=0.5)
    R = max(sum(len(L._turn_tokens(t)) for t in ep["turns"]) for ep in episodes) + 2
    base, rows = agent_loop_batch(episodes, R, with_signals=signals)
    if not signals:  # boundaries (so that tool calls stay inside their turns) and keys only
        base.non_tensor_batch["mica_turn_start"] = rows["non_tensor"]["mica_turn_start"]
        base.non_tensor_batch["mica_key"] = rows["non_tensor"]["mica_key"]
    mask = base.batch["response_mask"]
    assert mask.shape[1] == R and torch.equal(mask[:, :rows["response_mask"].shape[1]],
                                              torch.as_tensor(rows["response_mask"]))
    for name in PRESETS:
        data = trainer_rewards(base.select_idxs(np.arange(len(base))), kl)
        kl_turn = kl_per_turn(data, episodes, rows["non_tensor"]["mica_turn_start"]) if kl \
            else None
        out = compute_advantage(data, adv_estimator=mv.verl_name(name),
                                config=AlgoConfig(gamma=0.85))
        want = L.expected(episodes, name, signal="distance" if signals else "score",
                          kl=kl_turn, gamma=0.85)
        for col, key in ((2, "advantages"), (1, "returns")):
            ref = np.zeros(tuple(mask.shape))
            for b, row in enumerate(L.expected_tokens(episodes, want, col, "trajectory")):
                ref[b, :len(row)] = row
            np.testing.assert_allclose(out.batch[key].numpy(), ref, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} {key}")


@pytest.mark.parametrize("kl", [False, True], ids=["scores", "kl_in_reward"])
def test_v1_multi_output_rows_through_verls_multi_trajectory_path(kl):
    """verl's v1 trainer: one row per turn keyed {uid}_{session}_{index}, each row's
    rm_scores made by AgentLoopOutput.as_dict with the session's score (verl copies it to every
    output), through compute_advantage_for_multi_trajectories for every preset."""
    from verl import DataProto
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    rng = np.random.default_rng(4)
    episodes = L.random_episodes(rng, tool_p=0.0)
    rows = L.turn_rows(episodes, rng)
    fields = []
    for b, (ep, i) in enumerate(rows["turn"]):
        n = len(L._turn_tokens(ep["turns"][i]))
        fields.append(AgentLoopOutput(
            prompt_ids=[1, 2], response_ids=[5] * n,
            response_mask=rows["response_mask"][b, :n].tolist(), reward_score=L.score_of(ep),
            metrics=AgentLoopMetrics()).as_dict())
    Lmax = rows["response_mask"].shape[1]

    def pad(key, dtype):
        t = torch.zeros(len(fields), Lmax, dtype=dtype)
        for b, f in enumerate(fields):
            t[b, :f[key].shape[0]] = f[key]
        return t

    keys = rows["keys"]
    kl_turn = None
    for name in PRESETS:
        data = DataProto.from_dict(
            tensors={"response_mask": pad("response_mask", torch.int64),
                     "token_level_scores": pad("rm_scores", torch.float32)},
            non_tensors={"uid": rows["non_tensor"]["uid"],
                         "mica_key": rows["non_tensor"]["mica_key"]})
        if kl:
            g = torch.Generator().manual_seed(1)
            data.batch["old_log_probs"] = -torch.rand(data.batch["response_mask"].shape,
                                                      generator=g)
            data.batch["ref_log_prob"] = -torch.rand(data.batch["response_mask"].shape,
                                                     generator=g)
            from verl.trainer.ppo.ray_trainer import apply_kl_penalty

            data, _ = apply_kl_penalty(data, core_algos.FixedKLController(0.1), "kl")
            dense = (data.batch["token_level_rewards"] - data.batch["token_level_scores"])
            by_turn = {(id(ep), i): float(dense[b].double().sum())
                       for b, (ep, i) in enumerate(rows["turn"])}
            kl_turn = [[by_turn[id(ep), i] for i in range(len(ep["turns"]))] for ep in episodes]
        else:
            data.batch["token_level_rewards"] = data.batch["token_level_scores"]
        out = compute_advantage_for_multi_trajectories(
            data, batch_keys=keys, adv_estimator=mv.verl_name(name),
            config=AlgoConfig(gamma=0.85))
        want = L.expected(episodes, name, signal="score", kl=kl_turn, gamma=0.85)
        by_ep = {id(ep): res for ep, res in zip(episodes, want)}
        adv = out.batch["advantages"]
        m = data.batch["response_mask"].bool()
        for b, (ep, i) in enumerate(rows["turn"]):
            np.testing.assert_allclose(adv[b][m[b]].numpy(), by_ep[id(ep)][i][2], rtol=1e-5,
                                       atol=1e-5, err_msg=f"{name} row {b}")
            assert torch.all(adv[b][~m[b]] == 0)


def test_verl_without_uid_gets_one_line_error():
    """verl passes index only when data.non_tensor_batch has 'uid'."""
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rew, mask, _, _ = _batch(seed=9)
    data = DataProto.from_dict(tensors={"token_level_rewards": rew, "response_mask": mask})
    with pytest.raises(MicaInputError, match="keep data.non_tensor_batch\\['uid'\\]") as info:
        compute_advantage(data, adv_estimator="mica", config=AlgoConfig(gamma=0.85))
    assert "\n" not in str(info.value)


def test_verls_default_gamma_warns_once():
    from verl.trainer.config import AlgoConfig

    rew, mask, uids, _ = _batch(seed=10)
    mv._GAMMA_WARNED.discard("mica_turn")
    with pytest.warns(UserWarning, match="algorithm.gamma=1.0"):
        a, _ = mv.compute_mica_turn_advantage(rew, mask, uids, config=AlgoConfig())
    b, _ = mv.compute_mica_turn_advantage(rew, mask, uids, gamma=1.0)
    assert torch.equal(a, b)
    cfg = compose_verl_config(["algorithm.adv_estimator=mica_turn",
                               "+algorithm.mica.gamma=0.85"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c, _ = mv.compute_mica_turn_advantage(rew, mask, uids, config=cfg.algorithm,
                                              non_tensor_batch={})
    d, _ = mv.compute_mica_turn_advantage(rew, mask, uids, gamma=0.85)
    assert torch.equal(c, d)


# --- verl's v1 trainer: mica's agent-loop outputs through its own post-processing and
# --- _compute_advantage, TransferQueue replaced by an in-memory store -------------------------

class InMemoryTQ:
    """TransferQueue's key-value calls that verl's v1 agent-loop worker and trainer make, on a
    dict: rows stored by key as verl put them, read back with the fields asked for."""

    def __init__(self):
        self.rows, self.puts = {}, []

    def _put(self, keys, partition_id, fields=None, tags=None, **_):
        self.puts.append((list(keys), fields))
        for i, key in enumerate(keys):
            row = self.rows.setdefault(key, {})
            if fields is not None:
                item = fields[i]
                for name in fields.keys():
                    v = item[name]
                    row[name] = getattr(v, "data", v) if not torch.is_tensor(v) else v
        from transfer_queue import KVBatchMeta

        return KVBatchMeta(keys=list(keys), tags=[{} for _ in keys], partition_id=partition_id)

    async def async_kv_batch_put(self, *a, **kw):
        return self._put(*a, **kw)

    def kv_batch_put(self, *a, **kw):
        return self._put(*a, **kw)

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        return list_of_dict_to_tensordict([
            {f: v for f, v in self.rows[k].items() if select_fields is None or f in select_fields}
            for k in keys])

    def install(self, monkeypatch):
        import transfer_queue

        for name in ("async_kv_batch_put", "kv_batch_put", "kv_batch_get"):
            monkeypatch.setattr(transfer_queue, name, getattr(self, name))


def v1_worker():
    """verl's AgentLoopWorkerTQ (the class inside its Ray actor), post-processing only."""
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

    cls = AgentLoopWorkerTQ.__ray_metadata__.modified_class
    worker = cls.__new__(cls)
    base = agent_loop_worker(_tiny_tokenizer(), prompt_length=4, response_length=64)
    worker.__dict__.update(base.__dict__)
    return worker


def v1_trainer(overrides=(), kl=False, cfg=None):
    """verl's v1 trainer class for the default trainer mode, its config composed by hydra
    (verl's ppo_trainer with ``overrides``, unless ``cfg`` is given)."""
    from verl.trainer.ppo.v1 import get_trainer_cls

    if cfg is None:
        cfg = compose_verl_config(list(overrides) + [f"algorithm.use_kl_in_reward={kl}"])
    cls = get_trainer_cls(cfg.trainer.v1.trainer_mode)
    trainer = cls.__new__(cls)
    trainer.config = cfg
    if kl:
        trainer.kl_ctrl_in_reward = core_algos.FixedKLController(kl_coef=0.1)
    return trainer


def v1_advantage_step(trainer, keys):
    """The v1 trainer's _compute_advantage on the rows stored under ``keys``, no warning
    allowed; returns the step's metrics dict."""
    import warnings

    from transfer_queue import KVBatchMeta

    metrics = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer._compute_advantage(KVBatchMeta(keys=keys, tags=[{}] * len(keys),
                                               partition_id="train"), metrics)
    return metrics


def _v1_rollouts(episodes, name, layout, tq_store, monkeypatch, *, keys=False):
    """Each episode's agent-loop result built by mica's agent_loop_output, through verl's
    AgentLoopWorkerTQ._agent_loop_postprocess into the store; returns the row keys."""
    import asyncio

    worker = v1_worker()
    rows = L.trajectory_rows(episodes)
    for b, ep in enumerate(episodes):
        n = int(rows["valid_length"][b])
        out = mv.agent_loop_output(
            prompt_ids=[1, 2, 3], response_ids=[5 + (j % 7) for j in range(n)],
            response_mask=rows["response_mask"][b, :n].tolist(), estimator=mv.verl_name(name),
            distances=[t["distance"] for t in ep["turns"]],
            initial_distance=ep["initial_distance"],
            turn_start=list(rows["non_tensor"]["mica_turn_start"][b]), layout=layout,
            keys=[t["key"] for t in ep["turns"]] if keys else None)
        asyncio.run(worker._agent_loop_postprocess(
            out, False, uid=ep["uid"], session_id=ep["session"], global_steps=1))
    return list(tq_store.rows)


@pytest.mark.parametrize("kl", [False, True], ids=["scores", "kl_in_reward"])
@pytest.mark.parametrize("layout", ["trajectory", "turn"])
def test_v1_trainer_per_turn_credit(layout, kl, monkeypatch):
    """verl's default (v1) trainer end to end on the advantage side: mica's agent-loop outputs,
    verl's TQ post-processing (which copies a session's final score onto its earlier outputs),
    verl's _compute_advantage (fixed fields: uid, response_mask, rm_scores, log probs) and
    compute_advantage_for_multi_trajectories; advantages compared token by token with a naive
    per-turn computation from the distances."""
    rng = np.random.default_rng(31)
    episodes = L.random_episodes(rng, tool_p=0.5 if layout == "turn" else 0.0)
    for name in ("mica", "mica_adr", "mica_turn", "mica_group"):
        store = InMemoryTQ()
        store.install(monkeypatch)
        keys = _v1_rollouts(episodes, name, layout, store, monkeypatch)
        keys = [keys[i] for i in rng.permutation(len(keys))]  # sessions interleaved
        if kl:  # what the trainer's old_log_prob / ref steps put before the advantage step
            g = torch.Generator().manual_seed(2)
            for k in keys:
                n = store.rows[k]["response_mask"].shape[0]
                store.rows[k]["old_log_probs"] = -torch.rand(n, generator=g)
                store.rows[k]["ref_log_prob"] = -torch.rand(n, generator=g)
        trainer = v1_trainer([f"algorithm.adv_estimator={mv.verl_name(name)}", REGISTRATION,
                              "+algorithm.mica.gamma=0.85", "+algorithm.mica.turn_rewards=true",
                              "+algorithm.mica.require_per_turn=true"], kl)
        metrics = v1_advantage_step(trainer, keys)
        assert metrics["mica/per_turn_signal"] == 1.0
        assert metrics["mica/frame_lookup_failed"] == 0.0
        back = store.puts[-1][1]
        kl_turn = None
        if kl:
            kl_turn = {}
            for i, k in enumerate(keys):
                dense = (back["token_level_rewards"][i].double() -
                         store.rows[k]["rm_scores"].double())
                kl_turn[k] = dense
        want = L.expected(episodes, name, signal="turn_reward", gamma=0.85,
                          kl=_kl_by_turn(episodes, keys, kl_turn, layout) if kl else None)
        by_session = {f"{ep['uid']}_{ep['session']}": (ep, res)
                      for ep, res in zip(episodes, want)}
        for i, k in enumerate(keys):
            ep, res = by_session[k.rsplit("_", 1)[0]]
            adv = back["advantages"][i]
            mask = store.rows[k]["response_mask"].bool()
            if layout == "trajectory":
                ref = np.concatenate([[r[2] if m else 0.0 for m in L._turn_tokens(t)]
                                      for t, r in zip(ep["turns"], res)])
            else:
                t = int(k.rsplit("_", 1)[1])
                ref = np.where(mask.numpy(), res[t][2], 0.0)
            np.testing.assert_allclose(adv.numpy(), ref[:adv.shape[0]], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} {k}")


def _kl_by_turn(episodes, keys, kl_turn, layout):
    """Per episode, per turn, the KL verl added (summed over the turn's tokens, from its start
    to the next turn's start: mica's attribution rule)."""
    out = []
    for ep in episodes:
        sid = f"{ep['uid']}_{ep['session']}"
        if layout == "trajectory":
            dense = kl_turn[sid + "_0"]
            starts, pos = [], 0
            for t in ep["turns"]:
                starts.append(pos)
                pos += len(L._turn_tokens(t))
            ends = starts[1:] + [dense.shape[0]]
            out.append([float(dense[s:e].sum()) for s, e in zip(starts, ends)])
        else:
            out.append([float(kl_turn[f"{sid}_{i}"].sum()) for i in range(len(ep["turns"]))])
    return out


def test_v1_trainer_refuses_gigpo_in_one_line(monkeypatch):
    from transfer_queue import KVBatchMeta

    rng = np.random.default_rng(32)
    episodes = L.random_episodes(rng, tool_p=0.0)
    store = InMemoryTQ()
    store.install(monkeypatch)
    keys = _v1_rollouts(episodes, "gigpo", "trajectory", store, monkeypatch, keys=True)
    trainer = v1_trainer(["algorithm.adv_estimator=mica_gigpo", REGISTRATION,
                          "+algorithm.mica.turn_rewards=true"], False)
    with pytest.raises(MicaInputError, match="trainer.use_v1=false") as info:
        trainer._compute_advantage(KVBatchMeta(keys=keys, tags=[{}] * len(keys),
                                               partition_id="train"), {})
    assert "\n" not in str(info.value) and info.value.column == "mica_key"


def test_v1_trainer_without_mica_outputs_warns_every_step(monkeypatch):
    """verl's stock outputs (one score per session, copied onto each output): the multi-turn
    batch has no per-turn signal; mica says so on every step, and the metric says 0."""
    import asyncio

    from transfer_queue import KVBatchMeta
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    rng = np.random.default_rng(33)
    episodes = L.random_episodes(rng, tool_p=0.0, per_group=(2, 3))
    store = InMemoryTQ()
    store.install(monkeypatch)
    worker = v1_worker()
    for ep in episodes:
        outs = []
        for t in ep["turns"]:
            m = L._turn_tokens(t)
            outs.append(AgentLoopOutput(prompt_ids=[1, 2], response_ids=[5] * len(m),
                                        response_mask=m, metrics=AgentLoopMetrics(),
                                        reward_score=L.score_of(ep), extra_fields={
                                            "reward_extra_info": {}}))
        asyncio.run(worker._agent_loop_postprocess(outs, False, uid=ep["uid"],
                                                   session_id=ep["session"], global_steps=1))
    keys = list(store.rows)
    meta = KVBatchMeta(keys=keys, tags=[{}] * len(keys), partition_id="train")
    trainer = v1_trainer(["algorithm.adv_estimator=mica", REGISTRATION,
                          "+algorithm.mica.gamma=0.85"], False)
    for _ in range(2):
        metrics = {}
        with pytest.warns(UserWarning, match="without a per-turn signal"):
            trainer._compute_advantage(meta, metrics)
        assert metrics["mica/per_turn_signal"] == 0.0
    trainer = v1_trainer(["algorithm.adv_estimator=mica", REGISTRATION,
                          "+algorithm.mica.gamma=0.85", "+algorithm.mica.require_per_turn=true"],
                         False)
    with pytest.raises(MicaInputError, match="without a per-turn signal") as info:
        trainer._compute_advantage(meta, {})
    assert "\n" not in str(info.value)


def test_agent_loop_output_refuses_what_v1_cannot_carry():
    """One-line errors: an ADR preset given rewards, a turn holding a tool call in the
    trajectory layout (v1 sees no turn boundaries), a signal of the wrong length, none."""
    kw = dict(prompt_ids=[1], response_ids=[5] * 6, response_mask=[1, 1, 0, 1, 0, 0])
    with pytest.raises(MicaInputError, match="ADR .* pass distances") as info:
        mv.agent_loop_output(estimator="mica_adr", rewards=[1.0, 2.0], **kw)
    assert "\n" not in str(info.value)
    with pytest.raises(MicaInputError, match="use layout='turn'"):
        mv.agent_loop_output(estimator="mica", distances=[1.0], initial_distance=2.0,
                             turn_start=[0], **kw)
    one = mv.agent_loop_output(estimator="mica", distances=[1.0], initial_distance=2.0,
                               turn_start=[0], layout="turn", **kw)
    assert len(one) == 1 and one[0].as_dict()["rm_scores"].tolist() == [0, 0, 0, 1.0, 0, 0]
    with pytest.raises(MicaInputError, match="has 1 values but the row has 2 turns"):
        mv.agent_loop_output(estimator="mica", distances=[1.0], initial_distance=2.0, **kw)
    with pytest.raises(MicaInputError, match="give distances"):
        mv.agent_loop_output(estimator="mica", **kw)
    # mica_grpo (verl name) is mica's grpo: IDR turn rewards, their sum is the outcome
    out = mv.agent_loop_output(estimator="mica_grpo", distances=[3.0, 1.0], initial_distance=4.0,
                               **kw)
    assert out.as_dict()["rm_scores"].tolist() == [0, 1.0, 0, 2.0, 0, 0]
    assert out.reward_score == 3.0 and out.extra_fields["mica_turn_start"] == [0, 3]
