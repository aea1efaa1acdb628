"""``mica env`` subcommands, through ``python -m mica_train.env.cli`` and ``main``."""

import json
import os
import subprocess
import sys

import pytest

from mica_train.env import INITIAL_KEYS, PROGRESS_KEYS
from mica_train.env.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "mica_train.env.cli", *args], input=stdin,
                          capture_output=True, text=True, env=env, cwd=ROOT)


INITIAL = {**dict.fromkeys(INITIAL_KEYS, 0), "C.1": 2, "C.2": 3, "A.1": 2, "A.3": 1,
           "P.1": 1, "P.2": 1}                  # P0 = (-10, -7, -6) under EMPA's scoring key


def prog(**kw):
    return {**dict.fromkeys(PROGRESS_KEYS, 0), **{k.replace("_", "."): v for k, v in kw.items()}}


def write_episodes(tmp_path, records):
    p = tmp_path / "episodes.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(p)


def test_help_is_instant_and_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0 and "replay" in out.stdout and "eval" in out.stdout
    code = ("import sys, mica_train.env.cli; "
            "print(sorted(m for m in ('numpy', 'mica_core', 'torch') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": ROOT}
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert mods.stdout.strip() == "[]"


def test_replay_prints_one_line_per_episode(tmp_path):
    full = [prog(C_Prog=2, A_Prog=1), prog(C_Prog=2, A_Prog=2, P_Prog=2),
            prog(C_Prog=2, A_Prog=2, P_Prog=2), prog(C_Prog=1)]
    records = [
        {"initial": INITIAL, "turns": full},
        {"initial": INITIAL, "turns": [prog(C_Neg=-1)] * 5},
        {"initial": INITIAL, "turns": [prog(A_Prog=1), None]},
        {"initial": INITIAL, "turns": [prog(P_Prog=1)] * 3},
    ]
    path = write_episodes(tmp_path, records)
    out = run("replay", path, "--min-turns", "2", "--max-turns", "6")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) == 4
    a, b, c, d = lines
    assert a["states"] == [[-7, -6, -6], [-4, -3, -3], [-1, 0, 0], [0, 0, 0]]
    assert (a["status"], a["end_turn"]) == ("success", 4)
    assert a["initial_distance"] == pytest.approx(142 ** 0.5)
    assert len(a["distances"]) == len(a["energies"]) == 4
    assert (b["status"], b["end_turn"]) == ("failure", 5)
    assert (c["status"], c["end_turn"], c["judge_failures"]) == ("running", None, 1)
    assert c["states"][1] == [-10, -5, -6]        # mean of the valid increments: (0, 1, 0)
    assert d["status"] == "running" and d["line"] == 4
    # same result through main() and from stdin
    assert main(["replay", path, "--min-turns", "2", "--max-turns", "6"]) == 0
    out2 = run("replay", "-", "--min-turns", "2", "--max-turns", "6",
               stdin=open(path).read())
    assert out2.stdout == out.stdout


def rubric(**levels):
    return {**dict.fromkeys(INITIAL_KEYS, 0), **{k.replace("_", "."): v for k, v in levels.items()}}


