"""mica's per-turn advantages through TRL's own tool loop (``environment_factory``), on a CPU.

TRL's ``GRPOTrainer`` generates, parses tool calls with the tokenizer's response template, runs
them on one environment instance per completion, appends the results (``tool_mask`` 0) and
generates again. The tiny offline model gets a tool-capable ChatML template and a short
supervised warm start so that it writes tool calls; the environment is a simulated listener
whose distance moves with what the policy says and which records it on every call
(``call_distances``). A subclass records the inputs of TRL's ``_compute_loss``; every token's
advantage is compared with ``mica_core.estimate`` on turn distances rebuilt here from the
completion's tokens and the listener's log (not from mica's alignment code).
"""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_trl_integration import _one_thread, _quiet  # noqa: F401 (autouse fixtures)

import mica_core as mc
from mica_core.integrations.trl import MicaGRPOConfig, MicaGRPOTrainer, turn_fields_from_calls

G = 4  # num_generations
SCENARIOS = {"I failed my exam": 3.0, "My dog is sick": 2.2}  # prompt -> initial distance
REPLIES = ["I hear you", "go on", "that sounds hard", "what happened next"]
CLOSINGS = ["take care", "I am here"]

# ChatML with tools: the tool list in a system line, an assistant's calls as
# <call NAME><KEY>VALUE</KEY></call> after its content, tool results as "tool" messages.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\ntools:' }}{% for tool in tools %}"
    "{{ ' ' + tool['function']['name'] }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<call ' + call['function']['name'] + '>' }}"
    "{% for key, value in call['function']['arguments'].items() %}"
    "{{ '<' + key + '>' + value|string + '</' + key + '>' }}{% endfor %}"
    "{{ '</call>' }}{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# transformers' response template for parse_response (what TRL parses generations with). Any
# text parses: an unknown tool or malformed arguments become a failed call, not a crash.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open_pattern": r"<call (?P<name>[^>]*)>", "close": "</call>", "repeats": True,
            "content": "xml-inline",
            "content_args": {"tag_pattern": r"<(?P<key>\w+)>(?P<value>.*?)</(?P=key)>"},
            "transform": {"type": "function",
                          "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


class Listener:
    """A simulated user reached through one tool, ``say``: each call moves the distance by an
    amount set by what was said. With ``mica_fields`` it keeps ``initial_distance`` and
    ``call_distances`` as attributes (read by mica); every call goes to a shared log."""

    mica_fields = True
    ids = itertools.count(1)
    log = {}  # reaction id -> (the distance after that call, the call's reward)

    def reset(self, initial_distance, **kwargs):
        self.start = self.distance = initial_distance
        self.calls = []  # this rollout's reaction ids, in call order
        if self.mica_fields:
            self.initial_distance, self.call_distances = initial_distance, []

    def say(self, text: str = "") -> str:
        """Say something to the user.

        Args:
            text: what to say.
        """
        before = self.distance
        self.distance = abs(before - 0.45 * (len(text) % 4 + 1))
        n = next(Listener.ids)
        Listener.log[n] = (self.distance, (before - self.distance) * (1 + len(text) % 3))
        self.calls.append(n)
        if self.mica_fields:
            self.call_distances.append(self.distance)
        return f"heard r{n}"


class QuietListener(Listener):
    """No mica attributes: a turn_signals_func hands each call's reward over as call_rewards."""

    mica_fields = False


def call_rewards(prompts, completions, completion_ids, environments, **kwargs):
    return {"call_rewards": [[Listener.log[n][1] for n in e.calls] for e in environments]}


@pytest.fixture(scope="module")
def tokenizer():
    from mica_train.tiny import train_tokenizer

    texts = [f"I hear you, that sounds hard ({i}). What happened next? case go on"
             for i in range(150)]
    texts += [f"<call say><text>{r}</text></call> heard r{i} tools: say take care I am here"
              for i, r in enumerate(REPLIES * 10)]
    tok = train_tokenizer(texts, vocab_size=400)
    tok.chat_template = TOOL_TEMPLATE
    tok.response_template = RESPONSE_TEMPLATE
    return tok


def _warm_conversation(rng):
    """A conversation as the policy should write it: 0-2 calls of say, then a closing reply."""
    messages = [{"role": "user", "content": rng.choice(list(SCENARIOS))}]
    for _ in range(rng.randint(0, 2)):
        call = {"type": "function", "function": {"name": "say",
                                                 "arguments": {"text": rng.choice(REPLIES)}}}
        messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "name": "say", "content": f"heard r{rng.randint(1, 60)}"}]
    return messages + [{"role": "assistant", "content": rng.choice(CLOSINGS)}]


