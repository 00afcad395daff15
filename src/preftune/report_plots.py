"""What each training plot of a report draws: its metrics.jsonl keys, titles, labels and captions.

`preftune report RUN` (report.py) and `preftune report A B --out DIR` (report_compare.py) both
draw every figure of TRAINING_PLOTS, so a new curve is one entry here and shows in both reports.
The loss plot is not here: its title and unit follow the run's loss.type (report.loss_labels),
so each report builds it from that.
"""

from __future__ import annotations

from typing import NamedTuple

from matplotlib.ticker import MaxNLocator

REWARD_UNIT = "β·log(π/π_ref), nats"
# What a point of a per-pair metric is a mean over (metrics.py), said under its figure.
PAIR_MEANS = " Training points are means over each step's pairs, evaluation points over the held-out pairs."
STEP_LABEL = "optimizer step"


class Panel(NamedTuple):
    """One metrics.jsonl key against the optimizer step; its eval/ twin is drawn with it."""

    key: str
    title: str
    ylabel: str
    name: str  # the curve in one run's legend: "NAME, train" and "NAME, eval"
    smooth: bool = True  # False for a schedule: an EMA would only distort its warmup and decay
    log_if_spans_decades: bool = False  # a log axis when positive values span 100x (spans_decades)


class PlotSpec(NamedTuple):
    """One PNG under plots/: its panels side by side, with each report's heading and caption."""

    file: str
    heading: str
    panels: tuple[Panel, ...]
    caption: str  # in one run's report
    compare_caption: str | None = None  # in the comparison, every run overlaid; None: `caption`
    # One run's report draws all panels' curves on one axis under this title (their y label is
    # the same); the comparison keeps a panel per key, each already holding a curve per run.
    one_axis_title: str | None = None
    # Keys logged only with a setting on (train.token_metrics, loss.wpo_weighting): a run without
    # them gets no note of missing keys, and the comparison names the runs that lack them.
    needs_setting: bool = False


TRAINING_PLOTS = (
    PlotSpec(
        "rewards.png", "Implicit rewards",
        (Panel("rewards/chosen", "Chosen responses", f"mean reward ({REWARD_UNIT})", "chosen"),
         Panel("rewards/rejected", "Rejected responses", f"mean reward ({REWARD_UNIT})", "rejected")),
        caption=("β·log(π/π_ref) of chosen and rejected responses. Training should lift chosen "
                 "above rejected; both falling together is common and not by itself a problem."
                 + PAIR_MEANS),
        compare_caption=("β·log(π/π_ref) of chosen (left) and rejected (right) responses, per run. "
                         "Runs with different β have rewards on different scales." + PAIR_MEANS),
        one_axis_title="Implicit rewards: chosen vs rejected"),
    PlotSpec(
        "accuracy_margins.png", "Accuracy and margin",
        (Panel("rewards/accuracies", "Reward accuracy", "fraction of pairs, chosen reward > rejected",
               "accuracy"),
         Panel("rewards/margins", "Reward margin", f"chosen − rejected ({REWARD_UNIT})", "margin")),
        caption=("Share of pairs whose chosen response gets the higher implicit reward, and the mean "
                 "gap." + PAIR_MEANS),
        compare_caption=("Share of pairs whose chosen response gets the higher implicit reward, and "
                         "the mean gap, per run. Runs with different β have margins on different "
                         "scales." + PAIR_MEANS)),
    PlotSpec(
        "optimization.png", "Optimization",
        (Panel("grad_norm", "Gradient norm", "global L2 norm of the gradient", "grad norm",
               log_if_spans_decades=True),
         Panel("learning_rate", "Learning rate", "learning rate (per step)", "learning rate",
               smooth=False)),
        caption="Gradient norm and learning rate per optimizer step.",
        compare_caption="Gradient norm (before clipping) and learning rate per optimizer step."),
    PlotSpec(
        "entropy_token_accuracy.png", "Entropy and token accuracy",
        (Panel("entropy", "Entropy of the policy", "nats per completion token", "entropy"),
         Panel("mean_token_accuracy", "Token accuracy", "fraction of chosen tokens, policy's top choice",
               "token accuracy")),
        caption=("Entropy: how unsure the policy is of the next token, in nats, averaged over chosen "
                 "and rejected completion tokens. Token accuracy: the share of chosen tokens that "
                 "are the policy's top choice."),
        compare_caption=("Entropy: how unsure each run's policy is of the next token, in nats, over "
                         "chosen and rejected completion tokens. Token accuracy: the share of chosen "
                         "tokens that are its top choice."),
        needs_setting=True),
    PlotSpec(
        "logits.png", "Mean logits",
        (Panel("logits/chosen", "Chosen tokens", "logit, mean over the vocabulary", "chosen"),
         Panel("logits/rejected", "Rejected tokens", "logit, mean over the vocabulary", "rejected")),
        caption=("The policy's logits averaged over the vocabulary, then over chosen (and rejected) "
                 "completion tokens: their overall level; moving every logit alike leaves the "
                 "probabilities unchanged."),
        compare_caption=("Each policy's logits averaged over the vocabulary, then over chosen (left) "
                         "and rejected (right) completion tokens: their overall level; moving every "
                         "logit alike leaves the probabilities unchanged."),
        one_axis_title="Mean logits: chosen vs rejected tokens", needs_setting=True),
    PlotSpec(
        "wpo_weight.png", "WPO weight",
        (Panel("wpo/weight", "WPO weight", "mean pair weight w(y_w)·w(y_l)", "WPO weight"),),
        caption=("WPO's pair weight w(y_w)·w(y_l), the step's mean: how likely the policy is to "
                 "write the pair itself; each pair's loss is scaled by it."),
        compare_caption=("WPO's pair weight w(y_w)·w(y_l), each step's mean: how likely the policy "
                         "is to write the pair itself; each pair's loss is scaled by it."),
        needs_setting=True),
)


