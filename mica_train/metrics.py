"""Per-step metrics: ``metrics.jsonl`` (one JSON object per step), TensorBoard scalars and text,
and PNG learning curves.

``metrics.jsonl`` is append-only: each step adds one line (written and flushed in one call), so
the cost of a step does not grow with the run. On resume the file is cut back to the
checkpoint's step (those steps run again; a line half-written by a kill is dropped too) and
TensorBoard purges them (``purge_step``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mica_core.atomic import atomic_path, atomic_write_text

__all__ = ["CURVES", "MetricsLogger", "json_safe", "plot_learning_curves", "read_metrics"]

# (metric key, panel title) of the learning-curve figure.
CURVES = (
    ("pass_rate", "pass rate (training rollouts)"),
    ("mean_final_distance", "mean final distance"),
    ("reward_mean", "mean turn reward (IDR)"),
    ("advantage_std", "advantage std"),
    ("clip_frac", "clip fraction"),
    ("kl", "KL to base (k3)"),
    ("entropy", "entropy (nats/token)"),
    ("eval_pass_rate", "pass rate (evaluation set)"),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a last line cut short by a kill is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON object") from None
    return records


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts and lists too) replaced by
    None: JSON has no NaN, and ``json.dumps`` would write a bare ``NaN`` other readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _line(record: dict[str, Any]) -> str:
    return json.dumps(json_safe(record), sort_keys=True, allow_nan=False) + "\n"


class MetricsLogger:
    """Writes metrics of ``run_dir``; only the main process should own one."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        planted = self.path.is_symlink()
        self.records = [] if planted else [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        kept = "".join(_line(r) for r in self.records)
        if planted or not self.path.is_file() or self.path.read_text() != kept:
            # truncate to the resumed step, once; a link planted here is replaced, not followed
            atomic_write_text(self.path, kept)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(_line(record))
            fh.flush()
            os.fsync(fh.fileno())
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and _finite(v):
                    self.tb.add_scalar(k.replace("time_", "time/", 1) if k.startswith("time_") else k, v, step)
            self.tb.flush()

    def log_text(self, tag: str, markdown: str, step: int) -> None:
        """A Markdown text (TensorBoard's text tab) at ``step``."""
        if self.tb is not None:
            self.tb.add_text(tag, markdown, int(step))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def save_figure(fig, out_png: str | Path, *, dpi: int) -> Path:
    """Lay out ``fig``, write it as PNG atomically (a reader never sees half a file) and
    close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return out_png


def plot_learning_curves(records: Sequence[dict[str, Any]], out_png: str | Path, title: str = "") -> Path | None:
    """One panel per metric in :data:`CURVES` that the records contain; written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = []
    for key, label in CURVES:
        pts = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
        if pts:
            panels.append((label, pts))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, pts) in zip(axes.flat, panels):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10, parse_math=False)  # a path, not math text: "$" is literal
    return save_figure(fig, out_png, dpi=110)
