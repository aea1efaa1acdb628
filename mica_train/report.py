"""``mica report RUN_DIR``: one self-contained HTML page that shows which turns mica credited.

    mica report runs/demo/train                       # -> runs/demo/train/report.html
    mica report RUN_DIR --out report.html --groups 3 --transcripts eval_transcripts.jsonl

The page has the run's learning curves (inline SVG, drawn from ``metrics.jsonl``) and the saved
conversations (``RUN_DIR/transcripts/step_*.jsonl`` and any ``--transcripts`` file), a few
rollout groups of each. Every assistant turn is shaded by its advantage (green positive, red
negative, stronger for larger ``|A|``, full at ``|A| >= 2``) and annotated with its advantage,
reward, return, the support state after it, its distance and the judge's rubric; each
conversation's summary line carries a strip of those shades, one cell per turn, so the credit
of a whole group reads at a glance. The rollouts of a group are listed best first (distance
gained), since the estimator compares them with each other.

Nothing is loaded from the network: styles, the small script that switches between
transcript files, and the charts are inline, so the file can be mailed or opened offline.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import _finite

__all__ = ["check_transcript", "load_config", "load_metrics", "load_transcripts", "main", "render_report",
           "write_report"]

CHART_W, CHART_H = 320, 170
_MARGIN = {"left": 54, "right": 12, "top": 10, "bottom": 30}
ADVANTAGE_FULL_SHADE = 2.0  # |A| at which a turn's shade is at its strongest


# ---------------------------------------------------------------------- helpers
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, spec: str = "+.2f") -> str:
    return format(x, spec).replace("-", "\u2212") if _finite(x) else "\u2013"


def _nice_ticks(lo: float, hi: float, n: int = 4) -> tuple[list[float], int]:
    """About ``n`` round tick values covering ``[lo, hi]``, and the decimals that tell them
    apart. Any finite ``lo``, ``hi`` (their difference may be past float64: it is taken in
    halves)."""
    if not hi > lo:
        return [lo], 2
    raw = (hi / 2 - lo / 2) / max(1, n - 1) * 2
    mag = 10.0 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if math.isfinite(m * mag)),
               key=lambda v: abs(math.log(v / raw)))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if decimals < 300 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    k = math.ceil(lo / step - 1e-9)
    ticks = []
    while len(ticks) <= 3 * n:  # a tick past hi by a rounding error still counts
        v = k * step
        if not (v <= hi or (math.isfinite(v) and v - hi <= 1e-9 * step)):
            break
        ticks.append(round(v, 12))
        k += 1
    return ticks, decimals


def _tick_label(v: float, decimals: int) -> str:
    if not v:
        return "0"
    text = f"{v:.3g}" if abs(v) >= 1e6 or decimals > 6 else f"{v:.{decimals}f}"
    return text.replace("-", "\u2212")


def advantage_color(a: Any) -> str:
    """The CSS background of a turn with advantage ``a`` (transparent when unknown)."""
    if not _finite(a):
        return "transparent"
    alpha = 0.06 + 0.5 * min(abs(a) / ADVANTAGE_FULL_SHADE, 1.0)
    rgb = "22,163,74" if a >= 0 else "220,38,38"
    return f"rgba({rgb},{alpha:.3f})"


# ---------------------------------------------------------------------- curves
def curve_svg(points: Sequence[tuple[float, float]], label: str, key: str) -> str:
    """A line chart of ``(step, value)`` points as an inline SVG figure."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    m = _MARGIN
    pw, ph = CHART_W - m["left"] - m["right"], CHART_H - m["top"] - m["bottom"]
    pad = 0.08 * ph  # the line keeps off the frame; in pixels, so no value overflows

    def frac(v, lo, hi):  # where v lies in [lo, hi], computed in halves (any finite values)
        return 0.5 if hi == lo else (v / 2 - lo / 2) / (hi / 2 - lo / 2)

    def sx(x):
        return m["left"] + frac(x, x0, x1) * pw

    def sy(y):
        return m["top"] + pad + (1 - frac(y, y0, y1)) * (ph - 2 * pad)

    parts = [f'<svg class="chart" viewBox="0 0 {CHART_W} {CHART_H}" width="{CHART_W}" '
             f'height="{CHART_H}" role="img" aria-label="{_esc(label)}">',
             f"<title>{_esc(label)}</title>"]
    yticks, decimals = _nice_ticks(y0, y1)
    for t in yticks:
        y = sy(t)
        parts.append(f'<line class="grid" x1="{m["left"]}" x2="{CHART_W - m["right"]}" '
                     f'y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{m["left"] - 6}" y="{y + 3.5:.1f}" '
                     f'text-anchor="end">{_tick_label(t, decimals)}</text>')
    for t in _nice_ticks(x0, x1, 5)[0]:
        if float(t).is_integer():
            x = sx(t)
            tick = int(t) if abs(t) < 1e6 else f"{t:.3g}"
            parts.append(f'<text class="tick" x="{x:.1f}" y="{CHART_H - m["bottom"] + 14}" '
                         f'text-anchor="middle">{tick}</text>')
    parts.append(f'<text class="axis" x="{m["left"] + pw / 2:.1f}" y="{CHART_H - 3}" '
                 f'text-anchor="middle">step</text>')
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts.append(f'<polyline class="line" points="{coords}"/>')
    if len(points) <= 40:
        for x, y in points:
            parts.append(f'<circle class="dot" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6">'
                         f"<title>step {x:g}: {y:.4g}</title></circle>")
    parts.append("</svg>")
    last = points[-1][1]
    return (f'<figure class="curve" data-key="{_esc(key)}" data-points="{len(points)}">'
            f'<figcaption>{_esc(label)} <span class="last">{last:.3g}</span></figcaption>'
            f'{"".join(parts)}</figure>')


