"""Turn the votes in a labels database into the data set D (D.jsonl, see docs/CONTRACTS.md).

A vote's outcome is the index of the response it prefers (0 or 1, undoing the random left/right
order), or "tie", "both_bad", "skip". Skips are abstentions. Per pair, over the other votes:

- majority: the most frequent outcome wins if it holds more than half of them;
- unanimous: all of them must be the same outcome.

A pair whose winning outcome is a response becomes one (prompt, chosen, rejected) row; pairs whose
outcome is a tie, both-bad, no majority / disagreement, or only skips are counted and left out,
as are unlabelled pairs and pairs with an empty response or two identical ones. Nothing is dropped silently: the
left-out pairs are listed, one row each with the reason and the votes, in a file beside D.jsonl
(`left_out_path`), so a lead can send disagreements back to annotators or check both-bad pairs.
`raw=True` writes one row per live vote instead, with annotator, time and side, for analysis.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from preftune.errors import UserError
from preftune.labeling.pairs import Pair
from preftune.labeling.store import Store
from preftune.records import check_out_file, make_parent_folder, write_jsonl_atomic
from preftune.wording import counted

POLICIES = ("majority", "unanimous")


def vote_outcome(choice: str, left_index: int) -> int | str:
    """The response index a vote prefers, or the choice itself when it prefers neither."""
    if choice == "left":
        return left_index
    if choice == "right":
        return 1 - left_index
    return choice


def decide(outcomes: list, policy: str) -> int | str:
    """The winning response index for one pair, or the reason the pair is left out."""
    counted = [o for o in outcomes if o != "skip"]
    if not counted:
        return "only_skips"
    top, top_count = Counter(counted).most_common(1)[0]
    if policy == "unanimous" and top_count != len(counted):
        return "disagreement"
    if policy == "majority" and 2 * top_count <= len(counted):
        return "no_majority"
    return top


def as_triplet(pair_id: str, pair: dict, winner: int) -> dict:
    """A D.jsonl row; a conversational prompt gets its answers as assistant messages.

    A response cut by max_new_tokens (`pair["truncated"]`) is marked `chosen_truncated` /
    `rejected_truncated: true`, so that training closes it with no EOS the model never wrote.
    """
    chosen, rejected = pair["responses"][winner], pair["responses"][1 - winner]
    if isinstance(pair["prompt"], list):
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    row = {"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected, "pair_id": pair_id}
    truncated = pair.get("truncated") or (False, False)
    for name, index in (("chosen", winner), ("rejected", 1 - winner)):
        if truncated[index]:
            row[f"{name}_truncated"] = True
    return row


def left_out_path(out: str | Path) -> Path:
    """The list of left-out pairs beside `out`: D.jsonl -> D.left_out.jsonl."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.left_out.jsonl")


def _outcome_name(outcome: int | str) -> str:
    return f"response_{outcome}" if isinstance(outcome, int) else outcome


def left_out_row(pair_id: str, pair: dict, reason: str, pair_votes: list[dict]) -> dict:
    """One row of the left-out list: the pair, why it is not in D, and the live votes it had.

    Votes are named by the response they prefer (response_0 / response_1, the left/right order
    undone), so they read the same whichever side each annotator saw.
    """
    outcomes = [_outcome_name(vote_outcome(v["choice"], v["left_index"])) for v in pair_votes]
    return {
        "pair_id": pair_id,
        "prompt": pair["prompt"],
        "responses": list(pair["responses"]),
        "reason": reason,
        "votes": dict(Counter(outcomes)),
        "annotators": [{"annotator": v["annotator"], "vote": outcome, "reason": v["reason"]}
                       for v, outcome in zip(pair_votes, outcomes)],
    }


def _votes_by_pair(votes: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for vote in votes:
        grouped[vote["pair_id"]].append(vote)
    return grouped


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")


def triplet_rows(store: Store, policy: str) -> tuple[list[dict], dict]:
    """The exported rows and a report: votes by choice and left-out pairs by reason."""
    if policy not in POLICIES:
        raise UserError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}.")
    with store.snapshot():
        pairs, votes = store.pairs(), store.live_votes()
    grouped = _votes_by_pair(votes)
    rows, left_out_rows = [], []
    for pair_id, pair in pairs.items():
        pair_votes = grouped.get(pair_id, [])
        outcomes = [vote_outcome(v["choice"], v["left_index"]) for v in pair_votes]
        decision = _pair_decision(pair, outcomes, policy)
        if isinstance(decision, str):
            left_out_rows.append(left_out_row(pair_id, pair, decision, pair_votes))
            continue
        counted = [o for o in outcomes if o != "skip"]
        row = as_triplet(pair_id, pair, decision)
        row["votes"] = len(counted)
        row["agreement"] = round(counted.count(decision) / len(counted), 4)
        rows.append(row)
    report = {
        "policy": policy,
        "exported": len(rows),
        "votes": dict(Counter(v["choice"] for v in votes)),
        "left_out": dict(Counter(r["reason"] for r in left_out_rows)),
        "left_out_rows": left_out_rows,
    }
    return rows, report


