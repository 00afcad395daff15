"""`preftune data inspect`: what a preference file holds, before a run spends hours on it."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table
from rich.text import Text

from preftune.data.io import load_pairs
from preftune.data.tokenize import tokenize_pair, truncate_pair


def histogram(values: list[int], bins: int = 10, width: int = 40) -> list[tuple[str, int, str]]:
    """(range label, count, bar) rows of a text histogram."""
    if not values:
        return []
    low, high = min(values), max(values)
    step = max(1, -(-(high - low + 1) // bins))
    counts = Counter((v - low) // step for v in values)
    peak = max(counts.values())
    rows = []
    for b in range(-(-(high - low + 1) // step)):
        lo = low + b * step
        rows.append((f"{lo}-{lo + step - 1}", counts.get(b, 0), "#" * round(width * counts.get(b, 0) / peak)))
    return rows


def _histogram_table(title: str, values: list[int]) -> Table:
    table = Table(title=title, show_edge=False)
    table.add_column("tokens", justify="right")
    table.add_column("pairs", justify="right")
    table.add_column("")
    for label, count, bar in histogram(values):
        table.add_row(label, str(count), bar)
    return table


def inspect_file(path: str, tokenizer, data_cfg, console: Console, split: str = "train") -> dict:
    loaded = load_pairs(path, split)
    console.print(f"[bold]{path}[/bold]: {loaded.rows_read} rows, {len(loaded.pairs)} usable")
    for reason, n in loaded.skipped.items():
        console.print(f"  skipped {n}: {reason}")
    lengths = {"prompt": [], "chosen": [], "rejected": [], "total": []}
    outcomes = Counter()
    first = None
    for index, pair in enumerate(loaded.pairs):
        tokenized = tokenize_pair(pair, tokenizer, index)
        lengths["prompt"].append(len(tokenized.prompt_ids))
        lengths["chosen"].append(len(tokenized.chosen_ids))
        lengths["rejected"].append(len(tokenized.rejected_ids))
        lengths["total"].append(tokenized.length)
        kept, status = truncate_pair(tokenized, data_cfg.max_length, data_cfg.max_prompt_length,
                                     data_cfg.truncation)
        outcomes[status or "fits"] += 1
        first = first or kept
    console.print(f"  with data.max_length={data_cfg.max_length}: "
                  + ", ".join(f"{n} {k}" for k, n in outcomes.items()))
    for name in ("prompt", "chosen", "rejected", "total"):
        console.print(_histogram_table(f"{name} length", lengths[name]))
    if first is not None:
        console.print(render_example(first, tokenizer))
    return {"rows": loaded.rows_read, "usable": len(loaded.pairs), "skipped": dict(loaded.skipped),
            "outcomes": dict(outcomes), "lengths": lengths}


def render_example(pair, tokenizer) -> Text:
    """The first pair as the model sees it: prompt dim, completion tokens underlined by token."""
    text = Text("example (prompt dim; completion tokens alternate colours):\n")
    text.append(tokenizer.decode(pair.prompt_ids), style="dim")
    for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        text.append(f"\n[{name}] ", style="bold")
        for i, token in enumerate(ids):
            text.append(tokenizer.decode([token]), style="black on cyan" if i % 2 else "black on green")
    return text
