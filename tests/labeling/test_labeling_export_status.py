"""Export policies and agreement numbers, with expected values worked out by hand."""

import json
import sqlite3

import pytest
from labeling_helpers import cast, make_pairs

from preftune.errors import UserError
from preftune.labeling.export import export, format_report, triplet_rows
from preftune.labeling.status import (
    agreement,
    cohen_kappa,
    compute_status,
    fleiss_kappa,
    format_status,
    percent_agreement,
)
from preftune.labeling.store import Store
from preftune.records import write_jsonl_atomic


@pytest.fixture
def voted(tmp_path):
    store = Store(tmp_path / "votes.sqlite", overlap=3)
    store.add_pairs(make_pairs(9))
    a, b, c = (store.authenticate(store.add_annotator(n)) for n in "abc")
    cast(store, a, "p00000", 0, 1), cast(store, b, "p00000", 0), cast(store, c, "p00000", 1, 1)
    cast(store, a, "p00001", 1), cast(store, b, "p00001", 1, 1)
    cast(store, a, "p00002", 0), cast(store, b, "p00002", 1)
    cast(store, a, "p00003", "tie"), cast(store, b, "p00003", "tie"), cast(store, c, "p00003", 0)
    cast(store, a, "p00004", "both_bad")
    cast(store, a, "p00005", "skip"), cast(store, b, "p00005", "skip")
    cast(store, a, "p00006", "skip"), cast(store, b, "p00006", 0, 1)
    # p00007 gets no vote; p00008: a first votes 0, undoes it, then votes 1.
    cast(store, a, "p00008", 0)
    store.undo(a)
    cast(store, a, "p00008", 1, 1)
    yield store
    store.close()


def test_majority_export(voted):
    rows, report = triplet_rows(voted, "majority")
    pairs = voted.pairs()
    winners = {"p00000": 0, "p00001": 1, "p00006": 0, "p00008": 1}
    assert [r["pair_id"] for r in rows] == list(winners)
    for row in rows:
        responses = pairs[row["pair_id"]]["responses"]
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(row["prompt"], list):  # p00008 is a conversation
            assert chosen[0]["role"] == "assistant"
            chosen, rejected = chosen[0]["content"], rejected[0]["content"]
        assert chosen == responses[winners[row["pair_id"]]]
        assert rejected == responses[1 - winners[row["pair_id"]]]
    assert rows[0]["votes"] == 3 and rows[0]["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["left_out"] == {"no_majority": 1, "tie": 1, "both_bad": 1, "only_skips": 1,
                                  "unlabelled": 1}
    assert report["votes"]["tie"] == 2 and report["votes"]["skip"] == 3
    assert report["votes"]["both_bad"] == 1 and sum(report["votes"].values()) == 16


def test_unanimous_export(voted):
    rows, report = triplet_rows(voted, "unanimous")
    assert [r["pair_id"] for r in rows] == ["p00001", "p00006", "p00008"]
    assert report["left_out"] == {"disagreement": 3, "both_bad": 1, "only_skips": 1,
                                  "unlabelled": 1}


