"""`preftune label ...`: serve the labeling page, manage annotators, report, export, auto-label.

The lead CLI mounts `app` as the `label` sub-command; every command is a thin call into the
library, and user mistakes surface as `UserError` (printed as one sentence by the main CLI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from preftune.errors import UserError
from preftune.rewards import REWARD_MODEL_BATCH_SIZE
from preftune.wording import counted

app = typer.Typer(
    help="Label response pairs: in the browser (serve) or with a reward function (auto).",
    no_args_is_help=True,
)


@app.command()
def serve(
    db: Path = typer.Option(..., help="SQLite labels database (created if missing)."),
    pairs: Path | None = typer.Option(None, help="pairs.jsonl to import before serving."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    overlap: int | None = typer.Option(
        None, help="How many different annotators label each pair (default: the overlap this "
        "database was last served with, else 1)."),
    open_: bool = typer.Option(
        False, "--open", help="Anonymous voting without tokens (loopback addresses only)."
    ),
    guidelines: Path | None = typer.Option(None, help="Text file shown as the guidelines."),
) -> None:
    """Serve the annotator page until interrupted."""
    from preftune.labeling.app import serve as run_server

    run_server(db, pairs=pairs, host=host, port=port, overlap=overlap, open_mode=open_,
               guidelines=guidelines, echo=typer.echo)


@app.command("import")
def import_pairs(
    pairs: Path = typer.Option(..., help="pairs.jsonl written by `preftune sample`."),
    db: Path = typer.Option(..., help="SQLite labels database (created if missing)."),
) -> None:
    """Add pairs to the database (pairs already there are kept as they are)."""
    from preftune.labeling.export import unusable_note
    from preftune.labeling.pairs import load_pairs
    from preftune.labeling.store import Store

    loaded = load_pairs(pairs, for_people=True)
    store = Store(db)
    try:
        added, present = store.add_pairs(loaded)
    finally:
        store.close()
    typer.echo(f"{pairs}: {counted(added, 'new pair')}, {present} already in {db}")
    note = unusable_note(pairs, loaded)
    if note:
        typer.echo(note)


@app.command("add-annotator")
def add_annotator(
    name: str = typer.Argument(..., help="Annotator name: letters, digits, _ . @ -"),
    db: Path = typer.Option(..., help="SQLite labels database (created if missing)."),
    url: str = typer.Option(
        "http://127.0.0.1:8000", help="Public address of the server, used in the login link."
    ),
    reissue: bool = typer.Option(False, help="Give an existing annotator a new link."),
) -> None:
    """Create an annotator and print their personal login link (shown only once)."""
    from preftune.labeling.store import Store

    store = Store(db)
    try:
        token = store.add_annotator(name, reissue=reissue)
    finally:
        store.close()
    typer.echo(f"login link for {name} (keep it private; it is not stored anywhere):")
    typer.echo(f"{url.rstrip('/')}/login?token={token}")


@app.command("revoke-annotator")
def revoke_annotator(
    name: str = typer.Argument(..., help="Annotator name."),
    db: Path = typer.Option(..., help="SQLite labels database."),
) -> None:
    """Disable an annotator's link at once; their votes are kept."""
    from preftune.labeling.store import Store

    store = Store(db, must_exist=True)
    try:
        store.revoke_annotator(name)
    finally:
        store.close()
    typer.echo(f"revoked {name}: their link no longer works (votes kept)")


