"""The support-state engine: rubric tables and hand-computed episodes."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mica_core import MicaInputError
from mica_core.signals import distance_from_state
from mica_train.env import (
    INITIAL_KEYS,
    PROGRESS_KEYS,
    SupportTrajectory,
    initial_state,
    mean_increment,
    progress_increment,
    replay_episode,
)


def rubric0(**levels):
    r = dict.fromkeys(INITIAL_KEYS, 0)
    r.update({k.replace("_", "."): v for k, v in levels.items()})
    return r


def prog(**levels):
    r = dict.fromkeys(PROGRESS_KEYS, 0)
    r.update({k.replace("_", "."): v for k, v in levels.items()})
    return r


# ---------------------------------------------------------------- rubric tables
# EMPA's IED scoring key (Benchmark/epj/scoring.py, KAYA-HAI/EMPA-Benchmark-EPMSandbox):
# value of levels 1/2/3 per indicator.
EMPA_IED_KEY = {
    "C.1": (-2, -4, -6), "C.2": (-2, -4, -6), "C.3": (-3, -6, -9),
    "A.1": (-2, -4, -6), "A.2": (-4, -8, -12), "A.3": (-3, -6, -9),
    "P.1": (-2, -4, -6), "P.2": (-4, -8, -12), "P.3": (-3, -6, -9),
}


@pytest.mark.parametrize("key", INITIAL_KEYS)
def test_initial_indicator_values_follow_empas_scoring_key(key):
    i = "CAP".index(key[0])
    for level, value in zip((1, 2, 3), EMPA_IED_KEY[key]):
        s = initial_state(rubric0(**{key.replace(".", "_"): level}))
        assert s[i] == value and sum(s) == value
    assert initial_state(rubric0()) == (0, 0, 0)


def test_initial_axis_is_the_sum_of_its_indicators():
    r = rubric0(C_1=1, C_2=2, A_2=1, A_3=2, P_1=1, P_3=1)
    assert initial_state(r) == (-2 - 4, -4 - 6, -2 - 3)
    assert initial_state(dict.fromkeys(INITIAL_KEYS, 3)) == (-21, -27, -27)


def test_initial_weights_can_be_overridden():
    r = rubric0(C_1=3, C_3=3)
    assert initial_state(r, weights={"C.1": 2, "C.3": 2}) == (-12 - 12, 0, 0)
    assert initial_state(r) == (-6 - 9, 0, 0)
    with pytest.raises(MicaInputError, match="weight"):
        initial_state(r, weights={"C.1": 3})


def test_progress_and_setback_tables():
    assert progress_increment(prog()) == (0, 0, 0)
    assert progress_increment(prog(C_Prog=1, A_Prog=1, P_Prog=1)) == (1, 1, 1)
    assert progress_increment(prog(C_Prog=2, A_Prog=2, P_Prog=2)) == (3, 3, 3)
    assert progress_increment(prog(C_Neg=-1, A_Neg=-1, P_Neg=-1)) == (-2, -2, -2)
    assert progress_increment(prog(C_Neg=-2, A_Neg=-2, P_Neg=-2)) == (-4, -5, -5)
    assert progress_increment(prog(C_Prog=2, C_Neg=-2, A_Prog=1, A_Neg=-2)) == (-1, -4, 0)


@pytest.mark.parametrize("bad, match", [
    ({"C.Prog": 3}, "out of range"),
    ({"A.Neg": 1}, "out of range"),
    ({"P.Neg": -3}, "out of range"),
    ({"C.Prog": "2"}, "integer"),
    ({"C.Prog": True}, "integer"),
    ({"C.Prog": 1.5}, "integer"),
    ({"C.Prog": None}, "integer"),
])
def test_progress_rubric_out_of_range_is_an_error(bad, match):
    with pytest.raises(MicaInputError, match=match):
        progress_increment({**prog(), **bad})


def test_rubric_missing_key_and_non_object_are_errors():
    r = prog()
    del r["P.Neg"]
    with pytest.raises(MicaInputError, match="missing keys.*P.Neg"):
        progress_increment(r)
    with pytest.raises(MicaInputError, match="JSON object"):
        progress_increment([0] * 6)
    with pytest.raises(MicaInputError, match="out of range"):
        initial_state(rubric0(C_1=4))
    with pytest.raises(MicaInputError, match="out of range"):
        initial_state(rubric0(A_2=-1))


def test_integral_floats_and_extra_keys_are_accepted():
    assert progress_increment({**prog(C_Prog=2.0), "reason": "clear reframe"}) == (3, 0, 0)


# ---------------------------------------------------------------- hand-computed episodes
# P0 = (-10, -7, -6): C.1=1 (-4) + C.2=2 (-6); A.2=1 (-3) + A.3=2 (-4); P.1=1 (-4) + P.3=1 (-2)
INITIAL = rubric0(C_1=2, C_2=3, A_1=2, A_3=1, P_1=1, P_2=1)   # EMPA key: (-4-6, -4-3, -2-4)
NORM0 = math.sqrt(185)


def test_hand_computed_success_episode():
    traj = SupportTrajectory(initial_state(INITIAL), max_turns=6, min_turns=2)
    assert traj.initial_state == (-10, -7, -6)
    assert traj.initial_distance == pytest.approx(math.sqrt(81 + 36 + 25))
    assert traj.direction == pytest.approx((10 / NORM0, 7 / NORM0, 6 / NORM0))

    r1 = traj.apply_rubric(prog(C_Prog=2, A_Prog=1))            # (+3, +1, 0)
    assert r1.state == (-7, -6, -6) and r1.status == "running"
    assert r1.distance == pytest.approx(math.sqrt(36 + 25 + 25))
    assert r1.energy == pytest.approx(37 / NORM0)

    r2 = traj.apply_rubric(prog(C_Prog=2, A_Prog=2, P_Prog=2))  # (+3, +3, +3)
    assert r2.state == (-4, -3, -3) and r2.distance == pytest.approx(math.sqrt(17))
    assert r2.energy == pytest.approx(69 / NORM0)
    assert r2.status == "running"   # E = 106/|P0| < |P0|

    r3 = traj.apply_rubric(prog(C_Prog=2, A_Prog=2, P_Prog=2))
    # P3 = (-1, 0, 0): in the zone (distance 0), but P3.v0 = -10/|P0| = -0.735 < -0.05|P0| = -0.680
    assert r3.state == (-1, 0, 0) and r3.distance == 0.0
    assert r3.status == "running"

    r4 = traj.apply_rubric(prog(C_Prog=1))
    # P4 = 0: |P4| <= 0.05 |P0| and E = 185/|P0| = |P0| exactly
    assert r4.state == (0, 0, 0) and r4.cumulative_energy == pytest.approx(NORM0)
    assert r4.status == "success" and r4.done and traj.end_turn == 4
    assert traj.distances == pytest.approx([math.sqrt(86), math.sqrt(17), 0.0, 0.0])
    m = traj.metrics()
    assert m["pass"] and m["turns"] == 4 and m["positive_energy_ratio"] == 1.0
    with pytest.raises(RuntimeError, match="ended"):
        traj.apply((0, 0, 0))


def test_zone_success_rule_ends_where_empa_does_not():
    empa = SupportTrajectory((-10, -7, -6), max_turns=6, min_turns=1)
    zone = SupportTrajectory((-10, -7, -6), max_turns=6, min_turns=1, success="zone")
    for traj in (empa, zone):
        traj.apply((9, 7, 6))   # (-1, 0, 0)
    assert zone.status == "success" and empa.status == "running"


def test_success_waits_for_min_turns():
    traj = SupportTrajectory((-4, -4, -4), max_turns=15, min_turns=3)
    assert traj.apply((5, 5, 5)).status == "running"   # over the line at turn 1
    assert traj.apply((0, 0, 0)).status == "running"
    assert traj.apply((0, 0, 0)).status == "success" and traj.end_turn == 3


def test_failure_after_five_negative_energy_turns():
    traj = SupportTrajectory((-10, -7, -6), max_turns=15, min_turns=5)
    for _ in range(1, 5):
        assert traj.apply_rubric(prog(C_Neg=-1)).status == "running"
    rec = traj.apply_rubric(prog(C_Neg=-1))
    assert rec.status == "failure" and traj.end_turn == 5
    assert rec.energy == pytest.approx(-20 / NORM0)
    assert traj.metrics()["positive_energy_ratio"] == 0.0


def test_failure_streak_counts_before_min_turns_and_zero_energy_breaks_it():
    traj = SupportTrajectory((-10, -7, -6), max_turns=15, min_turns=7)
    for _ in range(6):
        assert traj.apply((-2, 0, 0)).status == "running"   # streak 6, but t < 7
    assert traj.apply((-2, 0, 0)).status == "failure"

    traj = SupportTrajectory((-10, -7, -6), max_turns=15, min_turns=1)
    for _ in range(4):
        traj.apply((-2, 0, 0))
    traj.apply((0, 0, 0))                                  # energy 0 breaks the streak
    for _ in range(4):
        assert traj.apply((-2, 0, 0)).status == "running"
    assert traj.apply((-2, 0, 0)).status == "failure"


def test_max_turns_end():
    traj = SupportTrajectory((-10, -7, -6), max_turns=3, min_turns=1)
    traj.apply((1, 0, 0))
    traj.apply((1, 0, 0))
    rec = traj.apply((1, 0, 0))
    assert rec.status == "max_turns" and traj.end_turn == 3 and not traj.metrics()["pass"]


def test_success_checked_before_max_turns():
    traj = SupportTrajectory((-3, 0, 0), max_turns=1, min_turns=1)
    assert traj.apply((3, 0, 0)).status == "success"


def test_unscored_turn_keeps_state_and_streak():
    traj = SupportTrajectory((-10, -7, -6), max_turns=15, min_turns=1)
    for _ in range(4):
        traj.apply((-2, 0, 0))
    rec = traj.apply((5, 5, 5), scored=False)
    assert rec.state == (-18, -7, -6) and rec.energy == 0.0 and not rec.scored
    assert traj.negative_streak == 4
    assert traj.apply((-2, 0, 0)).status == "failure"


def test_zero_initial_state_uses_the_uniform_direction():
    traj = SupportTrajectory((0, 0, 0), max_turns=3, min_turns=1)
    assert traj.initial_distance == 0.0
    assert traj.apply((0, 0, 0)).status == "success"
    traj = SupportTrajectory((0, 0, 0), max_turns=3, min_turns=1)
    assert traj.apply((-2, 0, 0)).status == "running"


@pytest.mark.parametrize("kwargs, match", [
    ({"max_turns": 0}, "max_turns"), ({"min_turns": 16}, "min_turns"),
    ({"success": "best"}, "success"), ({"epsilon": -1.0}, "epsilon"),
    ({"failure_streak": 0}, "failure_streak"),
])
def test_invalid_end_rule_is_an_error(kwargs, match):
    with pytest.raises(MicaInputError, match=match):
        SupportTrajectory((-1, -1, -1), **kwargs)


def test_invalid_increments_are_errors():
    traj = SupportTrajectory((-1, -1, -1))
    for bad in [(1, 2), (1.5, 0, 0), ("1", 0, 0), (True, 0, 0)]:
        with pytest.raises(MicaInputError, match="three integers"):
            traj.apply(bad)
    assert traj.turn == 0


@settings(max_examples=200, deadline=None)
@given(st.tuples(*[st.integers(-27, 0)] * 3).filter(any),
       st.lists(st.tuples(*[st.integers(-5, 3)] * 3), min_size=1, max_size=20))
def test_empa_success_is_crossing_the_initial_hyperplane(p0, increments):
    """Identity: with every turn scored, E_t = P_t.v0 + |P0|, so EMPA's rule is P_t.v0 >= 0."""
    traj = SupportTrajectory(p0, max_turns=100, min_turns=100)
    for inc in increments:
        traj.apply(inc)
        proj = sum(s * v for s, v in zip(traj.state, traj.direction))
        assert traj.cumulative_energy == pytest.approx(proj + traj.initial_norm, abs=1e-9)
        assert traj.success_reached() == (proj >= -1e-9)
        assert traj.distance == pytest.approx(float(distance_from_state(traj.state)))