def test_export_files_and_raw_votes(voted, tmp_path):
    out = tmp_path / "D.jsonl"
    out.write_text("old content\n")
    report = export(voted.path, out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == report["exported"] == 4
    assert {"prompt", "chosen", "rejected", "pair_id"} <= set(lines[0])
    raw_out = tmp_path / "raw.jsonl"
    export(voted.path, raw_out, raw=True)
    raw = [json.loads(line) for line in raw_out.read_text().splitlines()]
    assert len(raw) == 16
    first = raw[0]  # a voted response 0 of p00000, shown on the right (left_index 1)
    assert (first["annotator"], first["side"], first["winner_index"]) == ("a", "right", 0)
    assert first["chosen"] == "first answer 0" and first["time"].endswith("+00:00")
    assert [r["side"] for r in raw if r["pair_id"] == "p00003"] == [None, None, "left"]
    with pytest.raises(UserError, match="policy"):
        export(voted.path, out, policy="plurality")
    with pytest.raises(UserError, match="no such labels database"):
        export(tmp_path / "missing.sqlite", out)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("policy, reasons", [
    ("majority", {"p00002": "no_majority", "p00003": "tie", "p00004": "both_bad",
                  "p00005": "only_skips", "p00007": "unlabelled"}),
    ("unanimous", {"p00000": "disagreement", "p00002": "disagreement", "p00003": "disagreement",
                   "p00004": "both_bad", "p00005": "only_skips", "p00007": "unlabelled"}),
])
def test_every_pair_is_in_d_or_in_the_left_out_list(voted, tmp_path, policy, reasons):
    """Nothing is dropped silently: each pair of the database is either a row of D.jsonl or a
    row of D.left_out.jsonl, which says why and holds the votes it had."""
    out = tmp_path / "D.jsonl"
    report = export(voted.path, out, policy=policy)
    listed = tmp_path / "D.left_out.jsonl"
    assert report["left_out_file"] == str(listed)
    exported = [r["pair_id"] for r in read_jsonl(out)]
    left_out = {r["pair_id"]: r for r in read_jsonl(listed)}
    assert sorted(exported + list(left_out)) == sorted(voted.pairs())  # each pair exactly once
    assert {pair_id: r["reason"] for pair_id, r in left_out.items()} == reasons
    tie = left_out["p00003"]
    assert tie["responses"] == ["first answer 3", "second answer 3"]
    assert tie["prompt"] == "prompt 3"
    assert tie["votes"] == {"tie": 2, "response_0": 1}
    assert [(v["annotator"], v["vote"]) for v in tie["annotators"]] == [
        ("a", "tie"), ("b", "tie"), ("c", "response_0")]
    assert left_out["p00005"]["votes"] == {"skip": 2}
    assert left_out["p00007"]["votes"] == {} and left_out["p00007"]["annotators"] == []
    if policy == "unanimous":  # a saw response 0 on the right, c response 1 on the right
        assert left_out["p00000"]["votes"] == {"response_0": 2, "response_1": 1}
        assert [v["vote"] for v in left_out["p00000"]["annotators"]] == [
            "response_0", "response_0", "response_1"]
    else:
        assert left_out["p00002"]["prompt"][0] == {"role": "user", "content": "question 2"}
        assert left_out["p00002"]["votes"] == {"response_0": 1, "response_1": 1}


def test_a_stale_left_out_list_is_removed(voted, tmp_path):
    out = tmp_path / "D.jsonl"
    listed = tmp_path / "D.left_out.jsonl"
    export(voted.path, out)
    assert listed.is_file()
    decided = Store(tmp_path / "decided.sqlite")
    decided.add_pairs(make_pairs(1))
    cast(decided, decided.authenticate(decided.add_annotator("a")), "p00000", 1)
    decided.close()
    report = export(decided.path, out)  # every pair has a winner: the earlier list is outdated
    assert not listed.exists()
    assert report["left_out_file"] is None and report["removed_stale"] == str(listed)
    assert f"removed {listed}" in format_report(report, out)
    report = export(decided.path, out)  # nothing left out, nothing stale
    assert report["removed_stale"] is None and not listed.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl") == ["D.jsonl"]


def test_a_folder_as_out_is_named_and_the_list_beside_it_kept(voted, tmp_path):
    """--out naming a folder was a traceback, after deleting the left-out list beside it."""
    export(voted.path, tmp_path / "D.jsonl")
    listed = tmp_path / "D.left_out.jsonl"
    (tmp_path / "D").mkdir()
    with pytest.raises(UserError, match="is a folder; name the file"):
        export(voted.path, tmp_path / "D")
    assert listed.is_file()


def test_out_in_a_new_folder_is_written_with_its_list(voted, tmp_path):
    """It said 'create it first', while sample, label auto, eval and report make their --out folder."""
    out = tmp_path / "new" / "deeper" / "D.jsonl"
    report = export(voted.path, out)
    assert len(out.read_text().splitlines()) == report["exported"]
    assert report["left_out_file"] == str(tmp_path / "new" / "deeper" / "D.left_out.jsonl")
    with pytest.raises(UserError, match="no such labels database"):  # a mistake makes no folder
        export(tmp_path / "missing.sqlite", tmp_path / "other" / "D.jsonl")
    assert not (tmp_path / "other").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="a_file/D cannot be a folder, a file holds its place"):
        export(voted.path, tmp_path / "a_file" / "D" / "D.jsonl")


def test_out_naming_the_database_is_refused_and_the_votes_kept(voted):
    """`--out labels.sqlite` (a slip for --db) replaced the database, every vote, with D."""
    before = len(voted.live_votes())
    with pytest.raises(UserError, match="is the labels database itself"):
        export(voted.path, voted.path)
    reopened = Store(voted.path, must_exist=True)
    assert len(reopened.live_votes()) == before
    reopened.close()


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    out = tmp_path / "D.jsonl"
    out.write_text('{"old": 1}\n')

    def rows():
        yield {"new": 1}
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        write_jsonl_atomic(out, rows())
    assert out.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["D.jsonl"], "temporary file left behind"


