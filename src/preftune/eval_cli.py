"""`preftune eval ...`: held-out pairs, generations judged by a reward or by people, and scoring.

Mounted by `preftune.cli` as the `eval` sub-command. Each command is a thin call into
`preftune.evaluate`, `preftune.eval_generate` or `preftune.eval_human`; a `UserError` reaches
the top-level CLI, which prints its sentence and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path

import typer

from preftune.rewards import REWARD_MODEL_BATCH_SIZE
from preftune.wording import counted

app = typer.Typer(
    help="Evaluate a policy: on held-out pairs (accuracy, margins) or on generations "
    "(win rate, reward, KL), for one model or a leaderboard of several.",
    no_args_is_help=True,
)


def _fmt(value, se=None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return f"{text} ± {se:.{digits}f}" if se is not None else text


@app.command()
def pairs(
    model: str = typer.Option(..., "--model", help="Policy folder, e.g. RUN/final."),
    data: str = typer.Option(..., "--data", help="Held-out pairs (prompt/chosen/rejected), e.g. D_eval.jsonl."),
    split: str = typer.Option("train", help="The split to read when --data is a hub id or a DatasetDict folder."),
    data_config: str | None = typer.Option(
        None, "--data-config", help="The config (subset) of --data, a hub id or folder whose README.md declares several."),
    reference: str | None = typer.Option(
        None, "--reference", help="Reference model folder (default: the one in RUN/config.yaml; none "
        "for a run trained without one)."),
    beta: float | None = typer.Option(None, help="beta of the implicit reward (default: the run's, else 0.1)."),
    loss: str | None = typer.Option(
        None, help="Loss type(s), comma separated (default: the run's, else sigmoid); the run's loss "
        "settings that these types do not use are left out."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Pairs per forward pass (default: the run's train.eval_batch_size, "
        "else its train.batch_size, else 8; aot and aot_unpaired sort margins within one)."),
    max_length: int | None = typer.Option(None, "--max-length", min=2, help="Tokens per sequence (default: the run's, else 1024)."),
    out: Path | None = typer.Option(None, help="Folder for eval.json (default: the model folder; needed for a hub id)."),
    device: str = typer.Option("auto", help="cuda, cpu, ... (auto: cuda if present)."),
    dtype: str | None = typer.Option(
        None, help="float32, bfloat16 or float16 (default: the run's model.dtype, else float32; a run "
        "under bf16 autocast is evaluated under it)."),
    token_metrics: bool | None = typer.Option(
        None, "--token-metrics/--no-token-metrics", help="Also TRL's entropy, mean_token_accuracy, "
        "logits/chosen and logits/rejected (default: as the run's train.token_metrics, else off)."),
) -> None:
    """Implicit-reward accuracy and margins (beta * log pi/ref), log-probs and lengths on pairs."""
    from preftune.evaluate import evaluate_pairs_file
    from preftune.metrics import TOKEN_METRIC_KEYS, WPO_KEY

    record = evaluate_pairs_file(model, data, reference, beta=beta, loss=loss,
                                 batch_size=batch_size, max_length=max_length, out=out,
                                 device=device, dtype=dtype, split=split,
                                 token_metrics=token_metrics, data_config=data_config)
    typer.echo(f"{counted(record['n_pairs'], 'pair')}, beta {record['beta']:g}, loss {record['loss_type']}:")
    if record["skipped"]:  # said here too, not only in eval.json: these pairs are not in the numbers
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(record["skipped"].items()))
        typer.echo(f"  left out (not evaluated): {reasons}")
    if record["truncated"]:
        typer.echo(f"  {record['truncated']} cut to max_length (evaluated as cut)")
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                "rewards/rejected", "logps/chosen", "logps/rejected", "lengths/chosen",
                "lengths/rejected", WPO_KEY, *TOKEN_METRIC_KEYS):
        if f"eval/{key}" in record:  # the last five only with their settings
            typer.echo(f"  eval/{key:<20} {record[f'eval/{key}']:.4f}")
    typer.echo(f"wrote {(out or Path(model)) / 'eval.json'}")


@app.command()
def generate(
    model: list[str] = typer.Option(..., "--model", help="Policy folder; repeat for a leaderboard of several."),
    prompts: Path = typer.Option(..., "--prompts", help=".jsonl ({\"prompt\": ...} per line), a .json list of such objects, or .txt (one per line)."),
    judge: str = typer.Option(
        ..., "--judge", help="reward:MODULE:FUNCTION, reward:FILE.py:FUNCTION, a reward-model folder, or human."),
    reference: str | None = typer.Option(
        None, "--reference", help="Reference model folder (default: the one in RUN/config.yaml)."),
    n_prompts: int | None = typer.Option(None, "--n-prompts", help="Use only the first N prompts."),
    max_new_tokens: int = typer.Option(
        64, "--max-new-tokens", help="Longest response in tokens; one cut there is scored as sampled."),
    temperature: float = typer.Option(1.0, help="1 samples from the policy itself (needed for an unbiased KL)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]; 1: off."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the K likeliest tokens; 0: off."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below MIN_P times the likeliest one's; 0: off."),
    seed: int = typer.Option(0, help="Prompt i is seeded from (seed, i) for every model alike."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per generate call."),
    out: Path | None = typer.Option(None, help="Output folder (default: beside each model)."),
    db: Path | None = typer.Option(None, help="Labeling database for --judge human."),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", min=0, help="Resamples behind leaderboard intervals; 0: none."),
    device: str = typer.Option("auto", help="cuda, cpu, ... (auto: cuda if present)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Let a --judge reward-model folder run the Python code "
        "it ships (its config.json auto_map), as ArmoRM needs; only for code you trust."),
    reward_batch_size: int | None = typer.Option(None, "--reward-batch-size", show_default=False, help=(
        f"Texts (prompt + response) a --judge reward-model folder scores per forward pass (default "
        f"{REWARD_MODEL_BATCH_SIZE}); raise it on a large GPU. Scores do not depend on it.")),
) -> None:
    """Sample policy and reference on the same prompts; win rate, rewards, KL(pi || ref), lengths."""
    from preftune.eval_generate import compare_models

    result = compare_models(
        model, reference, prompts, judge, n_prompts=n_prompts, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, batch_size=batch_size, out=out, db=db,
        device=device, dtype=dtype, n_bootstrap=n_bootstrap, echo=typer.echo,
        trust_remote_code=trust_remote_code, reward_batch_size=reward_batch_size,
    )
    for record, folder in zip(result["evals"], result["folders"]):
        _print_generation_record(record, folder)
    _print_leaderboard(result)
    if judge == "human":
        from preftune.eval_human import serve_instructions

        typer.echo("\n" + serve_instructions(db, result["folders"]))


def _print_leaderboard(result: dict) -> None:
    """The table, and where it went: --out, else the folder holding all the models."""
    if result["leaderboard_text"]:
        typer.echo("\n" + result["leaderboard_text"])
        typer.echo(f"wrote {result['leaderboard_file']} and leaderboard.md beside it")


def _print_generation_record(record: dict, folder: str) -> None:
    typer.echo(f"\n{record['system']} vs reference on {counted(record['n_prompts'], 'prompt')} "
               f"(judge {record['judge']}):")
    if record.get("win_rate") is not None:
        low, high = record["win_rate_ci"]
        typer.echo(f"  win rate   {record['win_rate']:.3f}  95% CI [{low:.3f}, {high:.3f}]  "
                   f"({counted(record['wins'], 'win')}, {counted(record['ties'], 'tie')}, "
                   f"{counted(record['losses'], 'loss', 'losses')})")
    if record.get("mean_reward", {}).get("policy") is not None:
        reward, se = record["mean_reward"], record["mean_reward_se"]
        typer.echo(f"  reward     policy {_fmt(reward['policy'], se['policy'])}, "
                   f"reference {_fmt(reward['reference'], se['reference'])}")
    typer.echo(f"  KL(pi||ref) {_fmt(record['kl'], record['kl_se'])} nats per response")
    if record.get("kl_tokens") is not None:  # the same KL, estimated token by token (lower variance)
        typer.echo(f"  token-wise  {_fmt(record['kl_tokens'], record.get('kl_tokens_se'))} nats per response")
    else:
        typer.echo("  token-wise  none: the policy's and the reference's output layers differ in size")
    lengths = record["mean_length"]
    typer.echo(f"  length     policy {lengths['policy']:.1f}, reference {lengths['reference']:.1f} tokens")
    if record.get("kl_note"):
        typer.echo(f"  note: {record['kl_note']}")
    # A folder holding several evaluations gives each its own samples file: name this one's.
    typer.echo(f"  wrote {Path(folder) / 'eval.json'} and {record.get('samples', 'samples.jsonl')}")


@app.command("score-human")
def score_human(
    targets: list[Path] = typer.Argument(
        ..., help="Folders (or their samples.jsonl) written by `eval generate --judge human`."),
    db: Path = typer.Option(..., help="The labeling database the comparisons were queued in."),
    out: Path | None = typer.Option(None, help="Folder for leaderboard.json when scoring several."),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", min=0, help="Resamples behind leaderboard intervals; 0: none."),
) -> None:
    """Read people's votes back and write the win rate into eval.json (and samples.jsonl)."""
    from preftune.eval_human import score_human as run_scoring

    result = run_scoring(db, targets, out=out, n_bootstrap=n_bootstrap)
    for record, target in zip(result["evals"], targets):
        low, high = record["win_rate_ci"]
        typer.echo(f"{record['system']}: win rate {record['win_rate']:.3f} 95% CI [{low:.3f}, "
                   f"{high:.3f}] from {counted(record['n_votes'], 'vote')} on {counted(record['n_prompts'], 'prompt')} "
                   f"({record['n_unjudged']} not judged yet); updated {target}")
    _print_leaderboard(result)
