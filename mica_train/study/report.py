"""The study's report: Markdown tables, the figure, and the files a study writes.

Every study writes ``RUN_DIR/study.json``, ``RUN_DIR/study_curves.png`` and ``RUN_DIR/study.md``
(the tables). ``mica study --publish`` also writes the committed results of a mica checkout:
``bench/results/study.json`` (``{"format": 2, "studies": {POLICY: study}}``, one study per
policy class; a file holding one study at its top level, the earlier layout, reads as the
language-model study), the figure (``docs/study_curves.png``; ``docs/study_curves_tabular.png``
for the tabular policy) and the tables of ``docs/study.md``, which sit between
``<!-- study:NAME -->`` and ``<!-- /study:NAME -->`` markers (NAME is a key of :data:`TABLES`,
prefixed ``tabular-`` for the tabular study) so that the prose around them stays as written.

Contrast rows of the earlier procedure (two-sided sign-flip p-values, bootstrap intervals: no
``p_reverse`` key) are shown with that procedure's columns.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..metrics import json_safe
from .plan import ACT_KEYS

__all__ = [
    "PUBLISHED",
    "TABLES",
    "check_publish_target",
    "format_behaviour_table",
    "format_contrast_table",
    "format_credit_table",
    "format_markdown",
    "format_movement_table",
    "format_secondary_table",
    "format_table",
    "json_safe",
    "plot_study_curves",
    "publish",
    "published_studies",
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
PUBLISHED_FORMAT = 2


def _policy(study: dict) -> str:
    return study.get("settings", {}).get("policy", "lm")


def _prefix(policy: str) -> str:
    return "" if policy == "lm" else f"{policy}-"


def _figure(policy: str) -> Path:
    f = PUBLISHED["figure"]
    return f if policy == "lm" else f.with_name(f"{f.stem}_{policy}{f.suffix}")


def _start(study: dict) -> str:
    """What step 0 is: the warm start (language model) or the uniform policy (tabular)."""
    return "warm start" if _policy(study) == "lm" else "uniform policy"


def published_studies(obj: dict) -> dict[str, dict]:
    """The studies of a published ``study.json`` by policy class (``lm``, ``tabular``); a file
    of the earlier layout (one study at the top level) is the language-model study."""
    if "studies" in obj:
        return dict(obj["studies"])
    return {"lm": obj}


def _ordered(study: dict) -> list[str]:
    """Estimators in the plan's order (a ``study.json`` read back has its keys sorted)."""
    names = study.get("settings", {}).get("estimators") or list(study["estimators"])
    return [e for e in names if e in study["estimators"]]


def _num(x, fmt: str = ".3f", signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, ("+" if signed else "") + fmt)


def _float(x) -> float:
    return float("nan") if x is None else float(x)


def _p(p) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "n/a"
    if p == 0 or p >= 0.01:
        return f"{p:.3f}"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _verdict(row: dict) -> str:
    if row["verdict"] == "undecided":
        return "undecided"
    better = f"`{row['a'] if row['verdict'] == 'a' else row['b']}` better"
    if "p_reverse" not in row:  # the earlier procedure
        return f"**{better}**"
    return f"**held** ({better})" if row["verdict"] == "a" else f"**reversed** ({better})"


def _legacy(rows: list[dict]) -> bool:
    return bool(rows) and "p_reverse" not in rows[0]


def _contrast_rows(rows: list[dict], metric_title: str | None = None) -> list[str]:
    out = []
    if not _legacy(rows):
        for r in rows:
            lead = f"| {metric_title} " if metric_title else ""
            out.append(
                f"{lead}| `{r['a']}` − `{r['b']}` | {_num(r['mean'], signed=True)} | "
                f"[{_num(r['ci'][0], signed=True)}, {_num(r['ci'][1], signed=True)}] | "
                f"{r['wins']}/{r['ties']}/{r['losses']} | {_p(r['p'])} | {_p(r['p_holm'])} | "
                f"{_num(r['sd'])} | {_num(r['mde'])} | {_num(r['mde_alpha'])} | {_verdict(r)} |"
            )
        return out
    for r in rows:
        lead = f"| {metric_title} " if metric_title else ""
        out.append(
            f"{lead}| `{r['a']}` − `{r['b']}` | {_num(r['mean'], signed=True)} | "
            f"[{_num(r['ci'][0], signed=True)}, {_num(r['ci'][1], signed=True)}] | "
            f"{r['wins']}/{r['ties']}/{r['losses']} | "
            f"{_p(r['p'])} | {_p(r['p_holm'])} | {_num(r['sd'])} | {_num(r['mde'])} | {_num(r['mde_family'])} | "
            f"{_verdict(r)} |"
        )
    return out


