"""The tiny model, the chat template's assistant mask, batch layout, log-probs consistent with
generation, and the LoRA invariant (base frozen, every adapter weight trained)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from train_helpers import write_small_tiny_model

from mica_train.config import load_config
from mica_train.policy import (
    collate_turns,
    encode_prompts,
    generate_replies,
    load_policy,
    prompt_messages,
    response_logprobs,
)
from mica_train.warmstart import generate_corpus, tokenize_examples

torch.set_num_threads(1)


@pytest.fixture
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def _cfg(tiny_dir, run_dir, *extra):
    return load_config("tiny", [f"model.path={tiny_dir}", f"run_dir={run_dir}", *extra])


def test_tiny_model_is_deterministic_and_offline(tiny_dir, tmp_path):
    other = tmp_path / "again"
    write_small_tiny_model(other)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).read_bytes() == (other / name).read_bytes(), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.padding_side == "left"  # saved, not set after loading
    assert tok.eos_token == "<|im_end|>"


def test_assistant_mask_is_the_reply_and_its_end_token(tiny_dir):
    from mica_train.policy import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    examples = generate_corpus(3, seed=1)[:5]
    for ex, (ids, mask) in zip(examples, tokenize_examples(tok, examples, max_tokens=10_000)):
        reply = [t for t, m in zip(ids, mask) if m]
        assert reply == tok(ex.reply)["input_ids"] + [tok.eos_token_id]
        # The supervised layout is exactly a rollout row: prompt + the reply the policy would sample.
        prompt = encode_prompts(tok, [ex.context], max_prompt_tokens=0)[0]
        assert ids[: len(prompt) + len(reply)] == prompt + reply


def test_prompt_window_and_truncation(tiny_dir):
    from mica_train.policy import load_tokenizer

    msgs = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    assert prompt_messages(msgs, 1) == [msgs[2]]
    assert prompt_messages(msgs, 2) == [msgs[2]]  # never starts with the policy's own reply
    assert prompt_messages(msgs, 3) == msgs
    assert prompt_messages(msgs, 0, "be kind")[0] == {"role": "system", "content": "be kind"}
    longer = msgs + [{"role": "assistant", "content": "four"}, {"role": "user", "content": "five"}]
    # the policy's own last replies before the window, the user messages between them left out
    assert prompt_messages(longer, 1, context_replies=2) == [msgs[1], longer[3], longer[4]]
    assert prompt_messages(longer, 1, context_replies=1) == [longer[3], longer[4]]
    assert prompt_messages(longer, 3, context_replies=2) == [msgs[1]] + longer[2:]
    assert prompt_messages(msgs[:1], 1, context_replies=2) == msgs[:1]
    tok = load_tokenizer(tiny_dir)
    full = encode_prompts(tok, [msgs], 0)[0]
    cut = encode_prompts(tok, [msgs], 5)[0]
    assert cut == full[-5:]


def test_collate_layout():
    b = collate_turns([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, device="cpu")
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.prompt_width == 3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_old_logprobs_match_generation(tiny_dir, tmp_path, temperature):
    """Log-probs recomputed on the padded turn batch equal the sampling distribution of
    ``generate`` (left padding, position ids, temperature)."""
    cfg = _cfg(tiny_dir, tmp_path)
    policy = load_policy(cfg.model, cfg.lora)
    tok = policy.tokenizer
    convs = [[{"role": "user", "content": "I feel awful."}],
             [{"role": "user",
               "content": "I'm confused about why they let me go and not the others. Also, what to do now?"}]]
    prompts = encode_prompts(tok, convs, 0)
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    torch.manual_seed(0)
    ids = torch.full((2, max(map(len, prompts))), tok.pad_token_id)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, ids.shape[1] - len(p):] = torch.tensor(p)
        att[i, ids.shape[1] - len(p):] = 1
    with torch.no_grad():
        out = policy.model.generate(
            input_ids=ids, attention_mask=att, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            output_scores=True, return_dict_in_generate=True,
        )
    gen_logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
    responses = out.sequences[:, ids.shape[1]:].tolist()
    batch = collate_turns(prompts, responses, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp, _ = response_logprobs(policy.model, batch, temperature)
    expected = gen_logp.gather(-1, torch.tensor(responses).unsqueeze(-1)).squeeze(-1)
    m = batch.response_mask.bool()
    assert torch.allclose(logp[m], expected[m], atol=1e-4)


def test_generate_replies_stop_at_end_of_turn(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path)
    policy = load_policy(cfg.model, cfg.lora)
    prompts = encode_prompts(policy.tokenizer, [[{"role": "user", "content": "hello"}]] * 4, 0)
    torch.manual_seed(1)
    replies = generate_replies(policy, prompts, temperature=1.0, max_new_tokens=12)
    eos = policy.tokenizer.eos_token_id
    for r in replies:
        assert 1 <= len(r) <= 12
        assert eos not in r[:-1]
    greedy = generate_replies(policy, prompts[:2], temperature=0.0, max_new_tokens=5)
    assert greedy[0] == greedy[1]


def _perturbed_policy(tiny_dir, tmp_path):
    """A policy whose adapter is not the identity (lora_B starts at zero)."""
    cfg = _cfg(tiny_dir, tmp_path)
    policy = load_policy(cfg.model, cfg.lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return policy


def _prompts(policy, n=6):
    texts = ["I feel awful.", "I'm confused about why they let me go and not the others.",
             "It's been a rough few days. I don't know where to start with the bills this month.", "hello"]
    return encode_prompts(policy.tokenizer, [[{"role": "user", "content": texts[i % 4]}] for i in range(n)], 0)


def test_sampling_loop_decodes_greedily_as_generate(tiny_dir, tmp_path):
    policy = _perturbed_policy(tiny_dir, tmp_path)
    prompts = _prompts(policy)
    ours = generate_replies(policy, prompts, temperature=0.0, max_new_tokens=10, sampler="mica")
    theirs = generate_replies(policy, prompts, temperature=0.0, max_new_tokens=10, sampler="hf")
    assert ours == theirs
    with pytest.raises(ValueError, match="sampler"):
        generate_replies(policy, prompts, sampler="vllm")


class _FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are always ``logits``."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        from types import SimpleNamespace

        out = self.logits.expand(input_ids.shape[0], 1, -1)
        return SimpleNamespace(logits=out, cache=cache if cache is not None else "cache")


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)])
def test_sampling_loop_draws_the_tempered_nucleus(temperature, top_p):
    """Inverse-CDF sampling reproduces softmax(logits / T), restricted to the nucleus as
    transformers' TopPLogitsWarper restricts it; log-probs are those of softmax(logits / T)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from mica_train.policy import _sample_batch

    probs = torch.tensor([0.5, 0.25, 0.15, 0.1 - 1e-4, 1e-4])
    logits = probs.log()
    n = 20_000
    torch.manual_seed(0)
    ids, mask = torch.zeros((n, 2), dtype=torch.long), torch.ones((n, 2), dtype=torch.long)
    new, logp, ent = _sample_batch(_FixedLogits(logits), ids, mask, temperature=temperature, top_p=top_p,
                                   max_new_tokens=1, eos=99, pad=98, with_logprobs=True)
    scores = logits / temperature
    expected = TopPLogitsWarper(top_p)(None, scores.unsqueeze(0)).softmax(-1)[0]
    freq = torch.bincount(new[:, 0], minlength=5).double() / n
    assert torch.allclose(freq, expected.double(), atol=0.015), (freq, expected)
    tempered = torch.log_softmax(scores, -1)
    assert torch.allclose(logp[:, 0], tempered[new[:, 0]])
    assert torch.allclose(ent[:, 0], -(tempered.exp() * tempered).sum().expand(n))


