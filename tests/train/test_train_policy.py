"""The tiny model, the chat template's assistant mask, batch layout, log-probs consistent with
generation, and the LoRA invariant (base frozen, every adapter weight trained)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

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
from train_helpers import write_small_tiny_model

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
    convs = [[{"role": "user", "content": "I feel awful."}], [{"role": "user", "content": "I'm confused about why they let me go and not the others. Also, what to do now?"}]]
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
                                  "prompt_ids", "response_ids", "reply"]
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
