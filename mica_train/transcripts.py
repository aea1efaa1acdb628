"""Transcripts: the conversations of a rollout batch with the credit each turn received.

One JSON object per episode, one per line (``RUN_DIR/transcripts/step_NNNNNN.jsonl`` during
training, ``mica eval --transcripts FILE.jsonl``)::

    {"split": "train", "step": 10, "estimator": "mica", "group": 0, "traj": 3,
     "scenario_id": "train-00017", "topic": "...", "initial_state": [-12, -19, -6],
     "initial_distance": 21.4, "status": "success", "pass": true, "final_distance": 0.0,
     "turns": [{"turn": 0, "user": "...", "reply": "...", "rubric": {"C.Prog": 0, ...},
                "judge_failed": false, "state": [-12, -16, -6], "distance": 19.2,
                "reward": 2.2, "return": 5.1, "advantage": 0.83}, ...]}

``user`` is the message the reply answers; ``state`` and ``distance`` are the support state
and its distance after the turn; ``reward``, ``return`` and ``advantage`` are the columns of
``mica_core.compute_advantages`` for that turn (in training: exactly the values the update
used; in evaluation: the estimator applied to the evaluation episodes, grouped by scenario).
``rubric`` is ``null`` on a turn whose judge failed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_credit", "conversation_markdown", "episode_transcripts", "pick_samples",
           "read_transcripts", "write_transcripts"]


def _number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def episode_transcripts(records: Sequence[Any], credit=None, *, step: int | None = None,
                        split: str = "train", estimator: str | None = None) -> list[dict]:
    """Transcripts of ``records`` (``rollout.EpisodeRecord``).

    ``credit``: a table with ``reward``, ``return`` and ``advantage`` columns whose rows are
    those of ``rollout.trajectory_table(records)`` (episode by episode, turns in order), such
    as the output of ``mica_core.compute_advantages`` on it; None leaves them ``null``.
    """
    n_rows = sum(len(r.turns) for r in records)
    cols = {}
    if credit is not None:
        for name in ("reward", "return", "advantage"):
            col = credit.column(name).to_pylist()
            if len(col) < n_rows:
                raise ValueError(f"credit has {len(col)} rows, the records {n_rows} turns")
            cols[name] = col
    out, row = [], 0
    for rec in records:
        turns = []
        for t, tr in enumerate(rec.turns):
            turn = {"turn": t, "user": tr.user_message, "reply": tr.reply, "rubric": tr.rubric,
                    "judge_failed": tr.judge_failed,
                    "state": None if tr.state is None else list(tr.state),
                    "distance": _number(tr.distance)}
            for name in ("reward", "return", "advantage"):
                turn[name] = _number(cols[name][row]) if cols else None
            turns.append(turn)
            row += 1
        m = rec.metrics
        out.append({
            "split": split, "step": step, "estimator": estimator,
            "group": rec.group, "traj": rec.traj,
            "scenario_id": rec.scenario_id or m.get("scenario_id", ""), "topic": rec.topic,
            "initial_state": None if rec.initial_state is None else list(rec.initial_state),
            "initial_distance": _number(rec.initial_distance),
            "status": m.get("status"), "pass": bool(m.get("pass", False)),
            "final_distance": _number(m["final_distance"]) if "final_distance" in m else None,
            "turns": turns,
        })
    return out


def add_credit(transcripts: Sequence[dict], estimator: str = "mica", **options) -> list[dict]:
    """``transcripts`` with ``reward``, ``return`` and ``advantage`` computed by
    ``mica_core.compute_advantages`` from their distances (trajectories grouped by ``group``)."""
    import pyarrow as pa

    import mica_core as mc

    group, traj, turn, dist, init = [], [], [], [], []
    for i, t in enumerate(transcripts):
        for k, tr in enumerate(t["turns"]):
            group.append(int(t["group"]))
            traj.append(i)
            turn.append(k)
            dist.append(tr["distance"])
            init.append(t["initial_distance"])
    out = [dict(t, estimator=estimator, turns=[dict(tr) for tr in t["turns"]]) for t in transcripts]
    if not turn:
        return out
    table = pa.table({"group_id": pa.array(group, pa.int64()), "traj_id": pa.array(traj, pa.int64()),
                      "turn": pa.array(turn, pa.int32()), "distance": pa.array(dist, pa.float64()),
                      "initial_distance": pa.array(init, pa.float64())})
    res = mc.compute_advantages(table, estimator=estimator, **options)
    cols = {name: res.column(name).to_pylist() for name in ("reward", "return", "advantage")}
    row = 0
    for t in out:
        for tr in t["turns"]:
            for name, col in cols.items():
                tr[name] = _number(col[row])
            row += 1
    return out


def write_transcripts(path: str | Path, transcripts: Sequence[dict]) -> Path:
    """Write ``transcripts`` as JSON lines, atomically."""
    from mica_core.atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in transcripts))
    return path


def read_transcripts(path: str | Path) -> list[dict]:
    """Transcripts from a JSON-lines file; a line that is not an episode transcript raises
    ``MicaInputError`` naming the file and line."""
    from .env.rubric import input_error, iter_jsonl

    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as fh:
        for _, where, obj in iter_jsonl(fh, str(path)):
            if not isinstance(obj, dict) or not isinstance(obj.get("turns"), list):
                raise input_error(f"{where}not an episode transcript (an object with a "
                                  f"'turns' list)", column="turns", rule="transcript")
            out.append(obj)
    return out


def pick_samples(transcripts: Sequence[dict], n: int) -> list[dict]:
    """``n`` transcripts that show the spread of a batch: the best and the worst outcome
    (distance gained, ``initial - final``) in turn, then the next best and worst, ..."""
    if n <= 0 or not transcripts:
        return []

    def gain(t):
        final = t.get("final_distance")
        return (t.get("initial_distance") or 0.0) - (final if final is not None else 0.0)

    order = sorted(range(len(transcripts)), key=lambda i: (-gain(transcripts[i]), i))
    picked, lo, hi = [], 0, len(order) - 1
    while len(picked) < min(n, len(order)):
        picked.append(order[lo])
        lo += 1
        if len(picked) < n and lo <= hi:
            picked.append(order[hi])
            hi -= 1
    return [transcripts[i] for i in picked]


def _fmt(x, spec="+.2f"):
    return "-" if x is None else format(x, spec)


def conversation_markdown(t: dict) -> str:
    """One transcript as Markdown (TensorBoard's text tab renders it)."""
    head = (f"**{t.get('scenario_id', '')}** {t.get('topic', '')}: {t.get('status')} after "
            f"{len(t['turns'])} turns, distance {_fmt(t.get('initial_distance'), '.2f')} -> "
            f"{_fmt(t.get('final_distance'), '.2f')} (group {t.get('group')}, rollout "
            f"{t.get('traj')})")
    lines = [head, "", "| turn | user | reply | advantage | reward | return | state | distance |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    for tr in t["turns"]:
        state = "-" if tr.get("state") is None else " ".join(str(v) for v in tr["state"])
        reply = cell(tr["reply"]) + (" *(judge failed)*" if tr.get("judge_failed") else "")
        lines.append(f"| {tr['turn']} | {cell(tr['user'])} | {reply} | "
                     f"{_fmt(tr.get('advantage'))} | {_fmt(tr.get('reward'))} | "
                     f"{_fmt(tr.get('return'))} | {state} | {_fmt(tr.get('distance'), '.2f')} |")
    return "\n".join(lines)
