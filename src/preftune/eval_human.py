"""People as the judge of `preftune eval generate --judge human`, through the labeling page.

Queueing: each prompt's two responses (policy, reference) go into a labeling database as one
pair, in the order drawn for that prompt (recorded in samples.jsonl as `order`); the labeling
page then shows each annotator the pair with left and right drawn again, so nobody can tell
which response is the policy's. The pair ids name the evaluation, not the systems.

Scoring: `score_human` reads the live votes back. A vote for a response counts for its system;
"tie" and "both bad" count as a tie (half a win each); "skip" abstains. With several annotators
on a pair, the pair's score is the mean of their votes (1 policy, 1/2 tie, 0 reference), and
the win rate is the mean of the pairs' scores with a Wilson 95% interval.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from preftune.bradley_terry import Outcome, fit_ratings, win_rate
from preftune.errors import UserError
from preftune.eval_generate import REFERENCE, leaderboard_folder, save_leaderboard
from preftune.evaluate import read_eval_records, write_eval_record
from preftune.labeling.export import vote_outcome
from preftune.labeling.pairs import Pair
from preftune.labeling.store import Store
from preftune.records import read_records, write_jsonl_atomic

VOTE_SCORES = {"policy": 1.0, "tie": 0.5, "reference": 0.0}


def evaluation_key(record: dict) -> str:
    """A short id of one evaluation (model, reference, prompts, sampling): rerunning the same
    evaluation finds its pairs already in the database instead of adding them twice."""
    fields = [record["model"], record["reference"], record.get("prompts"), record["n_prompts"],
              record["sampling"]]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:10]


def queue_for_humans(db, rows: list[dict], record: dict) -> dict:
    """Put each row's two responses into the labeling database; sets each row's `pair_id`.

    Returns the keys the pending eval.json record gains (`status`, `db`, `pairs_added`).
    """
    key = evaluation_key(record)
    pairs = []
    for row in rows:
        row["pair_id"] = f"eval-{key}-{row['prompt_index']:06d}"
        first, second = row["order"]
        pairs.append(Pair(row["pair_id"], row["prompt"],
                          (row["responses"][first], row["responses"][second])))
    store = Store(db)
    try:
        added, _ = store.add_pairs(pairs)
    finally:
        store.close()
    return {"status": "awaiting_votes", "db": str(db), "pairs_added": added}


def serve_instructions(db, folders: Sequence[Path]) -> str:
    """What to run next, for the CLI to print after queueing."""
    targets = " ".join(str(f) for f in folders)
    return (f"the comparisons are in {db}. Let people judge them blind with\n"
            f"  preftune label serve --db {db} --open        (one person, this machine), or\n"
            f"  preftune label add-annotator --db {db} NAME   then  preftune label serve --db {db}\n"
            f"and when they have voted, write the win rate with\n"
            f"  preftune eval score-human --db {db} {targets}")


# ------------------------------------------------------------------ scoring


def _preferred(vote: dict, order: list[str]) -> str | None:
    """"policy", "reference" or "tie" for a vote on a pair shown in `order`; None for a skip."""
    result = vote_outcome(vote["choice"], vote["left_index"])
    if result in (0, 1):
        return order[result]
    return None if result == "skip" else "tie"  # "tie" and "both_bad" prefer neither


def _locate(target) -> tuple[Path, Path]:
    """(folder, samples file) from a folder written by `eval generate --judge human` (the file
    its human-judged record names) or from that samples file itself."""
    path = Path(target)
    samples = path / _pending_record(path).get("samples", "samples.jsonl") if path.is_dir() else path
    if not samples.is_file():
        raise UserError(f"{samples}: no such file; pass the folder (or samples.jsonl) that "
                        "`preftune eval generate --judge human` wrote.")
    return samples.parent, samples


def _pending_record(folder: Path, samples_name: str | None = None) -> dict:
    """The human-judged generation record in `folder`'s eval.json (the one whose samples file
    is `samples_name`, when given: a folder may hold several evaluations)."""
    for record in read_eval_records(folder / "eval.json"):
        if record.get("kind") == "generate" and record.get("judge") == "human" and \
                samples_name in (None, record.get("samples", "samples.jsonl")):
            return record
    raise UserError(f"{folder / 'eval.json'}: holds no human-judged generation evaluation; "
                    "run `preftune eval generate --judge human` into that folder first.")


def score_rows(rows: list[dict], votes_by_pair: dict[str, list[dict]]) -> tuple[list[float], int]:
    """Attach votes and a winner to each row; returns the judged pairs' scores and vote count."""
    scores, n_votes = [], 0
    for row in rows:
        counted = []
        row["votes"] = []
        for vote in votes_by_pair.get(row.get("pair_id"), []):
            preferred = _preferred(vote, row["order"])
            row["votes"].append({"annotator": vote["annotator"], "choice": vote["choice"],
                                 "preferred": preferred})
            if preferred is not None:
                counted.append(VOTE_SCORES[preferred])
        n_votes += len(counted)
        if not counted:
            row["winner"] = None
            continue
        pair_score = sum(counted) / len(counted)
        scores.append(pair_score)
        row["winner"] = "policy" if pair_score > 0.5 else "reference" if pair_score < 0.5 else "tie"
    return scores, n_votes


