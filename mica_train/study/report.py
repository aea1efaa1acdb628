"""The study's report: Markdown tables, the figure, and the files a study writes.

Every study writes ``RUN_DIR/study.json``, ``RUN_DIR/study_curves.png`` and ``RUN_DIR/study.md``
(the tables). ``mica study --publish`` also writes the committed results of a mica checkout:
``bench/results/study.json``, ``docs/study_curves.png`` and the tables of ``docs/study.md``,
which sit between ``<!-- study:NAME -->`` and ``<!-- /study:NAME -->`` markers (NAME is
``evaluation``, ``behaviour`` or ``credit``) so that the prose around them stays as written.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "PUBLISHED",
    "TABLES",
    "check_publish_target",
    "format_behaviour_table",
    "format_credit_table",
    "format_markdown",
    "format_table",
    "plot_study_curves",
    "publish",
    "replace_tables",
    "write_outputs",
]

# The committed results, relative to the root of a mica checkout.
PUBLISHED = {
    "json": Path("bench/results/study.json"),
    "figure": Path("docs/study_curves.png"),
    "markdown": Path("docs/study.md"),
}
FIGURE_NAME = "study_curves.png"


def _ordered(study: dict) -> list[str]:
    """Estimators in the plan's order (a ``study.json`` read back has its keys sorted)."""
    names = study.get("settings", {}).get("estimators") or list(study["estimators"])
    return [e for e in names if e in study["estimators"]]


