"""Machine labels: a reward function r*(x, y) picks the preferred response of each pair.

The Bradley-Terry model gives p(y1 > y2 | x) = exp(r1) / (exp(r1) + exp(r2)) = sigmoid(r1 - r2).
`bt-sample` draws the winner with that probability, as the DPO paper's synthetic experiments do;
`argmax` takes the higher reward, and a pair whose rewards are exactly equal is counted and
skipped (no preference to learn from it); `bt-sample` writes such a pair with a coin flip
(p = 0.5), counted as `ties_drawn`. In both modes a pair with an empty response is
counted and skipped, since training refuses empty responses, and so is a pair whose two
responses are the same text (greedy decoding gives those), since neither can be preferred.

A record with N > 2 responses (`preftune sample --n N`) becomes one row from the best and the
worst of them, the on-policy recipe of SimPO (Meng et al. 2024, sec. 4). All N are scored.
Empty responses are left out of the candidates first, and a text that repeats an earlier one
is left out too (it would be compared with itself); a record with fewer than two distinct
non-empty texts left is counted and skipped as `empty_skipped` (fewer than two non-empty) or
`identical_skipped`, and the responses left out of written rows are counted as
`empty_dropped` / `duplicates_dropped`. `argmax` takes the highest reward as chosen and the
lowest as rejected (the first of equal ones), and skips the record as a tie when they are
equal; `bt-sample` draws a full ranking from the Plackett-Luce model, the Bradley-Terry model
for N responses (DPO paper, Rafailov et al. 2023, sec. 5 and appendix A.3): the next place goes
to a remaining response with probability exp(r_i) / sum of exp(r_j) over the remaining; chosen
is ranked first, rejected last. The row records `chosen_index`, `rejected_index`, every reward
(`rewards`) and the indices compared (`candidates`). A record with exactly two responses is
labeled as before, row for row and draw for draw.

The run is crash-safe and resumable: rows are appended and fsynced per batch, and a rerun reads
what is on disk (cutting a partial last line) and labels only the pairs not yet written. It
resumes only a file written by the same job: every row must hold the same prompt and responses
as its pair and carry the same reward spec, mode and seed. The draw for a pair uses a generator
seeded by (seed, pair_id), so a resumed run writes exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from preftune.errors import UserError
from preftune.labeling.export import as_triplet
from preftune.labeling.pairs import Pair, load_pairs
from preftune.records import (
    append_records,
    check_out_file,
    kept_so_far,
    make_parent_folder,
    read_records,
    record_line_numbers,
)

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


def _already_written(out: Path, pairs: dict[str, Pair], job: dict) -> set[str]:
    """Pair ids already labeled in `out` (after cutting a partial last line) by this very job.

    `preftune sample` numbers every pairs file p000000, p000001, ..., so a pair id alone does
    not tell two pairs files apart: a row counts as done only if it holds the same prompt and
    responses as the pair it names, and was labeled with the same reward, mode and seed
    (`job`). Anything else would mix two jobs in one file or skip pairs never labeled, so it is
    refused instead.
    """
    records = read_records(out, repair=True)
    if not records:
        return set()
    done: dict[str, int] = {}
    for lineno, row in zip(record_line_numbers(out), records):
        where = f"{out}, line {lineno}"
        if "reward" not in row:
            raise UserError(
                f"{where}: this row does not record which reward labeled it (written by an older "
                f"preftune), so resuming could mix rewards; choose another --out, or delete "
                f"{out} to label again."
            )
        found = {key: row.get(key) for key in job}
        if found != job:
            written = " ".join(f"{k}={v!r}" for k, v in found.items())
            wanted = " ".join(f"{k}={v!r}" for k, v in job.items())
            raise UserError(
                f"{where}: written by another job ({written}, not {wanted}); rerun with the same "
                f"settings to resume, or choose another --out (or delete {out})."
            )
        pair_id = row.get("pair_id")
        pair = pairs.get(pair_id)
        if pair is None:
            raise UserError(
                f"{where}: pair_id {pair_id!r} is not in the pairs file, so this file labels "
                f"another pairs file; choose another --out (or delete {out})."
            )
        if not _row_labels_pair(row, pair):
            raise UserError(
                f"{where}: the prompt or responses of pair {pair_id!r} differ from the pairs file's "
                f"(another pairs file with the same pair ids?); choose another --out for a "
                f"different pairs file (or delete {out})."
            )
        if pair_id in done:
            raise UserError(
                f"{where}: pair {pair_id!r} was already labeled on line {done[pair_id]}; a pair "
                f"must appear once, so remove one of the two lines."
            )
        done[pair_id] = lineno
    return set(done)


def _row_labels_pair(row: dict, pair: Pair) -> bool:
    """Whether `row` is the D.jsonl row that labeling `pair` with its `chosen_index` gives."""
    if len(pair.responses) > 2:
        return _row_labels_ranked(row, pair)
    winner = row.get("chosen_index")
    if type(winner) is not int or winner not in (0, 1):
        return False
    expected = as_triplet(pair.pair_id, _as_dict(pair), winner)
    return all(row.get(key) == value for key, value in expected.items())


def _row_labels_ranked(row: dict, pair: Pair) -> bool:
    """The same for a record of N > 2 responses: its chosen and rejected texts at the recorded
    indices, and one reward per response (the row does not copy the other responses)."""
    chosen, rejected, rewards = row.get("chosen_index"), row.get("rejected_index"), row.get("rewards")
    n = len(pair.responses)
    if not (type(chosen) is int and type(rejected) is int and 0 <= chosen < n and 0 <= rejected < n
            and chosen != rejected and isinstance(rewards, list) and len(rewards) == n):
        return False
    expected = _best_and_worst_row(pair, chosen, rejected)
    return all(row.get(key) == value for key, value in expected.items())


def _as_dict(pair: Pair) -> dict:
    return {"prompt": pair.prompt, "responses": pair.responses, "truncated": pair.truncated}


def _best_and_worst_row(pair: Pair, chosen: int, rejected: int) -> dict:
    """The D.jsonl row with response `chosen` as chosen and `rejected` as rejected."""
    two = {"prompt": pair.prompt, "responses": (pair.responses[chosen], pair.responses[rejected]),
           "truncated": (pair.truncated[chosen], pair.truncated[rejected])}
    return as_triplet(pair.pair_id, two, 0)


def plackett_luce_ranking(rewards: list[float], rng: random.Random) -> list[int]:
    """Indices of `rewards` in a ranking drawn from the Plackett-Luce model: each place goes to
    a remaining index i with probability exp(r_i) / sum_j exp(r_j) over the remaining j."""
    remaining = list(range(len(rewards)))
    ranking = []
    while len(remaining) > 1:
        top = max(rewards[i] for i in remaining)  # subtracted so exp never overflows
        weights = [math.exp(rewards[i] - top) for i in remaining]
        u = rng.random() * sum(weights)
        pick = len(remaining) - 1  # where rounding leaves u at the very end
        for k, w in enumerate(weights):
            if u < w:
                pick = k
                break
            u -= w
        ranking.append(remaining.pop(pick))
    return ranking + remaining


def _candidates(pair: Pair, stats: Counter) -> list[int] | None:
    """Indices of the non-empty responses, each distinct text once (its first index); None,
    counted as skipped, when fewer than two are left."""
    non_empty = [i for i, text in enumerate(pair.responses) if text.strip()]
    first_of_text: dict[str, int] = {}
    for i in non_empty:
        first_of_text.setdefault(pair.responses[i], i)
    if len(non_empty) < 2:
        stats["empty_skipped"] += 1
        return None
    if len(first_of_text) < 2:
        stats["identical_skipped"] += 1
        return None
    stats["empty_dropped"] += len(pair.responses) - len(non_empty)
    stats["duplicates_dropped"] += len(non_empty) - len(first_of_text)
    return sorted(first_of_text.values())


def _label_many(pair: Pair, rewards: list[float], job: dict, stats: Counter) -> dict | None:
    """The row for a record of N > 2 responses (best and worst), or None when it is skipped."""
    dropped = Counter()
    candidates = _candidates(pair, dropped)
    if candidates is None:
        stats.update(dropped)
        return None
    scores = [rewards[i] for i in candidates]
    if job["label"] == "argmax":
        if max(scores) == min(scores):
            stats["ties_skipped"] += 1
            return None
        chosen = candidates[scores.index(max(scores))]
        rejected = candidates[scores.index(min(scores))]
    else:
        stats["ties_drawn"] += max(scores) == min(scores)
        ranking = plackett_luce_ranking(scores, random.Random(f"{job['seed']}:{pair.pair_id}"))
        chosen, rejected = candidates[ranking[0]], candidates[ranking[-1]]
    stats.update(dropped)  # only for rows written: a skipped record's responses count as skipped
    row = _best_and_worst_row(pair, chosen, rejected)
    row.update(rewards=rewards, chosen_index=chosen, rejected_index=rejected,
               candidates=candidates, **job)
    return row


def _label_batch(batch: list[Pair], values: list[float], job: dict, stats: Counter):
    rows = []
    start = 0
    for pair in batch:
        rewards = list(values[start:start + len(pair.responses)])  # one per response, in order
        start += len(pair.responses)
        if len(rewards) > 2:
            row = _label_many(pair, rewards, job, stats)
            rows += [row] if row is not None else []
            continue
        r1, r2 = rewards
        if not all(text.strip() for text in pair.responses[:2]):
            # `preftune train` refuses empty responses; a sampler may still write one.
            stats["empty_skipped"] += 1
            continue
        if pair.responses[0] == pair.responses[1]:
            # Nothing to prefer: bt-sample would write a coin flip with chosen == rejected.
            stats["identical_skipped"] += 1
            continue
        p = bt_probability(r1, r2)
        if job["label"] == "argmax":
            if r1 == r2:
                stats["ties_skipped"] += 1
                continue
            winner = 0 if r1 > r2 else 1
        else:
            # Equal rewards make the draw a coin flip: counted, so that a reward that cannot tell
            # responses apart is seen rather than written as labels.
            stats["ties_drawn"] += r1 == r2
            winner = 0 if pair_draw(job["seed"], pair.pair_id) < p else 1
        row = as_triplet(pair.pair_id, _as_dict(pair), winner)
        row.update(r1=r1, r2=r2, p=p, chosen_index=winner, **job)
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
    reward_name: str | None = None,
    trust_remote_code: bool = False,
    reward_batch_size: int | None = None,
) -> dict:
    """Label every pair of `pairs_path` not yet in `out`; returns counts for the summary.

    Each row records the reward as `reward`: the spec when `reward` is one, otherwise
    `reward_name`, or the function's module and name. A resumed run must use the same.
    `trust_remote_code` lets a reward-model folder run the Python code it ships;
    `reward_batch_size` sets the texts it scores per forward pass (None: rewards.py's default).
    """
    from preftune.rewards import REWARD_MODEL_BATCH_SIZE, load_reward

    if mode not in MODES:
        raise UserError(f"the labeling mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    if reward_batch_size is not None and reward_batch_size < 1:
        raise UserError(f"--reward-batch-size must be at least 1, got {reward_batch_size}.")
    out = check_out_file(out, "D.jsonl", pairs_path, "--pairs file")
    pairs = load_pairs(pairs_path)
    if reward_name is None:
        reward_name = reward if isinstance(reward, str) else _function_name(reward)
    job = {"reward": reward_name, "label": mode, "seed": seed}
    done = _already_written(out, {p.pair_id: p for p in pairs}, job)
    todo = [p for p in pairs if p.pair_id not in done]
    reward_fn = load_reward(reward, batch_size=reward_batch_size or REWARD_MODEL_BATCH_SIZE,
                            trust_remote_code=trust_remote_code) if isinstance(reward, str) else reward
    # A reward model folder is scored by preftune's code and torch's, not the user's: what it
    # raises keeps its traceback rather than a sentence telling the user to fix their function.
    reward_folder = isinstance(reward, str) and Path(reward).expanduser().is_dir()
    user_code = not reward_folder
    if reward_batch_size is not None and not reward_folder:
        raise UserError(f"--reward-batch-size sets the texts a reward model folder scores per forward pass, but "
                        f"the reward {reward_name} is a function; drop it (--batch-size sets the pairs per call).")
    if reward_folder:  # calls of as many pairs hold at least one full forward pass of texts
        batch_size = max(batch_size, reward_batch_size or REWARD_MODEL_BATCH_SIZE)
    stats = Counter(pairs=len(pairs), resumed_from=len(done))
    make_parent_folder(out)
    with _progress(show_progress and bool(todo), len(todo)) as advance:  # no 0% bar for nothing to do
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            prompts = [p.prompt for p in batch for _ in p.responses]
            responses = [r for p in batch for r in p.responses]
            try:
                values = reward_fn(prompts, responses)
            except UserError:
                raise
            except Exception as e:  # the user's own code: one sentence naming the pair, not a traceback
                if not user_code:
                    raise
                raise UserError(_reward_failure(e, batch, reward_name, out)) from None
            if len(values) != len(responses):
                raise UserError(
                    f"the reward function returned {len(values)} values for {len(responses)} "
                    f"responses; it must return one per response."
                )
            _check_finite(values, batch, reward_name, out)
            stats["written"] += append_records(out, _label_batch(batch, values, job, stats))
            advance(len(batch))
    if getattr(reward_fn, "truncated", 0):  # a reward model folder cuts texts at its max length
        stats["reward_truncated"] = reward_fn.truncated
        stats["reward_max_length"] = reward_fn.max_length
    return dict(stats)


def _check_finite(values: list[float], batch: list[Pair], reward_name: str, out: Path) -> None:
    """A NaN or infinite reward is refused naming the pair, and, as for a reward that raised,
    how many rows `out` keeps and that a rerun continues."""
    start = 0
    for pair in batch:  # the call's lists hold each pair's responses in turn
        rewards = list(values[start:start + len(pair.responses)])
        start += len(pair.responses)
        if not all(math.isfinite(r) for r in rewards):
            raise UserError(
                f"the reward {reward_name} returned {' and '.join(map(str, rewards))} for pair "
                f"{pair.pair_id!r}, and rewards must be finite numbers; {kept_so_far(out, 'row', 'labeled')}: "
                "fix the function and rerun the same command to continue.")


def _reward_failure(error: Exception, batch: list[Pair], reward_name: str, out: Path) -> str:
    """The sentence for a reward function that raised while scoring `batch`: which pair (and
    response) when the function is called pair by pair, else which pairs; what it raised, where
    in its code; and that the rows before are kept."""
    from preftune.rewards import RewardCallError

    if isinstance(error, RewardCallError) and error.__cause__ is not None:
        index, error = error.index, error.__cause__
        for pair in batch:  # the call's lists hold each pair's responses in turn
            if index < len(pair.responses):
                which = f"response {index} of pair {pair.pair_id!r}"
                break
            index -= len(pair.responses)
    else:
        which = f"one of pairs {batch[0].pair_id!r} to {batch[-1].pair_id!r}"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    detail = f": {error}" if str(error) else ""
    return (f"the reward {reward_name} raised {type(error).__name__}{detail}{where} while scoring {which}; "
            f"{kept_so_far(out, 'row', 'labeled')}: fix the function and rerun the same command to continue.")


def _function_name(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"


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