@pytest.fixture(scope="module")
def tool_policy_state(tokenizer):
    """The tiny model after a short supervised warm start on tool-calling conversations
    (assistant tokens only), so that sampling writes calls of ``say`` and closing replies."""
    from transformers.utils import get_json_schema

    from mica_train.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=64, intermediate_size=128))
    rng = random.Random(0)
    tools = [get_json_schema(Listener.say)]
    data = []
    for _ in range(48):
        out = tokenizer.apply_chat_template(_warm_conversation(rng), tools=tools,
                                            return_dict=True, return_assistant_tokens_mask=True)
        data.append((out["input_ids"], out["assistant_masks"]))
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(80):
        batch = rng.sample(data, 8)
        width = max(len(ids) for ids, _ in batch)
        pad = [width - len(ids) for ids, _ in batch]
        ids = torch.tensor([i + [tokenizer.pad_token_id] * p for (i, _), p in zip(batch, pad)])
        labels = torch.tensor([[t if m else -100 for t, m in zip(i, mask)] + [-100] * p
                               for (i, mask), p in zip(batch, pad)])
        attention = torch.tensor([[1] * len(i) + [0] * p for (i, _), p in zip(batch, pad)])
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tool_policy(tokenizer, state):
    from mica_train.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=64, intermediate_size=128))
    model.load_state_dict(state)
    return model


def dataset():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "initial_distance": d}
                              for p, d in SCENARIOS.items()])


class RecordingTrainer(MicaGRPOTrainer):
    """Records each generation batch in order (tokens and the listeners' logs) and the batches
    TRL's loss receives, as it receives them."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.generated, self.loss_inputs = [], []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._ids = [tuple(ids) for ids in completion_ids_list]  # unpadded, before any masking
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rows = []
        for b, env in enumerate(self.environments):
            prompt = output["prompt_ids"][b][output["prompt_mask"][b].bool()]
            rows.append({"prompt": tuple(prompt.tolist()), "ids": self._ids[b],
                         "initial": env.start, "calls": list(env.calls)})
        self.generated.append(rows)
        return output

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: (v.detach().clone() if torch.is_tensor(v) else v)
                                 for k, v in inputs.items()})
        return super()._compute_loss(model, inputs)


def split_turns(tokenizer, ids):
    """A completion's assistant spans and the text of the tool block after each, from its
    tokens: the model's generation runs up to its <|im_end|>; a tool block runs from there to
    the next "<|im_start|>assistant\\n"."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    spans, blocks, start, j = [], [], 0, 0
    while j < len(ids):
        if ids[j] != end:
            j += 1
            continue
        spans.append((start, j + 1))
        k = j + 1
        while k < len(ids) and list(ids[k:k + len(header)]) != header:
            k += 1
        blocks.append(tokenizer.decode(ids[j + 1:k]))
        start = j = k + len(header)
    if start < len(ids):
        spans.append((start, len(ids)))  # cut by max_completion_length
    return spans, blocks


