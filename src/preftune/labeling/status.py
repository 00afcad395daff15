"""How labeling is going: progress per annotator, agreement, position bias.

Agreement is measured on pairs with at least two non-skip votes, over four categories (response
0 preferred, response 1 preferred, tie, both bad). Percent agreement is the mean, over pairs, of
the share of annotator couples that agree. Kappa corrects it for chance: Cohen's kappa when
exactly two annotators labelled those pairs, otherwise Fleiss' kappa (in its usual form for a
varying number of annotators per pair).

Position bias is the share of left/right votes that went to the left card; the order is
random, so a share far from 0.5 means annotators favour a side.

What is left is measured against the overlap (votes wanted per pair): the one the last
`label serve` recorded, or `--overlap K`. A vote here is what the store counts toward a pair's
`done` flag: a live (not undone) vote other than a skip.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path

from preftune.errors import UserError
from preftune.labeling.export import vote_outcome
from preftune.labeling.store import Store
from preftune.wording import counted

RATE_WINDOW_S = 3600.0  # the rate is votes in the last hour of voting


def percent_agreement(items: list[list]) -> float:
    """Mean over items of the fraction of rater couples giving the same category."""
    shares = []
    for labels in items:
        n = len(labels)
        same = sum(c * (c - 1) for c in Counter(labels).values())
        shares.append(same / (n * (n - 1)))
    return sum(shares) / len(shares)


def cohen_kappa(first: list, second: list) -> float | None:
    """Cohen's kappa of two raters who labelled the same items; None when chance is certain."""
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_a, count_b = Counter(first), Counter(second)
    expected = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def fleiss_kappa(items: list[list]) -> float | None:
    """Fleiss' kappa; each item is the list of categories its raters gave (two or more)."""
    p_bar = percent_agreement(items)
    totals: Counter = Counter()
    for labels in items:
        totals.update(labels)
    n_labels = sum(totals.values())
    expected = sum((count / n_labels) ** 2 for count in totals.values())
    if expected == 1:
        return None
    return (p_bar - expected) / (1 - expected)


def agreement(labels_by_pair: dict[str, dict[str, object]]) -> dict:
    """Agreement over pairs labelled by two or more annotators (name -> category per pair)."""
    multi = {p: by for p, by in labels_by_pair.items() if len(by) >= 2}
    if not multi:
        return {"pairs": 0, "annotators": 0, "percent": None, "kappa": None, "kappa_kind": None}
    raters = sorted({name for by in multi.values() for name in by})
    items = [list(by.values()) for by in multi.values()]
    if len(raters) == 2:
        first = [by[raters[0]] for by in multi.values()]
        second = [by[raters[1]] for by in multi.values()]
        kappa, kind = cohen_kappa(first, second), "cohen"
    else:
        kappa, kind = fleiss_kappa(items), "fleiss"
    return {"pairs": len(multi), "annotators": len(raters), "percent": percent_agreement(items),
            "kappa": kappa, "kappa_kind": kind}


def position_bias(votes: list[dict]) -> dict:
    """Share of left/right votes for the left card, with a 95% Wilson interval."""
    left = sum(v["choice"] == "left" for v in votes)
    n = left + sum(v["choice"] == "right" for v in votes)
    if n == 0:
        return {"left_share": None, "n": 0, "ci95": None}
    share, z = left / n, 1.96
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"left_share": share, "n": n, "ci95": [centre - half, centre + half]}


def progress(pairs_by_vote_count: Counter, overlap: int) -> dict:
    """Pairs complete (votes >= overlap), partly labelled and untouched, and the votes still
    needed to complete them all; `pairs_by_vote_count` maps a number of votes to its pairs."""
    counts = pairs_by_vote_count.items()
    return {
        "complete": sum(n for votes, n in counts if votes >= overlap),
        "partial": sum(n for votes, n in counts if 0 < votes < overlap),
        "untouched": pairs_by_vote_count.get(0, 0),
        "votes_needed": sum(n * (overlap - votes) for votes, n in counts if votes < overlap),
    }


def vote_rate(times: list[float], votes_needed: int | None) -> dict | None:
    """Votes per hour in the hour up to the latest vote, and the hours left at that pace.

    None unless the votes span a full hour: the rate of a session younger than the window
    would be too low by an unknown factor.
    """
    if not times or max(times) - min(times) < RATE_WINDOW_S:
        return None
    end = max(times)
    per_hour = sum(t > end - RATE_WINDOW_S for t in times) * 3600.0 / RATE_WINDOW_S
    hours_left = None if votes_needed is None else votes_needed / per_hour
    return {"votes_per_hour": per_hour, "window_end": end, "hours_left": hours_left}


