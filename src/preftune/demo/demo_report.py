"""The demo's report.html: the reward-KL frontier, win rates, every run's training curves, tables.

All plots are `preftune.report`'s; this module only chooses them and lays out one page over
all runs (each run's own report.html, with its full set of curves, stays in its folder).
"""

from __future__ import annotations

from pathlib import Path

from preftune.demo.pipeline import DemoPaths, Run
from preftune.records import write_text_atomic
from preftune.report import (
    PLOT_DIR,
    load_metrics,
    plot_accuracy_margins,
    plot_frontier,
    plot_loss,
    plot_win_rates,
)
from preftune.report_html import render_html


def draw_figures(paths: DemoPaths, runs: list[Run], evals: list[dict]) -> list[tuple[str, str, str]]:
    """Draw the page's plots into plots/; returns (relative src, title, caption) for each."""
    plots = paths.out / PLOT_DIR
    plots.mkdir(parents=True, exist_ok=True)
    plot_frontier(evals, plots / "reward_kl.png", from_reference=["DPO"],
                  title="Reward vs KL(π ‖ π_sft): DPO at several β and Preferred-FT")
    plot_win_rates(evals, plots / "win_rates.png")
    figures = [
        (f"{PLOT_DIR}/reward_kl.png", "Reward vs KL: the frontier",
         ("Mean latent reward of each model's samples on held-out prompts against its KL "
          "divergence from pi_sft (the black square). DPO's line starts at pi_sft, its limit "
          "as β grows; smaller β lets DPO move further from pi_sft for more reward; up and to "
          "the left is better.")),
        (f"{PLOT_DIR}/win_rates.png", "Win rates against pi_sft",
         "Share of held-out prompts where the model's continuation has the higher latent reward."),
    ]
    for run in runs:
        metrics = load_metrics(run.folder / "metrics.jsonl")
        name = run.name
        loss_types = ["sigmoid"] if run.method == "DPO" else ["sft"]
        if plot_loss(metrics, plots / f"{name}_loss.png", loss_types=loss_types) is not None:
            what = ("DPO loss, nats per pair" if run.method == "DPO" else
                    "negative log-likelihood of the chosen responses, nats per token: plain "
                    "fine-tuning")
            caption = (f"Per-step loss of {name} ({what}); its full report is "
                       f"runs/{name}/report.html.")
            figures.append((f"{PLOT_DIR}/{name}_loss.png", f"{name}: training loss", caption))
        if run.method == "DPO" and plot_accuracy_margins(
                metrics, plots / f"{name}_accuracy_margins.png") is not None:
            caption = ("How often β·log(π/π_sft) ranks the chosen response above the rejected "
                       "one, and by how much.")
            figures.append((f"{PLOT_DIR}/{name}_accuracy_margins.png",
                            f"{name}: implicit-reward accuracy and margin", caption))
    return figures


def _tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    from preftune.demo.summary import TABLE_HEADER, format_row

    results = (f"Results on {summary['results'][0]['n_prompts']} held-out prompts (judge: the "
               "latent sentiment reward r*; KL in nats per response, length in tokens)",
               TABLE_HEADER, [format_row(r) for r in summary["results"]])
    checks = ("Checks", ["claim", "holds"],
              [[c["claim"], "yes" if c["holds"] else "NO"] for c in summary["checks"]])
    examples = ("Sample continuations, before (pi_sft) and after (DPO)",
                ["prompt", "pi_sft", "r*", "DPO", "r*"],
                [[e["prompt"], e["pi_sft"], f"{e['pi_sft_reward']:+.2f}", e["dpo"],
                  f"{e['dpo_reward']:+.2f}"] for e in summary["examples"]])
    seconds = ("Time per step (seconds; a step kept from an earlier call of the demo takes "
               "almost none)", ["step", "seconds"],
               [[k, f"{v:.1f}"] for k, v in summary["seconds"].items()])
    return [results, checks, examples, seconds]


def write_demo_report(paths: DemoPaths, summary: dict, figures: list) -> Path:
    """Write report.html (whole or not at all) beside the plots `draw_figures` drew."""
    artefacts = ("Every artefact is kept beside this page: pi_sft/, pairs.jsonl, D.jsonl, and for "
                 "each model runs/NAME/ (config.yaml, metrics.jsonl, report.html, final/ with "
                 "eval.json and samples.jsonl, whose rewards can be recomputed with "
                 "preftune.demo.world.sentiment_reward).")
    notes = [f"Command: {summary['command']}", artefacts]
    html = render_html(title="preftune demo: DPO on synthetic movie-review sentiment",
                       run_dir=str(paths.out), tables=_tables(summary),
                       figures=figures, notes=notes)
    write_text_atomic(paths.report, html)
    return paths.report
