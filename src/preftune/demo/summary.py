"""Step 7 of `preftune demo`: the results table, the checks of the result, demo.json, report.html.

demo.json holds (the documented keys, which tests check):
- `results`: one row per model, pi_sft first: `model`, `method` ("pi_sft", "DPO",
  "Preferred-FT"), `beta` (DPO only), `mean_reward`, `mean_reward_se`, `win_rate`,
  `win_rate_ci` (95% Wilson; null for pi_sft, which is the opponent), `kl`, `kl_se` (nats per
  response, KL(pi || pi_sft)), `mean_length` (tokens), `n_prompts`, `folder`;
- `checks`: the claims the demo makes, each `{"claim", "holds"}`;
- `examples`: held-out prompts with pi_sft's and a DPO model's continuation and their rewards;
- `command` (as typed), `sizes` (the settings used), `seconds` (per step and `total`, of the
  call that wrote the file: a step kept from an earlier call takes almost none),
  `report` (report.html's path), `artefacts` (where each file went).
Every path (`folder`, `report`, `artefacts`) is absolute, as in eval.json and config.yaml, however
--out was typed. report.html shows the same numbers; demo.json is written after it, last.
"""

from __future__ import annotations

import json
import math
import os
from itertools import pairwise
from pathlib import Path

from preftune.demo.pipeline import DemoPaths, DemoSizes, Run, eval_path, generation_eval
from preftune.errors import UserError
from preftune.records import read_records

SUMMARY_KEYS = ("results", "checks", "examples", "command", "sizes", "seconds", "report",
                "artefacts")
WIN_RATE_TARGET = 0.75
Z95 = 1.959964  # two-sided 95% normal quantile, for the reward intervals


def _interval(mean: float, se: float | None) -> tuple[float, float]:
    half = Z95 * (se or 0.0)
    return mean - half, mean + half


def model_evals(runs: list[Run], paths: DemoPaths) -> list[dict]:
    """Each run's eval.json record, tagged for the report's plots (method, beta, label)."""
    evals = []
    for run in runs:
        record = generation_eval(run, paths)
        if record is None:
            raise UserError(f"{run.final}: no evaluation against {paths.pi_sft}; rerun the demo "
                            "to finish step 6.")
        record = dict(record, method=run.method, label=run.name)
        if run.beta is None:
            record.pop("beta", None)  # the sft loss has no beta; the config's default is noise
        evals.append(record)
    return evals


def result_rows(runs: list[Run], evals: list[dict], paths: DemoPaths) -> list[dict]:
    """The results table: pi_sft (the reference every model was compared with), then each model."""
    first = evals[0]
    rows = [{
        "model": "pi_sft", "method": "pi_sft", "beta": None,
        "mean_reward": first["mean_reward"]["reference"],
        "mean_reward_se": first["mean_reward_se"]["reference"],
        "win_rate": None, "win_rate_ci": None, "kl": 0.0, "kl_se": 0.0,
        "mean_length": first["mean_length"]["reference"], "n_prompts": first["n_prompts"],
        "folder": _absolute(paths.pi_sft),
    }]
    for run, ev in zip(runs, evals):
        rows.append({
            "model": run.name, "method": run.method, "beta": run.beta,
            "mean_reward": ev["mean_reward"]["policy"],
            "mean_reward_se": ev["mean_reward_se"]["policy"],
            "win_rate": ev["win_rate"], "win_rate_ci": ev["win_rate_ci"],
            "kl": ev["kl"], "kl_se": ev["kl_se"], "mean_length": ev["mean_length"]["policy"],
            "n_prompts": ev["n_prompts"], "folder": _absolute(run.folder),
        })
    return rows


def result_checks(rows: list[dict]) -> list[dict]:
    """The claims of the issue, checked on the numbers (the paper's claims in miniature)."""
    pi_sft = rows[0]
    dpo = [r for r in rows if r["method"] == "DPO"]
    baselines = [r for r in rows if r["method"] == "Preferred-FT"]
    sft_upper = _interval(pi_sft["mean_reward"], pi_sft["mean_reward_se"])[1]
    origin = (0.0, pi_sft["mean_reward"])
    checks = [
        {"claim": f"every DPO run wins against pi_sft on at least {WIN_RATE_TARGET:.0%} of "
                  "held-out prompts",
         "holds": bool(dpo) and all(r["win_rate"] >= WIN_RATE_TARGET for r in dpo)},
        {"claim": "every DPO run's mean reward is above pi_sft's, 95% intervals not overlapping",
         "holds": bool(dpo) and all(
             _interval(r["mean_reward"], r["mean_reward_se"])[0] > sft_upper for r in dpo)},
    ]
    for base in baselines:
        dpo_there = dpo_reward_at(dpo, base["kl"], origin)
        checks.append({
            "claim": f"at {base['model']}'s KL ({base['kl']:.2f}), DPO's reward-KL line "
                     f"(pi_sft and the betas' points joined) gives {dpo_there:+.2f}, at least "
                     f"{base['model']}'s {base['mean_reward']:+.2f}",
            "holds": bool(dpo) and dpo_there >= base["mean_reward"],
        })
    return checks


def dpo_reward_at(dpo: list[dict], kl: float, origin: tuple[float, float] | None = None) -> float:
    """DPO's mean reward at a given KL, read off its reward-KL line.

    Between two betas' points the line is straight: mixing the two policies (sampling from one
    or the other at random) reaches that reward with at most that KL, KL being convex. `origin`
    is pi_sft's point (KL 0), the limit of DPO as beta grows, so below the smallest DPO KL the
    line runs from pi_sft. Beyond the largest KL the best DPO reward holds: it was reached with
    less KL than asked for.
    """
    points = sorted([(r["kl"], r["mean_reward"]) for r in dpo] + ([origin] if origin else []))
    if not points:
        return -math.inf
    if kl <= points[0][0]:
        return points[0][1]
    for (k0, r0), (k1, r1) in pairwise(points):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else max(r0, r1)
    return max(r for _, r in points)


