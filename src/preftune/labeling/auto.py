"""Machine labels: a reward function r*(x, y) picks the preferred response of each pair.

The Bradley-Terry model gives p(y1 > y2 | x) = exp(r1) / (exp(r1) + exp(r2)) = sigmoid(r1 - r2).
`bt-sample` draws the winner with that probability, as the DPO paper's synthetic experiments do;
`argmax` takes the higher reward, and a pair whose rewards are exactly equal is counted and
skipped (no preference to learn from it). A pair with an empty response is counted and skipped
in both modes, since training refuses empty responses.

The run is crash-safe and resumable: rows are appended and fsynced per batch, and a rerun reads
what is on disk (cutting a partial last line) and labels only the pairs not yet written. The
draw for a pair uses a generator seeded by (seed, pair_id), so a resumed run writes exactly the
rows an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from preftune.errors import UserError
from preftune.labeling.export import as_triplet
from preftune.labeling.pairs import Pair, load_pairs
from preftune.records import append_records, read_records

MODES = ("bt-sample", "argmax")


def bt_probability(r1: float, r2: float) -> float:
    """p(y1 > y2) = sigmoid(r1 - r2), without overflow for large reward gaps."""
    margin = r1 - r2
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    e = math.exp(margin)
    return e / (1.0 + e)


def pair_draw(seed: int, pair_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, pair_id): independent of batch and resume."""
    return random.Random(f"{seed}:{pair_id}").random()


def _already_written(out: Path, pair_ids: set[str], mode: str, seed: int) -> set[str]:
    """Pair ids already in `out`, after cutting a partial last line; refuse mixed runs."""
    done = set()
    for lineno, row in enumerate(read_records(out, repair=True), start=1):
        if row.get("label") != mode or row.get("seed") != seed:
            raise UserError(
                f"{out}: row {lineno} was written with label={row.get('label')!r} "
                f"seed={row.get('seed')!r}, not {mode!r} seed={seed}; rerun with the same "
                f"settings to resume, or choose another --out."
            )
        if row.get("pair_id") not in pair_ids:
            raise UserError(
                f"{out}: row {lineno} has pair_id {row.get('pair_id')!r}, which the pairs file "
                f"does not hold; choose another --out for a different pairs file."
            )
        done.add(row["pair_id"])
    return done


def _label_batch(batch: list[Pair], values: list[float], mode: str, seed: int, stats: Counter):
    rows = []
    for i, pair in enumerate(batch):
        r1, r2 = values[2 * i], values[2 * i + 1]
        if not (math.isfinite(r1) and math.isfinite(r2)):
            raise UserError(
                f"the reward function returned {r1} and {r2} for pair {pair.pair_id!r}; "
                f"rewards must be finite numbers."
            )
        if not all(text.strip() for text in pair.responses[:2]):
            # `preftune train` refuses empty responses; a sampler may still write one.
            stats["empty_skipped"] += 1
            continue
        p = bt_probability(r1, r2)
        if mode == "argmax":
            if r1 == r2:
                stats["ties_skipped"] += 1
                continue
            winner = 0 if r1 > r2 else 1
        else:
            winner = 0 if pair_draw(seed, pair.pair_id) < p else 1
        row = as_triplet(pair.pair_id, {"prompt": pair.prompt, "responses": pair.responses},
                         winner)
        row.update(r1=r1, r2=r2, p=p, chosen_index=winner, label=mode, seed=seed)
        rows.append(row)
    return rows


def label_auto(
    pairs_path: str | Path,
    reward: str | Callable,
    out: str | Path,
    mode: str = "bt-sample",
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Label every pair of `pairs_path` not yet in `out`; returns counts for the summary."""
    from preftune.rewards import load_reward

    if mode not in MODES:
        raise UserError(f"the labeling mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    out = Path(out)
    pairs = load_pairs(pairs_path)
    done = _already_written(out, {p.pair_id for p in pairs}, mode, seed)
    todo = [p for p in pairs if p.pair_id not in done]
    reward_fn = load_reward(reward) if isinstance(reward, str) else reward
    stats = Counter(pairs=len(pairs), resumed_from=len(done))
    with _progress(show_progress, len(todo)) as advance:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            prompts = [p.prompt for p in batch for _ in range(2)]
            responses = [r for p in batch for r in p.responses]
            values = reward_fn(prompts, responses)
            if len(values) != len(responses):
                raise UserError(
                    f"the reward function returned {len(values)} values for {len(responses)} "
                    f"responses; it must return one per response."
                )
            stats["written"] += append_records(out, _label_batch(batch, values, mode, seed, stats))
            advance(len(batch))
    return dict(stats)


class _progress:
    """A rich progress bar when asked for, otherwise nothing; yields an `advance(n)`."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        task = self.bar.add_task("labeling pairs", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