def score_one(folder: Path, samples: Path, votes_by_pair: dict, db,
              stored: set | None = None) -> tuple[dict, list[dict]]:
    """Score one evaluation folder; rewrites its samples.jsonl and eval.json. `stored`: the
    pair ids `db` holds, to tell another database from one without votes yet."""
    record = dict(_pending_record(folder, samples.name))
    rows = read_records(samples)
    if stored is not None and not any(row.get("pair_id") in stored for row in rows):
        raise UserError(f"{db} holds none of the {len(rows)} pairs of {samples}; pass the --db "
                        f"`eval generate --judge human` queued them in ({record.get('db')}).")
    scores, n_votes = score_rows(rows, votes_by_pair)
    if not scores:
        raise UserError(f"{db}: no votes yet on the {len(rows)} pairs of {samples}; serve them "
                        f"with `preftune label serve --db {db}` and score again after people vote.")
    winners = [r["winner"] for r in rows if r["winner"] is not None]
    rate = win_rate(sum(scores), 0, len(scores))
    record.update(
        status="scored", n_prompts=len(scores), n_unjudged=len(rows) - len(scores),
        n_votes=n_votes, win_rate=rate.rate, win_rate_ci=[rate.lower, rate.upper],
        wins=winners.count("policy"), ties=winners.count("tie"),
        losses=winners.count("reference"),
    )
    write_jsonl_atomic(samples, rows)
    write_eval_record(folder, record)
    return record, rows


def score_human(db, targets: Sequence, out=None, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Read the votes on queued comparisons back; write eval.json (and a leaderboard for several).

    targets: folders (or their samples.jsonl) written by `eval generate --judge human`.
    Returns {"evals": [updated eval.json records], "leaderboard": dict or None,
    "leaderboard_text": the printed table or None, "leaderboard_file": its leaderboard.json or None}.
    """
    if not targets:
        raise UserError("pass the folder(s) that `preftune eval generate --judge human` wrote.")
    store = Store(db, must_exist=True)
    try:
        votes = store.live_votes()
        stored = set(store.pairs())
    finally:
        store.close()
    votes_by_pair: dict[str, list[dict]] = defaultdict(list)
    for vote in votes:
        votes_by_pair[vote["pair_id"]].append(vote)
    evals, outcomes, prompts = [], [], []
    for target in targets:
        folder, samples = _locate(target)
        record, rows = score_one(folder, samples, votes_by_pair, db, stored)
        evals.append(record)
        system = record.get("system") or record["model"]
        for row in rows:
            for vote in row["votes"]:
                if vote["preferred"] == "policy":
                    outcomes.append(Outcome(system, REFERENCE))
                elif vote["preferred"] is not None:
                    outcomes.append(Outcome(REFERENCE, system, vote["preferred"] == "tie"))
                else:
                    continue
                # Votes on one prompt (several annotators, several models against one
                # reference answer) are not independent: the bootstrap resamples prompts.
                prompts.append(json.dumps(row["prompt"], sort_keys=True))
    leaderboard, leaderboard_file = None, None
    if len(evals) > 1:
        systems = [REFERENCE] + [r.get("system") or r["model"] for r in evals]
        board = fit_ratings(outcomes, systems=systems, anchor=REFERENCE,
                            n_bootstrap=n_bootstrap, seed=seed, groups=prompts)
        folders = [_locate(target)[0] for target in targets]
        leaderboard_file = str(save_leaderboard(board, leaderboard_folder(folders, out)))
        leaderboard = board
    return {"evals": evals, "leaderboard": leaderboard.to_dict() if leaderboard else None,
            "leaderboard_text": leaderboard.to_text() if leaderboard else None,
            "leaderboard_file": leaderboard_file}
