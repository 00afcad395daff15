"""The run report: PNG plots of a DPO run and one `report.html` that shows them.

Reads what the other commands leave in a run folder (formats in docs/CONTRACTS.md):
`metrics.jsonl` from `preftune train`, `config.yaml` if present, and every `eval.json` below the
folder from `preftune eval`. Writes `plots/*.png` and `report.html` (figures linked by relative
path, styles inline), so the folder can be zipped or served as it is.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot), so making a report
never changes the plotting backend or state of the process that calls it.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

from preftune.bradley_terry import win_rate as wilson_win_rate
from preftune.config import flat_config
from preftune.errors import UserError
from preftune.records import read_records, write_bytes_atomic, write_text_atomic
from preftune.report_html import render_html
from preftune.report_plots import (
    REWARD_UNIT,
    TRAINING_PLOTS,
    PlotSpec,
    draw_guides,
    finish_step_axes,
    is_smoothed,
    smoothing_caption,
)
from preftune.sampling_settings import describe_sampling

TRAIN_COLOR, EVAL_COLOR = "tab:blue", "tab:orange"
CHOSEN_COLOR, REJECTED_COLOR = "tab:green", "tab:red"
PLOT_DIR = "plots"


# --------------------------------------------------------------------------- reading


class RunMetrics:
    """Training and evaluation lines of a metrics.jsonl, each sorted by step, one per step."""

    def __init__(self, train: list[dict], evals: list[dict], source: Path):
        self.train, self.eval, self.source = train, evals, source

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of `key` (eval keys from eval lines), skipping missing points."""
        rows = self.eval if key.startswith("eval/") else self.train
        points = [(r["step"], r[key]) for r in rows if _is_number(r.get(key))]
        if not points:
            return np.empty(0), np.empty(0)
        steps, values = zip(*points)
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)

    def has(self, key: str) -> bool:
        return self.series(key)[0].size > 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_metrics(path: str | Path) -> RunMetrics:
    """Read metrics.jsonl; a resumed run may repeat steps, and the last line of a step wins."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise UserError(f"{path} holds no metrics; the run logged no steps yet, so run "
                        "`preftune train` further or point the report at another run.")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for n, record in enumerate(records, start=1):
        if not _is_number(record.get("step")):
            raise UserError(f"{path}, record {n}: no numeric 'step'; every line of "
                            "metrics.jsonl needs one (see docs/CONTRACTS.md).")
        step = int(record["step"])
        if any(k.startswith("eval/") for k in record):
            evals[step] = {**evals.get(step, {}), **record}
        if any(not k.startswith("eval/") and k not in ("step", "epoch") for k in record):
            train[step] = record
    def by_step(rows):
        return [rows[s] for s in sorted(rows)]
    return RunMetrics(by_step(train), by_step(evals), path)


def find_eval_files(run_dir: str | Path) -> list[Path]:
    """Every eval.json below `run_dir` (the evaluator writes one beside each model)."""
    return sorted(Path(run_dir).rglob("eval.json"))


def load_evals(paths: Iterable[str | Path]) -> list[dict]:
    """Read eval.json files. A file may also hold a list of evals, or {"evals": [...]}."""
    from preftune.evaluate import read_eval_records

    evals = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"{path}: no such evaluation file; check the path.")
        evals += [{"_source": str(path), **item} for item in read_eval_records(path)]
    return evals


def load_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML; fix it or remove it.") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(config).__name__}.")
    return config


# --------------------------------------------------------------------------- helpers


def _check_smoothing(smoothing: float) -> None:
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--smoothing must be in [0, 1), got {smoothing:g}; 0 turns it off.")


def ema(values: Sequence[float], smoothing: float) -> np.ndarray:
    """Exponential moving average with TensorBoard's weight convention (0 = no smoothing).

    Debiased (divided by 1 - smoothing^t) so the curve starts at the data, not at zero.
    """
    _check_smoothing(smoothing)
    out = np.empty(len(values))
    running = 0.0
    for t, value in enumerate(values, start=1):
        running = smoothing * running + (1.0 - smoothing) * value
        out[t - 1] = running / (1.0 - smoothing**t)
    return out


def literal(text: str) -> str:
    """`text` (a run's folder, a model path) to show as written in a plot: matplotlib reads a pair
    of '$' as TeX math, which would italicise 'lr$1e-4$' or fail on 'a$\\q$'."""
    return text.replace("$", r"\$")


def _new_figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(7.5 * ncols if ncols > 1 else 8.0, 4.6), dpi=110, layout="constrained")
    axes = [fig.add_subplot(1, ncols, c + 1) for c in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    write_bytes_atomic(path, png_bytes(fig))
    return path


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG, to be written atomically: a rerun of the report replaces the plots,
    and a kill or a full disk must leave the earlier picture, not half of one."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _curve(ax, metrics: RunMetrics, key: str, label: str, color: str, smoothing: float) -> bool:
    """Draw `key` from training (raw faintly, plus EMA) and `eval/key` (markers)."""
    drawn = False
    steps, values = metrics.series(key)
    if steps.size:
        if is_smoothed(smoothing, steps.size):
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(steps, ema(values, smoothing), color=color, linewidth=2,
                    label=f"{label}, train (EMA {smoothing:g})")
        else:  # a lone point (a one-step run) is no line: it needs a marker to show at all
            ax.plot(steps, values, color=color, linewidth=1.6, label=f"{label}, train",
                    marker="o" if steps.size == 1 else None, markersize=5)
        drawn = True
    steps, values = metrics.series(f"eval/{key}")
    if steps.size:
        ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=5,
                markerfacecolor="white", linewidth=1.4, label=f"{label}, eval")
        drawn = True
    return drawn


# --------------------------------------------------------------------------- training plots


def loss_labels(loss_types: list[str] | None) -> tuple[str, str]:
    """(title, y label) of a run's loss plot: `sft` alone (Preferred-FT, plain fine-tuning) is
    the chosen responses' negative log-likelihood per token, anything else a loss per pair."""
    if loss_types == ["sft"]:
        return "NLL of the chosen responses", "loss (nats per token)"
    name = "DPO" if loss_types in (None, ["sigmoid"]) else " + ".join(loss_types)
    if set(loss_types or ["sigmoid"]) <= NATS_LOSSES:
        return f"Preference loss ({name})", "loss (nats per pair)"
    return f"Preference loss ({name})", "loss per pair"


def loss_unit(loss_types: list[str] | None) -> str:
    """The loss plot's y unit without the word loss: 'nats per pair', 'nats per token', 'per pair'."""
    return loss_labels(loss_types)[1].removeprefix("loss (").removeprefix("loss ").rstrip(")")


# Loss types whose per-pair loss is a sum of log-likelihoods (or, exo_pair, a KL), so in nats;
# the others are squares of log-ratios (ipo, sppo_hard), hinges or probabilities (hinge, apo_*).
NATS_LOSSES = {"sigmoid", "robust", "sigmoid_norm", "simpo", "rdpo", "sft", "exo_pair", "nca_pair",
               "aot", "aot_unpaired", "bco_pair"}


def plot_loss(metrics: RunMetrics, path: Path, smoothing: float = 0.6,
              loss_types: list[str] | None = None) -> Path | None:
    """Training and evaluation loss against step; None when the run logged no loss.
    `loss_types`: the run's loss.type as a list (None: DPO's sigmoid)."""
    fig, (ax,) = _new_figure()
    if not _curve(ax, metrics, "loss", "loss", TRAIN_COLOR, smoothing):
        return None
    # The eval markers share the train colour in the other plots; here, with a single quantity,
    # a second colour tells the two curves apart at a glance.
    for line in ax.get_lines():
        if line.get_label().endswith(", eval"):
            line.set_color(EVAL_COLOR)
    finish_step_axes(ax, *loss_labels(loss_types))
    return _save(fig, path)


# One run's colours: chosen and rejected as in every preftune plot, the schedule apart from the
# noisy curves. The comparison colours each run instead.
CURVE_COLORS = {"rewards/chosen": CHOSEN_COLOR, "rewards/rejected": REJECTED_COLOR,
                "logits/chosen": CHOSEN_COLOR, "logits/rejected": REJECTED_COLOR,
                "learning_rate": "tab:purple"}


def spans_decades(values: np.ndarray) -> bool:
    """Whether positive values span more than 100x: then a log axis, since early spikes (of a
    gradient norm, say) would otherwise flatten the rest of the curve."""
    return bool(values.size and values.min() > 0 and values.max() / values.min() > 100)


def plot_training(metrics: RunMetrics, spec: PlotSpec, path: Path,
                  smoothing: float = 0.6) -> Path | None:
    """One figure of TRAINING_PLOTS for one run: a panel per key, or all keys on one axis where
    the spec says so; None when the run logged none of its keys."""
    if spec.one_axis_title:
        fig, (ax,) = _new_figure()
        layout = [(ax, spec.one_axis_title, spec.panels)]  # (axis, its title, panels drawn on it)
    else:
        fig, axes = _new_figure(ncols=len(spec.panels))
        layout = [(ax, panel.title, (panel,)) for ax, panel in zip(axes, spec.panels)]
    drawn = False
    for ax, _, panels in layout:
        for panel in panels:
            drawn |= _curve(ax, metrics, panel.key, panel.name,
                            CURVE_COLORS.get(panel.key, TRAIN_COLOR),
                            smoothing if panel.smooth else 0.0)
    if not drawn:
        return None
    for ax, title, panels in layout:
        if any(p.log_if_spans_decades and spans_decades(metrics.series(p.key)[1]) for p in panels):
            ax.set_yscale("log")
        draw_guides(ax, {panel.key for panel in panels})
        finish_step_axes(ax, title, panels[0].ylabel)
    return _save(fig, path)


def plot_accuracy_margins(metrics: RunMetrics, path: Path, smoothing: float = 0.6):
    """Reward accuracy and margin side by side (the demo's page shows them for each DPO run)."""
    (spec,) = [spec for spec in TRAINING_PLOTS if spec.file == "accuracy_margins.png"]
    return plot_training(metrics, spec, path, smoothing)


# --------------------------------------------------------------------------- evaluation plots


def eval_label(ev: dict) -> str:
    """A short name for one evaluation: its `label`, else method and beta, else the model."""
    if ev.get("label"):
        return str(ev["label"])
    beta = ev.get("beta")
    beta_text = f" β={beta:g}" if _is_number(beta) else ""
    if ev.get("method"):
        return f"{ev['method']}{beta_text}"
    parts = Path(str(ev.get("model") or "model")).parts
    return "/".join(parts[-2:]) + beta_text


def _policy_reward(ev: dict, who: str = "policy"):
    value = (ev.get("mean_reward") or {}).get(who)
    return value if _is_number(value) else None


def _reward_se(ev: dict, who: str = "policy") -> float:
    value = (ev.get("mean_reward_se") or {}).get(who)
    return value if _is_number(value) else 0.0


def plot_frontier(evals: Sequence[dict], path: str | Path,
                  title: str = "Reward vs KL: the DPO trade-off",
                  colors: dict[str, str] | None = None,
                  from_reference: Sequence[str] = ()) -> Path:
    """Mean reward against KL(policy || reference), one point per model (or beta).

    Each evaluation needs `kl` and `mean_reward.policy`; `kl_se` and `mean_reward_se.policy`
    give the error bars. Evaluations sharing a `method` share a colour and are joined in KL
    order, so DPO at several betas traces its frontier against single-point baselines.
    `colors` maps a group to its colour (a comparison keeps each run's colour of its curves).
    Groups named in `from_reference` have their line start at the reference (KL 0): DPO tends
    to it as beta grows, so its frontier runs from there through the betas' points.
    """
    points = [ev for ev in evals if _is_number(ev.get("kl")) and _policy_reward(ev) is not None]
    if not points:
        raise UserError("no evaluation has both 'kl' and 'mean_reward.policy', so there is no "
                        "reward-KL point to plot; run `preftune eval generate` first.")
    groups: dict[str, list[dict]] = {}
    for ev in points:
        groups.setdefault(str(ev.get("method") or eval_label(ev)), []).append(ev)
    fig, (ax,) = _new_figure()
    reference = _reference_reward(points)
    cycle = [f"C{n % 10}" for n in range(len(groups))]
    for (group, members), color in zip(groups.items(), cycle):
        color = (colors or {}).get(group, color)
        members.sort(key=lambda ev: ev["kl"])
        x = [ev["kl"] for ev in members]
        y = [_policy_reward(ev) for ev in members]
        xerr = [ev["kl_se"] if _is_number(ev.get("kl_se")) else 0.0 for ev in members]
        yerr = [_reward_se(ev) for ev in members]
        joined = len(members) > 1
        if group in from_reference and reference is not None:
            ax.plot([0.0, *x], [reference, *y], "-", color=color, linewidth=1.2)
            joined = False  # the line above already joins the points
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o-" if joined else "o",
                    color=color, capsize=3, markersize=6, linewidth=1.2, label=literal(group))
        for ev, xi, yi in zip(members, x, y):
            if _is_number(ev.get("beta")):
                ax.annotate(f"β={ev['beta']:g}", (xi, yi), textcoords="offset points",
                            xytext=(7, -14), fontsize=8, color=color,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                  "alpha": 0.8})
    _draw_reference(ax, reference)
    ax.set_title(f"{title}\n(bars: ±1 standard error)", fontsize=11)
    ax.set_xlabel("KL(π ‖ π_ref), nats per response (estimated from samples)")
    ax.set_ylabel("mean reward of samples (reward-function units)")
    ax.legend(loc="best", fontsize=9, framealpha=0.85)
    return _save(fig, Path(path))


