"""`preftune report RUN_A RUN_B ... --out DIR`: several runs on one page.

A sweep (beta, loss type, learning rate) is read by comparing runs, so this page overlays every
run's curves, one colour and marker per run, and puts each run's settings that differ from the
others beside its final and best numbers. Each run is read as `preftune.report` reads one run
(formats in docs/CONTRACTS.md); the page goes to its own folder, so no run's own report.html is
replaced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from preftune.config import flat_config
from preftune.errors import UserError
from preftune.records import write_bytes_atomic, write_text_atomic
from preftune.report import (
    PLOT_DIR,
    PLOTTED_KEYS,
    RunMetrics,
    _fmt,
    _is_number,
    _judged_on,
    _policy_reward,
    _value_text,
    _win_rate_with_ci,
    _with_se,
    ema,
    eval_label,
    find_eval_files,
    frontier_setting,
    kl_caveat,
    literal,
    load_config,
    load_evals,
    load_metrics,
    logged_value,
    loss_labels,
    metric_unit,
    plot_frontier,
    plot_win_rates,
    png_bytes,
    spans_decades,
    win_rate_text,
)
from preftune.report_html import render_html
from preftune.report_plots import (
    TRAINING_PLOTS,
    Panel,
    draw_guides,
    finish_step_axes,
    is_smoothed,
    smoothing_caption,
)

# Ten colours that stay apart, and a marker per run on top, so that runs can be told apart in
# grey print and by colour-blind readers too; beyond ten runs the line style changes as well.
COLORS = [f"C{n}" for n in range(10)]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "-.", ":"]
# Shown for every run even when equal: what was trained, on what, and how (β scales every reward
# and margin row and curve); train.output_dir is the run's folder, named by its label.
ALWAYS_SHOWN = ("model.path", "data.train", "loss.type", "loss.beta")
NEVER_SHOWN = ("train.output_dir",)


@dataclass
class Run:
    folder: Path
    label: str
    metrics: RunMetrics | None
    config: dict  # flattened: "loss.beta" -> 0.1
    evals: list[dict]
    index: int
    notes: list[str] = field(default_factory=list)

    @property
    def style(self) -> dict:
        return {"color": COLORS[self.index % 10], "marker": MARKERS[self.index % len(MARKERS)],
                "linestyle": LINESTYLES[self.index // 10 % len(LINESTYLES)]}

    @property
    def last_step(self) -> int | None:
        return int(self.metrics.train[-1]["step"]) if self.metrics and self.metrics.train else None

    @property
    def finished(self) -> bool:
        return (self.folder / "final").is_dir()


# --------------------------------------------------------------------------- reading


def run_labels(folders: list[Path]) -> list[str]:
    """Each folder's name, with as many parent folders as it takes to tell equal names apart."""
    parts = [folder.resolve().parts for folder in folders]
    depth = [1] * len(folders)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels)
                    if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clashing:  # (a folder given twice keeps its one name; check_folders refuses it)
            return labels
        for i in clashing:
            depth[i] += 1


def check_folders(folders: list[Path], out: Path) -> None:
    """Refuse, in one sentence each, what cannot be compared, before any plotting."""
    seen: dict[Path, Path] = {}
    for folder in folders:
        if not folder.exists():
            raise UserError(f"{folder}: no such run folder; pass the folders `preftune train` wrote "
                            "(their train.output_dir).")
        if folder.is_file():
            raise UserError(f"{folder} is a file, not a run folder; pass the folder holding it.")
        if folder.resolve() in seen:
            raise UserError(f"{folder} is given twice (as {seen[folder.resolve()]} too); pass each "
                            "run once.")
        seen[folder.resolve()] = folder
        if not (folder / "metrics.jsonl").is_file():
            _refuse_non_run(folder)
    if out.resolve() in seen:
        raise UserError(f"--out {out} is one of the runs compared, whose own report.html and plots "
                        "would be replaced; choose another folder, e.g. --out "
                        f"{out.resolve().parent / 'compare'}.")


def _refuse_non_run(folder: Path) -> None:
    """A folder without metrics.jsonl passes only when it holds evaluations of its own."""
    if (folder / "demo.json").is_file() and (folder / "runs").is_dir():
        raise UserError(f"{folder} is a `preftune demo` folder, not a run; compare its runs "
                        f"instead: preftune report {folder / 'runs'}/* --out {folder / 'compare'}")
    runs_inside = sorted(p.parent for p in folder.glob("*/metrics.jsonl"))
    if runs_inside:
        shown = " ".join(str(p) for p in runs_inside[:3]) + (" ..." if len(runs_inside) > 3 else "")
        raise UserError(f"{folder} is not a run but holds runs; pass them instead: {shown}")
    if not find_eval_files(folder):
        raise UserError(f"{folder} is not a run folder: it holds neither metrics.jsonl nor any "
                        "eval.json; pass the folders `preftune train` wrote (their train.output_dir).")