def expected_turns(tokenizer, row):
    """Turn spans, distances and rewards, from the completion's tokens and the listener's log:
    after a tool block, the distance at its last reaction and the sum of its rewards; a turn
    without a reaction keeps the distance before it and gets reward 0; calls the listener
    executed whose results TRL dropped count for the last turn."""
    spans, blocks = split_turns(tokenizer, row["ids"])
    calls = [[int(n) for n in re.findall(r"heard r(\d+)", blocks[k])] if k < len(blocks) else []
             for k in range(len(spans))]
    seen = [n for c in calls for n in c]
    assert seen == row["calls"][:len(seen)]
    calls[-1] += row["calls"][len(seen):]
    distances, rewards, d = [], [], row["initial"]
    for c in calls:
        d = Listener.log[c[-1]][0] if c else d
        distances.append(d)
        rewards.append(sum(Listener.log[n][1] for n in c))
    return spans, distances, rewards


ROUTES = {  # environment, turn_signals_func, mica options, expected signal, more config
    "call_distances attributes, mica": (Listener, None, {"estimator": "mica"}, "distance", {}),
    "call_rewards from turn_signals_func, mica_turn, truncated masked": (
        QuietListener, call_rewards, {"estimator": "mica_turn", "scale": "none"}, "reward",
        {"scale_rewards": "none", "mask_truncated_completions": True,
         "max_completion_length": 64}),
}