def _reference_reward(points: list[dict]) -> float | None:
    """The reference policy's reward at KL = 0; None when unknown or one of the points is it."""
    rewards = [_policy_reward(ev, "reference") for ev in points]
    rewards = [r for r in rewards if r is not None]
    if not rewards or any(abs(ev["kl"]) < 1e-12 for ev in points):
        return None
    # Every evaluation samples the reference on its own prompts; their mean is the best
    # single estimate of its reward.
    return float(np.mean(rewards))


def _draw_reference(ax, reference: float | None) -> None:
    if reference is not None:
        ax.plot([0.0], [reference], marker="s", color="black", linestyle="none",
                markersize=7, label="reference π_ref (KL = 0)")


def _win_rate_with_ci(ev: dict):
    """(rate, lower, upper) of the 95% interval; lower and upper None where neither the file
    nor its prompt count gives one (not [rate, rate], which would read as a certain rate)."""
    rate, ci = ev.get("win_rate"), ev.get("win_rate_ci")
    if not _is_number(rate):
        return None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_is_number, ci)):
        return rate, ci[0], ci[1]
    n = ev.get("n_prompts")
    if _is_number(n) and n > 0:  # older files without an interval: rebuild Wilson's
        return wilson_win_rate(rate * n, 0, int(n))
    return rate, None, None