def curves_html(records: Sequence[dict]) -> str:
    from .metrics import CURVES

    figs = []
    for key, label in CURVES:
        pts = sorted((float(r["step"]), float(r[key])) for r in records
                     if _finite(r.get(key)) and _finite(r.get("step")))
        if pts:
            figs.append(curve_svg(pts, label, key))
    if not figs:
        return '<p class="empty">No metrics yet (metrics.jsonl is empty or missing).</p>'
    return f'<div class="curves">{"".join(figs)}</div>'


# ---------------------------------------------------------------------- conversations
def _gain(t: dict) -> float:
    init, final = t.get("initial_distance"), t.get("final_distance")
    return (init if _finite(init) else 0.0) - (final if _finite(final) else 0.0)


def _rubric_text(tr: dict) -> str:
    if tr.get("judge_failed") or tr.get("rubric") is None:
        return "judge failed"
    parts = [f"{k} {_fmt(v, '+d')}" for k, v in tr["rubric"].items() if isinstance(v, int) and v]
    return "judge: " + (", ".join(parts) if parts else "no change")


def _state_text(state: Any) -> str:
    if not state:
        return "\u2013"
    return " ".join(f"{axis} {_fmt(v, '+d' if isinstance(v, int) else '+.3g')}"
                    for axis, v in zip("CAP", state))


def _strip(turns: Sequence[dict]) -> str:
    cells = "".join(f'<i style="background:{advantage_color(tr.get("advantage"))}" '
                    f'title="turn {tr["turn"]}: A {_fmt(tr.get("advantage"))}"></i>'
                    for tr in turns)
    return f'<span class="strip">{cells}</span>'


def _status_badge(t: dict) -> str:
    status = t.get("status") or "?"
    cls = "ok" if t.get("pass") else "bad" if status == "failure" else "neutral"
    return f'<span class="badge {cls}">{_esc(status.replace("_", " "))}</span>'