def draw_guides(ax, keys: set[str]) -> None:
    """Reference lines and axis ranges of a plot of `keys`, the same in one run's report and in
    the comparison: chance for the reward accuracy, [0, 1] for fractions, zero for rewards."""
    if "rewards/accuracies" in keys:
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance (0.5)")
    if keys & {"rewards/accuracies", "mean_token_accuracy"}:  # fractions
        ax.set_ylim(-0.02, 1.02)
    if keys & {"rewards/chosen", "rewards/rejected", "rewards/margins"}:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    if "learning_rate" in keys:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def finish_step_axes(ax, title: str, ylabel: str) -> None:
    """Title, axis labels and legend of a plot against the optimizer step, the same in both
    reports: steps are whole (no tick at 2.5), and a log y axis says so in its label."""
    ax.set_title(title)
    ax.set_xlabel(STEP_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    low, high = ax.get_xlim()
    if high - low < 1:  # one step: no two whole numbers in view, and MaxNLocator fell back to 0.96, 0.975
        step = round((low + high) / 2)
        ax.set_xlim(step - 0.5, step + 0.5)
        ax.set_xticks([step])
    ax.set_ylabel(ylabel + (", log scale" if ax.get_yscale() == "log" else ""))
    if ax.get_legend_handles_labels()[0]:  # the guides' labels (chance); runs are in fig.legend
        ax.legend(loc="best", fontsize=9, framealpha=0.85)


def is_smoothed(smoothing: float, n_steps: int) -> bool:
    """Whether a curve of `n_steps` training values is drawn as an EMA: of 2 points or fewer
    there is nothing to smooth, so both reports draw those raw."""
    return smoothing > 0 and n_steps > 2


def smoothing_caption(smoothing: float, smoothed: bool = True) -> str:
    """How the loss plot's training lines are drawn, in both reports' captions; `smoothed`:
    whether any curve was long enough to be drawn as an EMA (is_smoothed)."""
    if smoothing > 0 and smoothed:
        return f"Faint lines are the raw per-step values, bold lines their EMA (weight {smoothing:g})."
    if smoothing > 0:
        return "Lines are the raw per-step values, unsmoothed: 2 steps or fewer are too few for an EMA."
    return "Lines are the raw per-step values, unsmoothed (smoothing 0)."