def test_distance_uses_weights_and_epsilon():
    traj = SupportTrajectory((-5, -3, -1), weights=(2.0, 1.0, 0.0), epsilon=2.0)
    assert traj.initial_distance == pytest.approx(math.sqrt(2 * 9 + 1))


# ---------------------------------------------------------------- replay and fallback
def test_mean_increment_rounds_half_away_from_zero():
    assert mean_increment([]) == (0, 0, 0)
    assert mean_increment([(3, 1, 0), (0, 0, -5)]) == (2, 1, -3)   # 1.5, 0.5, -2.5
    assert mean_increment([(3, 3, 3), (1, 0, -2), (0, 0, 0)]) == (1, 1, 0)


def test_replay_episode_hand_computed():
    rec = {"initial": INITIAL,
           "turns": [prog(C_Prog=2, A_Prog=1), prog(C_Prog=2, A_Prog=2, P_Prog=2),
                     prog(C_Prog=2, A_Prog=2, P_Prog=2), prog(C_Prog=1), prog()]}
    out = replay_episode(rec, min_turns=2)
    assert out["initial_state"] == [-10, -7, -6]
    assert out["states"] == [[-7, -6, -6], [-4, -3, -3], [-1, 0, 0], [0, 0, 0]]
    assert out["status"] == "success" and out["end_turn"] == 4
    assert out["turns"] == 4 and out["turns_after_end"] == 1
    assert out["energies"] == pytest.approx([37 / NORM0, 69 / NORM0, 69 / NORM0, 10 / NORM0])