def conversation_html(t: dict, open_: bool) -> str:
    turns = t.get("turns") or []
    summary = (f"<summary>{_status_badge(t)}"
               f'<span class="who-traj">rollout {_esc(t.get("traj"))}</span>'
               f'<span class="dist">D {_fmt(t.get("initial_distance"), ".1f")} \u2192 '
               f'{_fmt(t.get("final_distance"), ".1f")}</span>'
               f'<span class="nturns">{len(turns)} turns</span>{_strip(turns)}</summary>')
    items = []
    for tr in turns:
        a = tr.get("advantage")
        sign = "pos" if _finite(a) and a >= 0 else "neg" if _finite(a) else "none"
        items.append(
            f'<li class="turn" data-turn="{tr["turn"]}">'
            f'<div class="msg user"><span class="who">user</span>{_esc(tr.get("user", ""))}</div>'
            f'<div class="msg assistant {sign}" data-advantage="{_fmt(a, ".4f")}" '
            f'style="background:{advantage_color(a)}">'
            f'<span class="who">assistant \u00b7 turn {tr["turn"] + 1}</span>'
            f'<span class="reply">{_esc(tr.get("reply", ""))}</span>'
            f'<span class="ann"><b class="adv">A {_fmt(a)}</b>'
            f'<span>r {_fmt(tr.get("reward"))}</span><span>G {_fmt(tr.get("return"))}</span>'
            f'<span>{_state_text(tr.get("state"))}</span>'
            f'<span>D {_fmt(tr.get("distance"), ".2f")}</span>'
            f'<span class="rubric">{_esc(_rubric_text(tr))}</span></span></div></li>')
    return (f'<details class="conv"{" open" if open_ else ""} data-traj="{_esc(t.get("traj"))}">'
            f'{summary}<ol class="turns">{"".join(items)}</ol></details>')


def source_html(index: int, label: str, transcripts: Sequence[dict], groups: int) -> str:
    order: list[Any] = []
    by_group: dict[Any, list[dict]] = {}
    for t in transcripts:
        g = t.get("group")
        if g not in by_group:
            order.append(g)
            by_group[g] = []
        by_group[g].append(t)
    shown = order[:groups] if groups > 0 else order
    n_pass = sum(bool(t.get("pass")) for t in transcripts)
    est = next((t.get("estimator") for t in transcripts if t.get("estimator")), None)
    info = (f"{len(transcripts)} episodes in {len(order)} groups, {n_pass} passed"
            f"{f'; credit by {_esc(est)}' if est else ''}. Showing {len(shown)} "
            f"group{'s' if len(shown) != 1 else ''}, rollouts best first.")
    blocks = []
    for g in shown:
        members = sorted(by_group[g], key=lambda t: (-_gain(t), str(t.get("traj"))))
        first = members[0]
        head = (f'<h3>group {_esc(g)} \u00b7 {_esc(first.get("scenario_id", ""))}'
                f'<span class="topic">{_esc(first.get("topic", ""))}</span></h3>'
                f'<p class="group-info">{len(members)} rollouts; initial state '
                f'{_state_text(first.get("initial_state"))}, distance '
                f'{_fmt(first.get("initial_distance"), ".2f")}</p>')
        convs = "".join(conversation_html(t, open_=k in (0, len(members) - 1))
                        for k, t in enumerate(members))
        blocks.append(f'<div class="group" data-group="{_esc(g)}">{head}{convs}</div>')
    return (f'<div class="source" id="source-{index}" data-label="{_esc(label)}">'
            f'<h3 class="source-title">{_esc(label)}</h3><p class="source-info">{info}</p>'
            f'{"".join(blocks)}</div>')