def format_table(study: dict) -> str:
    """The evaluation results as Markdown (docs/study.md's results table)."""
    ref = study["reference"]
    lines = [
        f"| estimator | pass rate (mean ± sd) | per seed | mean final distance | energy | positive-energy ratio | turns | {ref} − it (pass, mean ± sd) | {ref} wins/ties/losses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for est in _ordered(study):
        e = study["estimators"][est]
        m = e["metrics"]
        p = e[f"paired_vs_{ref}"]["pass_rate"]
        per_seed = " ".join(f"{v:.2f}" for v in e["pass_rate"]["per_seed"])
        paired = "" if est == ref else f"{p['mean']:+.3f} ± {p['std']:.3f}"
        wtl = "" if est == ref else f"{p['wins']}/{p['ties']}/{p['losses']}"
        lines.append(
            f"| `{est}` | {m['pass_rate']['mean']:.3f} ± {m['pass_rate']['std']:.3f} | {per_seed} | "
            f"{m['mean_final_distance']['mean']:.2f} ± {m['mean_final_distance']['std']:.2f} | "
            f"{m['mean_energy']['mean']:.1f} | {m['mean_positive_energy_ratio']['mean']:.3f} | "
            f"{m['mean_turns']['mean']:.1f} | {paired} | {wtl} |"
        )
    b = study.get("before")
    if b:
        lines.append(
            f"| warm start (no RL) | {b['pass_rate']:.3f} | | {b['mean_final_distance']:.2f} | "
            f"{b['mean_energy']:.1f} | {b['mean_positive_energy_ratio']:.3f} | {b['mean_turns']:.1f} | | |"
        )
    return "\n".join(lines)


def format_behaviour_table(study: dict) -> str:
    """What the evaluated policies do (``evaluation.behaviour_summary``), means over the seeds,
    as Markdown. The warm start is one evaluation: it has no spread over seeds."""
    lines = ["| estimator | pacing agreement | opening validation | validate | reframe | plan | several acts | no act |",
             "|---|---|---|---|---|---|---|---|"]
    acts = ("validate", "reframe", "plan", "multiple", "none")
    for est in _ordered(study):
        b = study["estimators"][est].get("behaviour")
        if not b:
            continue
        a = b["act_shares"]
        lines.append(
            f"| `{est}` | {b['pacing_agreement']['mean']:.3f} ± {b['pacing_agreement']['std']:.3f} | "
            f"{b['opening_validation']['mean']:.3f} | " + " | ".join(f"{a[k]['mean']:.3f}" for k in acts) + " |"
        )
    before = (study.get("before") or {}).get("behaviour")
    if before:
        lines.append(
            f"| warm start (no RL) | {before['pacing_agreement']:.3f} | {before['opening_validation']:.3f} | "
            + " | ".join(f"{before['act_shares'][k]:.3f}" for k in acts) + " |"
        )
    return "\n".join(lines)


def format_credit_table(credit: dict, ref: str = "mica") -> str:
    """The credit diagnostic as Markdown."""
    lines = [f"| estimator | AUC (mean ± sd over seeds) | effect size | {ref} AUC − it (mean ± sd) |",
             "|---|---|---|---|"]
    for est, e in credit["estimators"].items():
        d = e.get(f"auc_{ref}_minus_it")
        paired = "" if est == ref or d is None else f"{d['mean']:+.3f} ± {d['std']:.3f}"
        lines.append(f"| `{est}` | {e['auc']['mean']:.3f} ± {e['auc']['std']:.3f} | "
                     f"{e['effect']['mean']:+.3f} | {paired} |")
    return "\n".join(lines)


def _credit_in_order(study: dict) -> dict:
    credit = dict(study["credit_diagnostic"])
    names = _ordered(study)
    credit["estimators"] = {e: credit["estimators"][e] for e in names if e in credit["estimators"]}
    return credit


TABLES = {
    "evaluation": format_table,
    "behaviour": format_behaviour_table,
    "credit": lambda study: format_credit_table(_credit_in_order(study), study["reference"]),
}


def format_markdown(study: dict, figure: str | None = FIGURE_NAME) -> str:
    """A study's report as Markdown: the setup in one paragraph, the three tables, the figure."""
    s = study["settings"]
    state = "complete" if study["complete"] else "partial"
    head = [
        "# mica study: results",
        "",
        f"`{study['command']}`: {study['runs_done']} of {study['runs_planned']} runs ({state}); "
        f"{len(s['estimators'])} estimators x {len(s['seeds'])} seeds; {s['steps']} step{'' if s['steps'] == 1 else 's'} of "
        f"{s['scenarios_per_step']} scenarios x {s['group_size']} rollouts per run "
        f"({s['episodes_per_run']} episodes); evaluation: {s['eval_episodes']} episodes of up to "
        f"{s['eval_max_turns']} turns. Analysis and setup: docs/study.md.",
    ]
    sections = [
        ("Evaluation (mean ± sd over seeds)", "evaluation"),
        ("Behaviour on the evaluation episodes", "behaviour"),
        ("Credit diagnostic (no training)", "credit"),
    ]
    out = head
    for title, name in sections:
        if name == "credit" and "credit_diagnostic" not in study:
            continue
        out += ["", f"## {title}", "", TABLES[name](study)]
    if figure:
        out += ["", f"![learning curves]({figure})"]
    return "\n".join(out) + "\n"


def _marker_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- study:{name} -->\n)(.*?)(<!-- /study:{name} -->)", re.S)


def _check_markers(text: str, source: str) -> None:
    for name in TABLES:
        if not _marker_pattern(name).search(text):
            raise ValueError(f"{source}: no <!-- study:{name} --> ... <!-- /study:{name} --> block")


def replace_tables(text: str, study: dict, source: str = "docs/study.md") -> str:
    """``text`` with the body of each ``<!-- study:NAME -->`` block replaced by that table."""
    _check_markers(text, source)
    for name, fmt in TABLES.items():
        body = fmt(study) + "\n"
        text = _marker_pattern(name).sub(lambda m, body=body: m.group(1) + body + m.group(3), text, count=1)
    return text


def check_publish_target(root: str | Path = ".") -> None:
    """``--publish`` writes into a mica checkout: fail before the study runs, not after it."""
    md = Path(root) / PUBLISHED["markdown"]
    if not md.is_file():
        raise ValueError(f"--publish: {md} not found (run it from the root of a mica checkout)")
    _check_markers(md.read_text(encoding="utf-8"), str(md))