def compute_status(store: Store, overlap: int | None = None) -> dict:
    """Every number `label status` prints; `overlap` overrides the one the server recorded."""
    votes = store.live_votes()
    per_annotator: dict[str, Counter] = defaultdict(Counter)
    last_vote: dict[str, float] = {}
    labels_by_pair: dict[str, dict[str, object]] = defaultdict(dict)
    for vote in votes:
        per_annotator[vote["annotator"]][vote["choice"]] += 1
        last_vote[vote["annotator"]] = vote["created_at"]
        if vote["choice"] != "skip":
            outcome = vote_outcome(vote["choice"], vote["left_index"])
            labels_by_pair[vote["pair_id"]][vote["annotator"]] = outcome
    annotators = []
    for row in store.annotators():
        counts = per_annotator.get(row["name"], Counter())
        annotators.append({
            "name": row["name"], "votes": sum(counts.values()), "by_choice": dict(counts),
            "last_vote": last_vote.get(row["name"]), "revoked": row["revoked_at"] is not None,
        })
    votes_per_pair = Counter(len(labels_by_pair.get(p, {})) for p in store.pairs())
    source = "option" if overlap is not None else "server"
    overlap = overlap if overlap is not None else store.recorded_overlap()
    left = None if overlap is None else progress(votes_per_pair, overlap)
    counted_times = [v["created_at"] for v in votes if v["choice"] != "skip"]
    return {
        "pairs": store.pair_count(),
        "votes": len(votes),
        "pairs_by_vote_count": {str(k): v for k, v in sorted(votes_per_pair.items())},
        "annotators": annotators,
        "agreement": agreement(labels_by_pair),
        "position_bias": position_bias(votes),
        "overlap": overlap,
        "overlap_source": None if overlap is None else source,
        "progress": left,
        "rate": vote_rate(counted_times, None if left is None else left["votes_needed"]),
    }


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_status(status: dict, db: str | Path) -> str:
    lines = [f"{db}: {counted(status['pairs'], 'pair')}, {counted(status['votes'], 'live vote')}"]
    counts = ", ".join(f"{k} vote(s): {v}" for k, v in status["pairs_by_vote_count"].items())
    lines.append(f"pairs by non-skip votes: {counts or 'none'}")
    lines.extend(_progress_lines(status))
    lines.append("")
    lines.append(f"{'annotator':<24} {'votes':>6}  choices")
    for a in status["annotators"]:
        choices = ", ".join(f"{k} {v}" for k, v in sorted(a["by_choice"].items())) or "-"
        name = a["name"] + (" (revoked)" if a["revoked"] else "")
        lines.append(f"{name:<24} {a['votes']:>6}  {choices}")
    ag = status["agreement"]
    lines.append("")
    if ag["pairs"]:
        lines.append(
            f"agreement on {ag['pairs']} pairs with several votes ({ag['annotators']} annotators): "
            f"{100 * ag['percent']:.1f}%, {ag['kappa_kind']} kappa {_fmt(ag['kappa'])}"
        )
    else:
        lines.append("agreement: no pair has two non-skip votes yet")
    pb = status["position_bias"]
    if pb["n"]:
        low, high = pb["ci95"]
        lines.append(
            f"position bias: {100 * pb['left_share']:.1f}% of {pb['n']} left/right votes chose "
            f"the left card (95% interval {100 * low:.1f}-{100 * high:.1f}%; 50% is unbiased)"
        )
    return "\n".join(lines)


def _progress_lines(status: dict) -> list[str]:
    left, k = status["progress"], status["overlap"]
    if k is None:
        lines = ["overlap unknown: no `label serve` recorded one in this database; pass "
                 "--overlap K to count what is left against K votes per pair"]
    else:
        origin = "from --overlap" if status["overlap_source"] == "option" else "of the last server"
        complete, needed = left["complete"], left["votes_needed"]
        lines = [f"against overlap {k} ({origin}): {complete} pair{'' if complete == 1 else 's'} complete, "
                 f"{left['partial']} partly labelled, {left['untouched']} untouched; "
                 f"{needed} vote{'' if needed == 1 else 's'} still needed"]
    rate = status["rate"]
    if rate is not None:
        end = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(rate["window_end"]))
        text = f"rate: {rate['votes_per_hour']:.0f} votes/hour in the hour up to the last vote ({end})"
        if left and left["votes_needed"]:
            text += f"; about {_duration(rate['hours_left'])} left at that rate"
        lines.append(text)
    return lines


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} minutes" if hours < 1 else f"{hours:.1f} hours"


def status(db: str | Path, overlap: int | None = None) -> dict:
    if overlap is not None and overlap < 1:
        raise UserError(f"--overlap must be at least 1, got {overlap}.")
    store = Store(db, must_exist=True)
    try:
        return compute_status(store, overlap)
    finally:
        store.close()