@pytest.mark.slow
@pytest.mark.parametrize("route", list(ROUTES))
def test_tool_loop_credits_each_turn(tokenizer, tool_policy_state, route):
    """environment_factory, per-call signals from the listeners; 2 generation batches x
    2 optimizer steps; every loss token has mica's advantage of its turn."""
    env, func, options, signal, more = ROUTES[route]
    Listener.ids = itertools.count(1)  # the same reactions whatever ran before
    args = MicaGRPOConfig(**{
        "output_dir": "out", "per_device_train_batch_size": 4, "num_generations": G,
        "steps_per_generation": 2, "max_steps": 4, "max_completion_length": 96,
        "max_tool_calling_iterations": 3, "bf16": False, "use_cpu": True, "report_to": [],
        "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-3,
        "gradient_checkpointing": False, "seed": 0, "mica_estimator": options["estimator"],
        **more})
    trainer = RecordingTrainer(model=tool_policy(tokenizer, tool_policy_state), args=args,
                               train_dataset=dataset(), processing_class=tokenizer,
                               environment_factory=env, turn_signals_func=func)
    trainer.train()
    assert trainer.state.global_step == 4
    assert len(trainer.generated) == 2 and len(trainer.loss_inputs) == 4

    expected = []  # per generation batch: (prompt, completion) -> token advantages, turn mask
    turn_counts, per_turn_spread = [], 0.0
    for rows in trainer.generated:
        turns = [expected_turns(tokenizer, r) for r in rows]
        counts = [len(t[1]) for t in turns]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        values = ({"distance": np.concatenate([t[1] for t in turns]),
                   "initial_distance": [r["initial"] for r in rows]} if signal == "distance"
                  else {"reward": np.concatenate([t[2] for t in turns])})
        res = mc.estimate(offsets, np.arange(len(rows)) // G, **options, **values)
        batch = {}
        for b, (row, (spans, _, _)) in enumerate(zip(rows, turns)):
            adv = res.advantage[offsets[b]:offsets[b + 1]]
            per_turn_spread = max(per_turn_spread, float(np.ptp(adv)))
            want = torch.zeros(len(row["ids"]), dtype=torch.float64)
            on_turn = torch.zeros(len(row["ids"]), dtype=torch.bool)
            for k, (s, e) in enumerate(spans):
                want[s:e] = adv[k]
                on_turn[s:e] = True
            key = (row["prompt"], row["ids"])
            if key in batch:  # the same completion twice in a group: the same advantages
                torch.testing.assert_close(batch[key][0], want)
            batch[key] = (want, on_turn)
        expected.append(batch)
        turn_counts += counts

    masked = 0
    for i, inputs in enumerate(trainer.loss_inputs):
        batch = expected[i // 2]  # steps_per_generation=2
        adv = inputs["advantages"]
        assert adv.dtype == torch.float32 and adv.shape == inputs["completion_ids"].shape
        for b in range(adv.shape[0]):
            n = int(inputs["completion_mask"][b].sum())
            if n == 0:  # removed by mask_truncated_completions: no loss, no advantage
                masked += 1
                assert not adv[b].any()
                continue
            prompt = inputs["prompt_ids"][b][inputs["prompt_mask"][b].bool()]
            key = (tuple(prompt.tolist()), tuple(inputs["completion_ids"][b, :n].tolist()))
            want, on_turn = batch[key]
            torch.testing.assert_close(adv[b, :n].double(), want, rtol=1e-6, atol=1e-6)
            assert not adv[b, n:].any()  # padding
            # the turns found from the tokens here are exactly what TRL's loss sums over
            loss_mask = (inputs["completion_mask"][b] * inputs["tool_mask"][b])[:n]
            assert torch.equal(loss_mask.bool(), on_turn)

    assert max(turn_counts) >= 3 and min(turn_counts) == 1  # tool loops of several calls
    assert per_turn_spread > 0.1  # turns of one completion got different advantages
    # the run went through every rule: failed calls (TRL's error result: no value, the turn
    # keeps its distance), calls whose results TRL dropped for length (their value goes to the
    # last turn) and completions cut by max_completion_length
    rows = [r for rows in trainer.generated for r in rows]
    blocks = [split_turns(tokenizer, r["ids"])[1] for r in rows]
    assert sum(b.count("{'error': ") for bs in blocks for b in bs) >= 1
    assert sum(sum(b.count("heard r") for b in bs) < len(r["calls"])
               for bs, r in zip(blocks, rows)) >= 1
    truncated = sum(r["ids"][-1] != tokenizer.eos_token_id for r in rows)
    assert truncated >= 1
    assert masked == (truncated if more.get("mask_truncated_completions") else 0)


@pytest.mark.slow
def test_call_fields_without_tool_loop_refused(tokenizer, tool_policy_state):
    """Per-call values in a run without tools: a one-line error, not a silent misalignment."""
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "call_rewards": [1.0]}
                              for p in SCENARIOS])
    args = MicaGRPOConfig(output_dir="out", per_device_train_batch_size=4, num_generations=G,
                          max_steps=1, max_completion_length=16, bf16=False, use_cpu=True,
                          report_to=[], save_strategy="no", gradient_checkpointing=False, seed=0)
    trainer = MicaGRPOTrainer(model=tool_policy(tokenizer, tool_policy_state), args=args,
                              train_dataset=data, processing_class=tokenizer)
    with pytest.raises(mc.MicaInputError) as err:
        trainer.train()
    assert (err.value.column, err.value.rule) == ("call_rewards", "tool loop")
    assert "\n" not in str(err.value) and "environment_factory" in str(err.value)


# --- per-call values to turns, without a trainer -------------------------------------------

def _call(name="say"):
    return {"type": "function", "function": {"name": name, "arguments": {}}}


def _assistant(*calls):
    return {"role": "assistant", "content": "", **({"tool_calls": list(calls)} if calls else {})}


def _tool(content="ok"):
    return {"role": "tool", "name": "say", "content": content}


FAILED = str({"error": "Tool sya not found."})  # what TRL writes for a failed call

ONE_CALL = [_assistant(_call()), _tool(), _assistant()]
COMPLETIONS = [
    [_assistant(_call()), _tool(), _assistant(_call(), _call()), _tool(), _tool(),
     _assistant()],                                              # 3 turns, 3 calls
    [_assistant()],                                              # no call at all
    [_assistant(_call("sya")), _tool(FAILED), _assistant(_call()), _tool(), _assistant()],
    [_assistant(_call()), _tool(), _assistant(_call())],          # last call's result dropped
]