def _pair_decision(pair: dict, outcomes: list, policy: str) -> int | str:
    """The winning response index, or the reason the pair stays out of D."""
    if not outcomes:
        return "unlabelled"
    return unusable_reason(pair["responses"]) or decide(outcomes, policy)


def unusable_reason(responses) -> str | None:
    """Why a pair stays out of D whatever its votes, or None when a vote can put it in."""
    if not all(text.strip() for text in responses):  # training refuses these
        return "empty response"
    if responses[0] == responses[1]:  # no preference: training skips chosen == rejected
        return "identical responses"
    return None


def unusable_note(source, pairs: list[Pair]) -> str | None:
    """A sentence for `label import` / `label serve --pairs` naming the pairs annotators would
    vote on for nothing (export leaves them out whatever the votes); None when there are none."""
    reasons = Counter(r for r in (unusable_reason(p.responses) for p in pairs) if r)
    if not reasons:
        return None
    listed = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
    count = sum(reasons.values())
    them = "it" if count == 1 else "them"
    return (f"{source}: {counted(count, 'pair')} ({listed}) will be left out of D "
            f"by `label export` whatever the votes, since training cannot use {them}; to spare the "
            f"annotators that work, remove {them} from {source} and import that file into a new "
            f"database before anyone votes")


def raw_rows(store: Store) -> tuple[list[dict], dict]:
    """One row per live vote; decisive votes also carry prompt/chosen/rejected."""
    with store.snapshot():
        pairs, votes = store.pairs(), store.live_votes()
    rows = []
    for vote in votes:
        pair = pairs[vote["pair_id"]]
        outcome = vote_outcome(vote["choice"], vote["left_index"])
        row = {"pair_id": vote["pair_id"], "prompt": pair["prompt"]}
        if isinstance(outcome, int):
            row.update(as_triplet(vote["pair_id"], pair, outcome))
        row.update(
            annotator=vote["annotator"],
            choice=vote["choice"],
            side=vote["choice"] if vote["choice"] in ("left", "right") else None,
            left_index=vote["left_index"],
            winner_index=outcome if isinstance(outcome, int) else None,
            reason=vote["reason"],
            time=_iso(vote["created_at"]),
        )
        rows.append(row)
    return rows, {"policy": "raw", "exported": len(rows),
                  "votes": dict(Counter(r["choice"] for r in rows)), "left_out": {}}


def export(db: str | Path, out: str | Path, policy: str = "majority", raw: bool = False) -> dict:
    """Write D.jsonl (or the raw votes) atomically, and the left-out pairs beside it; returns the
    report, whose `left_out_file` names the list (None when nothing is left out) and
    `removed_stale` the list of an earlier export deleted because this one has none.
    """
    check_out_file(out, "D.jsonl", db, "labels database")  # an atomic write over it would replace every vote
    store = Store(db, must_exist=True)
    try:
        rows, report = raw_rows(store) if raw else triplet_rows(store, policy)
    finally:
        store.close()
    left_out_rows = report.pop("left_out_rows", [])
    make_parent_folder(out)
    listed = left_out_path(out)
    # The old list goes first: a kill before the new one is written then leaves no list rather
    # than one that describes an earlier D. A raw export replaces D too, so its list goes. The
    # folder fsync of the atomic write below makes the deletion durable as well.
    removed = _remove(listed)
    report["removed_stale"] = str(listed) if removed and not left_out_rows else None
    write_jsonl_atomic(out, rows)
    report["left_out_file"] = str(listed) if left_out_rows else None
    if left_out_rows:
        write_jsonl_atomic(listed, left_out_rows)
    return report


def _remove(path: Path) -> bool:
    """Delete `path`; False when there was nothing to delete."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def format_report(report: dict, out: str | Path) -> str:
    lines = [f"wrote {counted(report['exported'], 'row')} to {out} (policy: {report['policy']})"]
    if report["votes"]:
        votes = ", ".join(f"{k} {v}" for k, v in sorted(report["votes"].items()))
        lines.append(f"live votes: {votes}")
    if report["left_out"]:
        left_out = ", ".join(f"{k} {v}" for k, v in sorted(report["left_out"].items()))
        listed = f" (listed in {report['left_out_file']})" if report.get("left_out_file") else ""
        lines.append(f"pairs left out: {left_out}{listed}")
    if report.get("removed_stale"):
        lines.append(f"removed {report['removed_stale']}, the left-out list of an earlier export "
                     "(this export lists no left-out pairs)")
    return "\n".join(lines)