def _t_header(first: str, m: int, alpha: float) -> list[str]:
    cols = first.count("|") - 1
    return [
        f"{first} mean difference | 95 % CI (t) | a wins/ties/losses | p (one-sided t) | p (Holm, {m}) | "
        f"sd of differences | MDE (α {alpha / max(m, 1):.3g}, Holm's first step) | MDE (α {alpha:g}) | verdict |",
        "|" + "---|" * (cols + 9),
    ]


def format_contrast_table(study: dict) -> str:
    """The pre-registered contrasts on the primary metric as Markdown."""
    alpha = study.get("design", {}).get("alpha", 0.05)
    m = len(study["contrasts"])
    if not _legacy(study["contrasts"]):
        return "\n".join(_t_header("| contrast (a − b) |", m, alpha) + _contrast_rows(study["contrasts"]))
    lines = [
        f"| contrast (a − b) | mean difference | 95 % CI (bootstrap) | a wins/ties/losses | p (sign-flip) | "
        f"p (Holm, {m}) | sd of differences | MDE (α {alpha:g}) | MDE (α {alpha / max(m, 1):g}) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + _contrast_rows(study["contrasts"]))


def format_secondary_table(study: dict) -> str:
    """The same contrasts on the secondary metrics (each family Holm-corrected on its own)."""
    titles = {"distance_auc_reduction": "distance reduction (AUC)", "final_pass_rate": "pass rate, last checkpoint"}
    secondary = study.get("secondary_contrasts", {})
    first = next(iter(secondary.values()), [])
    if not _legacy(first):
        alpha = study.get("design", {}).get("alpha", 0.05)
        lines = _t_header("| metric | contrast (a − b) |", len(first), alpha)
        for key, rows in secondary.items():
            lines += _contrast_rows(rows, titles.get(key, key))
        return "\n".join(lines)
    lines = [
        "| metric | contrast (a − b) | mean difference | 95 % CI | a wins/ties/losses | p (sign-flip) | p (Holm) | "
        "sd | MDE (α 0.05) | MDE (α 0.01) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rows in study.get("secondary_contrasts", {}).items():
        lines += _contrast_rows(rows, titles.get(key, key))
    return "\n".join(lines)


def format_table(study: dict) -> str:
    """Per estimator: the primary metric and the learning curve at the checkpoints."""
    steps = study["settings"]["checkpoints"]
    head = " | ".join(f"step {s}" for s in steps)
    lines = [
        f"| estimator | pass rate AUC (mean ± sd) | 95 % CI | per seed | pass rate at {head} | "
        "mean final distance AUC | distance at last checkpoint |",
        "|---|---|---|---|" + "---|" * len(steps) + "---|---|",
    ]
    for est in _ordered(study):
        e = study["estimators"][est]
        auc, dist = e["pass_rate_auc"], e["distance_auc"]
        per_seed = " ".join(_num(v, ".2f") for v in auc["per_seed"])
        at = " | ".join(_num(c["mean"]) for c in e["checkpoints"].get("pass_rate", []))
        lines.append(
            f"| `{est}` | {_num(auc['mean'])} ± {_num(auc['std'])} | [{_num(auc['ci'][0])}, {_num(auc['ci'][1])}] | "
            f"{per_seed} | {at} | {_num(dist['mean'], '.2f')} ± {_num(dist['std'], '.2f')} | "
            f"{_num(e['final_distance']['mean'], '.2f')} |"
        )
    b = study.get("before")
    if b:
        lines.append(f"| {_start(study)} (no RL) | {_num(b['pass_rate'])} | | | " + " | ".join([""] * len(steps))
                     + f" | {_num(b['mean_final_distance'], '.2f')} | {_num(b['mean_final_distance'], '.2f')} |")
    return "\n".join(lines)


def format_movement_table(study: dict) -> str:
    """How far each estimator's policies moved from the warm start (at the last checkpoint)."""
    lines = ["| estimator | act-mix change (TV, mean; min over seeds) | pass rate change | "
             "mean final distance change | "
             "clip fraction (mean over steps) | largest clip fraction of a step |",
             "|---|---|---|---|---|---|"]
    for est in _ordered(study):
        mv = study["estimators"][est].get("movement") or {}
        if "act_tv" not in mv:
            continue
        tv = [v for v in mv["act_tv"]["per_seed"] if v is not None]
        lines.append(
            f"| `{est}` | {_num(mv['act_tv']['mean'])}; {_num(min(tv) if tv else None)} | "
            f"{_num(mv['pass_rate_change']['mean'], signed=True)} ± {_num(mv['pass_rate_change']['std'])} | "
            f"{_num(mv['distance_change']['mean'], '.2f', signed=True)} ± "
            f"{_num(mv['distance_change']['std'], '.2f')} | "
            f"{_num(mv['clip_frac_mean']['mean'], '.4f')} | {_num(mv['clip_frac_max']['mean'], '.4f')} |"
        )
    rep = (study.get("before") or {}).get("replicate")
    if rep:
        b = study["before"]
        lines.append(
            f"| {_start(study)} on other episodes (noise floor) | {_num(rep['act_tv'])} | "
            f"{_num(rep['pass_rate'] - b['pass_rate'], signed=True)} | "
            f"{_num(rep['mean_final_distance'] - b['mean_final_distance'], '.2f', signed=True)} | | |"
        )
    return "\n".join(lines)


def format_behaviour_table(study: dict) -> str:
    """What the evaluated policies do at the last checkpoint (``evaluation.behaviour_summary``),
    means over the seeds. The warm start is one evaluation: it has no spread over seeds."""
    lines = ["| estimator | pacing agreement | opening validation | validate | reframe | plan | several acts "
             "| no act |", "|---|---|---|---|---|---|---|---|"]
    for est in _ordered(study):
        b = study["estimators"][est].get("behaviour")
        if not b:
            continue
        a = b["act_shares"]
        lines.append(
            f"| `{est}` | {_num(b['pacing_agreement']['mean'])} ± {_num(b['pacing_agreement']['std'])} | "
            f"{_num(b['opening_validation']['mean'])} | " + " | ".join(_num(a[k]["mean"]) for k in ACT_KEYS) + " |"
        )
    before = (study.get("before") or {}).get("behaviour")
    if before:
        lines.append(
            f"| {_start(study)} (no RL) | {_num(before['pacing_agreement'])} | {_num(before['opening_validation'])} | "
            + " | ".join(_num(before["act_shares"][k]) for k in ACT_KEYS) + " |"
        )
    return "\n".join(lines)


def format_credit_table(study: dict) -> str:
    """The credit diagnostic as Markdown: the pacing-label AUC and the correlation with the
    forked true advantage, means ± sd over seeds, and a line on the true advantage itself."""
    credit = study["credit_diagnostic"]
    names = [e for e in _ordered(study) if e in credit["estimators"]]
    has_true = "true_pearson" in credit["estimators"][names[0]] if names else False
    head = "| estimator | AUC for pacing's act | effect size |"
    rule = "|---|---|---|"
    if has_true:
        head += " correlation with A* (Pearson) | (Spearman) |"
        rule += "---|---|"
    lines = [head, rule]
    for est in names:
        e = credit["estimators"][est]
        row = (f"| `{est}` | {_num(e['auc']['mean'])} ± {_num(e['auc']['std'])} | "
               f"{_num(e['effect']['mean'], signed=True)} |")
        if has_true:
            row += (f" {_num(e['true_pearson']['mean'])} ± {_num(e['true_pearson']['std'])} | "
                    f"{_num(e['true_spearman']['mean'])} |")
        lines.append(row)
    ta = credit.get("true_advantage")
    if ta:
        lines += [
            "",
            f"A* from {ta['forks_per_act']} forks per act on every turn of {ta['fork_scenarios']} cards per seed "
            f"({_num(sum(ta['turns_per_seed']) / len(ta['turns_per_seed']), '.0f')} turns per seed): sd "
            f"{_num(ta['sd']['mean'], '.2f')}, split-half reliability {_num(ta['reliability']['mean'])}; "
            f"the pacing label's correlation with A* {_num(ta['good_label_pearson']['mean'])} "
            f"(mean A* {_num(ta['good_mean']['mean'], '.2f', signed=True)} on pacing's act, "
            f"{_num(ta['other_mean']['mean'], '.2f', signed=True)} on the others).",
        ]
    return "\n".join(lines)


def _has_credit(study: dict) -> bool:
    return "credit_diagnostic" in study


TABLES = {
    "contrasts": format_contrast_table,
    "evaluation": format_table,
    "secondary": format_secondary_table,
    "movement": format_movement_table,
    "behaviour": format_behaviour_table,
    "credit": format_credit_table,
}


def format_markdown(study: dict, figure: str | None = FIGURE_NAME) -> str:
    """A study's report as Markdown: the setup in one paragraph, the tables, the figure."""
    s = study["settings"]
    state = "complete" if study["complete"] else "partial"
    head = [
        "# mica study: results",
        "",
        f"`{study['command']}`: {study['runs_done']} of {study['runs_planned']} runs ({state}); "
        f"{len(s['estimators'])} estimators x {len(s['seeds'])} seeds; "
        f"{s['steps']} step{'' if s['steps'] == 1 else 's'} of "
        f"{s['scenarios_per_step']} scenarios x {s['group_size']} rollouts per run "
        f"({s['episodes_per_run']} episodes); evaluation at steps {', '.join(map(str, s['checkpoints']))}: "
        f"{s['eval_episodes']} episodes of up to {s['eval_max_turns']} turns each. Analysis and setup: docs/study.md.",
    ]
    sections = [
        ("Pre-registered contrasts (primary metric: pass rate averaged over the checkpoints)", "contrasts"),
        ("Per estimator", "evaluation"),
        ("Secondary metrics", "secondary"),
        ("Did the policies move?", "movement"),
        ("Behaviour at the last checkpoint", "behaviour"),
        ("Credit diagnostic (no training)", "credit"),
    ]
    out = head
    for title, name in sections:
        if name == "credit" and not _has_credit(study):
            continue
        out += ["", f"## {title}", "", TABLES[name](study)]
    if figure:
        out += ["", f"![learning curves]({figure})"]
    return "\n".join(out) + "\n"


def _marker_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- study:{name} -->\n)(.*?)(<!-- /study:{name} -->)", re.S)


def _tables_of(policy: str) -> list[str]:
    """The tables a policy's study publishes (the tabular study has no credit diagnostic)."""
    return [n for n in TABLES if policy == "lm" or n != "credit"]


def _check_markers(text: str, source: str, policy: str = "lm") -> None:
    for name in _tables_of(policy):
        name = _prefix(policy) + name
        if not _marker_pattern(name).search(text):
            raise ValueError(f"{source}: no <!-- study:{name} --> ... <!-- /study:{name} --> block")


def replace_tables(text: str, study: dict, source: str = "docs/study.md") -> str:
    """``text`` with the body of each ``<!-- study:NAME -->`` block of the study's policy class
    (NAME prefixed ``tabular-`` for the tabular study) replaced by that table. ``study`` may also
    be a published ``study.json`` holding several studies: each replaces its own blocks."""
    if "studies" in study:
        for one in study["studies"].values():
            text = replace_tables(text, one, source)
        return text
    policy = _policy(study)
    _check_markers(text, source, policy)
    for name in _tables_of(policy):
        if name == "credit" and not _has_credit(study):
            continue
        body = TABLES[name](study) + "\n"
        text = _marker_pattern(_prefix(policy) + name).sub(lambda m, body=body: m.group(1) + body + m.group(3),
                                                           text, count=1)
    return text


def check_publish_target(root: str | Path = ".", policy: str = "lm") -> None:
    """``--publish`` writes into a mica checkout: fail before the study runs, not after it."""
    md = Path(root) / PUBLISHED["markdown"]
    if not md.is_file():
        raise ValueError(f"--publish: {md} not found (run it from the root of a mica checkout)")
    _check_markers(md.read_text(encoding="utf-8"), str(md), policy)


def plot_study_curves(study: dict, out_png: str | Path) -> Path | None:
    """The evaluation learning curves per estimator (mean over seeds with 95 % bootstrap CI
    bands; step 0 is the shared warm start), the contrasts with their CIs, and the credit
    diagnostic's correlation with the true advantage when present."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..metrics import save_figure

    ests = [e for e in _ordered(study) if study["estimators"][e]["checkpoints"].get("step")]
    if not ests:
        return None
    credit = study.get("credit_diagnostic")
    panels = 4 if credit else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 3.8))
    cmap = plt.get_cmap("tab10")
    before = study.get("before")
    ci_name = study.get("design", {}).get("ci", "bootstrap")
    for k, (metric, title) in enumerate((("pass_rate", "evaluation pass rate"),
                                         ("mean_final_distance", "evaluation mean final distance"))):
        ax = axes[k]
        for i, est in enumerate(ests):
            ck = study["estimators"][est]["checkpoints"]
            steps = list(ck["step"])
            # A published study holds null for what it could not compute (a t interval of one seed).
            mean = [_float(c["mean"]) for c in ck[metric]]
            low = [_float(c["ci"][0]) for c in ck[metric]]
            high = [_float(c["ci"][1]) for c in ck[metric]]
            if before:
                start = before[metric]
                steps, mean, low, high = [0] + steps, [start] + mean, [start] + low, [start] + high
            color = cmap(i % 10)
            ax.plot(steps, mean, color=color, lw=2.2 if est == "mica" else 1.3, marker="o", ms=3, label=est)
            ax.fill_between(steps, low, high, color=color, alpha=0.12, lw=0)
        ax.set_title(f"{title}\n(mean over seeds, 95 % {ci_name} CI)", fontsize=9)
        ax.set_xlabel("training step (0: " + ("warm start)" if _policy(study) == "lm" else "uniform policy)"),
                      fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, ncol=2)
    ax = axes[2]
    rows = [r for r in study.get("contrasts", [])
            if all(v is not None and math.isfinite(v) for v in (r["mean"], *r["ci"]))]
    for j, r in enumerate(rows):
        y = len(rows) - 1 - j
        color = "tab:green" if r["verdict"] == "a" else ("tab:red" if r["verdict"] == "b" else "tab:gray")
        ax.errorbar([r["mean"]], [y], xerr=[[r["mean"] - r["ci"][0]], [r["ci"][1] - r["mean"]]], fmt="o",
                    color=color, capsize=3, ms=4)
        ax.text(r["mean"], y + 0.12, f"Holm p {_p(r['p_holm'])}", fontsize=6, ha="center", va="bottom")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['a']} − {r['b']}" for r in reversed(rows)], fontsize=7)
    ax.set_title(f"pre-registered contrasts: pass rate AUC\n(paired mean difference, 95 % {ci_name} CI)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.tick_params(labelsize=7)
    if credit:
        ax = axes[3]
        names = [e for e in _ordered(study) if e in credit["estimators"]]
        key = "true_pearson" if "true_pearson" in credit["estimators"][names[0]] else "auc"
        means = [credit["estimators"][e][key]["mean"] for e in names]
        sds = [credit["estimators"][e][key]["std"] for e in names]
        ax.bar(range(len(names)), means, yerr=sds, color=[cmap(i % 10) for i in range(len(names))], capsize=3)
        if key == "auc":
            ax.axhline(0.5, color="gray", ls="--", lw=1)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title("credit diagnostic (no training):\ncorrelation of advantages with forked A*" if key != "auc"
                     else "credit diagnostic: AUC for pacing's act", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(labelsize=7)
    return save_figure(fig, out_png, dpi=80)


def write_outputs(study: dict, run_dir: str | Path) -> dict[str, Path]:
    """``study.json``, ``study_curves.png`` (when there are curves) and ``study.md`` in
    ``run_dir``; sets ``study["plot"]``. Returns the paths written."""
    from mica_core.atomic import atomic_write_json, atomic_write_text

    run_dir = Path(run_dir)
    png = plot_study_curves(study, run_dir / FIGURE_NAME)
    study["plot"] = str(png) if png else None
    out = {"json": run_dir / "study.json", "markdown": run_dir / "study.md"}
    atomic_write_json(out["json"], json_safe(study))
    atomic_write_text(out["markdown"], format_markdown(study, FIGURE_NAME if png else None))
    if png:
        out["figure"] = png
    return out


def publish(study: dict, root: str | Path = ".") -> dict[str, Path]:
    """Write the committed results into the mica checkout at ``root``: the JSON, the figure
    and the tables of docs/study.md (its prose is kept)."""
    import json

    from mica_core.atomic import atomic_write_json, atomic_write_text

    root = Path(root)
    md = root / PUBLISHED["markdown"]
    policy = _policy(study)
    published = json_safe(dict(study))
    text = replace_tables(md.read_text(encoding="utf-8"), published, str(md))
    figure = _figure(policy)
    png = plot_study_curves(published, root / figure)
    published["plot"] = str(figure) if png else None
    studies = {}
    if (root / PUBLISHED["json"]).is_file():
        studies = published_studies(json.loads((root / PUBLISHED["json"]).read_text(encoding="utf-8")))
    studies[policy] = published
    atomic_write_json(root / PUBLISHED["json"], {"format": PUBLISHED_FORMAT, "studies": studies})
    atomic_write_text(md, text)
    out = {"json": root / PUBLISHED["json"], "markdown": md}
    if png:
        out["figure"] = png
    return out