def plot_study_curves(study: dict, out_png: str | Path) -> Path | None:
    """Mean learning curves per estimator (training rollouts), the final evaluation pass rates,
    and the credit diagnostic's AUC when present."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from mica_core.atomic import atomic_path

    all_ests = _ordered(study)
    ests = [e for e in all_ests if study["estimators"][e]["curve"].get("step")]
    if not ests:
        return None
    credit = study.get("credit_diagnostic")
    fig, axes = plt.subplots(1, 4 if credit else 3, figsize=(17 if credit else 13, 3.6))
    cmap = plt.get_cmap("tab10")
    for i, est in enumerate(ests):
        c = study["estimators"][est]["curve"]
        style = {"color": cmap(i % 10), "lw": 2.2 if est == "mica" else 1.2, "label": est}
        if "pass_rate_mean" in c:
            axes[0].plot(c["step"], c["pass_rate_mean"], **style)
        if "mean_final_distance_mean" in c:
            axes[1].plot(c["step"], c["mean_final_distance_mean"], **style)
    axes[0].set_title("training pass rate (mean over seeds)", fontsize=9)
    axes[1].set_title("training mean final distance (mean over seeds)", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax = axes[2]
    for i, est in enumerate(all_ests):
        pr = study["estimators"][est]["pass_rate"]
        vals = [v for v in pr["per_seed"] if v is not None]
        ax.scatter([i] * len(vals), vals, s=12, color=cmap(i % 10), alpha=0.6)
        ax.errorbar([i], [pr["mean"]], yerr=[pr["std"]], fmt="o", color="black", ms=4, capsize=3)
    if study.get("before"):
        ax.axhline(study["before"]["pass_rate"], color="gray", ls="--", lw=1, label="warm start")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks(range(len(all_ests)))
    ax.set_xticklabels(all_ests, rotation=40, ha="right", fontsize=7)
    ax.set_title("evaluation pass rate (seeds, mean ± sd)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(labelsize=7)
    if credit:
        ax = axes[3]
        names = [e for e in all_ests if e in credit["estimators"]]
        means = [credit["estimators"][e]["auc"]["mean"] for e in names]
        sds = [credit["estimators"][e]["auc"]["std"] for e in names]
        ax.bar(range(len(names)), means, yerr=sds, color=[cmap(i % 10) for i in range(len(names))], capsize=3)
        ax.axhline(0.5, color="gray", ls="--", lw=1)
        ax.set_ylim(0.45, max(means + [0.55]) + 0.05)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title("credit diagnostic: AUC for pacing's act (no training)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=75)
    plt.close(fig)
    return out_png


def write_outputs(study: dict, run_dir: str | Path) -> dict[str, Path]:
    """``study.json``, ``study_curves.png`` (when there are curves) and ``study.md`` in
    ``run_dir``; sets ``study["plot"]``. Returns the paths written."""
    from mica_core.atomic import atomic_write_json, atomic_write_text

    run_dir = Path(run_dir)
    png = plot_study_curves(study, run_dir / FIGURE_NAME)
    study["plot"] = str(png) if png else None
    out = {"json": run_dir / "study.json", "markdown": run_dir / "study.md"}
    atomic_write_json(out["json"], study)
    atomic_write_text(out["markdown"], format_markdown(study, FIGURE_NAME if png else None))
    if png:
        out["figure"] = png
    return out


def publish(study: dict, root: str | Path = ".") -> dict[str, Path]:
    """Write the committed results into the mica checkout at ``root``: the JSON, the figure
    and the tables of docs/study.md (its prose is kept)."""
    from mica_core.atomic import atomic_write_json, atomic_write_text

    root = Path(root)
    md = root / PUBLISHED["markdown"]
    text = replace_tables(md.read_text(encoding="utf-8"), study, str(md))
    png = plot_study_curves(study, root / PUBLISHED["figure"])
    published = dict(study, plot=str(PUBLISHED["figure"]) if png else None)
    atomic_write_json(root / PUBLISHED["json"], published)
    atomic_write_text(md, text)
    out = {"json": root / PUBLISHED["json"], "markdown": md}
    if png:
        out["figure"] = png
    return out
