"""A labels database on a full disk: SQLite's "database or disk is full", raised for real by
capping the database at its current size (PRAGMA max_page_count), as a full disk does."""

import sqlite3

import pytest
from labeling_helpers import make_pairs, write_pairs_file
from typer.testing import CliRunner

from preftune.errors import UserError
from preftune.labeling.cli import app as label_app
from preftune.labeling.pairs import Pair
from preftune.labeling.store import NotSaved, Store

LONG_REASON = "€" * 2000  # 6,000 bytes: more than a page, so saving it needs a new page


@pytest.fixture
def fill_disk(monkeypatch):
    """Call it to make every connection a Store opens from then on unable to grow its database
    by a single page; `monkeypatch.undo()` frees the space again."""
    opened = Store._conn

    def capped(self):
        conn = opened(self)
        conn.execute("PRAGMA max_page_count = 1")  # SQLite keeps it at no less than the current size
        return conn

    return lambda: monkeypatch.setattr(Store, "_conn", capped)


def votes(store):
    with sqlite3.connect(store.path) as db:
        return db.execute("SELECT pair_id, choice, reason FROM votes").fetchall()


def test_a_vote_on_a_full_disk_is_answered_not_saved_and_saved_once_there_is_room(
        store, alice, fill_disk, monkeypatch, capsys):
    """The vote was a 500 with a traceback in the server's terminal, and the page said only
    'the server answered 500'; now the page is told why in a sentence, nothing is recorded, the
    terminal gets one line naming the database, and the same vote is saved once there is room."""
    _, client = alice
    pair_id = client.get("/api/next").json()["pair"]["pair_id"]
    fill_disk()
    store.close()  # the connections opened from now on are capped
    body = {"pair_id": pair_id, "choice": "left", "key": "k-000001", "reason": LONG_REASON}
    for _ in range(2):
        refused = client.post("/api/vote", json=body)
        assert refused.status_code == 503
        assert refused.json() == {"error": "the server cannot write to its labels database (the disk "
                                           "it is on is full); your earlier votes are kept; tell "
                                           "whoever runs the server, then try again."}
    assert votes(store) == []
    assert capsys.readouterr().err == (  # once, not once per refused vote
        f"error: {store.path}: could not write to this labels database: the disk it is on is full; "
        "free space on that disk, then try again (the labels already saved in it are kept).\n")
    assert client.get("/api/next").json()["pair"]["pair_id"] == pair_id  # still theirs to answer

    monkeypatch.undo()  # space freed
    store.close()
    saved = client.post("/api/vote", json=body)
    assert saved.status_code == 200 and saved.json()["saved"] is True
    assert votes(store) == [(pair_id, "left", LONG_REASON)]


def test_the_connection_that_hit_the_full_disk_writes_again_once_there_is_room(store, fill_disk,
                                                                              monkeypatch):
    """SQLite rolls the transaction back itself when the disk is full; the ROLLBACK that followed
    then failed ('no transaction is active') and hid the reason behind a traceback."""
    annotator = store.open_annotator()
    fill_disk()
    store.close()
    pair_id = store.next_pair(annotator)["pair_id"]  # this thread's connection is now capped
    with pytest.raises(NotSaved, match="the disk it is on is full"):
        store.record_vote(annotator, pair_id, "tie", LONG_REASON, "k-000002")
    monkeypatch.undo()
    store._conn().execute("PRAGMA max_page_count = 1000000")  # space freed, same connection
    assert store.record_vote(annotator, pair_id, "tie", LONG_REASON, "k-000002") > 0
    assert votes(store) == [(pair_id, "tie", LONG_REASON)]


def test_label_import_on_a_full_disk_is_one_sentence(tmp_path, fill_disk):
    """`preftune label import` stopped with sqlite3.OperationalError: database or disk is full,
    and its traceback; now a UserError, which the CLI prints as its one sentence."""
    db = tmp_path / "labels.sqlite"
    first = write_pairs_file(tmp_path / "first.jsonl", make_pairs(2))
    assert CliRunner().invoke(label_app, ["import", "--pairs", str(first), "--db", str(db)]).exit_code == 0
    long_pairs = [Pair(f"q{i}", f"prompt {i}", ("a" * 5000, "b" * 5000)) for i in range(3)]
    more = write_pairs_file(tmp_path / "more.jsonl", long_pairs)
    fill_disk()
    for target in (db, tmp_path / "new.sqlite"):  # adding to a database, and making one
        result = CliRunner().invoke(label_app, ["import", "--pairs", str(more), "--db", str(target)])
        assert isinstance(result.exception, UserError), result.exception
        assert str(result.exception) == (
            f"{target}: could not write to this labels database: the disk it is on is full; free "
            "space on that disk, then try again (the labels already saved in it are kept).")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT pair_id FROM pairs").fetchall() == [("p00000",), ("p00001",)]


def test_an_error_without_a_sqlite_code_is_kept_as_it_is(tmp_path, monkeypatch):
    """Python 3.10 (which preftune supports) gives sqlite3 errors no sqlite_errorcode and has no
    sqlite3.SQLITE_FULL and kin: classifying a locked database there raised AttributeError in
    place of SQLite's own error."""
    from preftune.labeling.store import not_saved

    for name in ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_BUSY",
                 "SQLITE_LOCKED", "SQLITE_IOERR"):
        monkeypatch.delattr(sqlite3, name)
    assert not_saved(tmp_path / "labels.db", sqlite3.OperationalError("database is locked")) is None
