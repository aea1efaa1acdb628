"""`mica report RUN_DIR`: one self-contained HTML page, checked as a person would see it: opened
from disk in Debian's headless Chromium, its DOM (after the page's script ran) and a screenshot.

Chromium: `make test` installs it (scripts/install-chromium.sh). Without it this test skips,
unless MICA_REQUIRE_BROWSER=1 (set by `make test`), where a missing browser is a failure. The
screenshot is kept at $MICA_TEST_ARTIFACTS/report.png (default runs/test-artifacts/).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mica_train.metrics import CURVES, read_metrics
from mica_train.report import render_report, write_report
from mica_train.transcripts import read_transcripts

ROOT = Path(__file__).resolve().parents[2]


class Elements(HTMLParser):
    """Every start tag as ``(tag, attrs dict)``, in document order, and the text."""

    def __init__(self):
        super().__init__()
        self.items = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.items.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def having(self, tag, cls=None):
        return [a for t, a in self.items
                if t == tag and (cls is None or cls in (a.get("class") or "").split())]


def parse(page):
    p = Elements()
    p.feed(page)
    return p


def chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("MICA_REQUIRE_BROWSER") == "1":
        pytest.fail("Chromium is not installed (bash scripts/install-chromium.sh)")
    pytest.skip("Chromium is not installed (bash scripts/install-chromium.sh)")


def browse(page: Path, profile: Path, *args):
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args,
           page.resolve().as_uri()]
    # The timeout only guards against a hung browser; nothing here is timed.
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_the_report_renders_in_a_browser(transcript_run, tmp_path):
    run, trainer = transcript_run
    eval_file = tmp_path / "eval_transcripts.jsonl"
    from mica_train.trainer import evaluate

    evaluate(trainer.policy, trainer.cfg, transcripts=eval_file)
    out = tmp_path / "report.html"
    res = subprocess.run([sys.executable, "-m", "mica_core.cli", "report", str(run), "--out", str(out),
                          "--transcripts", str(eval_file), "--groups", "2"],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    page = out.read_text()
    # Self-contained: no external resource of any kind.
    for needle in ("http://", "https://", "src=", "<link", "@import", "url("):
        assert needle not in page, needle

    dom = parse(browse(out, tmp_path / "profile", "--dump-dom"))
    body = dom.having("body")[0]
    assert body.get("data-ready") == "1"                      # the page's script ran
    assert "js" in dom.having("html")[0].get("class", "")

    # Curves: one chart per metric the run logged, each line through all its points.
    records = read_metrics(run / "metrics.jsonl")
    expected = [k for k, _ in CURVES if any(k in r for r in records)]
    figures = dom.having("figure", "curve")
    assert [f["data-key"] for f in figures] == expected and "eval_pass_rate" in expected
    lines = dom.having("polyline", "line")
    assert len(lines) == len(figures)
    for fig, line in zip(figures, lines):
        assert len(line["points"].split()) == int(fig["data-points"]) == len(records)

    # Conversations: one source per transcript file; the latest training step shown first.
    sources = dom.having("div", "source")
    assert [s["data-label"] for s in sources] == ["training step 1", "training step 2",
                                                   "evaluation (eval_transcripts.jsonl)"]
    active = dom.having("div", "active")
    assert [a["id"] for a in active] == ["source-1"]
    options = dom.having("option")
    assert len(options) == 3

    # Every shown turn carries the advantage of its transcript, in order.
    shown = {}
    for t in read_transcripts(run / "transcripts" / "step_000002.jsonl"):
        shown.setdefault(t["group"], []).append(t)
    order = [idx for idx, (tag, a) in enumerate(dom.items) if tag == "div" and "source" in a.get("class", "").split()]
    items = dom.items[order[1]:order[2]]
    convs = [a for tag, a in items if tag == "details"]
    assert len(convs) == sum(len(v) for v in list(shown.values())[:2])
    rendered = [a["data-advantage"] for tag, a in items if tag == "div" and "assistant" in a.get("class", "")]
    gain = lambda t: t["initial_distance"] - t["final_distance"]  # noqa: E731
    want = [f"{tr['advantage']:.4f}".replace("-", "\u2212")
            for group in list(shown.values())[:2]
            for t in sorted(group, key=lambda t: (-gain(t), str(t["traj"])))
            for tr in t["turns"]]
    assert rendered == want and len(want) >= 6
    text = " ".join(dom.text)
    first = shown[next(iter(shown))][0]
    assert first["turns"][0]["user"] in text and first["turns"][0]["reply"][:10] in text

    # What a person sees: the screenshot shows the charts' blue and shaded turns.
    shot = tmp_path / "report.png"
    browse(out, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2200")
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[:2] == (2200, 1280)
    px = (img * 255).round().astype(int).reshape(-1, 3)
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    blue = ((abs(r - 9) < 30) & (abs(g - 105) < 30) & (abs(b - 218) < 30)).sum()
    green = ((g > r + 25) & (g > b + 15)).sum()
    red = ((r > g + 40) & (r > b + 40)).sum()
    assert blue > 500 and green > 500 and red > 500, (blue, green, red)
    artifacts = Path(os.environ.get("MICA_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, artifacts / "report.png")


def test_text_is_escaped_and_empty_runs_render(tmp_path):
    t = {"split": "train", "step": 1, "group": 0, "traj": 0, "scenario_id": "s<1>", "topic": "a & b",
         "initial_state": [-3, -2, -1], "initial_distance": 2.0, "final_distance": 1.0, "status": "max_turns",
         "pass": False, "turns": [{"turn": 0, "user": "<script>alert(1)</script>", "reply": "I hear you.",
                                   "rubric": None, "judge_failed": True, "state": [-3, -1, -1],
                                   "distance": 1.0, "reward": 1.0, "return": 1.0, "advantage": None}]}
    page = render_report([], [("training step 1", [t])], title="x")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "judge failed" in page and "No metrics yet" in page
    dom = parse(page)
    assert dom.having("div", "assistant")[0]["data-advantage"] == "\u2013"
    empty = tmp_path / "empty"
    empty.mkdir()
    out = write_report(empty)
    assert "No transcripts" in out.read_text()


def test_report_errors_are_one_line(tmp_path):
    from mica_train.report import main

    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path), "--transcripts", str(tmp_path / "nope.jsonl")]) == 2
    assert main([str(tmp_path), "--groups", "-1"]) == 2


def test_report_uses_config_and_every_group_with_groups_zero(transcript_run, tmp_path):
    run, trainer = transcript_run
    out = write_report(run, tmp_path / "all.html", groups=0)
    dom = parse(out.read_text())
    n = trainer.cfg.data.scenarios_per_step * trainer.cfg.data.group_size
    assert len(dom.having("details", "conv")) == 2 * n
    cards = " ".join(dom.text)
    assert "mica" in cards and json.loads((run / "config.json").read_text())["advantage"]["estimator"] == "mica"


# ----------------------------------------------------------------- malformed run directories

GOOD_TURN = {"turn": 0, "user": "hi", "reply": "hello", "rubric": {"C.Prog": 1}, "judge_failed": False,
             "state": [-3, -1, 0], "distance": 1.0, "reward": 1.0, "return": 1.0, "advantage": 0.5}
GOOD = {"split": "train", "step": 1, "group": 0, "traj": 0, "scenario_id": "s1", "topic": "t",
        "initial_state": [-3, -2, -1], "initial_distance": 2.0, "final_distance": 1.0,
        "status": "max_turns", "pass": False, "turns": [GOOD_TURN]}


def run_dir(tmp_path, *, transcript=None, transcript_bytes=None, metrics=None, config=None):
    """A run directory with one transcript file (``transcript`` an object, or raw bytes),
    ``metrics.jsonl`` (raw bytes) and ``config.json`` (raw bytes)."""
    run = tmp_path / "run"
    (run / "transcripts").mkdir(parents=True)
    line = transcript_bytes if transcript_bytes is not None else \
        (json.dumps(transcript if transcript is not None else GOOD) + "\n").encode()
    (run / "transcripts" / "step_000001.jsonl").write_bytes(
        (json.dumps(GOOD) + "\n").encode() + line)
    (run / "metrics.jsonl").write_bytes(metrics if metrics is not None else
                                        b'{"step": 1, "pass_rate": 0.5}\n{"step": 2, "pass_rate": 0.75}\n')
    if config is not None:
        (run / "config.json").write_bytes(config)
    return run


def turn_with(**changes):
    tr = dict(GOOD_TURN, **changes)
    return dict(GOOD, turns=[tr])


def without_turn_index():
    tr = dict(GOOD_TURN)
    del tr["turn"]
    return dict(GOOD, turns=[tr])


TRANSCRIPT = "transcripts/step_000001.jsonl"
# (case, run dir arguments, file named, line, words of the message): a one-line error, exit 2
ERRORS = [
    ("turn a string", dict(transcript=turn_with(turn="0")), TRANSCRIPT, 2, "'turns[0].turn'"),
    ("turn missing", dict(transcript=without_turn_index()), TRANSCRIPT, 2, "it is missing"),
    ("turn negative", dict(transcript=turn_with(turn=-1)), TRANSCRIPT, 2, "'turns[0].turn'"),
    ("status an integer", dict(transcript=dict(GOOD, status=3)), TRANSCRIPT, 2, "'status' must be text"),
    ("group a list", dict(transcript=dict(GOOD, group=[1, 2])), TRANSCRIPT, 2, "'group'"),
    ("rubric a list", dict(transcript=turn_with(rubric=[1])), TRANSCRIPT, 2, "'turns[0].rubric'"),
    ("state not a list", dict(transcript=turn_with(state="CAP")), TRANSCRIPT, 2, "'turns[0].state'"),
    ("initial state of text", dict(transcript=dict(GOOD, initial_state=["a"])), TRANSCRIPT, 2,
     "'initial_state'"),
    ("a turn not an object", dict(transcript=dict(GOOD, turns=[3])), TRANSCRIPT, 2, "'turns[0]'"),
    ("user text an object", dict(transcript=turn_with(user={"a": 1})), TRANSCRIPT, 2, "'turns[0].user'"),
    ("no turns list", dict(transcript={"group": 0}), TRANSCRIPT, 2, "not an episode transcript"),
    ("transcript not UTF-8", dict(transcript_bytes=b'{"turns": []}\xff\n'), TRANSCRIPT, 2, "UTF-8"),
    ("transcript not JSON", dict(transcript_bytes=b'{"turns": [\n'), TRANSCRIPT, 2, "not valid JSON"),
    ("config not an object", dict(config=b"[1, 2]"), "config.json", None, "not a JSON object"),
    ("config not JSON", dict(config=b'{"a": '), "config.json", 1, "not valid JSON"),
    ("config not UTF-8", dict(config=b'{"a": "\xff"}'), "config.json", None, "UTF-8"),
]


@pytest.mark.parametrize("case, kwargs, file, line, word", ERRORS, ids=[c[0] for c in ERRORS])
def test_malformed_run_dirs_are_one_line_errors(tmp_path, capsys, case, kwargs, file, line, word):
    from mica_train.report import main

    run = run_dir(tmp_path, **kwargs)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mica report: error: "), err
    where = f"{run / file}:{line}: " if line is not None else f"{run / file}: "
    assert where in lines[0] and word in lines[0], lines[0]
    assert not (run / "report.html").exists()


# (case, run dir arguments, what the page shows): these render
RENDERED = [
    ("float state", dict(transcript=turn_with(state=[-2.5, 0.0, 1.25])), "C \u22122.5 A +0 P +1.25"),
    ("integer state", dict(), "C \u22123 A \u22121 P +0"),
    ("huge metric values", dict(metrics=b'{"step": 1, "pass_rate": 1e308}\n{"step": 2, "pass_rate": -1e308}\n'
                                        b'{"step": 3, "pass_rate": 1.7976931348623157e308}\n'),
     "pass rate (training rollouts)"),
    ("huge steps", dict(metrics=b'{"step": -1e308, "kl": 1}\n{"step": 1e308, "kl": 2}\n'), "KL to base"),
    ("config sections of the wrong type", dict(config=b'{"advantage": [1], "data": "x"}'), "estimator"),
]


@pytest.mark.parametrize("case, kwargs, text", RENDERED, ids=[c[0] for c in RENDERED])
def test_odd_but_readable_run_dirs_render(tmp_path, capsys, case, kwargs, text):
    from mica_train.report import main

    run = run_dir(tmp_path, **kwargs)
    assert main([str(run)]) == 0, capsys.readouterr().err
    page = (run / "report.html").read_text()
    dom = parse(page)
    assert text in " ".join(dom.text)
    for key, label in CURVES:  # each chart captioned by its metric
        if f'data-key="{key}"' in page:
            assert f"<figcaption>{label} " in page, key
    for line in dom.having("polyline", "line"):  # every point drawn inside the chart
        for point in line["points"].split():
            x, y = map(float, point.split(","))
            assert 0 <= x <= 320 and 0 <= y <= 170, line["points"]


SKIPPED = [  # metrics lines a report skips, with a count: the curves lose a point, not the page
    ("a corrupt line", b'{"step": 1, "pass_rate": 0.5}\n{"step": 2, "pass_\n{"step": 3, "pass_rate": 0.7}\n', [2]),
    ("a line not UTF-8", b'{"step": 1, "pass_rate": 0.5}\n\xff\xfe\n{"step": 3, "pass_rate": 0.7}\n', [2]),
    ("a line not an object", b'[1]\n{"step": 1, "pass_rate": 0.5}\n7\n{"step": 3, "pass_rate": 0.7}\n', [1, 3]),
]


@pytest.mark.parametrize("case, metrics, lines", SKIPPED, ids=[c[0] for c in SKIPPED])
def test_unreadable_metrics_lines_are_skipped_and_counted(tmp_path, capsys, case, metrics, lines):
    from mica_train.report import main

    run = run_dir(tmp_path, metrics=metrics)
    assert main([str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mica report: warning: "), err
    note = f"skipped {len(lines)} unreadable line"
    assert note in err[0] and f"line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}" in err[0]
    page = parse((run / "report.html").read_text())
    assert note in " ".join(page.text)
    (curve,) = [f for f in page.having("figure", "curve") if f["data-key"] == "pass_rate"]
    assert curve["data-points"] == "2"


def test_out_a_directory_is_one_line(tmp_path, capsys):
    from mica_train.report import main

    run = run_dir(tmp_path)
    (tmp_path / "outdir").mkdir()
    assert main([str(run), "--out", str(tmp_path / "outdir")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory" in err[0] and "--out" in err[0], err
    assert os.listdir(tmp_path / "outdir") == []


def test_ticks_cover_any_finite_range():
    from mica_train.report import _nice_ticks

    for lo, hi in ((-1e308, 1e308), (-1.7976931348623157e308, 1.7976931348623157e308), (0.0, 1e-300),
                   (1.0, 1.0 + 2**-50), (-3.0, 7.0)):
        ticks, _ = _nice_ticks(lo, hi)
        assert 1 <= len(ticks) <= 8 and all(math.isfinite(t) for t in ticks), (lo, hi, ticks)