def test_replay_gives_empas_p0_distances_and_end_turns(tmp_path):
    """Judge JSON replayed under EMPA's IED scoring key (Benchmark/epj/scoring.py of
    KAYA-HAI/EMPA-Benchmark-EPMSandbox): C.1 x1, C.2 x1, C.3 x1.5; A.1 x1, A.2 x2, A.3 x1.5;
    P.1 x1, P.2 x2, P.3 x1.5; an indicator is worth -2 x weight x level. Numbers by hand."""
    plus3 = prog(C_Prog=2, A_Prog=2, P_Prog=2)                      # (+3, +3, +3)
    records = [
        # every indicator at 3: C = -6-6-9, A = P = -6-12-9; six turns of +3 end at max_turns
        {"initial": rubric(**dict.fromkeys([k.replace(".", "_") for k in INITIAL_KEYS], 3)),
         "turns": [plus3] * 6},
        # the x1.5 and x2 indicators: C.3=2 -> -6, A.2=1 -> -4, P.3=3 -> -9; five setbacks
        # on C in a row (negative energy) end in failure at turn 5
        {"initial": rubric(C_3=2, A_2=1, P_3=3), "turns": [prog(C_Neg=-1)] * 6},
        # C.1=1 -> -2, A.1=1 -> -2, P.2=1 -> -4: crosses the hyperplane at turn 2 with
        # E_2 = (18 + 6)/sqrt(24) = |P_0| exactly: success at turn 2
        {"initial": rubric(C_1=1, A_1=1, P_2=1),
         "turns": [prog(A_Prog=2, P_Prog=2), prog(C_Prog=2), plus3]},
        # the example in EMPA's scoring.py: P_0 = (-4-2-6, -4-4-6, -4-12-9); its MDEP-PR
        # example (C.Prog 1, A.Prog 2, P.Prog 1, P.Neg -1) moves it by (1, 3, -1)
        {"initial": rubric(C_1=2, C_2=1, C_3=2, A_1=2, A_2=1, A_3=2, P_1=2, P_2=3, P_3=3),
         "turns": [prog(C_Prog=1, A_Prog=2, P_Prog=1, P_Neg=-1)] * 2},
    ]
    out = run("replay", write_episodes(tmp_path, records), "--min-turns", "2", "--max-turns", "6")
    assert out.returncode == 0, out.stderr
    a, b, c, d = (json.loads(x) for x in out.stdout.splitlines())

    assert a["initial_state"] == [-21, -27, -27]
    assert a["initial_distance"] == pytest.approx((20**2 + 26**2 + 26**2) ** 0.5)
    assert a["states"][0] == [-18, -24, -24] and a["states"][-1] == [-3, -9, -9]
    assert a["distances"] == pytest.approx(
        [((17 - 3 * k) ** 2 + 2 * (23 - 3 * k) ** 2) ** 0.5 for k in range(6)])
    assert (a["status"], a["end_turn"]) == ("max_turns", 6)

    assert b["initial_state"] == [-6, -4, -9]
    assert b["initial_distance"] == pytest.approx(98 ** 0.5)
    assert b["distances"] == pytest.approx([122 ** 0.5, 154 ** 0.5, 194 ** 0.5, 242 ** 0.5,
                                            298 ** 0.5])
    assert b["energies"] == pytest.approx([-12 / 133 ** 0.5] * 5)
    assert (b["status"], b["end_turn"], b["turns_after_end"]) == ("failure", 5, 1)

    assert c["initial_state"] == [-2, -2, -4]
    assert c["initial_distance"] == pytest.approx(11 ** 0.5)
    assert c["states"] == [[-2, 1, -1], [1, 1, -1]]
    assert c["distances"] == pytest.approx([1.0, 0.0])
    assert c["cumulative_energy"] == pytest.approx(24 ** 0.5)
    assert (c["status"], c["end_turn"]) == ("success", 2)

    assert d["initial_state"] == [-12, -14, -25]
    assert d["initial_distance"] == pytest.approx((11**2 + 13**2 + 24**2) ** 0.5)
    assert d["states"] == [[-11, -11, -26], [-10, -8, -27]]
    assert d["distances"] == pytest.approx([825 ** 0.5, (81 + 49 + 676) ** 0.5])
    assert (d["status"], d["end_turn"]) == ("running", None)


def test_replay_max_turns_and_drop(tmp_path):
    path = write_episodes(tmp_path, [{"initial": INITIAL, "turns": [prog(), None, prog()]}])
    out = run("replay", path, "--max-turns", "3", "--min-turns", "3",
              "--on-judge-failure", "drop")
    rec = json.loads(out.stdout)
    assert (rec["status"], rec["end_turn"]) == ("max_turns", 3)


@pytest.mark.parametrize("content, match", [
    ('{"initial": {}, "turns": []}\n', "episodes.jsonl:1: initial: rubric is missing keys"),
    ("not json\n", "episodes.jsonl:1: not valid JSON"),
    (json.dumps({"initial": INITIAL, "turns": [prog(C_Prog=5)]}) + "\n",
     "episodes.jsonl:1: turn 1: C.Prog = 5 is out of range"),
])
def test_replay_bad_input_exits_2_with_one_line(tmp_path, content, match):
    p = tmp_path / "episodes.jsonl"
    p.write_text(json.dumps({"initial": INITIAL, "turns": []}) + "\n" + content)
    out = run("replay", str(p))
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert match.replace(":1:", ":2:") in out.stderr


