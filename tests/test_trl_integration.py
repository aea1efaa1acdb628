"""mica's per-turn advantages inside a real TRL GRPO run (CPU, the tiny offline model).

The trainer runs as users run it: ``MicaGRPOTrainer(...).train()`` with a ``rollout_func`` that
generates multi-turn conversations with the policy itself (assistant turns separated by
simulated user messages, ``env_mask`` 0 on those). A subclass records the inputs of TRL's
``_compute_loss`` (what the loss actually multiplied), and every assistant token's advantage is
compared with ``mica_core.estimate`` on the per-turn values the rollout produced.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import trl  # pinned in requirements/ci.txt: without it these tests fail, they do not skip
from datasets import Dataset

import mica_core as mc
from mica_core.integrations.trl import (
    MicaGRPOConfig,
    MicaGRPOTrainer,
    collect_turn_signals,
    mica_options,
    token_advantages,
)

G = 4  # num_generations
SCENARIOS = {"I failed my exam": 3.0, "My dog is sick": 2.2}  # prompt -> initial distance


@pytest.fixture(scope="module")
def tokenizer():
    from mica_train.tiny import train_tokenizer

    texts = [f"I hear you, that sounds hard ({i}). What happened next? case go on"
             for i in range(150)]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # A 64-wide model gains nothing from intra-op threads, and on a busy 2-core machine
    # spinning threads made each training run several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(tokenizer):
    from mica_train.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(tokenizer, TinyModelConfig(hidden_size=64, intermediate_size=128))


def dataset():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "initial_distance": d}
                              for p, d in SCENARIOS.items()])


def config_kwargs(**kw):
    base = dict(output_dir="out", per_device_train_batch_size=4, num_generations=G,
                steps_per_generation=2, max_steps=4, max_completion_length=96, bf16=False,
                use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                learning_rate=1e-2, gradient_checkpointing=False, seed=0)
    base.update(kw)
    return base


def config(**kw):
    return MicaGRPOConfig(**config_kwargs(**kw))


class Rollout:
    """A multi-turn rollout with the policy: 1-3 assistant turns, a simulated user after each.

    Every completion ends with the user's reaction (tokens outside any turn) naming its case
    number, so completions are unique and can be found again in the loss inputs. Records, per
    generation batch, each completion's tokens, its assistant spans and per-turn values.
    """

    def __init__(self, tokenizer, *, signal="distance", tool_inside_turn=False, truncate=(),
                 seed=0, keys=False):
        self.tok = tokenizer
        self.signal = signal
        self.keys = keys  # also hand a key per turn (turn_keys), for keyed estimators
        self.tool_inside_turn = tool_inside_turn
        self.truncate = set(truncate)  # case numbers whose last reply is cut (no final user turn)
        self.rng = np.random.default_rng(seed)
        self.batches = []
        self.case = 0

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def __call__(self, prompts, trainer):
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": []}
        rows = []
        for p in prompts:
            self.case += 1
            prompt_ids = list(self.tok.apply_chat_template(p, add_generation_prompt=True,
                                                           tokenize=True)["input_ids"])
            n_turns = int(self.rng.integers(1, 4))
            ids, mask, spans, starts, values = [], [], [], [], []
            for t in range(n_turns):
                starts.append(len(ids))
                pieces = 2 if self.tool_inside_turn and t == 0 else 1
                for piece in range(pieces):
                    with torch.no_grad():
                        gen = trainer.model.generate(torch.tensor([prompt_ids + ids]),
                                                     max_new_tokens=5, do_sample=True)
                    reply = gen[0, len(prompt_ids) + len(ids):].tolist()
                    spans.append((t, len(ids), len(ids) + len(reply)))
                    ids += reply
                    mask += [1] * len(reply)
                    if piece < pieces - 1:  # a tool result inside the turn
                        tool = self.encode(f"\n<|im_start|>tool\nok {self.case}<|im_end|>\n"
                                           f"<|im_start|>assistant\n")
                        ids += tool
                        mask += [0] * len(tool)
                values.append(self.rng.uniform(0.0, 3.0, size=3) - 2.0 if self.signal == "state"
                              else float(self.rng.uniform(0.0, 3.0)))
                last = t == n_turns - 1
                if last and self.case in self.truncate:
                    if ids[-1] == self.tok.eos_token_id:  # cut the reply before its end
                        ids[-1] = self.encode("x")[0]
                    break
                user = self.encode(f"\n<|im_start|>user\ncase {self.case} turn {t}<|im_end|>"
                                   + ("" if last else "\n<|im_start|>assistant\n"))
                ids += user
                mask += [0] * len(user)
            out["prompt_ids"].append(prompt_ids)
            out["completion_ids"].append(ids)
            out["env_mask"].append(mask)
            rows.append({"ids": tuple(ids), "spans": spans, "starts": starts,
                         "values": values, "prompt": p[-1]["content"],
                         "truncated": self.case in self.truncate,
                         "keys": [f"k{int(self.rng.integers(0, 2))}" for _ in values]})
        self.batches.append(rows)
        key = {"distance": "turn_distances", "state": "turn_states", "reward": "turn_rewards"}
        out[key[self.signal]] = [r["values"] for r in rows]
        if self.tool_inside_turn:
            out["turn_starts"] = [r["starts"] for r in rows]
        if self.keys:
            out["turn_keys"] = [r["keys"] for r in rows]
        return out


class RecordingTrainer(MicaGRPOTrainer):
    """Records the batches TRL's loss receives, as it receives them."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.loss_inputs = []

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: (v.detach().clone() if torch.is_tensor(v) else v)
                                 for k, v in inputs.items()})
        return super()._compute_loss(model, inputs)


