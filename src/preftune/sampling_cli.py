"""`preftune sample`: the command-line face of `preftune.sampling.sample_to_file`.

Mounted by `preftune.cli` (the typer `app` here holds the one `sample` command). A `UserError`
propagates to the top-level CLI, which prints its sentence and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from preftune.sampling import SamplingSettings, sample_to_file

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command("sample")
def sample(
    model: str = typer.Option(..., "--model", help="Model folder or hub id (pi_sft)."),
    prompts: Path = typer.Option(
        ..., "--prompts",
        help='Prompt file: .jsonl with {"prompt": text or chat messages} per line, '
        "or .txt with one prompt per line.",
    ),
    out: Path = typer.Option(..., "--out", help="pairs.jsonl to write or resume."),
    n: int = typer.Option(2, "--n", help="Responses per prompt."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 means greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generate call."),
    seed: int = typer.Option(0, "--seed", help="Prompt i's responses are seeded from (seed, i)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or auto."),
    device: str = typer.Option("auto", "--device", help="cuda, cpu, ... (auto: cuda if present)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Sample N responses per prompt from a model into pairs.jsonl (resumes an interrupted run)."""
    settings = SamplingSettings(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, n=n
    )
    done, written = sample_to_file(
        model, prompts, out, settings, batch_size=batch_size, dtype=dtype, device=device,
        progress=progress,
    )
    console = Console(stderr=True)
    if written == 0:
        console.print(f"{out} already holds all {done} prompts; nothing to do.")
    elif done:
        console.print(f"resumed after {done} prompts; wrote {written} more to {out}.")
    else:
        console.print(f"wrote {written} prompts x {n} responses to {out}.")