def test_cohen_kappa_by_hand():
    # Agreement on 8 of 10 items: p_o = 0.8. Each rater says 0 six times and 1 four times:
    # p_e = 0.6 * 0.6 + 0.4 * 0.4 = 0.52, kappa = (0.8 - 0.52) / 0.48 = 0.58333.
    a = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    b = [0, 0, 0, 0, 0, 1, 1, 1, 0, 1]
    assert cohen_kappa(a, b) == pytest.approx(0.28 / 0.48)
    assert percent_agreement([[x, y] for x, y in zip(a, b)]) == pytest.approx(0.8)
    assert cohen_kappa([1, 1], [1, 1]) is None  # chance agreement is certain: undefined


def test_fleiss_kappa_by_hand():
    # Per-item agreement P_i: 1, 2/6, 2/6, 0 -> P_bar = 5/12. Category shares over 12 labels:
    # 5/12, 4/12, 2/12, 1/12 -> P_e = 46/144. kappa = (60/144 - 46/144) / (98/144) = 1/7.
    items = [[0, 0, 0], [0, 0, 1], [1, 1, "tie"], [1, "tie", "both_bad"]]
    assert percent_agreement(items) == pytest.approx(5 / 12)
    assert fleiss_kappa(items) == pytest.approx(1 / 7)
    by_pair = {f"p{i}": dict(zip("abc", labels)) for i, labels in enumerate(items)}
    result = agreement(by_pair)
    assert result["kappa_kind"] == "fleiss" and result["kappa"] == pytest.approx(1 / 7)


def test_status_of_two_annotators(tmp_path):
    store = Store(tmp_path / "two.sqlite", overlap=2)
    store.add_pairs(make_pairs(5))
    a, b = (store.authenticate(store.add_annotator(n)) for n in "ab")
    for pair, outcome in zip(["p00000", "p00001", "p00002", "p00003"], [0, 0, 1, "tie"]):
        cast(store, a, pair, outcome)
    for pair, outcome, left in zip(["p00000", "p00001", "p00002", "p00003"],
                                   [0, 1, 1, "tie"], [1, 0, 0, 0]):
        cast(store, b, pair, outcome, left)
    cast(store, a, "p00004", "skip")
    status = compute_status(store)
    # p_o = 3/4; a gives 0,0,1,tie and b gives 0,1,1,tie: p_e = (2*1 + 1*2 + 1*1) / 16 = 5/16;
    # kappa = (12/16 - 5/16) / (11/16) = 7/11.
    ag = status["agreement"]
    assert (ag["pairs"], ag["annotators"], ag["kappa_kind"]) == (4, 2, "cohen")
    assert ag["percent"] == pytest.approx(0.75) and ag["kappa"] == pytest.approx(7 / 11)
    # Left votes: a on p00000 and p00001; right: b on p00000 (left_index 1), a on p00002,
    # b on p00001 and p00002. 2 of 6 -> 1/3, Wilson 95% interval 9.7% - 70.0%.
    bias = status["position_bias"]
    assert bias["n"] == 6 and bias["left_share"] == pytest.approx(1 / 3)
    assert bias["ci95"] == pytest.approx([0.0968, 0.7000], abs=5e-4)
    names = {x["name"]: x for x in status["annotators"]}
    assert names["a"]["votes"] == 5 and names["a"]["by_choice"]["skip"] == 1
    assert status["pairs_by_vote_count"] == {"0": 1, "2": 4}
    text = format_status(status, "two.sqlite")
    assert "cohen kappa 0.636" in text and "33.3% of 6" in text
    store.close()


def test_status_counts_one_pair_and_one_vote_in_the_singular(tmp_path):
    """It said "1 pairs, 1 live votes"."""
    store = Store(tmp_path / "one.sqlite")
    store.add_pairs(make_pairs(1))
    cast(store, store.authenticate(store.add_annotator("a")), "p00000", 0)
    assert format_status(compute_status(store), "one.sqlite").startswith("one.sqlite: 1 pair, 1 live vote\n")
    store.close()