def expected_turn_advantages(rows, **options):
    """mica_core.estimate on the rollout's own per-turn values, one group per G completions."""
    counts = [len(r["values"]) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    group = np.arange(len(rows)) // G
    if isinstance(rows[0]["values"][0], np.ndarray):  # states
        distance = mc.distance_from_state(np.concatenate([np.stack(r["values"]) for r in rows]))
        init = mc.distance_from_state(np.stack([np.full(3, -3.0)] * len(rows)))
        res = mc.estimate(offsets, group, distance=distance, initial_distance=init, **options)
    else:
        res = mc.estimate(offsets, group, distance=np.concatenate([r["values"] for r in rows]),
                          initial_distance=[SCENARIOS[r["prompt"]] for r in rows],
                          key=np.concatenate([r["keys"] for r in rows]), **options)
    return [res.advantage[offsets[i]:offsets[i + 1]] for i in range(len(rows))]


def check_loss_advantages(trainer, rollout, **options):
    """Every recorded loss row: turn k's tokens carry mica's turn-k advantage, others 0."""
    expected = {}
    for rows in rollout.batches:
        for row, adv in zip(rows, expected_turn_advantages(rows, **options), strict=True):
            assert row["ids"] not in expected  # completions are unique by construction
            expected[row["ids"]] = (row, adv)
    seen = set()
    for inputs in trainer.loss_inputs:
        adv = inputs["advantages"]
        assert adv.dtype == torch.float32 and adv.shape == inputs["completion_ids"].shape
        for b in range(adv.shape[0]):
            n = int(inputs["completion_mask"][b].sum())
            ids = tuple(inputs["completion_ids"][b, :n].tolist())
            if n == 0:  # removed by mask_truncated_completions: no loss, no advantage
                assert not adv[b].any()
                continue
            row, turn_adv = expected[ids]
            seen.add(ids)
            want = torch.zeros(adv.shape[1], dtype=torch.float64)
            on_turn = torch.zeros(adv.shape[1], dtype=torch.bool)
            for t, s, e in row["spans"]:
                want[s:e] = turn_adv[t]
                on_turn[s:e] = True
            torch.testing.assert_close(adv[b].double(), want, rtol=1e-6, atol=1e-6)
            assert not adv[b][~on_turn].any()  # user/tool/padding tokens: exactly 0
            loss_mask = inputs["completion_mask"][b] * inputs["tool_mask"][b]
            assert torch.equal(loss_mask.bool(), on_turn)  # the loss sums over the turns only
    return seen


@pytest.mark.slow
def test_grpo_run_uses_mica_turn_advantages(tokenizer):
    """mica (IDR) from rollout distances + a dataset column, 2 generations x 2 optimizer steps."""
    model = tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rollout = Rollout(tokenizer)
    trainer = RecordingTrainer(model=model, args=config(), train_dataset=dataset(),
                               processing_class=tokenizer, rollout_func=rollout)
    trainer.train()

    assert trainer.state.global_step == 4
    assert len(rollout.batches) == 2 and len(trainer.loss_inputs) == 4
    seen = check_loss_advantages(trainer, rollout, estimator="mica")
    assert len(seen) == 16  # every completion of both generation batches reached the loss
    counts = [len(r["values"]) for rows in rollout.batches for r in rows]
    assert max(counts) > 1 and min(counts) == 1  # multi-turn and ragged
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    logged = list(trainer._logs["advantages"])  # one list of turn advantages per completion
    assert [len(a) for a in logged] == counts[-len(logged):]


@pytest.mark.slow
def test_gigpo_groups_turns_by_turn_keys(tokenizer):
    """TRL with a keyed estimator: gigpo's step groups come from the rollout's turn_keys."""
    rollout = Rollout(tokenizer, keys=True)
    trainer = RecordingTrainer(model=tiny_model(tokenizer),
                               args=config(mica_estimator="gigpo", max_steps=2),
                               train_dataset=dataset(), processing_class=tokenizer,
                               rollout_func=rollout)
    trainer.train()
    seen = check_loss_advantages(trainer, rollout, estimator="gigpo")
    assert len(seen) == 8
    # the key term matters: without keys, gigpo refuses in one line naming the field
    with pytest.raises(mc.MicaInputError, match="groups turns by a key") as err:
        collect_turn_signals({"turn_rewards": [[1.0]]}, 1, estimator="gigpo")
    assert err.value.column == "turn_keys" and "\n" not in str(err.value)


@pytest.mark.slow
def test_states_turn_starts_truncation_and_options(tokenizer):
    """turn_signals_func with support states, a tool result inside a turn (turn_starts),
    a truncated completion under mask_truncated_completions, num_iterations=2, loss grpo,
    scale_rewards='none' mapped to mica's scale='none', and mica_turn."""
    rollout = Rollout(tokenizer, signal="state", tool_inside_turn=True, truncate={2})

    def states(prompts, completions, completion_ids, turn_states, **kwargs):
        assert "trainer_state" in kwargs and len(turn_states) == len(prompts)
        return {"turn_states": turn_states, "initial_state": [[-3.0] * 3] * len(prompts)}

    args = config(mica_estimator="mica_turn", scale_rewards="none", loss_type="grpo",
                  num_iterations=2, max_steps=2, mask_truncated_completions=True)
    trainer = RecordingTrainer(model=tiny_model(tokenizer), args=args,
                               train_dataset=dataset(), processing_class=tokenizer,
                               rollout_func=rollout, turn_signals_func=states)
    trainer.train()

    assert trainer.state.global_step == 2 and len(trainer.loss_inputs) == 2
    seen = check_loss_advantages(trainer, rollout, estimator="mica_turn", scale="none")
    assert len(seen) == 7  # the truncated completion (case 2) reached the loss with no tokens
    truncated = [r for r in rollout.batches[0] if r["truncated"]]
    assert len(truncated) == 1 and truncated[0]["ids"] not in seen
    # a tool result inside turn 0 makes more runs of ones than turns in every completion
    assert all(len(r["spans"]) == len(r["values"]) + 1 for r in rollout.batches[0])


@pytest.mark.slow
def test_grpo_preset_reproduces_trls_own_advantages(tokenizer):
    """One-turn completions, mica's ``grpo`` with TRL's epsilon: the loss gets TRL's numbers."""

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 7) for c in completions]

    def turn_rewards(prompts, completions, completion_ids, **kwargs):
        return {"turn_rewards": [[r] for r in reward(completions)]}

    class RecordingGRPO(trl.GRPOTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.loss_inputs = []

        def _compute_loss(self, model, inputs):
            self.loss_inputs.append({k: v.clone() for k, v in inputs.items()
                                     if torch.is_tensor(v)})
            return super()._compute_loss(model, inputs)

    common = dict(reward_funcs=reward, train_dataset=dataset(), processing_class=tokenizer)
    kw = dict(max_steps=2, steps_per_generation=1, per_device_train_batch_size=8,
              max_completion_length=8)
    plain = RecordingGRPO(model=tiny_model(tokenizer), args=trl.GRPOConfig(
        **config_kwargs(**kw)), **common)
    plain.train()
    ours = RecordingTrainer(model=tiny_model(tokenizer), turn_signals_func=turn_rewards,
                            args=config(mica_estimator="grpo", mica_eps=1e-4, **kw), **common)
    ours.train()

    trl_adv = {}
    for inputs in plain.loss_inputs:
        for b in range(inputs["advantages"].shape[0]):
            n = int(inputs["completion_mask"][b].sum())
            trl_adv[tuple(inputs["completion_ids"][b, :n].tolist())] = inputs["advantages"][b]
    matched = 0
    for inputs in ours.loss_inputs:
        for b in range(inputs["advantages"].shape[0]):
            n = int(inputs["completion_mask"][b].sum())
            key = tuple(inputs["completion_ids"][b, :n].tolist())
            if key in trl_adv:
                matched += 1
                torch.testing.assert_close(inputs["advantages"][b, :n],
                                           trl_adv[key].expand(n), rtol=1e-5, atol=1e-5)
                assert not inputs["advantages"][b, n:].any()
    assert matched == 16  # same seed, same generations: every completion compared
    assert any(v.abs().max() > 0.1 for v in trl_adv.values())


# --- bad input: a one-line MicaInputError naming the row -------------------------------------

class BrokenRollout(Rollout):
    def __init__(self, tokenizer, breaker):
        super().__init__(tokenizer)
        self.breaker = breaker

    def __call__(self, prompts, trainer):
        out = super().__call__(prompts, trainer)
        self.breaker(out)
        return out


def _run_until_error(tokenizer, breaker):
    trainer = MicaGRPOTrainer(model=tiny_model(tokenizer), args=config(max_steps=1),
                              train_dataset=dataset(), processing_class=tokenizer,
                              rollout_func=BrokenRollout(tokenizer, breaker))
    with pytest.raises(mc.MicaInputError) as err:
        trainer.train()
    assert "\n" not in str(err.value)
    return err.value


@pytest.mark.slow
def test_completion_without_assistant_tokens_gets_zero(tokenizer):
    """An aborted completion (no loss token) trains with advantage 0 instead of stopping."""
    def no_assistant_tokens(out):
        out["env_mask"][5] = [0] * len(out["env_mask"][5])

    trainer = RecordingTrainer(model=tiny_model(tokenizer), args=config(max_steps=1),
                               train_dataset=dataset(), processing_class=tokenizer,
                               rollout_func=BrokenRollout(tokenizer, no_assistant_tokens))
    trainer.train()
    assert trainer.state.global_step == 1
    rows = [inputs["advantages"][b] for inputs in trainer.loss_inputs
            for b in range(inputs["advantages"].shape[0])
            if not (inputs["completion_mask"][b] * inputs["tool_mask"][b]).any()]
    assert len(rows) == 1 and not rows[0].any()


@pytest.mark.slow
def test_per_turn_list_of_wrong_length_names_the_row(tokenizer):
    def one_value_too_many(out):
        out["turn_distances"][3] = list(out["turn_distances"][3]) + [0.5]

    err = _run_until_error(tokenizer, one_value_too_many)
    assert (err.column, err.row, err.rule) == ("turn_distances", 3, "one value per turn")
    assert "row 3" in str(err)


# --- the pieces, without a trainer -----------------------------------------------------------

def test_token_advantages_runs_of_ones_and_explicit_starts():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1],
                         [0, 1, 1, 1, 0, 0, 0, 0]])
    out = token_advantages([0.5, -1.0, 2.0, 3.0], [3, 1], mask)
    assert out.tolist() == [[0.5, 0.5, 0, 0, -1.0, 0, 2.0, 2.0], [0, 3.0, 3.0, 3.0, 0, 0, 0, 0]]
    # explicit starts: row 0 has two turns, the second from token 4 with a gap (tool) inside
    out = token_advantages([0.5, -1.0, 3.0], [2, 1], mask, turn_starts=[[0, 3], [1]])
    assert out.tolist() == [[0.5, 0.5, 0, 0, -1.0, 0, -1.0, -1.0], [0, 3.0, 3.0, 3.0, 0, 0, 0, 0]]


