"""Persona cards: generation, the fixed evaluation set, JSONL files."""

import json
from collections import Counter

import pytest

from mica_core import MicaInputError
from mica_train.env import (
    Scenario,
    eval_scenarios,
    generate_scenarios,
    load_scenarios,
    save_scenarios,
)
from mica_train.env.scenarios import DIFFICULTY_BANDS, _build_eval_set


def _in_band(card):
    (dlo, dhi), (olo, ohi) = DIFFICULTY_BANDS[card.difficulty]
    s = dict(zip("CAP", card.initial_state))
    return dlo <= s[card.dominant] <= dhi and all(
        olo <= v <= ohi for a, v in s.items() if a != card.dominant)


def test_generation_is_seeded_and_balanced():
    a = generate_scenarios(63, seed=3)   # (dominant, difficulty) cycles every 9 cards
    assert a == generate_scenarios(63, seed=3)
    assert a != generate_scenarios(63, seed=4)
    assert generate_scenarios(10, seed=3) == a[:10]
    assert Counter((s.dominant, s.difficulty) for s in a) == {
        (d, k): 7 for d in "CAP" for k in ("easy", "medium", "hard")}
    assert len({s.id for s in a}) == 63
    for card in a:
        assert _in_band(card)
        assert min(card.initial_state) == card.initial_state["CAP".index(card.dominant)]
        assert set(card.needs) == {"C", "A", "P"}


def test_generation_can_fix_axis_and_difficulty():
    cards = generate_scenarios(12, seed=0, dominant="P", difficulty="hard", prefix="x")
    assert {(c.dominant, c.difficulty) for c in cards} == {("P", "hard")}
    assert cards[0].id == "x-0-0"
    with pytest.raises(MicaInputError, match="dominant"):
        generate_scenarios(3, dominant="Z")
    with pytest.raises(MicaInputError, match="n must be"):
        generate_scenarios(-1)


def test_eval_set_is_fixed_stratified_and_apart_from_training():
    ev = eval_scenarios()
    assert len(ev) == 30
    assert ev == _build_eval_set()   # the frozen file is what the generator made
    assert Counter(s.dominant for s in ev) == {"C": 10, "A": 10, "P": 10}
    for axis in "CAP":
        diffs = Counter(s.difficulty for s in ev if s.dominant == axis)
        assert diffs == {"easy": 3, "medium": 4, "hard": 3}
    assert all(_in_band(c) for c in ev)
    held_out = {tuple(c.rubric.values()) for c in ev}
    for seed in range(5):
        train = generate_scenarios(300, seed=seed)
        assert not held_out & {tuple(c.rubric.values()) for c in train}
    ev[0].rubric["C.1"] = 3   # callers get their own objects
    assert eval_scenarios()[0] == _build_eval_set()[0]


def test_save_load_roundtrip(tmp_path):
    cards = generate_scenarios(9, seed=1) + eval_scenarios()[:3]
    path = tmp_path / "cards.jsonl"
    save_scenarios(cards, path)
    assert load_scenarios(path) == cards
    assert len(path.read_text().splitlines()) == 12
    assert list(tmp_path.iterdir()) == [path]


def _write(tmp_path, lines):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = eval_scenarios()[0].to_dict()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("rubric"), "missing"),
    (lambda d: d["rubric"].update({"C.2": 4}), r"bad.jsonl:1: rubric: C.2 = 4 is out of range"),
    (lambda d: d["rubric"].pop("P.3"), "missing keys"),
    (lambda d: d.update(dominant="X"), "dominant"),
    (lambda d: d.update(dominant="A"), "deepest deficit"),
    (lambda d: d.update(difficulty="extreme"), "difficulty"),
    (lambda d: d.update(id=""), "'id'"),
    (lambda d: d["needs"].pop("A"), "needs"),
])
def test_invalid_card_names_line_and_field(tmp_path, mutate, match):
    bad = json.loads(json.dumps(GOOD))
    mutate(bad)
    with pytest.raises(MicaInputError, match=match):
        load_scenarios(_write(tmp_path, [json.dumps(bad)]))


def test_invalid_files(tmp_path):
    with pytest.raises(MicaInputError, match=r"bad.jsonl:2: not valid JSON"):
        load_scenarios(_write(tmp_path, [json.dumps(GOOD), "{oops"]))
    with pytest.raises(MicaInputError, match="duplicate scenario id"):
        load_scenarios(_write(tmp_path, [json.dumps(GOOD)] * 2))
    with pytest.raises(MicaInputError, match="no scenarios"):
        load_scenarios(_write(tmp_path, [""]))
    with pytest.raises(MicaInputError, match="JSON object"):
        load_scenarios(_write(tmp_path, ["[1, 2]"]))
    with pytest.raises(FileNotFoundError):
        load_scenarios(tmp_path / "missing.jsonl")


def test_scenario_is_hashable_by_id():
    a, b = eval_scenarios()[:2]
    assert len({a, b, Scenario.from_dict(a.to_dict())}) == 2