# ---------------------------------------------------------------------- page
_CSS = """
:root { --fg:#1f2328; --muted:#57606a; --line:#d0d7de; --bg:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI","DejaVu Sans",sans-serif;
       color:var(--fg); background:#fff; }
header, section { max-width:1400px; margin:0 auto; padding:14px 24px; }
h1 { font-size:22px; margin:6px 0 2px; } h2 { font-size:17px; margin:10px 0 8px; }
h3 { font-size:15px; margin:14px 0 4px; }
.sub, .source-info, .group-info, .legend, .empty { color:var(--muted); margin:2px 0 8px; }
.note { color:#9a6700; margin:2px 0 8px; }
.cards { display:flex; flex-wrap:wrap; gap:10px; margin-top:10px; }
.card { border:1px solid var(--line); border-radius:8px; padding:8px 14px; background:var(--bg);
        min-width:130px; }
.card b { display:block; font-size:20px; } .card span { color:var(--muted); font-size:12px; }
.curves { display:grid; grid-template-columns:repeat(auto-fill,minmax(290px,1fr)); gap:10px; }
figure.curve { margin:0; border:1px solid var(--line); border-radius:8px; padding:6px 4px 2px; }
figcaption { font-size:12.5px; padding:0 8px; color:var(--fg); }
figcaption .last { float:right; color:var(--muted); }
svg.chart { display:block; width:100%; height:auto; }
svg .grid { stroke:#eaeef2; stroke-width:1; } svg .tick, svg .axis { font-size:10px; fill:#6e7781; }
svg .line { fill:none; stroke:var(--accent); stroke-width:1.8; } svg .dot { fill:var(--accent); }
.swatch { display:inline-block; padding:0 7px; border-radius:4px; margin:0 2px; }
nav.sources { display:none; margin:6px 0 10px; } .js nav.sources { display:block; }
.js .source { display:none; } .js .source.active { display:block; }
select { font:inherit; padding:3px 6px; }
.topic { color:var(--muted); font-weight:normal; margin-left:8px; }
details.conv { border:1px solid var(--line); border-radius:8px; margin:8px 0; background:#fff; }
details.conv > summary { cursor:pointer; padding:7px 10px; display:flex; flex-wrap:wrap;
        align-items:center; gap:10px; background:var(--bg); border-radius:8px; }
.badge { font-size:11.5px; border-radius:10px; padding:1px 8px; font-weight:600; }
.badge.ok { background:#dafbe1; color:#116329; } .badge.bad { background:#ffebe9; color:#a40e26; }
.badge.neutral { background:#eaeef2; color:#424a53; }
.dist, .nturns, .who-traj { color:var(--muted); font-size:12.5px; }
.strip { display:inline-flex; gap:2px; margin-left:auto; }
.strip i { display:inline-block; width:13px; height:15px; border-radius:2px;
           border:1px solid rgba(0,0,0,.12); }
ol.turns { list-style:none; margin:0; padding:8px 12px 10px; }
li.turn { margin:0 0 6px; }
.msg { border-radius:8px; padding:5px 10px; margin:3px 0; max-width:980px; }
.msg .who { display:block; font-size:11px; color:var(--muted); text-transform:uppercase;
            letter-spacing:.03em; }
.msg.user { background:#f3f4f6; margin-right:120px; }
.msg.assistant { margin-left:120px; border-left:4px solid #8c959f; }
.msg.assistant.pos { border-left-color:#1a7f37; } .msg.assistant.neg { border-left-color:#cf222e; }
.ann { display:flex; flex-wrap:wrap; gap:4px 12px; margin-top:3px; font-size:12px; color:#32383f;
       font-variant-numeric:tabular-nums; }
.ann .adv { font-weight:700; } .ann .rubric { color:var(--muted); }
footer { max-width:1400px; margin:0 auto; padding:10px 24px 30px; color:var(--muted); font-size:12px; }
"""

_JS = """
(function () {
  var root = document.documentElement, sources = document.querySelectorAll('.source');
  var select = document.getElementById('source-select');
  root.classList.add('js');
  sources.forEach(function (s, i) {
    var o = document.createElement('option');
    o.value = s.id; o.textContent = s.getAttribute('data-label'); select.appendChild(o);
  });
  function show(id) {
    sources.forEach(function (s) { s.classList.toggle('active', s.id === id); });
  }
  select.addEventListener('change', function () { show(select.value); });
  if (sources.length) {
    var initial = document.body.getAttribute('data-initial-source') || sources[0].id;
    select.value = initial; show(initial);
  }
  document.body.setAttribute('data-ready', '1');
})();
"""


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{_esc(value)}</b><span>{_esc(label)}</span></div>'