@pytest.mark.parametrize("kwargs, counts, column, row, rule", [
    ({}, [2, 1], "turn_distances", 0, "one value per turn"),
    ({"row_offset": 8}, [3, 2], "turn_distances", 9, "one value per turn"),
    ({"turn_starts": [[1, 3], [1]]}, [2, 1], "turn_starts", 0,
     "every assistant token belongs to a turn"),
    ({"turn_starts": [[0, 2, 3], [1]]}, [3, 1], "turn_starts", 0, "a token per turn"),
    ({"turn_starts": [[0], [1, 6]]}, [1, 2], "turn_starts", 1, "a token per turn"),
])
def test_token_advantages_errors(kwargs, counts, column, row, rule):
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1],
                         [0, 1, 1, 1, 0, 0, 0, 0]])
    with pytest.raises(mc.MicaInputError) as err:
        token_advantages(np.zeros(sum(counts)), counts, mask, **kwargs)
    assert (err.value.column, err.value.row, err.value.rule) == (column, row, rule)


def test_token_advantages_no_assistant_token_and_skipped_rows():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # an empty (aborted) completion gets 0, not an error
    assert token_advantages([1.0, 2.0], [1, 1], mask).tolist() == [[1.0, 1.0, 0.0],
                                                                    [0.0, 0.0, 0.0]]
    out = token_advantages([1.0, 2.0], [1, 1], mask, skip_rows=torch.tensor([False, True]))
    assert out.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("fields, column, row, rule", [
    ({"turn_distances": [[1.0], [2.0]]}, "initial_distance", None, "required"),
    ({"turn_distances": [[1.0], None]}, "turn_distances", 1, "a value per completion"),
    ({"turn_distances": [[1.0], [0.5, float("nan")]]}, "turn_distances", 1, "finite"),
    ({"turn_distances": [[1.0], [0.5, -0.1]]}, "turn_distances", 1, "non-negative"),
    ({"turn_distances": [[1.0], ["x"]]}, "turn_distances", 1, "numbers"),
    ({"turn_distances": [[1.0], [1.0]], "initial_distance": [1.0, -2.0]},
     "initial_distance", 1, "non-negative"),
    ({"turn_distances": [[1.0], [1.0]], "initial_distance": [1.0, [2.0, 3.0]]},
     "initial_distance", 1, "shape"),
    ({"turn_distances": [[1.0]]}, "turn_distances", None, "one entry per completion"),
    ({"turn_rewards": [[1.0], [1.0]], "turn_distances": [[1.0], [1.0]]}, "turn_distances",
     None, "one per-turn signal"),
    ({"initial_distance": [1.0, 1.0]}, "turn_distances", None, "one per-turn signal"),
    ({"turn_states": [[[0.0, 1.0]], [[0.0, 1.0, 2.0]]]}, "turn_states", 1, "one state width"),
    ({"turn_rewards": [[1.0, 2.0], [1.0]], "turn_starts": [[0, 0], [0]]}, "turn_starts", 0,
     "increasing positions"),
    ({"turn_rewards": [[1.0, 2.0], [1.0]], "turn_starts": [[0, 4], [0, 2]]}, "turn_starts", 1,
     "one start per turn"),
])
def test_collect_turn_signals_errors(fields, column, row, rule):
    with pytest.raises(mc.MicaInputError) as err:
        collect_turn_signals(fields, 2)
    assert (err.value.column, err.value.row, err.value.rule) == (column, row, rule)
    assert "\n" not in str(err.value)