@pytest.mark.parametrize("sampler", ["mica", "hf"])
def test_rollout_logprobs_equal_a_forward_pass(tiny_dir, tmp_path, sampler):
    """The log-probs and entropies recorded while sampling equal those of a fresh forward pass
    over the padded turn batch (another padding, rows reordered) up to float rounding, with
    the adapter merged for generation or not: they can stand in for PPO's old log-probs."""
    policy = _perturbed_policy(tiny_dir, tmp_path)
    prompts = _prompts(policy, 8)
    for merged in (False, True):
        torch.manual_seed(0)
        with policy.merged_adapter() if merged else torch.no_grad():
            replies, logps, ents = generate_replies(policy, prompts, temperature=0.8, max_new_tokens=12,
                                                    with_logprobs=True, sampler=sampler)
        order = list(reversed(range(len(prompts))))
        batch = collate_turns([prompts[i] for i in order], [replies[i] for i in order],
                              policy.tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            ref, ref_ent = response_logprobs(policy.model, batch, 0.8, with_entropy=True)
        for j, i in enumerate(order):
            n = len(replies[i])
            assert len(logps[i]) == len(ents[i]) == n
            assert torch.allclose(ref[j, :n], torch.tensor(logps[i]), atol=1e-4, rtol=0)
            assert torch.allclose(ref_ent[j, :n], torch.tensor(ents[i]), atol=1e-4, rtol=0)


def test_merged_adapter_is_exact_and_restores_the_base(tiny_dir, tmp_path):
    policy = _perturbed_policy(tiny_dir, tmp_path)
    model = policy.model
    batch = collate_turns(_prompts(policy, 4), [[5, 6, 7]] * 4, policy.tokenizer.pad_token_id, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged, _ = response_logprobs(model, batch)
        with policy.merged_adapter():
            merged, _ = response_logprobs(model, batch)
            changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        after, _ = response_logprobs(model, batch)
    assert changed and all("base_layer" in k for k in changed)   # merged into the base weights
    assert torch.allclose(merged, unmerged, atol=1e-5)
    for k, v in model.state_dict().items():                       # restored bit for bit
        assert torch.equal(v, before[k]), k
    assert torch.equal(after, unmerged)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_lora_invariant_after_two_steps(tiny_dir, tmp_path):
    """Two PPO steps: every base weight unchanged, every adapter weight changed (lora_A has a
    zero gradient at the first update, lora_B starting at zero, hence two steps)."""
    from safetensors.torch import load_file

    from mica_train.trainer import Trainer

    cfg = _cfg(tiny_dir, tmp_path / "run", "steps=2", "tensorboard=false", "plot=false")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.named_trainable_state().items()}
    assert before and all("lora_" in k for k in before)
    trainer.train()
    after = trainer.policy.named_trainable_state()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    base = load_file(str(tiny_dir / "model.safetensors"))
    state = trainer.policy.model.get_base_model().state_dict()
    seen = 0
    for name, value in state.items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        if key in base:
            assert torch.equal(value, base[key]), key
            seen += 1
    assert seen == len(base)


def test_trajectory_table_and_advantages(tiny_dir, tmp_path):
    """G rollouts per scenario, one row per turn with the exact token spans, and the advantage
    is mica_core's on that table."""
    import numpy as np

    import mica_core as mc
    from mica_train.rollout import trajectory_table
    from mica_train.trainer import Trainer

    cfg = _cfg(tiny_dir, tmp_path / "run", "tensorboard=false", "advantage.estimator=mapo")
    trainer = Trainer(cfg)
    torch.manual_seed(0)
    records = trainer.rollout(1)
    assert len(records) == cfg.data.scenarios_per_step * cfg.data.group_size
    table = trajectory_table(records)
    assert table.column_names == ["group_id", "traj_id", "turn", "distance", "initial_distance",
                                  "prompt_ids", "response_ids", "reply", "logprobs", "entropies"]
    for ids, lp in zip(table.column("response_ids").to_pylist(), table.column("logprobs").to_pylist()):
        assert len(lp) == len(ids) and all(x <= 0 for x in lp)
    groups = table.column("group_id").to_numpy()
    trajs = table.column("traj_id").to_numpy()
    turns = table.column("turn").to_numpy()
    assert sorted(set(groups)) == list(range(cfg.data.scenarios_per_step))
    for t in set(trajs):
        assert list(turns[trajs == t]) == list(range((trajs == t).sum()))
        assert len(set(groups[trajs == t])) == 1
    tok = trainer.policy.tokenizer
    for ids, text in zip(table.column("response_ids").to_pylist(), table.column("reply").to_pylist()):
        assert 1 <= len(ids) <= cfg.rollout.max_new_tokens
        assert tok.decode(ids, skip_special_tokens=True).strip() == text
    adv, out = trainer.advantages(table)
    expected = mc.compute_advantages(table.select(["group_id", "traj_id", "turn", "distance", "initial_distance"]),
                                     estimator="mapo")
    np.testing.assert_array_equal(adv, expected.column("advantage").to_numpy())
    np.testing.assert_array_equal(out.column("reward").to_numpy(), expected.column("reward").to_numpy())


def test_gradient_checkpointing_step(tiny_dir, tmp_path):
    from mica_train.trainer import Trainer

    cfg = _cfg(tiny_dir, tmp_path / "run", "steps=1", "tensorboard=false", "plot=false",
               "model.gradient_checkpointing=true")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.named_trainable_state().items()}
    rec = trainer.train()
    assert rec["step"] == 1 and not trainer.policy.model.training
    after = trainer.policy.named_trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _one_step(tiny_dir, run_dir, *extra):
    from mica_train.trainer import Trainer

    cfg = _cfg(tiny_dir, run_dir, "steps=1", "tensorboard=false", "plot=false", "loss.kl_coef=0", *extra)
    trainer = Trainer(cfg)
    rec = trainer.train()
    return {k: v.clone() for k, v in trainer.policy.named_trainable_state().items()}, rec


