"""The pairs `data.eval_fraction` holds out of data.train, kept in the run folder.

Training holds out a seeded share of its rows for evaluation (or, with data.eval_fraction_by:
prompt, of its distinct prompts, each with all its pairs). Written to
OUTPUT/eval_heldout.jsonl in the format `load_pairs` reads, those exact pairs can be scored again
later (`preftune eval pairs --data OUTPUT/eval_heldout.jsonl`), checked against the training
rows, or handed to another tool; and a resumed run checks that it still holds out the same ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from preftune.data.io import load_pairs
from preftune.data.schema import PreferencePair
from preftune.errors import UserError
from preftune.records import write_text_atomic
from preftune.wording import counted

HELDOUT_FILE = "eval_heldout.jsonl"


def hold_out(pairs: list[PreferencePair], fraction: float, seed: int,
             by: Literal["pair", "prompt"] = "pair"):
    """(train, held_out): a seeded `fraction` of `pairs` (at least one) held out, each list in
    the data's order. by="prompt" holds out that share of the distinct prompts instead, each
    with all its pairs, so that no prompt is on both sides (data.eval_fraction_by)."""
    # The unit drawn for each pair: its row, or its prompt (compared as shared_prompts does).
    units = list(range(len(pairs))) if by == "pair" else [prompt_key(p.prompt) for p in pairs]
    distinct = list(dict.fromkeys(units))  # in the data's order, so the seed alone fixes the draw
    if by == "prompt" and len(distinct) == 1:
        raise UserError(f"data.eval_fraction_by: prompt needs two or more distinct prompts, but all {len(pairs)} "
                        "pairs of data.train have the same one, so holding it out would leave nothing to train "
                        "on; set data.eval_fraction_by: pair, or give data.eval a file of other prompts.")
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    held = {distinct[i] for i in order[:max(1, round(len(order) * fraction))]}
    return ([p for p, unit in zip(pairs, units) if unit not in held],
            [p for p, unit in zip(pairs, units) if unit in held])


def count_prompts(pairs: list[PreferencePair]) -> int:
    """How many distinct prompts `pairs` have (a message list compared as a whole)."""
    return len({prompt_key(p.prompt) for p in pairs})


def pair_row(pair: PreferencePair) -> dict:
    """The row `load_pairs` reads back as `pair`. The prompt is written out even when the data
    left it implicit: it was split off the responses when read, and the row says so."""
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, **pair.metadata}


def shared_prompts(train: list[PreferencePair], held_out: list[PreferencePair]) -> int:
    """How many held-out pairs have a prompt that a training pair has too: the policy was
    trained on that prompt, so its evaluation there is optimistic."""
    trained = {prompt_key(p.prompt) for p in train}
    return sum(prompt_key(p.prompt) in trained for p in held_out)


def prompt_key(text) -> str:
    """What two prompts (or texts) are compared by: equal keys, the same prompt. A message list
    is compared whole; `data inspect` counts prompts with this too, so its numbers match the split."""
    return json.dumps(text, sort_keys=True, ensure_ascii=False)  # a prompt may be a message list


def check_heldout(output_dir: Path, held_out: list[PreferencePair], dist) -> None:
    """On resume: refuse when the run's file holds other pairs than those held out now.

    The checkpoint's data fingerprint covers the training pairs only, so an edited held-out row
    would go unnoticed and the eval/ curve would switch to other pairs mid-run. Rank 0 reads
    the file, every rank raises together.
    """
    # Pairs are compared by all that tokenizing reads of them (texts, *_truncated flags, a
    # conversational row's tools and template arguments); other metadata (scores, ids) may change.
    # Imported here: repeats imports prompt_key from this module.
    from preftune.data.repeats import row_key

    path = Path(output_dir) / HELDOUT_FILE
    differs = False
    if dist.is_main and path.is_file():
        try:
            before = [row_key(p) for p in load_pairs(str(path)).pairs]
        except UserError:  # emptied or broken by hand: not the pairs either, and other ranks wait
            before = None
        differs = before != [row_key(p) for p in held_out]
    if dist.all_reduce_sum(float(differs)):
        raise UserError(f"{path} does not hold the pairs data.eval_fraction holds out of data.train now (the "
                        "data changed since the run started, or the file was edited); restore the data the "
                        f"run started with, delete {HELDOUT_FILE} to evaluate from here on on the new held-out "
                        "pairs, or start a new run in another train.output_dir.")


def write_heldout(output_dir: Path, held_out: list[PreferencePair],
                  by: Literal["pair", "prompt"] = "pair") -> str:
    """Write the held-out pairs to OUTPUT/eval_heldout.jsonl atomically; returns the line to print,
    which counts the held-out prompts too when whole prompts were held out (by="prompt")."""
    path = Path(output_dir) / HELDOUT_FILE
    # default=str: a Parquet or hub row's dates or bytes in the metadata become text instead of
    # stopping the run; prompt, chosen and rejected are always JSON strings or message lists.
    write_text_atomic(path, "".join(json.dumps(pair_row(p), ensure_ascii=False, default=str) + "\n"
                                    for p in held_out))
    prompts = count_prompts(held_out)
    what = (f"{len(held_out)} pairs" if by == "pair" else
            f"{counted(prompts, 'prompt')} ({len(held_out)} pairs)")
    return (f"data: {what} held out by data.eval_fraction written to {path}; score a model "
            f"on them with: preftune eval pairs --model MODEL --data {path}")


def remove_stale_heldout(output_dir: Path, data_sources: list[str]) -> str | None:
    """A fresh run that holds nothing out deletes an earlier run's eval_heldout.jsonl (left by
    --overwrite, or by a run stopped during set-up): beside this run's files it would pass for
    pairs this run held out. A file this run reads as its data (data.eval pointing at it, say)
    is kept. Returns the line to print, or None when nothing was deleted."""
    path = Path(output_dir) / HELDOUT_FILE
    if not path.is_file() or any(Path(s).is_file() and Path(s).samefile(path) for s in data_sources):
        return None
    path.unlink()
    return f"data: deleted {path}, an earlier run's held-out pairs; this run holds none out"