def test_collect_turn_signals_states_match_distance_from_state():
    states = [np.array([[-3.0, 0.0, -1.5]]), np.array([[-2.0, -2.0, 0.0], [0.0, 0.0, 0.0]])]
    sig = collect_turn_signals({"turn_states": states, "initial_state": [[-4.0, 0, 0]] * 2},
                               2, state_weights=[1.0, 2.0, 1.0])
    w = [1.0, 2.0, 1.0]
    np.testing.assert_allclose(sig.distance, mc.distance_from_state(np.concatenate(states), w))
    np.testing.assert_allclose(sig.initial_distance, [3.0, 3.0])
    assert sig.offsets.tolist() == [0, 1, 3] and sig.source == "turn_states"


def test_mica_options_map_trls():
    base = trl.GRPOConfig(output_dir="x", use_cpu=True, bf16=False)
    assert mica_options(base) == {"estimator": "mica", "gamma": None, "weight": 0.5,
                                  "eps": 1e-6, "ddof": 1, "baseline": "mean", "scale": "std",
                                  "singleton": "zero"}
    none = trl.GRPOConfig(output_dir="x", use_cpu=True, bf16=False, scale_rewards=False)
    assert mica_options(none)["scale"] == "none"
    with pytest.raises(ValueError, match="scale_rewards='batch' has no mica equivalent"):
        mica_options(trl.GRPOConfig(output_dir="x", use_cpu=True, bf16=False,
                                    scale_rewards="batch"))
    ours = MicaGRPOConfig(output_dir="x", use_cpu=True, bf16=False, scale_rewards="batch",
                          mica_scale="std", mica_estimator="mapo", mica_gamma=0.9)
    assert mica_options(ours)["scale"] == "std" and mica_options(ours)["gamma"] == 0.9
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        mica_options(MicaGRPOConfig(output_dir="x", use_cpu=True, bf16=False,
                                    mica_estimator="nope"))


def test_mica_core_imports_without_trl():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import mica_core, mica_core.integrations.trl as t\n"
            "t.collect_turn_signals({'turn_rewards': [[1.0]]}, 1)\n"
            "try:\n    t.MicaGRPOTrainer\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("ImportError: MicaGRPOTrainer needs TRL: pip install 'mica-credit[trl]'")


@pytest.mark.slow
def test_docs_quick_start_runs(tmp_path):
    """docs/trl.md's quick start, run as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "trl.md").read_text()
    code = re.search(r"## Quick start.*?```python\n(.*?)```", doc, re.DOTALL).group(1)
    scope = {"__name__": "docs_trl_quick_start"}
    exec(compile(code, "docs/trl.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    assert [len(a) for a in trainer._logs["advantages"]] == [2] * 8