def _section(config: dict, key: str) -> dict:
    """``config[key]`` when it is an object, else ``{}`` (the cards then show a dash)."""
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def render_report(records: Sequence[dict], sources: Sequence[tuple[str, Sequence[dict]]], *,
                  title: str, config: dict | None = None, groups: int = 2,
                  initial_source: int | None = None, notes: Sequence[str] = ()) -> str:
    """The report page as a string. ``sources``: ``(label, transcripts)`` pairs;
    ``initial_source`` is the one shown first (default: the last training step, else the
    first); ``notes``: lines shown under the title (e.g. skipped metrics lines)."""
    config = config or {}
    last = records[-1] if records else {}
    evals = [r for r in records if _finite(r.get("eval_pass_rate"))]
    cards = [_card(str(last.get("step", "\u2013")), "steps"),
             _card(str(_section(config, "advantage").get("estimator", "\u2013")), "estimator"),
             _card(_fmt(last.get("pass_rate"), ".3f"), "pass rate, last training step"),
             _card(_fmt(evals[-1]["eval_pass_rate"] if evals else None, ".3f"),
                   "pass rate, last evaluation"),
             _card(_fmt(last.get("mean_final_distance"), ".2f"), "mean final distance, last step")]
    data = _section(config, "data")
    if data:
        cards.append(_card(f"{data.get('scenarios_per_step', '?')} \u00d7 {data.get('group_size', '?')}",
                           "groups \u00d7 rollouts per step"))
    if sources:
        if initial_source is None:
            train = [i for i, (label, _) in enumerate(sources) if label.startswith("training")]
            initial_source = train[-1] if train else 0
        body_sources = "".join(source_html(i, label, ts, groups) for i, (label, ts) in enumerate(sources))
        conversations = (
            '<p class="legend">Each assistant turn is shaded by its advantage: '
            f'<span class="swatch" style="background:{advantage_color(-2)}">\u2212{ADVANTAGE_FULL_SHADE:g}</span>'
            f'<span class="swatch" style="background:{advantage_color(-0.5)}">\u22120.5</span>'
            f'<span class="swatch" style="background:{advantage_color(0)}">0</span>'
            f'<span class="swatch" style="background:{advantage_color(0.5)}">+0.5</span>'
            f'<span class="swatch" style="background:{advantage_color(2)}">+{ADVANTAGE_FULL_SHADE:g}</span>. '
            "A: advantage; r: reward (distance gained, IDR); G: discounted return; C A P: the "
            "support state after the turn (0 is met, negative a deficit); D: distance to the "
            "target; judge: the progress rubric (X.Prog, X.Neg).</p>"
            '<nav class="sources"><label>Transcripts: <select id="source-select"></select>'
            "</label></nav>" + body_sources)
    else:
        conversations = ('<p class="empty">No transcripts: train with '
                         "<code>--set transcripts_every=N</code> or pass <code>--transcripts "
                         "FILE.jsonl</code> (from <code>mica eval --transcripts</code>).</p>"
                         '<nav class="sources"><select id="source-select"></select></nav>')
    init_attr = f' data-initial-source="source-{initial_source}"' if sources else ""
    notes_html = "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mica credit report: {_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body{init_attr}><header><h1>mica credit report</h1>"
        f'<p class="sub">{_esc(title)} \u00b7 generated {stamp}</p>'
        f"{notes_html}"
        f'<div class="cards">{"".join(cards)}</div></header>'
        f'<section id="curves"><h2>Learning curves</h2>{curves_html(records)}</section>'
        f'<section id="conversations"><h2>Conversations and credit</h2>{conversations}</section>'
        "<footer>Written by <code>mica report</code>; self-contained (no network needed).</footer>"
        f"<script>{_JS}</script></body></html>\n")


def _source_label(path: Path, transcripts: Sequence[dict]) -> str:
    first = transcripts[0] if transcripts else {}
    if first.get("split") == "train" and first.get("step") is not None:
        return f"training step {first['step']}"
    if first.get("split") == "eval":
        return f"evaluation ({path.name})"
    return path.name


def _error(where: str, message: str, *, field: str | None = None, line: int | None = None,
           rule: str = "run directory"):
    """A one-line input error: ``where`` (``file:line: `` or ``file: ``), the field, the rule."""
    from .env.rubric import input_error

    return input_error(f"{where}{message}", column=field, row=line, rule=rule)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_SCALARS = (str, int, float, bool, type(None))