def examples(runs: list[Run], rows: list[dict], n: int = 4) -> list[dict]:
    """The first held-out prompts, pi_sft's continuation beside the best DPO model's."""
    dpo = [(row, run) for row, run in zip(rows[1:], runs) if run.method == "DPO"]
    if not dpo:
        return []
    row, run = max(dpo, key=lambda pair: pair[0]["mean_reward"])
    out = []
    for sample in read_records(run.final / "samples.jsonl")[:n]:
        out.append({
            "prompt": sample["prompt"], "model": row["model"],
            "pi_sft": sample["responses"]["reference"], "pi_sft_reward": sample["reward"]["reference"],
            "dpo": sample["responses"]["policy"], "dpo_reward": sample["reward"]["policy"],
        })
    return out


def _absolute(path) -> str:
    return os.path.abspath(path)


def build_summary(paths: DemoPaths, sizes: DemoSizes, runs: list[Run],
                  command: str) -> tuple[dict, list]:
    """demo.json's content but `seconds` (keys in the module docstring), and the report's
    figures, drawn into plots/. Paths are absolute, as in eval.json and config.yaml."""
    from dataclasses import asdict

    from preftune.demo.demo_report import draw_figures

    evals = model_evals(runs, paths)
    rows = result_rows(runs, evals, paths)
    summary = {
        "command": command, "results": rows, "checks": result_checks(rows),
        "examples": examples(runs, rows), "sizes": asdict(sizes),
        "report": _absolute(paths.report),
        "artefacts": {
            "pi_sft": _absolute(paths.pi_sft),
            "prompts": [_absolute(paths.train_prompts), _absolute(paths.heldout_prompts)],
            "pairs": _absolute(paths.pairs), "D": _absolute(paths.dataset),
            "runs": {run.name: _absolute(run.folder) for run in runs},
            "evals": {run.name: _absolute(eval_path(run)) for run in runs},
            "samples": {run.name: _absolute(run.final / "samples.jsonl") for run in runs},
        },
    }
    return summary, draw_figures(paths, runs, evals)


def write_summary(paths: DemoPaths, summary: dict, figures: list) -> None:
    """report.html, then demo.json (each whole or not at all): demo.json present means the demo
    finished, and both show the same numbers and times."""
    from preftune.demo.demo_report import write_demo_report
    from preftune.records import write_text_atomic

    write_demo_report(paths, summary, figures)
    write_text_atomic(paths.summary, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ printing


def format_row(row: dict) -> list[str]:
    """One results row as the strings of the printed (and README) table."""
    wr = row["win_rate"]
    win = "–" if wr is None else f"{wr:.1%} [{row['win_rate_ci'][0]:.1%}, {row['win_rate_ci'][1]:.1%}]"
    se = row["mean_reward_se"] or 0.0
    return [
        row["model"], "–" if row["beta"] is None else f"{row['beta']:g}",
        f"{row['mean_reward']:+.2f} ± {se:.2f}", win,
        f"{row['kl']:.2f} ± {row['kl_se'] or 0.0:.2f}", f"{row['mean_length']:.1f}",
    ]


TABLE_HEADER = ["model", "beta", "mean reward ± se", "win rate vs pi_sft [95% CI]",
                "KL(pi||pi_sft) ± se", "mean length"]


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table, ready for the README."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + " --- |" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in rows]
    return "\n".join(lines)


def failed_checks(summary: dict) -> list[str]:
    """The claims that do not hold: `preftune demo` exits 1 when there is any, so `make demo`
    fails on a broken claim instead of printing NO and succeeding."""
    return [check["claim"] for check in summary["checks"] if not check["holds"]]


def print_summary(summary: dict, console, out: str | Path | None = None) -> None:
    """The results table, the checks, sample continuations side by side, the report's path
    (below `out` as the user named it, when given), and last how many checks failed, if any."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Held-out prompts: {summary['results'][0]['n_prompts']}, judge: the "
                        "latent sentiment reward r*")
    for i, name in enumerate(TABLE_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in summary["results"]:
        table.add_row(*format_row(row))
    console.print(table)
    for check in summary["checks"]:
        mark = "[green]yes[/green]" if check["holds"] else "[red] NO[/red]"
        console.print(f"  {mark}  {check['claim']}", highlight=False)
    if summary["examples"]:
        model = summary["examples"][0]["model"]
        samples = Table(title=f"Sample continuations: pi_sft (before) and {model} (after)",
                        show_lines=True)
        for name in ("prompt", "pi_sft", model):
            samples.add_column(name, ratio=1 if name == "prompt" else 2)
        for ex in summary["examples"]:
            samples.add_row(ex["prompt"], f"{ex['pi_sft']}\n[dim]r* = {ex['pi_sft_reward']:+.2f}[/dim]",
                            f"{ex['dpo']}\n[dim]r* = {ex['dpo_reward']:+.2f}[/dim]")
        console.print(samples)
    folder = Path(out) if out is not None else Path(summary["report"]).parent
    # Whole paths (soft wrap) as typed (no markup): the user copies or clicks them.
    console.print(f"report: {folder / 'report.html'}\nsummary: {folder / 'demo.json'}",
                  markup=False, soft_wrap=True)
    failed = failed_checks(summary)
    if failed:
        console.print(f"[red]{len(failed)} of {len(summary['checks'])} checks failed (NO above); "
                      f"see {escape(str(folder / 'report.html'))}[/red]", highlight=False,
                      soft_wrap=True)