def win_rate_text(rate_ci) -> str:
    """A `_win_rate_with_ci` as a table shows it: '0.800 [0.700, 0.900]', '0.800 (no interval)'."""
    rate, lower, upper = rate_ci
    if lower is None:
        return f"{rate:.3f} (no interval)"
    return f"{rate:.3f} [{lower:.3f}, {upper:.3f}]"


def win_rate_labels(evals: Sequence[dict]) -> list[str]:
    """`eval_label`s, with the judge and data added where one model has several rows."""
    labels = [eval_label(ev) for ev in evals]
    return [f"{label} ({_judged_on(ev)})" if labels.count(label) > 1 else label
            for label, ev in zip(labels, evals)]


def plot_win_rates(evals: Sequence[dict], path: str | Path) -> Path:
    """Each model's win rate against its reference, with its 95% interval."""
    # Labelled once the rows without a win rate are gone: a pairs evaluation of the same model
    # is no second row to tell apart.
    evals = [ev for ev in evals if _win_rate_with_ci(ev) is not None]
    if not evals:
        raise UserError("no evaluation has a 'win_rate'; run `preftune eval generate` first.")
    # Long names (a run, its model and judge) wrap, so that the axes keep their width and the
    # title and axis label stay inside the picture.
    rows = [(textwrap.fill(label, 30), _win_rate_with_ci(ev))
            for label, ev in zip(win_rate_labels(evals), evals)]
    lines = sum(label.count("\n") + 1 for label, _ in rows)
    fig = Figure(figsize=(8.0, 1.6 + 0.45 * len(rows) + 0.18 * (lines - len(rows))), dpi=110,
                 layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, axis="x", alpha=0.3)
    for y, (label, (rate, lower, upper)) in enumerate(rows):
        if lower is None:  # a dot without a bar, said so beside it
            lower = upper = rate
            text = f"{rate:.2f} (no interval)"
        else:
            text = f"{rate:.2f} [{lower:.2f}, {upper:.2f}]"
        ax.errorbar([rate], [y], xerr=[[rate - lower], [upper - rate]], fmt="o", color="C0",
                    capsize=4, markersize=6)
        # The number goes on whichever side of the bar has room inside the axes.
        right = upper < 0.75
        ax.annotate(text, (upper if right else lower, y),
                    xytext=(6 if right else -6, 0), textcoords="offset points", va="center",
                    ha="left" if right else "right", fontsize=8)
    ax.axvline(0.5, color="grey", linestyle=":")
    ax.annotate("0.5: as good as the reference", (0.5, 0), xycoords=("data", "axes fraction"),
                xytext=(4, 4), textcoords="offset points", fontsize=8, color="dimgrey")
    ax.set_yticks(range(len(rows)), [literal(label) for label, _ in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first evaluation on top, as in the table
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("win rate against the reference (fraction of prompts; a tie counts ½)")
    ax.set_ylabel("model")
    # Over the whole figure, not the axes: beside long model names it would run out of the picture.
    fig.suptitle("Win rate against the reference (dot: estimate, bar: 95% interval)")
    return _save(fig, Path(path))


# --------------------------------------------------------------------------- the report

SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm",
                "learning_rate", "tokens_per_second",
                # Logged only with loss.wpo_weighting or train.token_metrics: rows only then.
                "wpo/weight", "entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")
# The unit of each SUMMARY_KEYS value, and what it averages: a training line holds the means over
# its optimizer step's pairs (or, token metrics, tokens), an eval/ line those over the held-out
# pairs (metrics.py). Log-probs and rewards are sums over a response's tokens. The loss's unit
# follows the loss type (metric_unit).
METRIC_UNITS = {
    "rewards/accuracies": "fraction of pairs",
    "rewards/margins": f"chosen − rejected, {REWARD_UNIT}, mean over pairs",
    "rewards/chosen": f"{REWARD_UNIT}, mean over pairs",
    "rewards/rejected": f"{REWARD_UNIT}, mean over pairs",
    "logps/chosen": "nats per response, mean over pairs",
    "logps/rejected": "nats per response, mean over pairs",
    "grad_norm": "global L2 norm, before clipping",
    "learning_rate": "the step's learning rate",
    "tokens_per_second": "tokens per second of the step",
    "wpo/weight": "w(y_w)·w(y_l), mean over pairs",
    "entropy": "nats per token, mean over completion tokens",
    "mean_token_accuracy": "fraction of chosen tokens",
    "logits/chosen": "logit, mean over vocabulary and chosen tokens",
    "logits/rejected": "logit, mean over vocabulary and rejected tokens",
}


def metric_unit(key: str, loss_types: list[str] | None) -> str:
    """The unit of a metrics.jsonl key (eval/ or not) and what its value is a mean over."""
    key = key.removeprefix("eval/")
    if key == "loss":  # each pair's loss (sft's: per token of its chosen response), averaged
        return f"{loss_unit(loss_types)}, mean over pairs"
    return METRIC_UNITS.get(key, "")


# Every run logs these; a run missing some gets a note, one missing all of them an error.
PLOTTED_KEYS = ("loss", *(panel.key for spec in TRAINING_PLOTS if not spec.needs_setting
                          for panel in spec.panels))
# Leaf names of config keys worth a line in the summary (unset ones are left out); the full
# config sits below the tables. Matching leaf names keeps this working as the schema grows.
CONFIG_HIGHLIGHTS = {"path", "reference", "reference_path", "lora", "train", "eval", "max_length",
                     "eval_fraction", "type", "weights", "beta", "label_smoothing", "lr",
                     "learning_rate", "scheduler", "warmup_steps", "batch_size", "grad_accum",
                     "epochs", "max_steps", "eval_every", "seed"}
# Sections shown whole when set: flattened, their keys' leaves (r, alpha, every) say nothing alone.
HIGHLIGHTED_SECTIONS = {"lora", "reference_sync"}


def write_report(run_dir: str | Path, eval_paths: Iterable[str | Path] = (),
                 evals: Iterable[dict] = (), smoothing: float = 0.6,
                 output_dir: str | Path | None = None) -> Path:
    """Write `report.html` and `plots/*.png` for a run; returns the path of the HTML.

    run_dir: a `preftune train` output folder (metrics.jsonl, config.yaml, eval.json files).
    eval_paths: more eval.json files (or JSON lists of evals, e.g. a demo summary).
    evals: evaluation dicts given directly, in eval.json's format.
    smoothing: EMA weight for noisy training curves (0 = raw only); raw data stays visible.
    output_dir: where to write (default: run_dir).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; pass the run folder `preftune train` wrote (its train.output_dir).")
    _check_smoothing(smoothing)  # before any work, so a typo costs nothing
    out = Path(output_dir) if output_dir else run_dir
    (out / PLOT_DIR).mkdir(parents=True, exist_ok=True)
    found = list(dict.fromkeys(p.resolve() for p in [*find_eval_files(run_dir), *map(Path, eval_paths)]))
    all_evals = load_evals(found) + [dict(ev) for ev in evals]
    metrics_path = run_dir / "metrics.jsonl"
    notes: list[str] = []
    if metrics_path.exists():
        metrics = load_metrics(metrics_path)
    elif all_evals:
        metrics = None
        notes.append(f"No metrics.jsonl in {run_dir}: training curves are left out.")
    else:
        raise UserError(f"{run_dir}: neither metrics.jsonl nor any eval.json found; point "
                        "`preftune report` at the run folder `preftune train` wrote (its train.output_dir).")
    config = load_config(run_dir)
    if metrics and metrics.train and config and not (run_dir / "final").is_dir():
        # A report of a run still going, or killed, must not read as that of a finished one.
        notes.append(f"No final/ in {run_dir}: the run is still training or was stopped, so these are "
                     f"its numbers up to step {metrics.train[-1]['step']}, not a finished run's; a "
                     f"stopped run continues with `preftune train {run_dir / 'config.yaml'} --resume`.")
    if metrics and metrics.train and not metrics.eval:
        # Else the only sign is an empty column, easy to read as a failed evaluation.
        notes.append(f"{metrics_path.name} has no eval/ lines (no data.eval or data.eval_fraction "
                     "in training), so the plots have no evaluation curves and the last evaluation "
                     "column is empty.")
    loss_type = (config.get("loss") or {}).get("type") if config else None
    loss_types = [loss_type] if isinstance(loss_type, str) else loss_type
    figures = _training_figures(metrics, out, smoothing, notes, loss_types) if metrics else []
    figures += _eval_figures(all_evals, out, notes)
    tables = []
    if metrics:
        tables.append(_final_metrics_table(metrics, loss_types))
    if config:
        tables.append(_config_table(config))
    if all_evals:
        tables.append(_evals_table(all_evals))
    html = render_html(title=f"preftune report: {run_dir.resolve().name}", run_dir=str(run_dir),
                       tables=tables, figures=figures, notes=notes,
                       config_text=yaml.safe_dump(config, sort_keys=False) if config else "")
    report_path = out / "report.html"
    write_text_atomic(report_path, html)
    return report_path


def _training_figures(metrics: RunMetrics, out: Path, smoothing: float, notes: list[str],
                      loss_types: list[str] | None = None):
    missing = [k for k in PLOTTED_KEYS if not metrics.has(k)]
    if len(missing) == len(PLOTTED_KEYS) and not any(metrics.has(f"eval/{k}") for k in missing):
        raise UserError(f"{metrics.source} has none of the keys the report plots "
                        f"({', '.join(PLOTTED_KEYS)}); see docs/CONTRACTS.md for the format.")
    if missing:
        notes.append(f"{metrics.source.name} has no training values for "
                     f"{', '.join(missing)}; those curves are missing from the plots.")
    figures = []
    if plot_loss(metrics, out / PLOT_DIR / "loss.png", smoothing, loss_types) is not None:
        title, unit = loss_labels(loss_types)
        smoothed = is_smoothed(smoothing, metrics.series("loss")[0].size)  # as _curve drew it
        figures.append((f"{PLOT_DIR}/loss.png", "Loss",
                        f"{title}, {unit.removeprefix('loss (').rstrip(')')}. "
                        + smoothing_caption(smoothing, smoothed)))
    for spec in TRAINING_PLOTS:
        if plot_training(metrics, spec, out / PLOT_DIR / spec.file, smoothing) is not None:
            figures.append((f"{PLOT_DIR}/{spec.file}", spec.heading, spec.caption))
    return figures


def frontier_setting(ev: dict) -> tuple:
    """What must match for two evaluations to share reward-KL axes: the judge (its reward's
    units), the reference (KL to what), the prompts and how responses were sampled."""
    sampling = {k: v for k, v in (ev.get("sampling") or {}).items() if k != "seed"}
    return (str(ev.get("judge")), str(ev.get("reference")), str(ev.get("prompts")),
            tuple(sorted((k, str(v)) for k, v in sampling.items())))


def kl_caveat(evals: Sequence[dict]) -> str:
    """A reward-KL caption's warning, in both reports, where an evaluation sampled at another
    temperature, top-p, ... than the policy's own: its 'kl' is not KL(π ‖ π_ref) (kl_note)."""
    return next((f" Not KL(π ‖ π_ref) here: {ev['kl_note']}" for ev in evals
                 if ev.get("kl_note")), "")


def _eval_figures(evals: list[dict], out: Path, notes: list[str]):
    figures = []
    points = [ev for ev in evals if _is_number(ev.get("kl")) and _policy_reward(ev) is not None]
    settings: dict[tuple, list[dict]] = {}
    for ev in points:
        settings.setdefault(frontier_setting(ev), []).append(ev)
    # One figure per setting: rewards of two judges have different units, and KL to two
    # references (or under two sampling settings) measure different things.
    for n, members in enumerate(settings.values(), start=1):
        name = "reward_kl.png" if n == 1 else f"reward_kl-{n}.png"
        first = members[0]
        where = (f" Judge {_judged_on(first)}, reference {first.get('reference') or '–'}."
                 if len(settings) > 1 else "")
        caveat = kl_caveat(members)
        title = "Reward vs KL" if len(settings) == 1 else f"Reward vs KL ({n} of {len(settings)})"
        plot_frontier(members, out / PLOT_DIR / name)
        figures.append((f"{PLOT_DIR}/{name}", title,
                        ("Mean reward of sampled responses against their KL divergence from the "
                         "reference; up and to the left is better. Bars: ±1 standard error."
                         + where + caveat)))
    if any(_win_rate_with_ci(ev) for ev in evals):
        plot_win_rates(evals, out / PLOT_DIR / "win_rates.png")
        figures.append((f"{PLOT_DIR}/win_rates.png", "Win rates",
                        ("Share of prompts on which the judge preferred the model's response to "
                         "the reference's, with 95% Wilson intervals.")))
    if evals and not figures:
        notes.append("The evaluations hold no win rates or KL estimates (pairs evaluations "
                     "only), so there are no evaluation plots; see the table.")
    return figures


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def logged_value(line: dict, key: str) -> str:
    """`key` of one metrics.jsonl line as text: 'not finite' where the line holds null (the
    logger's NaN or inf, a skipped step), '–' where the line has no such key."""
    if key in line and line[key] is None:
        return "not finite"
    return _fmt(line.get(key))


def _final_metrics_table(metrics: RunMetrics, loss_types: list[str] | None = None):
    last_train = metrics.train[-1] if metrics.train else {}
    last_eval = metrics.eval[-1] if metrics.eval else {}
    rows = [["step (optimizer step)", _fmt(last_train.get("step")), _fmt(last_eval.get("step"))]]
    for key in SUMMARY_KEYS:
        if key in last_train or f"eval/{key}" in last_eval:
            # The unit beside the name, as the comparison's rows have it; a phone shows the
            # values next to it, not a column of units.
            rows.append([f"{key} ({metric_unit(key, loss_types)})", logged_value(last_train, key),
                         logged_value(last_eval, f"eval/{key}")])
    return ("Final metrics", ["metric (unit)", "last train step (its batch)",
                              "last evaluation (held-out pairs)"], rows)


def _value_text(value) -> str:
    """A config value as config.yaml writes it: true, false and null, not Python's True and None
    (and not '–', which marks a run without a config.yaml); a list as its items."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_value_text(v) for v in value) if value else "[]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return _fmt(value)


def _highlighted(key: str) -> bool:
    """Whether a flattened config key is one of CONFIG_HIGHLIGHTS, or inside a highlighted section
    that is set (model.lora.r: a LoRA run's rank, flattened under 'lora')."""
    leaf, *sections = reversed(key.split("."))
    return leaf in CONFIG_HIGHLIGHTS or any(s in HIGHLIGHTED_SECTIONS for s in sections)


def _config_table(config: dict):
    flat = flat_config(config)
    chosen = {k: v for k, v in flat.items() if _highlighted(k) and v is not None}
    rows = [[key, _value_text(value)]
            for key, value in (chosen or dict(list(flat.items())[:15])).items()]
    return ("Config highlights", ["key", "value"], rows)


def _judged_on(ev: dict) -> str:
    """What an evaluation judged with, and on what: 'reward:rm.py:score on prompts.txt'."""
    def short(path) -> str:  # directories dropped: the table names, the JSON has full paths
        return re.sub(r"[^:]*/", "", str(path))

    if ev.get("kind") == "pairs":
        split = f" ({ev['split']})" if ev.get("split") not in (None, "train") else ""
        return f"pairs of {short(ev.get('data'))}{split}"
    prompts = f" on {short(ev['prompts'])}" if ev.get("prompts") else ""
    sampling = ev.get("sampling") or {}
    drawn = ""  # a temperature sweep of one model has one row per temperature
    if describe_sampling(sampling):
        drawn = f" at {describe_sampling(sampling)}"
    return f"{short(ev.get('judge') or '–')}{prompts}{drawn}"


def _with_se(ev: dict, key: str) -> str:
    """'value ± se' of `key` and `key`_se, or '–' where the record has no value (an evaluation
    written before `kl_tokens` existed, or a pairs evaluation). A null `kl_tokens` was not
    measured: `eval generate` says so, as 'none', when the two models' output layers differ."""
    if key == "kl_tokens" and key in ev and ev[key] is None:
        return "not measured (output layers differ in size)"
    if not _is_number(ev.get(key)):
        return "–"
    se = ev.get(key + "_se")
    # eval generate writes a null standard error for a single prompt, where there is none.
    return f"{_fmt(ev[key])} ± {_fmt(se)}" if _is_number(se) else f"{_fmt(ev[key])} (no standard error)"


def _evals_table(evals: list[dict]):
    header = ["model", "kind", "judge and data", "prompts or pairs", "win rate [95% CI]",
              "mean reward (policy / ref)", "KL ± se (nats per response)",
              "token-wise KL ± se (nats per response)", "accuracy (fraction of pairs)",
              "held-out loss (mean over pairs)", "mean length, tokens (policy / ref)"]
    rows = []
    for ev in evals:
        wr = _win_rate_with_ci(ev)
        reward = f"{_fmt(_policy_reward(ev))} / {_fmt(_policy_reward(ev, 'reference'))}"
        kl = _with_se(ev, "kl")
        lengths = ev.get("mean_length") or {}
        waiting = ev.get("status") == "awaiting_votes"
        rows.append([
            # A pairs evaluation's numbers are means over its n_pairs held-out pairs.
            eval_label(ev), _fmt(ev.get("kind")), _judged_on(ev),
            _fmt(ev.get("n_pairs") if ev.get("kind") == "pairs" else ev.get("n_prompts")),
            win_rate_text(wr) if wr else "awaiting votes" if waiting else "–",
            reward if _policy_reward(ev) is not None else "–", kl, _with_se(ev, "kl_tokens"),
            _fmt(ev.get("eval/rewards/accuracies")), _fmt(ev.get("eval/loss")),
            f"{_fmt(lengths.get('policy'))} / {_fmt(lengths.get('reference'))}" if lengths else "–",
        ])
    return ("Evaluations", header, rows)