def _check_state(value: Any, field: str, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise _error(where, f"field {field!r} must be a list of numbers; got {_short(value)}",
                     field=field, rule="transcript")


def check_transcript(obj: Any, where: str) -> dict:
    """``obj`` if it is an episode transcript the report can show, else a one-line error
    naming ``where`` (file and line) and the field: ``turns`` a list of objects, each with an
    integer ``turn`` >= 0, ``state`` a list of numbers, ``rubric`` an object; the episode's
    ``group``, ``traj``, ``status`` and texts single values (``status`` text), its
    ``initial_state`` a list of numbers."""
    if not isinstance(obj, dict) or not isinstance(obj.get("turns"), list):
        raise _error(where, "not an episode transcript (an object with a 'turns' list)",
                     field="turns", rule="transcript")
    for key in ("group", "traj", "scenario_id", "topic", "status", "estimator", "split", "step"):
        if not isinstance(obj.get(key), _SCALARS):
            raise _error(where, f"field {key!r} must be a single value (text or a number); got "
                         f"{_short(obj[key])}", field=key, rule="transcript")
    if obj.get("status") is not None and not isinstance(obj["status"], str):
        raise _error(where, f"field 'status' must be text; got {_short(obj['status'])}",
                     field="status", rule="transcript")
    _check_state(obj.get("initial_state"), "initial_state", where)
    for i, tr in enumerate(obj["turns"]):
        name = f"turns[{i}]"
        if not isinstance(tr, dict):
            raise _error(where, f"field {name!r} must be an object; got {_short(tr)}",
                         field=name, rule="transcript")
        turn = tr.get("turn")
        if not (isinstance(turn, int) and not isinstance(turn, bool) and turn >= 0):
            got = "it is missing" if "turn" not in tr else f"got {_short(turn)}"
            raise _error(where, f"field '{name}.turn' must be an integer >= 0; {got}",
                         field=f"{name}.turn", rule="transcript")
        _check_state(tr.get("state"), f"{name}.state", where)
        if tr.get("rubric") is not None and not isinstance(tr["rubric"], dict):
            raise _error(where, f"field '{name}.rubric' must be an object; got "
                         f"{_short(tr['rubric'])}", field=f"{name}.rubric", rule="transcript")
        for key in ("user", "reply"):
            if not isinstance(tr.get(key), _SCALARS):
                raise _error(where, f"field '{name}.{key}' must be text; got {_short(tr[key])}",
                             field=f"{name}.{key}", rule="transcript")
    return obj


def load_transcripts(path: Path) -> list[dict]:
    """The transcripts of a JSON-lines file, each checked by :func:`check_transcript`; a line
    that is not UTF-8, not JSON or not a transcript is a one-line error naming the line."""
    from .env.rubric import iter_jsonl

    with open(path, "rb") as fh:
        return [check_transcript(obj, where) for _, where, obj in iter_jsonl(fh, str(path))]


def load_metrics(path: Path) -> tuple[list[dict], list[int]]:
    """The records of ``metrics.jsonl`` and the numbers of the lines skipped: a line that is
    not UTF-8, not JSON or not an object (a line cut short by a kill, a corrupt disk block)
    costs the curves one point, not the report. A missing file has no records."""
    records: list[dict] = []
    skipped: list[int] = []
    if not path.is_file():
        return records, skipped
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                obj = json.loads(text)
            except (UnicodeDecodeError, ValueError, RecursionError):
                obj = None
            if isinstance(obj, dict):
                records.append(obj)
            else:
                skipped.append(lineno)
    return records, skipped


def load_config(path: Path) -> dict:
    """``config.json`` of the run (``{}`` when absent); not UTF-8, not JSON or not an object
    is a one-line error naming the file."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _error(f"{path}: ", f"not valid UTF-8 (byte {e.start + 1})", rule="utf-8") from None
    except json.JSONDecodeError as e:
        raise _error(f"{path}:{e.lineno}: ", f"not valid JSON ({e.msg})", line=e.lineno,
                     rule="json") from None
    except RecursionError:
        raise _error(f"{path}: ", "nested too deeply to read as JSON", rule="json") from None
    if not isinstance(obj, dict):
        raise _error(f"{path}: ", f"not a JSON object (a run's config); got {_short(obj)}",
                     rule="config")
    return obj


def _skipped_note(path: Path, skipped: Sequence[int]) -> str:
    lines = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
    return (f"{path}: skipped {len(skipped)} unreadable line{'s' if len(skipped) != 1 else ''} "
            f"(not a JSON object: line{'s' if len(skipped) != 1 else ''} {lines})")


def write_report(run_dir: str | Path, out: str | Path | None = None, *,
                 transcripts: Sequence[str | Path] = (), groups: int = 2,
                 records: Sequence[dict] | None = None, title: str | None = None,
                 warnings: list[str] | None = None) -> Path:
    """Write the report of ``run_dir`` (default ``RUN_DIR/report.html``) atomically.

    ``transcripts``: further transcript files (e.g. from ``mica eval --transcripts``), after
    the run's own ``transcripts/step_*.jsonl``. ``records``: metrics to plot instead of
    ``RUN_DIR/metrics.jsonl``. ``warnings`` collects what was skipped (unreadable metrics
    lines), which the page shows too.

    Raises ``MicaInputError`` (one line naming the file, line and field) for a malformed run
    directory: a transcript line that is not UTF-8, JSON or a transcript, a field of the wrong
    type, a ``config.json`` that is not a JSON object; ``out`` a directory."""
    from mica_core import MicaInputError
    from mica_core.atomic import atomic_write_text

    run_dir = Path(run_dir)
    files = [Path(p) for p in transcripts]
    if not run_dir.is_dir() and not files:
        raise MicaInputError(f"run directory {str(run_dir)!r} does not exist", column="RUN_DIR",
                             rule="exists")
    for p in files:
        if not p.is_file():
            raise MicaInputError(f"transcripts file {str(p)!r} does not exist",
                                 column="--transcripts", rule="exists")
    if groups < 0:
        raise MicaInputError(f"--groups must be >= 0, got {groups}", column="--groups",
                             rule="range")
    out = Path(out) if out is not None else run_dir / "report.html"
    if out.is_dir():
        raise MicaInputError(f"{str(out)!r} is a directory; name the HTML file to write",
                             column="--out", rule="a file")
    notes = []
    if records is None:
        metrics = run_dir / "metrics.jsonl"
        records, skipped = load_metrics(metrics)
        if skipped:
            notes.append(_skipped_note(metrics, skipped))
    config = load_config(run_dir / "config.json")
    sources = []
    for p in sorted((run_dir / "transcripts").glob("step_*.jsonl")) + files:
        ts = load_transcripts(p)
        if ts:
            sources.append((_source_label(p, ts), ts))
    page = render_report(records, sources, title=title or str(run_dir), config=config,
                         groups=groups, notes=notes)
    atomic_write_text(out, page)
    if warnings is not None:
        warnings.extend(notes)
    return out


def main(argv: list[str] | None = None) -> int:
    """write a self-contained HTML credit report of a training run (mica_train)"""
    p = argparse.ArgumentParser(
        prog="mica report",
        description="Write one self-contained HTML page with a run's learning curves and its "
                    "saved conversations, each assistant turn shaded by its advantage.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (metrics.jsonl, "
                   "transcripts/step_*.jsonl)")
    p.add_argument("--out", default=None, help="output HTML file (default RUN_DIR/report.html)")
    p.add_argument("--transcripts", action="append", default=[], metavar="FILE.jsonl",
                   help="further transcripts, e.g. from `mica eval --transcripts` (repeatable)")
    p.add_argument("--groups", type=int, default=2,
                   help="rollout groups shown per transcript file (0: all; default 2)")
    p.add_argument("--title", default=None, help="page title (default RUN_DIR)")
    args = p.parse_args(argv)
    import sys

    from mica_core import MicaInputError

    warnings: list[str] = []
    try:
        out = write_report(args.run_dir, args.out, transcripts=args.transcripts,
                           groups=args.groups, title=args.title, warnings=warnings)
    except MicaInputError as e:
        print(f"mica report: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as e:  # the page cannot be written (permissions, a full disk)
        where = f"{e.filename}: " if e.filename else ""
        print(f"mica report: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"mica report: warning: {line}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