def load_run(folder: Path, label: str, index: int) -> Run:
    notes = []
    metrics = None
    metrics_path = folder / "metrics.jsonl"
    if not metrics_path.is_file():
        notes.append(f"{label} has no metrics.jsonl: evaluations only, no training curves.")
    elif not metrics_path.read_text(encoding="utf-8").strip():
        notes.append(f"{label} has logged no step yet (its metrics.jsonl is empty): no curves.")
    else:
        metrics = load_metrics(metrics_path)
    config = load_config(folder)
    if not config:
        notes.append(f"{label} has no config.yaml, so its settings are shown as unknown (–).")
    evals = load_evals(find_eval_files(folder))
    return Run(folder, label, metrics, flat_config(config), evals, index, notes)


def _schema_defaults() -> dict:
    """Flattened defaults of the config schema: a key a config.yaml leaves out has this value."""
    from preftune.config import Config

    defaults = {}
    for name, section in Config.model_fields.items():
        for key, spec in getattr(section.annotation, "model_fields", {}).items():
            if not spec.is_required():
                defaults[f"{name}.{key}"] = spec.get_default(call_default_factory=True)
    return defaults


# --------------------------------------------------------------------------- plots


def _new_figure(ncols: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(7.5 * ncols if ncols > 1 else 9.0, 5.4), dpi=110, layout="constrained")
    axes = [fig.add_subplot(1, ncols, c + 1) for c in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _run_curve(ax, run: Run, panel: Panel, smoothing: float) -> bool:
    """One run's panel.key: training (faint raw, bold EMA, solid) and eval/ (dashed, open markers)."""
    color, marker, linestyle = run.style["color"], run.style["marker"], run.style["linestyle"]
    if not panel.smooth:
        smoothing = 0.0
    drawn = False
    steps, values = run.metrics.series(panel.key)
    if steps.size:
        smooth = is_smoothed(smoothing, steps.size)
        if smooth:
            ax.plot(steps, values, color=color, alpha=0.15, linewidth=0.8, linestyle=linestyle)
        # A few markers per line (and always one on a lone point) tell the runs apart.
        ax.plot(steps, ema(values, smoothing) if smooth else values, color=color,
                linewidth=1.8, linestyle=linestyle, marker=marker, markersize=5,
                markevery=max(1, steps.size // 6))
        drawn = True
    steps, values = run.metrics.series(f"eval/{panel.key}")
    if steps.size:
        ax.plot(steps, values, color=color, linestyle="--", linewidth=1.2, marker=marker,
                markersize=6, markerfacecolor="white")
        drawn = True
    return drawn


def _legend(fig: Figure, runs: list[Run], panels: Sequence[Panel], smoothing: float,
            with_eval: bool) -> None:
    """One entry per run, and those that say which line is training and which evaluation. When
    some runs are drawn as an EMA and others raw (2 steps or fewer), each run's entry says which."""
    smoothed = {run.index: _run_smoothed(run, panels, smoothing) for run in runs}
    mixed = len(set(smoothed.values())) > 1

    def run_label(run: Run) -> str:
        if not mixed:
            return literal(run.label)
        drawn = f"train EMA {smoothing:g}" if smoothed[run.index] else "train raw, 2 steps or fewer"
        return literal(f"{run.label} ({drawn})")

    handles = [Line2D([], [], label=run_label(run), markersize=6, **run.style) for run in runs]
    raw = [panel.name for panel in panels if not panel.smooth]  # a schedule is drawn as it is
    train = "train"
    if any(smoothed.values()) and not mixed:
        train = f"train (EMA {smoothing:g}" + (f"; {', '.join(raw)} raw)" if raw else ")")
    elif mixed and raw:  # the runs' entries tell EMA from raw; the schedule is raw for all
        train = f"train ({', '.join(raw)} raw)"
    handles.append(Line2D([], [], color="grey", linewidth=1.8, label=train))
    if with_eval:
        handles.append(Line2D([], [], color="grey", linestyle="--", marker="o",
                              markerfacecolor="white", label="eval"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(5, len(handles)),
               fontsize=9, framealpha=0.85)


def _run_smoothed(run: Run, panels: Sequence[Panel], smoothing: float) -> bool:
    """Whether the run's training curves in `panels` are drawn as an EMA (see _run_curve)."""
    return run.metrics is not None and any(
        is_smoothed(smoothing, run.metrics.series(panel.key)[0].size) for panel in panels if panel.smooth)


def _any_smoothed(runs: list[Run], panels: Sequence[Panel], smoothing: float) -> bool:
    """Whether some run's training curve in `panels` is drawn as an EMA (see _run_curve)."""
    return any(_run_smoothed(run, panels, smoothing) for run in runs)


def draw_overlay(runs: list[Run], panels: Sequence[Panel], smoothing: float):
    """A figure with one panel per Panel, every run overlaid; None if empty."""
    runs = [run for run in runs if run.metrics is not None]
    fig, axes = _new_figure(len(panels))
    drawn_runs = set()
    for ax, panel in zip(axes, panels):
        for run in runs:
            if _run_curve(ax, run, panel, smoothing):
                drawn_runs.add(run.index)
        if panel.log_if_spans_decades:  # judged on every run's values together
            values = [run.metrics.series(panel.key)[1] for run in runs]
            if spans_decades(np.concatenate(values) if values else np.empty(0)):
                ax.set_yscale("log")
        draw_guides(ax, {panel.key})  # chance lines and ranges, as one run's report draws them
        finish_step_axes(ax, panel.title, panel.ylabel)
    if not drawn_runs:
        return None
    with_eval = any(run.metrics.has(f"eval/{panel.key}") for run in runs for panel in panels)
    _legend(fig, [run for run in runs if run.index in drawn_runs], panels, smoothing, with_eval)
    return fig


def _loss_types(runs: list[Run]) -> tuple[bool, list[str] | None]:
    """(whether the runs' loss types differ, the one they share as a list; None: unknown or DPO)."""
    types = {json.dumps(run.config.get("loss.type", "sigmoid")) for run in runs if run.config}
    if len(types) > 1:
        return True, None
    loss_type = json.loads(types.pop()) if types else None
    return False, [loss_type] if isinstance(loss_type, str) else loss_type


def _loss_panel(runs: list[Run]) -> Panel:
    differ, loss_types = _loss_types(runs)
    if differ:
        return Panel("loss", "Loss (loss types differ: compare shapes, not values)", "loss", "loss")
    title, unit = loss_labels(loss_types)
    return Panel("loss", title, unit, "loss")


def training_figures(runs: list[Run], out: Path, smoothing: float) -> list[tuple[str, str, str]]:
    """The loss, then TRAINING_PLOTS' figures, every run overlaid. A figure of keys that only a
    setting logs (spec.needs_setting) is drawn as soon as one run logged them; a run that did
    not is absent from it, and the figure names it (at its top and in the caption)."""
    figures = []
    loss = _loss_panel(runs)
    fig = draw_overlay(runs, [loss], smoothing)
    if fig is not None:
        smoothed = _any_smoothed(runs, [loss], smoothing)
        short = [run.label for run in runs if run.metrics is not None and run.metrics.has("loss")
                 and not _run_smoothed(run, [loss], smoothing)]
        drawn_raw = f" {', '.join(short)}: 2 steps or fewer, drawn raw." if smoothed and short else ""
        figures.append(_save(fig, out, "loss.png", "Loss",
                             "Each run's loss. " + smoothing_caption(smoothing, smoothed) + drawn_raw
                             + " Dashed lines with open markers are evaluations."))
    for spec in TRAINING_PLOTS:
        fig = draw_overlay(runs, spec.panels, smoothing)
        if fig is None:
            continue
        caption = spec.compare_caption or spec.caption
        lacking = [run.label for run in runs if not _logged_any(run, spec.panels)]
        if spec.needs_setting and lacking:  # absent, not flat: say so where the figure is read
            absent = f"Not logged by {', '.join(lacking)}, so absent here."
            fig.suptitle(literal(absent), fontsize=10, color="dimgrey")
            caption = f"{caption} {absent}"
        figures.append(_save(fig, out, spec.file, spec.heading, caption))
    return figures


def _save(fig: Figure, out: Path, name: str, heading: str, caption: str) -> tuple[str, str, str]:
    write_bytes_atomic(out / PLOT_DIR / name, png_bytes(fig))
    return (f"{PLOT_DIR}/{name}", heading, caption)


def _logged_any(run: Run, panels: Sequence[Panel]) -> bool:
    return run.metrics is not None and any(
        run.metrics.has(panel.key) or run.metrics.has(f"eval/{panel.key}") for panel in panels)


def _on_the_frontier(ev: dict) -> bool:
    return _policy_reward(ev) is not None and _is_number(ev.get("kl"))


def _on_a_plot(ev: dict) -> bool:
    """Whether `ev` is drawn in the reward-KL or the win-rate plot."""
    return _on_the_frontier(ev) or _win_rate_with_ci(ev) is not None


def eval_figures(runs: list[Run], out: Path) -> list[tuple[str, str, str]]:
    """Reward vs KL (one figure per judge, reference and sampling setting) and win rates, with
    each evaluation named after its run, in the run's colour."""
    evals = []
    for run in runs:
        # Named by the run alone unless it has several to plot: a pairs evaluation, or a human-
        # judged one still awaiting votes, is in no plot, so it is not a second one to tell apart.
        several = sum(_on_a_plot(ev) for ev in run.evals) > 1
        for ev in run.evals:
            label = f"{run.label}: {eval_label(ev)}" if several else run.label
            evals.append({**ev, "method": run.label, "label": label})
    colors = {run.label: run.style["color"] for run in runs}
    settings: dict[tuple, list[dict]] = {}
    for ev in evals:
        if _on_the_frontier(ev):
            settings.setdefault(frontier_setting(ev), []).append(ev)
    figures = []
    for n, members in enumerate(settings.values(), start=1):
        name = "reward_kl.png" if n == 1 else f"reward_kl-{n}.png"
        plot_frontier(members, out / PLOT_DIR / name, title="Reward vs KL, by run", colors=colors)
        where = f" Judge {_judged_on(members[0])}." if len(settings) > 1 else ""
        figures.append((f"{PLOT_DIR}/{name}", "Reward vs KL" + (f" ({n})" if n > 1 else ""),
                        "Mean reward of each run's sampled responses against their KL from the "
                        "reference; up and to the left is better. Bars: ±1 standard error." + where
                        + kl_caveat(members)))
    if any(_win_rate_with_ci(ev) for ev in evals):
        plot_win_rates(evals, out / PLOT_DIR / "win_rates.png")
        figures.append((f"{PLOT_DIR}/win_rates.png", "Win rates",
                        "Each run's win rate against its reference, with 95% Wilson intervals."))
    return figures


# --------------------------------------------------------------------------- the table


def distinct_suffixes(texts: list[str]) -> list[str]:
    """The last '/'-part of each text, with more parts where that alone names two texts alike."""
    parts = [text.rstrip("/").split("/") for text in texts]
    depth = [1] * len(texts)
    while True:
        short = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, s in enumerate(short) if short.count(s) > 1 and texts.count(texts[i]) == 1]
        if not clashing:
            return short
        for i in clashing:
            depth[i] += 1


def settings_rows(runs: list[Run]) -> list[list[str]]:
    """The ALWAYS_SHOWN keys, then every config key whose value is not the same in all runs."""
    defaults = _schema_defaults()
    keys = list(ALWAYS_SHOWN)
    for run in runs:
        keys += [k for k in run.config if k not in keys and k not in NEVER_SHOWN]
    known = [run for run in runs if run.config]
    rows = []
    for key in keys:
        values = [run.config.get(key, defaults.get(key)) if run.config else None for run in runs]
        same = len({json.dumps(v, sort_keys=True, default=str) for v, run in zip(values, runs)
                    if run.config}) <= 1
        if same and key not in ALWAYS_SHOWN:
            continue
        if len(known) == 0 and key in ALWAYS_SHOWN:
            continue
        texts = [_value_text(v) if run.config else "–" for v, run in zip(values, runs)]
        if all(isinstance(v, str) and "/" in v for v in values):
            texts = distinct_suffixes(texts)  # paths are long and alike: keep what tells them apart
        rows.append([key, *texts])
    return rows


def _last(run: Run, key: str, with_step: bool = False) -> str:
    """The last logged `key` as text ('not finite' for the logger's null); `with_step`: with the
    step it was logged at, as evaluations of runs of other lengths or cadences fall at other steps."""
    rows = (run.metrics.eval if key.startswith("eval/") else run.metrics.train) if run.metrics else []
    if not rows or key not in rows[-1]:
        return "–"
    step = f" (step {rows[-1]['step']})" if with_step else ""
    return logged_value(rows[-1], key) + step


def _row_unit(runs: list[Run], key: str) -> str:
    """A metric row's unit and what it is a mean over (report.metric_unit), for all runs."""
    differ, loss_types = _loss_types(runs)
    if differ and key.removeprefix("eval/") == "loss":
        return "unit differs by loss type"
    return metric_unit(key, loss_types)


def _best(run: Run, key: str, lowest: bool) -> str:
    if run.metrics is None:
        return "–"
    steps, values = run.metrics.series(key)
    if not steps.size:
        return "–"
    i = int(values.argmin() if lowest else values.argmax())
    return f"{_fmt(float(values[i]))} (step {int(steps[i])})"


def metric_rows(runs: list[Run]) -> list[list[str]]:
    """Last training values (the last step row says which step), and last and best evaluations
    with their step: runs of other lengths or eval cadences evaluate at other steps."""
    rows = [[f"train {key}, last step ({_row_unit(runs, key)})", *(_last(run, key) for run in runs)]
            for key in ("loss", "rewards/accuracies", "rewards/margins")]
    for key, lowest in (("loss", True), ("rewards/accuracies", False), ("rewards/margins", None)):
        unit = _row_unit(runs, key)
        rows.append([f"eval/{key}, last ({unit})",
                     *(_last(run, f"eval/{key}", with_step=True) for run in runs)])
        if lowest is not None:
            rows.append([f"eval/{key}, best ({unit})",
                         *(_best(run, f"eval/{key}", lowest) for run in runs)])
    return [row for row in rows if any(cell != "–" for cell in row[1:])]


def _eval_cells(ev: dict):
    """(row name, text) of one eval.json record; rows name the judge and data, so that only
    evaluations made the same way share a row."""
    on = _judged_on(ev)
    if ev.get("kind") == "pairs":
        yield f"held-out accuracy ({on})", _fmt(ev.get("eval/rewards/accuracies"))
        yield f"held-out loss ({on})", _fmt(ev.get("eval/loss"))
        return
    rate = _win_rate_with_ci(ev)
    if rate:
        yield f"win rate [95% CI] ({on})", win_rate_text(rate)
    elif ev.get("status") == "awaiting_votes":
        yield f"win rate [95% CI] ({on})", "awaiting votes"
    for key, name in (("kl", "KL"), ("kl_tokens", "token-wise KL")):
        text = _with_se(ev, key)  # kl_tokens is absent from evaluations written before it existed
        if text != "–":
            yield f"{name} ± se, nats per response ({on})", text
    if _policy_reward(ev) is not None:
        yield (f"mean reward, policy / ref ({on})",
               f"{_fmt(_policy_reward(ev))} / {_fmt(_policy_reward(ev, 'reference'))}")


def eval_rows(runs: list[Run]) -> list[list[str]]:
    cells: dict[str, list[list[tuple[str, dict]]]] = {}
    for i, run in enumerate(runs):
        for ev in run.evals:
            for name, text in _eval_cells(ev):
                cells.setdefault(name, [[] for _ in runs])[i].append((text, ev))
    rows = []
    for name, per_run in cells.items():
        # Several evaluations of one run on the same row (a checkpoint and final/): name each.
        texts = ["; ".join(f"{t} ({eval_label(ev)})" if len(c) > 1 else t for t, ev in c) or "–"
                 for c in per_run]
        rows.append([name, *texts])
    return rows


def _status(run: Run) -> str:
    if run.finished:
        return "finished"
    if run.metrics is None:
        return "no training log"
    return "unfinished (no final/)" if run.config else "no final/"


def comparison_table(runs: list[Run]):
    rows = [["folder", *(str(run.folder) for run in runs)],
            ["status", *(_status(run) for run in runs)],
            ["last step", *(_fmt(run.last_step) for run in runs)]]
    rows += settings_rows(runs) + metric_rows(runs) + eval_rows(runs)
    return ("Runs side by side: settings that differ, final and best numbers",
            ["run", *(run.label for run in runs)], rows)


# --------------------------------------------------------------------------- the page


def comparison_notes(runs: list[Run]) -> list[str]:
    notes = [note for run in runs for note in run.notes]
    for run in runs:
        if run.metrics is not None and run.config and not run.finished:
            notes.append(f"{run.label} has no final/: it is still training or was stopped, so its "
                         f"numbers are up to step {run.last_step}, not a finished run's; a stopped "
                         f"run continues with `preftune train {run.folder / 'config.yaml'} --resume`.")
        missing = [k for k in PLOTTED_KEYS if run.metrics is not None and not run.metrics.has(k)]
        if missing:  # as one run's report says it: the plots hold no curve of these for this run
            notes.append(f"{run.label} has no training values for {', '.join(missing)}; those "
                         "curves of it are missing from the plots.")
        if not run.evals and not (run.metrics and run.metrics.eval):
            notes.append(f"{run.label} has no evaluations (no eval/ lines in metrics.jsonl, no "
                         "eval.json), so its evaluation cells are empty.")
    lengths = {run.label: run.last_step for run in runs if run.last_step is not None}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{label} {step}" for label, step in lengths.items())
        notes.append(f"The runs have different lengths (steps: {shown}); each curve ends at its "
                     "run's last step.")
    pairs = {run.label: run.config.get("train.batch_size", 8) * run.config.get("train.grad_accum", 1)
             for run in runs if run.config and all(isinstance(run.config.get(k, 1), int)
                                                   for k in ("train.batch_size", "train.grad_accum"))}
    if len(set(pairs.values())) > 1:
        shown = ", ".join(f"{label} {n}" for label, n in pairs.items())
        notes.append(f"A step holds a different number of pairs in these runs (batch_size × "
                     f"grad_accum: {shown}), so equal steps are not equal amounts of data.")
    drawn = held_out_draws(runs)
    differing = [key for key in HELD_OUT_KEYS if len({draw[key] for draw in drawn.values()}) > 1]
    if differing:
        shown = "; ".join(f"{key}: " + ", ".join(f"{label} {draw[key]}" for label, draw in drawn.items())
                          for key in differing)
        notes.append("The runs evaluate on different held-out pairs: data.eval_fraction draws them "
                     f"from data.train with train.seed, and these differ ({shown}), so their eval/ "
                     "numbers are not on the same pairs; give every run the same data.eval file "
                     "to compare them on one set.")
    if len({json.dumps(run.config.get("loss.type", "sigmoid")) for run in runs if run.config}) > 1:
        notes.append("The runs use different loss types, whose values have different scales: "
                     "compare the shapes of their loss curves, not the values.")
    if len(runs) > len(COLORS):
        notes.append(f"With more than {len(COLORS)} runs colours repeat; the line style and "
                     "marker tell those runs apart.")
    return notes


# What decides the pairs data.eval_fraction holds out: the rows data.train reads (its data set
# config and split too) and the draw (train.prepare_data, data/heldout.py).
HELD_OUT_KEYS = ("data.train", "data.config", "data.split", "data.eval_fraction", "data.eval_fraction_by",
                 "train.seed")


def held_out_draws(runs: list[Run]) -> dict[str, dict[str, str]]:
    """{run: {key: value}} of what draws the held-out pairs of each run that holds out
    data.eval_fraction of data.train (no data.eval): equal values, equal pairs (data/heldout.py)."""
    defaults = _schema_defaults()
    return {run.label: {key: _value_text(run.config.get(key, defaults.get(key))) for key in HELD_OUT_KEYS}
            for run in runs
            if run.config and not run.config.get("data.eval") and run.config.get("data.eval_fraction")}


def write_comparison(run_dirs, output_dir: str | Path, smoothing: float = 0.6) -> Path:
    """Write one `report.html` and `plots/*.png` comparing several runs; returns the HTML's path.

    run_dirs: two or more `preftune train` folders (a folder holding only eval.json files is
    shown with its evaluations). output_dir: where to write; not one of the runs, whose own
    report.html stays theirs. smoothing: EMA weight of training curves, as in `write_report`.
    """
    from preftune.report import _check_smoothing

    folders = [Path(p) for p in run_dirs]
    if len(folders) < 2:
        raise UserError("a comparison needs two run folders or more; for one run, "
                        "preftune.report.write_report writes its report.")
    _check_smoothing(smoothing)
    out = Path(output_dir)
    check_folders(folders, out)
    runs = [load_run(folder, label, n)
            for n, (folder, label) in enumerate(zip(folders, run_labels(folders)))]
    (out / PLOT_DIR).mkdir(parents=True, exist_ok=True)
    figures = training_figures(runs, out, smoothing) + eval_figures(runs, out)
    html = render_html(title=f"preftune report: {len(runs)} runs compared",
                       run_dir=", ".join(str(f) for f in folders), tables=[comparison_table(runs)],
                       figures=figures, notes=comparison_notes(runs), folder_label="Run folders")
    path = out / "report.html"
    write_text_atomic(path, html)
    return path