def test_turn_fields_from_calls_distances_and_rewards():
    fields = {"call_distances": [[2.0, 1.5, 1.0], [], [0.5], [1.0, 0.2]],
              "initial_distance": [3.0, 2.0, 2.5, 3.0]}
    out = turn_fields_from_calls(fields, COMPLETIONS)
    assert "call_distances" not in out and out["initial_distance"] == fields["initial_distance"]
    assert out["turn_distances"] == [[2.0, 1.0, 1.0], [2.0], [2.5, 0.5, 0.5], [1.0, 0.2]]
    # the last call's result was dropped and the environment never ran it: one value fewer
    out = turn_fields_from_calls({**fields, "call_distances": [[2.0, 1.5, 1.0], [], [0.5],
                                                               [1.0]]}, COMPLETIONS)
    assert out["turn_distances"][3] == [1.0, 1.0]
    rewards = turn_fields_from_calls({"call_rewards": [[1.0, 0.5, -2.0], [], [0.5], [1, 2]]},
                                     COMPLETIONS)
    assert rewards["turn_rewards"] == [[1.0, -1.5, 0.0], [0.0], [0.0, 0.5, 0.0], [1.0, 2.0]]
    states = turn_fields_from_calls(
        {"call_states": [[[0, -1]], []], "initial_state": [[-2, -2], [-1, 0]]},
        [ONE_CALL, [_assistant()]])
    assert [np.asarray(s).tolist() for s in states["turn_states"][0]] == [[0, -1], [0, -1]]
    assert np.asarray(states["turn_states"][1]).tolist() == [[-1, 0]]


@pytest.mark.parametrize("fields, completions, column, row, rule", [
    ({"call_distances": [[1.0, 2.0]]}, [COMPLETIONS[0]], "call_distances", 0,
     "one value per executed tool call"),
    ({"call_distances": [[1.0, 2.0, 3.0, 4.0]]}, [COMPLETIONS[0]], "call_distances", 0,
     "one value per executed tool call"),
    ({"call_distances": [[1.0, 1.0, 1.0]]}, [COMPLETIONS[3]], "call_distances", 0,
     "one value per executed tool call"),
    ({"call_distances": [[]]}, [COMPLETIONS[1]], "initial_distance", 0,
     "a value before a turn without a call"),
    ({"call_distances": [[1.0], None], "initial_distance": [2.0, 2.0]},
     [COMPLETIONS[2], COMPLETIONS[1]], "call_distances", 1, "a value per completion"),
    ({"call_distances": [[float("nan")]]}, [ONE_CALL], "call_distances", 0,
     "finite"),
    ({"call_distances": [["x"]]}, [ONE_CALL], "call_distances", 0, "numbers"),
    ({"call_distances": [[0.5, -1.0]]}, [COMPLETIONS[3]], "call_distances", 0,
     "non-negative"),
    ({"call_distances": [[]], "initial_distance": [-1.0]}, [COMPLETIONS[1]], "initial_distance",
     0, "non-negative"),
    ({"call_states": [[]], "initial_state": [[0.0, float("inf")]]}, [COMPLETIONS[1]],
     "initial_state", 0, "finite"),
    ({"call_rewards": [[1.0]], "call_distances": [[1.0]]}, [COMPLETIONS[2]], "call_distances",
     None, "one per-turn signal"),
    ({"call_rewards": [[1.0]], "turn_rewards": [[1.0]]}, [COMPLETIONS[2]], "call_rewards",
     None, "one per-turn signal"),
    ({"call_rewards": [[1.0]]}, [COMPLETIONS[2], COMPLETIONS[2]], "call_rewards", None,
     "one entry per completion"),
    ({"call_rewards": [[1.0]]}, [[_tool(), _assistant()]], "completions", 0,
     "assistant and tool messages"),
])
def test_turn_fields_from_calls_errors(fields, completions, column, row, rule):
    with pytest.raises(mc.MicaInputError) as err:
        turn_fields_from_calls(fields, completions)
    assert (err.value.column, err.value.row, err.value.rule) == (column, row, rule)
    assert "\n" not in str(err.value)
