"""`preftune data inspect`: what a preference file holds, before a run spends hours on it."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table
from rich.text import Text

from preftune.data.heldout import prompt_key
from preftune.data.io import load_pairs
from preftune.data.repeats import repeated_rows
from preftune.data.tokenize import tokenize_pair, truncate_pair
from preftune.wording import counted


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


def inspect_file(path: str, tokenizer, data_cfg, console: Console, split: str = "train",
                 data_config: str | None = None) -> dict:
    loaded = load_pairs(path, split, setting="the file given to `preftune data inspect`", config=data_config)
    console.print(f"[bold]{path}[/bold]: {counted(loaded.rows_read, 'row')}, {len(loaded.pairs)} usable")
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
    longer = length_bias(lengths["chosen"], lengths["rejected"])
    if longer is not None:
        console.print(f"  {longer}")
    repeats = len(repeated_rows(loaded.pairs))
    if repeats:
        console.print(f"  {repeats} {'rows repeat' if repeats > 1 else 'row repeats'} an earlier one "
                      "(same prompt, chosen and rejected): training counts each copy")
    prompts = prompt_counts(loaded.pairs)
    if loaded.pairs:
        for line in prompt_lines(prompts):
            console.print(f"  {line}")
    for name in ("prompt", "chosen", "rejected", "total"):
        console.print(_histogram_table(f"{name} length", lengths[name]))
    if first is not None:
        console.print(render_example(first, tokenizer))
    return {"rows": loaded.rows_read, "usable": len(loaded.pairs), "skipped": dict(loaded.skipped),
            "outcomes": dict(outcomes), "lengths": lengths, "repeated_rows": repeats, **prompts}


def length_bias(chosen: list[int], rejected: list[int]) -> str | None:
    """How often the chosen response is the longer one, in completion tokens.

    DPO learns whatever separates chosen from rejected, length included: when the chosen is
    mostly the longer, the policy's responses grow (Park et al. 2024, who propose R-DPO).
    """
    if not chosen:
        return None
    n = len(chosen)
    longer = sum(c > r for c, r in zip(chosen, rejected))
    shorter = sum(c < r for c, r in zip(chosen, rejected))
    mean_gap = sum(c - r for c, r in zip(chosen, rejected)) / n
    line = (f"chosen longer than rejected in {counted(longer, 'pair')} ({longer / n:.0%}), "
            f"shorter in {shorter} "
            f"({shorter / n:.0%}), as long in {n - longer - shorter}; mean difference {mean_gap:+.1f} tokens")
    if max(longer, shorter) / n >= 0.65:
        line += (f": a length bias the policy will learn ({'longer' if longer > shorter else 'shorter'} "
                 "responses); loss.type rdpo or simpo counters it")
    return line


def prompt_counts(pairs) -> dict:
    """Distinct prompts, how many have more than one pair, and the most pairs one prompt has.

    Prompts are compared as data.eval_fraction_by: prompt compares them (heldout.prompt_key),
    so these are the units that option draws from.
    """
    per_prompt = Counter(prompt_key(pair.prompt) for pair in pairs)
    return {"prompts": len(per_prompt),
            "prompts_with_several_pairs": sum(n > 1 for n in per_prompt.values()),
            "most_pairs_per_prompt": max(per_prompt.values(), default=0)}


def prompt_lines(counts: dict) -> list[str]:
    """The prompt count, and when a prompt has several pairs, which held-out split to use."""
    n, several, most = counts["prompts"], counts["prompts_with_several_pairs"], counts["most_pairs_per_prompt"]
    lines = [f"{counted(n, 'distinct prompt')}, {several} with more than one pair "
             f"(at most {counted(most, 'pair')} for one prompt)"]
    if several:
        # data.eval_fraction_by: pair would put pairs of one prompt on both sides of the split.
        lines.append("if you hold out part of this data for evaluation (data.eval_fraction), set "
                     "data.eval_fraction_by: prompt, so that no prompt is both trained on and held out; "
                     "otherwise the held-out evaluation is optimistic")
    return lines


def render_example(pair, tokenizer) -> Text:
    """The first pair as the model sees it: prompt dim, completion tokens underlined by token."""
    text = Text("example (prompt dim; completion tokens alternate colours):\n")
    text.append(tokenizer.decode(pair.prompt_ids), style="dim")
    for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        text.append(f"\n[{name}] ", style="bold")
        for i, token in enumerate(ids):
            text.append(tokenizer.decode([token]), style="black on cyan" if i % 2 else "black on green")
    return text