def test_pairs_with_an_empty_response_are_left_out_of_d(tmp_path):
    from preftune.labeling.pairs import Pair

    store = Store(tmp_path / "votes.sqlite")
    store.add_pairs([Pair("empty", "p", ("an answer", "")), Pair("full", "p", ("one", "two"))])
    who = store.authenticate(store.add_annotator("a"))
    cast(store, who, "empty", 0), cast(store, who, "full", 1)
    rows, report = triplet_rows(store, "majority")
    store.close()
    assert [r["pair_id"] for r in rows] == ["full"]
    assert report["left_out"] == {"empty response": 1}
    assert [(r["pair_id"], r["reason"], r["votes"]) for r in report["left_out_rows"]] == [
        ("empty", "empty response", {"response_0": 1})]


def test_pairs_with_identical_responses_are_left_out_of_d_and_listed(tmp_path):
    """Such a pair went into D as chosen == rejected, which training then skips; label auto
    skips it too. It belongs in the left-out list, with its votes."""
    from preftune.labeling.pairs import Pair

    store = Store(tmp_path / "votes.sqlite")
    store.add_pairs([Pair("same", "p", ("Yes.", "Yes.")), Pair("full", "p", ("one", "two"))])
    who = store.authenticate(store.add_annotator("a"))
    cast(store, who, "same", 0), cast(store, who, "full", 1)
    rows, report = triplet_rows(store, "majority")
    store.close()
    assert [r["pair_id"] for r in rows] == ["full"]
    assert report["left_out"] == {"identical responses": 1}
    assert [(r["pair_id"], r["reason"], r["votes"]) for r in report["left_out_rows"]] == [
        ("same", "identical responses", {"response_0": 1})]


def test_export_marks_responses_the_sampler_cut(tmp_path):
    """A response cut by max_new_tokens (pairs.jsonl's `truncated`) stays marked through the
    labels database, so training closes it with no EOS (tests/test_loop_seams.py)."""
    from preftune.labeling.pairs import Pair

    db = tmp_path / "votes.sqlite"
    with sqlite3.connect(db) as old:  # a database from before the column existed
        old.execute("CREATE TABLE pairs (seq INTEGER PRIMARY KEY AUTOINCREMENT, pair_id TEXT NOT NULL "
                    "UNIQUE, prompt TEXT NOT NULL, response_0 TEXT NOT NULL, response_1 TEXT NOT NULL, "
                    "filled INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0)")
        old.execute("INSERT INTO pairs (pair_id, prompt, response_0, response_1) "
                    "VALUES ('old', '\"p\"', 'a', 'b')")
    old.close()
    store = Store(db, overlap=1)
    store.add_pairs([Pair("cut", "p", ("ended.", "cut off"), truncated=(False, True)),
                     Pair("chat", [{"role": "user", "content": "q"}], ("x y", "z"), truncated=(True, False))])
    a = store.authenticate(store.add_annotator("a"))
    cast(store, a, "old", 0), cast(store, a, "cut", 0), cast(store, a, "chat", 0, 1)
    rows = {row["pair_id"]: row for row in triplet_rows(store, "majority")[0]}
    store.close()
    assert "chosen_truncated" not in rows["old"] and "rejected_truncated" not in rows["old"]
    assert rows["cut"]["rejected_truncated"] is True and "chosen_truncated" not in rows["cut"]
    assert rows["chat"]["chosen_truncated"] is True and rows["chat"]["chosen"][0]["role"] == "assistant"


@pytest.mark.parametrize("raw", [False, True])
def test_export_reads_pairs_and_votes_at_one_moment(tmp_path, monkeypatch, raw):
    """A pair imported and voted on while export runs, between its reading the pairs and the
    votes, is in neither: the raw export stopped with a KeyError, the other counted the vote."""
    db = tmp_path / "labels.sqlite"
    store = Store(db, overlap=1)
    store.add_pairs(make_pairs(1))
    alice = store.authenticate(store.add_annotator("alice"))
    cast(store, alice, "p00000", 0)
    read_pairs = Store.pairs

    def pairs_then_a_new_voted_pair(self):
        found = read_pairs(self)
        if self is not store:  # the export's own store: the server adds a pair and a vote now
            store.add_pairs(make_pairs(1, prefix="late"))
            cast(store, alice, "late00000", 1)
        return found

    monkeypatch.setattr(Store, "pairs", pairs_then_a_new_voted_pair)
    report = export(db, tmp_path / "D.jsonl", raw=raw)
    store.close()
    assert report["exported"] == 1 and report["votes"] == {"left": 1}

