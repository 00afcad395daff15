"""`preftune sample`: the command-line face of `preftune.sampling.sample_to_file`.

Mounted by `preftune.cli` (the typer `app` here holds the one `sample` command). A `UserError`
propagates to the top-level CLI, which prints its sentence and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from preftune.errors import UserError
from preftune.records import kept_so_far
from preftune.sampling_settings import SamplingSettings
from preftune.wording import counted

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command("sample")
def sample(
    model: Annotated[str, typer.Option("--model", help="Model folder or hub id (pi_sft).")],
    prompts: Annotated[Path, typer.Option(
        "--prompts",
        help='Prompt file: .jsonl with {"prompt": text or chat messages} per line, a .json list '
        "of such objects, or .txt with one prompt per line (blank lines skipped and counted).",
    )],
    out: Annotated[Path, typer.Option(
        "--out", help="pairs.jsonl to write; rerun with the same model, prompts, sampling options "
        "and --id-prefix to continue after its last prompt."
    )],
    n: Annotated[int, typer.Option("--n", help="Responses per prompt.")] = 2,
    temperature: Annotated[float, typer.Option(
        "--temperature", help="0 means greedy, which gives one response per prompt: pass --n 1 with it."
    )] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the K likeliest tokens; 0: off.")] = 0,
    min_p: Annotated[float, typer.Option(
        "--min-p", help="Drop tokens below MIN_P times the likeliest one's probability; 0: off."
    )] = 0.0,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="Longest response in tokens; one cut there is marked truncated."
    )] = 64,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Prompts per generate call. Out of memory: rerun with a smaller one, it "
        "resumes; only the same batch size gives bit-identical pairs (rounding moves a rare token)."
    )] = 16,
    seed: Annotated[int, typer.Option(
        "--seed", help="Prompt i's responses are seeded from (seed, i)."
    )] = 0,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="float32, bfloat16, float16 or auto."
    )] = "float32",
    device: Annotated[str, typer.Option(
        "--device", help="cuda, cpu, ... (auto: cuda if present)."
    )] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    id_prefix: Annotated[str, typer.Option(
        "--id-prefix", help="Pair ids are PREFIX000000, PREFIX000001, ...: give each batch of prompts "
        "its own prefix when several go into one labeling database or D.jsonl."
    )] = "p",
) -> None:
    """Sample N responses per prompt from a model into pairs.jsonl (resumes an interrupted run)."""
    import torch  # here, not at the top: `preftune --help` and the label server need no torch

    from preftune.sampling import sample_to_file

    settings = SamplingSettings(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, n=n,
        top_k=top_k, min_p=min_p,
    )
    console = Console(stderr=True)
    try:
        done, written = sample_to_file(
            model, prompts, out, settings, batch_size=batch_size, dtype=dtype, device=device,
            progress=progress, id_prefix=id_prefix,
        )
    except KeyboardInterrupt:
        # It ended without a word: say that the work so far is kept and how to go on.
        console.print(f"stopped by Ctrl-C: {kept_so_far(out, 'prompt', 'sampled')}; rerun the same command to continue.")
        raise typer.Exit(130) from None
    except torch.cuda.OutOfMemoryError:  # was a traceback; a smaller batch resumes where it stopped
        smaller = (f"rerun with a smaller --batch-size (say {batch_size // 2}) to continue"
                   if batch_size > 1 else "rerun on a device with more memory to continue")
        half = " or with --dtype bfloat16" if dtype == "float32" else ""
        raise UserError(f"out of memory sampling {counted(batch_size, 'prompt')} x {counted(n, 'response')} "
                        f"at once; {kept_so_far(out, 'prompt', 'sampled')}: {smaller}{half}.") from None
    if written == 0:
        console.print(f"{out} already holds {'the' if done == 1 else 'all'} {counted(done, 'prompt')}; nothing to do.")
    elif done:
        console.print(f"resumed after {counted(done, 'prompt')}; wrote {written} more to {out}.")
    else:
        console.print(f"wrote {counted(written, 'prompt')} x {counted(n, 'response')} to {out}.")
    # Labeling reads pairs: say now what it will do with this many responses, not at label time.
    if n == 1:
        console.print("one response per prompt: nothing to compare, so `preftune label` needs --n 2 or more.")
    elif n > 2:
        console.print(f"{n} responses per prompt: `preftune label auto` keeps the best and the worst of each; "
                      "people (`label serve`) compare two at a time, so sample with --n 2 for them.")