def test_replay_running_and_judge_failures():
    rec = {"initial": INITIAL, "turns": [prog(C_Prog=2, A_Prog=1), None, prog(P_Neg=-2)]}
    out = replay_episode(rec)
    assert out["status"] == "running" and out["end_turn"] is None
    # the failed turn gets the mean of the valid increments so far: (3, 1, 0)
    assert out["states"] == [[-7, -6, -6], [-4, -5, -6], [-4, -5, -11]]
    assert out["judge_failures"] == 1
    out = replay_episode(rec, on_judge_failure="drop")
    assert out["states"] == [[-7, -6, -6], [-7, -6, -6], [-7, -6, -11]]
    assert out["energies"][1] == 0.0


@pytest.mark.parametrize("record, match", [
    ({"turns": []}, "initial"),
    ({"initial": INITIAL}, "turns"),
    ({"initial": INITIAL, "turns": {}}, "list"),
    ({"initial": {**INITIAL, "C.1": 7}, "turns": []}, "initial: C.1 = 7 is out of range"),
    ({"initial": INITIAL, "turns": [prog(), {**prog(), "A.Prog": 5}]}, "turn 2: A.Prog"),
    ([1, 2], "JSON object"),
])
def test_replay_bad_input_names_the_problem(record, match):
    with pytest.raises(MicaInputError, match=match):
        replay_episode(record)