@app.command()
def status(
    db: Path = typer.Option(..., help="SQLite labels database."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
    overlap: int | None = typer.Option(
        None, help="Votes wanted per pair (default: the one the last `label serve` recorded)."
    ),
) -> None:
    """Progress per annotator and against the overlap, agreement (percent, Cohen/Fleiss kappa)
    and position bias."""
    from preftune.labeling.status import format_status
    from preftune.labeling.status import status as compute

    result = compute(db, overlap=overlap)
    typer.echo(json.dumps(result, indent=2) if as_json else format_status(result, db))


@app.command()
def export(
    db: Path = typer.Option(..., help="SQLite labels database."),
    out: Path = typer.Option(..., help="D.jsonl to write (replaced atomically)."),
    policy: str | None = typer.Option(None, help="majority (the default) or unanimous."),
    raw: bool = typer.Option(False, help="Every live vote with annotator, time and side."),
) -> None:
    """Write the data set D = {(prompt, chosen, rejected)} for `preftune train`."""
    from preftune.labeling.export import export as run_export
    from preftune.labeling.export import format_report

    if raw and policy is not None:  # a raw export decides nothing, so a policy would be ignored
        raise UserError(f"--raw writes every vote rather than D, so --policy {policy} has no effect; "
                        "drop one of them.")
    report = run_export(db, out, policy=policy or "majority", raw=raw)
    typer.echo(format_report(report, out))


@app.command()
def auto(
    pairs: Path = typer.Option(..., help="pairs.jsonl written by `preftune sample`."),
    reward: str = typer.Option(..., help="MODULE:FUNCTION, FILE.py:FUNCTION, or a reward model folder (one-output classifier)."),
    out: Path = typer.Option(..., help="D.jsonl to append to (resumes after a kill)."),
    bt_sample: bool = typer.Option(False, "--bt-sample", help=(
        "Draw the winner with the Bradley-Terry p = sigmoid(r1 - r2) (default; equal rewards are a "
        "coin flip, counted); of N > 2 responses, draw a Plackett-Luce ranking: first is chosen, "
        "last rejected.")),
    argmax: bool = typer.Option(False, "--argmax", help=(
        "The higher reward wins, equal rewards are skipped and counted; of N > 2 responses, the "
        "highest is chosen, the lowest rejected.")),
    seed: int = typer.Option(0, help="Seed of the Bradley-Terry (Plackett-Luce) draws."),
    batch_size: int = typer.Option(32, help=(
        "Records (pairs) per call of a batched reward function (one taking a single prompt and "
        "response is called per response); a --reward model folder gets at least --reward-batch-size "
        "pairs per call.")),
    reward_batch_size: Optional[int] = typer.Option(None, "--reward-batch-size", show_default=False, help=(
        f"Texts (prompt + response) a --reward model folder scores per forward pass (default "
        f"{REWARD_MODEL_BATCH_SIZE}); raise it on a large GPU. Scores do not depend on it.")),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=(
        "Let a --reward model folder run the Python code it ships (its config.json auto_map), "
        "as ArmoRM needs; only for code you trust.")),
) -> None:
    """Label pairs with a reward function: a Bradley-Terry draw (Plackett-Luce for N > 2) or the argmax."""
    from preftune.labeling.auto import label_auto

    if bt_sample and argmax:
        raise UserError("pass either --bt-sample or --argmax, not both.")
    mode = "argmax" if argmax else "bt-sample"
    try:
        stats = label_auto(pairs, reward, out, mode=mode, seed=seed, batch_size=batch_size,
                           show_progress=progress, trust_remote_code=trust_remote_code,
                           reward_batch_size=reward_batch_size)
    except KeyboardInterrupt:
        # It ended without a word: say that the rows so far are kept and how to go on.
        from preftune.records import kept_so_far

        typer.echo(f"stopped by Ctrl-C: {kept_so_far(out, 'row', 'labeled')}; rerun the same command "
                   "to continue.", err=True)
        raise typer.Exit(130) from None
    ties = f", {counted(stats['ties_skipped'], 'tie')} skipped" if stats.get("ties_skipped") else ""
    if stats.get("empty_skipped"):
        ties += f", {counted(stats['empty_skipped'], 'pair')} with an empty response skipped"
    if stats.get("identical_skipped"):
        ties += f", {counted(stats['identical_skipped'], 'pair')} with identical responses skipped"
    if stats.get("empty_dropped") or stats.get("duplicates_dropped"):  # only with --n above 2
        empty, repeated = stats.get("empty_dropped", 0), stats.get("duplicates_dropped", 0)
        ties += (f"; {empty} empty and {counted(repeated, 'repeated response')} left out before "
                 f"picking best and worst")
    if stats.get("reward_truncated"):
        cut = stats["reward_truncated"]
        with_prompt, was = ("with its prompt", "was") if cut == 1 else ("with their prompts", "were")
        ties += (f"; {counted(cut, 'response')} ({with_prompt}) {was} longer than the reward model's "
                 f"{stats['reward_max_length']} tokens and {was} scored cut to them")
    if stats.get("ties_drawn"):
        ties += (f"; {counted(stats['ties_drawn'], 'tie')} (equal rewards) labeled by a coin flip "
                 "(--argmax skips ties)")
    typer.echo(
        f"{out}: wrote {counted(stats.get('written', 0), 'row')} ({mode}), "
        f"{stats['resumed_from']} {'was' if stats['resumed_from'] == 1 else 'were'} already there{ties}"
    )


if __name__ == "__main__":
    # Standalone use (`python -m preftune.labeling.cli`), as the main CLI would report it.
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
