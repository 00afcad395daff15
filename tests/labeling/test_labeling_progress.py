"""`label status` against the overlap: complete, partly labelled and untouched pairs, the votes
still needed, the rate; numbers worked out by hand."""

import json
import sqlite3
from collections import Counter

import pytest
from labeling_helpers import cast, make_pairs
from typer.testing import CliRunner

from preftune.errors import UserError
from preftune.labeling.cli import app
from preftune.labeling.status import format_status, progress, status, vote_rate
from preftune.labeling.store import Store


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def db(tmp_path):
    """5 pairs served with overlap 2. Votes the store counts (live, not skips):
    p00000 2 (a, b); p00001 1 (a's tie; b skipped); p00002 1 (b's both_bad; a's vote undone);
    p00003 0 (two skips); p00004 0."""
    path = tmp_path / "labels.sqlite"
    store = Store(path, overlap=2)
    store.add_pairs(make_pairs(5))
    a, b = (store.authenticate(store.add_annotator(n)) for n in "ab")
    cast(store, a, "p00000", 0), cast(store, b, "p00000", 1, 1)
    cast(store, a, "p00001", "tie"), cast(store, b, "p00001", "skip")
    cast(store, a, "p00002", 0)
    store.undo(a)
    cast(store, b, "p00002", "both_bad")
    cast(store, a, "p00003", "skip"), cast(store, b, "p00003", "skip")
    store.close()
    return path


def done_flags(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM pairs WHERE done = 1").fetchone()[0]


def test_progress_against_overlap_two_and_one(db):
    result = status(db)
    assert (result["overlap"], result["overlap_source"]) == (2, "server")
    # Needed: p00001 and p00002 one each, p00003 and p00004 two each.
    assert result["progress"] == {"complete": 1, "partial": 2, "untouched": 2, "votes_needed": 6}
    assert result["progress"]["complete"] == done_flags(db)  # the store's own `done` agrees
    text = format_status(result, db)
    assert ("against overlap 2 (of the last server): 1 pair complete, 2 partly labelled, "
            "2 untouched; 6 votes still needed") in text
    Store(db, overlap=1).close()  # a server started again with overlap 1 records it
    result = status(db)
    assert result["overlap"] == 1
    assert result["progress"] == {"complete": 3, "partial": 0, "untouched": 2, "votes_needed": 2}
    assert result["progress"]["complete"] == done_flags(db)


def test_votes_needed_by_hand():
    # Pairs by votes: 3 with none, 2 with one, 4 with two, 1 with three; overlap 3 needs
    # 3 * 3 + 2 * 2 + 4 * 1 = 17 more votes; the pair with three is complete.
    by_votes = Counter({0: 3, 1: 2, 2: 4, 3: 1})
    assert progress(by_votes, 3) == {"complete": 1, "partial": 6, "untouched": 3,
                                     "votes_needed": 17}
    # Overlap 1: every voted pair is complete, and a pair above the overlap needs nothing.
    assert progress(by_votes, 1) == {"complete": 7, "partial": 0, "untouched": 3,
                                     "votes_needed": 3}


def test_an_older_database_reports_with_the_overlap_unknown(db):
    with sqlite3.connect(db) as conn:  # as made before the overlap was recorded
        conn.execute("DROP TABLE meta")
    conn.close()
    result = invoke("status", "--db", db)
    assert result.exit_code == 0, result.output
    assert "overlap unknown" in result.output and "pass --overlap K" in result.output
    assert "pairs by non-skip votes: 0 vote(s): 2, 1 vote(s): 2, 2 vote(s): 1" in result.output
    numbers = json.loads(invoke("status", "--db", db, "--json").output)
    assert numbers["overlap"] is None and numbers["progress"] is None
    asked = json.loads(invoke("status", "--db", db, "--json", "--overlap", "2").output)
    assert asked["progress"]["votes_needed"] == 6


def test_the_overlap_option_overrides_the_record(db):
    result = invoke("status", "--db", db, "--overlap", "3")
    assert result.exit_code == 0, result.output
    # Needed against 3: p00000 1, p00001 2, p00002 2, p00003 3, p00004 3.
    assert ("against overlap 3 (from --overlap): 0 pairs complete, 3 partly labelled, "
            "2 untouched; 11 votes still needed") in result.output
    numbers = json.loads(invoke("status", "--db", db, "--json", "--overlap", "1").output)
    assert (numbers["overlap"], numbers["overlap_source"]) == (1, "option")
    assert numbers["progress"]["complete"] == 3
    store = Store(db)  # asking "what if" changes neither the record nor the `done` flags
    assert store.recorded_overlap() == 2
    store.close()
    assert done_flags(db) == 1
    assert isinstance(invoke("status", "--db", db, "--overlap", "0").exception, UserError)


def test_rate_over_the_last_hour_of_votes():
    # The hour up to the last vote (5000 s) holds the votes at 2000, 3000, 4000 and 5000 s.
    times = [0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0]
    assert vote_rate(times, 10) == {"votes_per_hour": 4.0, "window_end": 5000.0,
                                    "hours_left": 2.5}
    assert vote_rate(times, None)["hours_left"] is None
    # Votes spanning less than an hour give no honest hourly rate.
    assert vote_rate([0.0, 1000.0, 3599.0], 10) is None
    assert vote_rate([], 10) is None


def test_status_prints_the_rate_only_with_an_hour_of_votes(db):
    assert "rate:" not in format_status(status(db), db)  # all votes are seconds apart
    # The counted votes, oldest first, moved to 0 s, 1800 s, 3600 s and 5400 s: the hour up to
    # the last one holds two (the skips and the undone vote are not counted).
    with sqlite3.connect(db) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM votes WHERE undone_at IS NULL AND choice != 'skip' ORDER BY id")]
        for i, vote_id in enumerate(ids):
            conn.execute("UPDATE votes SET created_at = ? WHERE id = ?", (1800.0 * i, vote_id))
    conn.close()
    result = status(db)
    assert result["rate"] == {"votes_per_hour": 2.0, "window_end": 5400.0, "hours_left": 3.0}
    assert ("rate: 2 votes/hour in the hour up to the last vote (1970-01-01 01:30 UTC); "
            "about 3.0 hours left at that rate") in format_status(result, db)