@pytest.mark.parametrize("line, match", [
    (b"[" * 100_000 + b"\n", "episodes.jsonl:2: nested too deeply to read as JSON"),
    (b'{"initial": "caf\xe9"}\n', "episodes.jsonl:2: not valid UTF-8 (byte 17 of the line)"),
])
def test_replay_unreadable_lines_name_file_and_line(tmp_path, line, match):
    # Was: a RecursionError traceback; a UnicodeDecodeError without file or line.
    p = tmp_path / "episodes.jsonl"
    p.write_bytes(json.dumps({"initial": INITIAL, "turns": []}).encode() + b"\n" + line)
    for stdin in (None, p.read_bytes()):
        out = subprocess.run([sys.executable, "-m", "mica_train.env.cli", "replay",
                              "-" if stdin else str(p)], input=stdin, capture_output=True,
                             env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
        err = out.stderr.decode()
        assert out.returncode == 2 and out.stdout == b"", err
        assert len(err.strip().splitlines()) == 1
        assert match.replace("episodes.jsonl", "<stdin>" if stdin else "episodes.jsonl") in err


@pytest.mark.parametrize("max_turns", ["2", "45"])
def test_a_malformed_turn_after_the_end_is_an_error_whatever_the_limit(tmp_path, max_turns):
    # Was: accepted with --max-turns 2 (the episode ended before turn 3 was read) but
    # rejected with the default limit.
    path = write_episodes(tmp_path, [{"initial": INITIAL,
                                      "turns": [prog(), prog(), prog(C_Prog=7)]}])
    out = run("replay", path, "--max-turns", max_turns, "--min-turns", "2")
    assert out.returncode == 2 and out.stdout == ""
    assert "episodes.jsonl:1: turn 3: C.Prog = 7 is out of range" in out.stderr


@pytest.mark.parametrize("args, match", [
    (["replay", "/nonexistent/episodes.jsonl"], "No such file"),
    (["replay", "x.jsonl", "--min-turns", "50"], "min_turns"),
    (["eval", "--policy", "oracle"], "invalid choice"),
    (["eval", "--policy", "greedy", "--simulator", "llm"], "embedded simulator only"),
    (["eval", "--policy", "pacing", "--seeds", "0"], "--seeds"),
    (["eval", "--policy", "pacing", "--scenarios", "/nonexistent.jsonl"], "No such file"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_cli_input_exits_2(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err


def test_eval_json_pacing_beats_advice_first_and_validation_only():
    results = {}
    for policy in ("pacing", "advice_first", "validation_only"):
        out = run("eval", "--policy", policy, "--scenarios", "eval", "--json")
        assert out.returncode == 0, out.stderr
        results[policy] = json.loads(out.stdout)
    for r in results.values():
        assert {"pass_rate", "mean_final_distance", "mean_turns", "pass_count",
                "n"} <= set(r)
        assert r["n"] == 30 and r["max_turns"] == 45
    assert results["pacing"]["pass_rate"] >= 0.8
    assert results["advice_first"]["pass_rate"] <= 0.2
    assert results["validation_only"]["pass_rate"] <= 0.2


def test_eval_on_a_scenario_file_and_text_output(tmp_path, capsys):
    cards = tmp_path / "cards.jsonl"
    assert main(["scenarios", str(cards), "--n", "6", "--seed", "2"]) == 0
    assert len(cards.read_text().splitlines()) == 6
    assert main(["eval", "--policy", "random", "--scenarios", str(cards), "--seeds", "2",
                 "--max-turns", "15"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("policy random on") and "12 episodes" in out


def test_eval_on_an_invalid_scenario_file(tmp_path, capsys):
    bad = tmp_path / "cards.jsonl"
    bad.write_text('{"id": "x"}\n')
    assert main(["eval", "--policy", "pacing", "--scenarios", str(bad)]) == 2
    assert "cards.jsonl:1: scenario is missing" in capsys.readouterr().err