def test_fast_paths_train_as_the_slow_ones(tiny_dir, tmp_path):
    """Without a KL term the reference pass is skipped and changes nothing but the metric; old
    log-probs taken from the rollout instead of a forward pass, or an adapter merged for
    generation, move the update only by float rounding (same samples: hf sampler)."""
    slow, rec_slow = _one_step(tiny_dir, tmp_path / "slow", "loss.kl_metric=true", "loss.old_logprobs=recompute",
                               "rollout.merge_lora=false", "rollout.sampler=hf")
    no_ref, rec_no_ref = _one_step(tiny_dir, tmp_path / "no_ref", "loss.old_logprobs=recompute",
                                   "rollout.merge_lora=false", "rollout.sampler=hf")
    assert "kl" in rec_slow and "kl" not in rec_no_ref
    assert all(torch.equal(slow[k], no_ref[k]) for k in slow)
    reused, rec_reused = _one_step(tiny_dir, tmp_path / "reused", "rollout.merge_lora=false", "rollout.sampler=hf")
    merged, _ = _one_step(tiny_dir, tmp_path / "merged", "rollout.sampler=hf")
    for other in (reused, merged):
        assert all(torch.allclose(slow[k], other[k], atol=1e-5, rtol=0) for k in slow)
    assert rec_reused["turns"] == rec_slow["turns"]
    for key in ("ppo_kl", "entropy", "loss"):
        assert rec_reused[key] == pytest.approx(rec_slow[key], abs=1e-5), key
