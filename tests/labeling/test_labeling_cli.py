"""`preftune label ...` commands through typer's runner (the lead mounts this app as `label`)."""

import json
import re

import pytest
from labeling_helpers import make_pairs, write_pairs_file
from typer.testing import CliRunner

from preftune.errors import UserError
from preftune.labeling.cli import app
from preftune.labeling.pairs import Pair
from preftune.labeling.store import Store

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_import_annotators_status_export(tmp_path):
    db = tmp_path / "labels.sqlite"
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(3))
    assert "3 new pairs" in invoke("import", "--pairs", pairs, "--db", db).output
    assert "0 new pairs, 3 already" in invoke("import", "--pairs", pairs, "--db", db).output
    one_more = write_pairs_file(tmp_path / "more.jsonl", make_pairs(4))
    assert "1 new pair, 3 already" in invoke("import", "--pairs", one_more, "--db", db).output
    result = invoke("add-annotator", "erin", "--db", db, "--url", "https://label.example/")
    link = result.output.strip().splitlines()[-1]
    assert link.startswith("https://label.example/login?token=")
    token = link.split("token=")[1]
    store = Store(db)
    erin = store.authenticate(token)
    assert erin.name == "erin" and token not in db.read_bytes().decode("latin-1")
    store.next_pair(erin)
    store.record_vote(erin, "p00000", "left", "clearer", "cli-vote-1")
    store.close()
    status = json.loads(invoke("status", "--db", db, "--json").output)
    assert status["votes"] == 1 and status["annotators"][0]["name"] == "erin"
    assert "erin" in invoke("status", "--db", db).output
    out = tmp_path / "D.jsonl"
    assert "wrote 1 row to" in invoke("export", "--db", db, "--out", out).output
    assert json.loads(out.read_text())["pair_id"] == "p00000"
    assert "revoked erin" in invoke("revoke-annotator", "erin", "--db", db).output
    store = Store(db)
    assert store.authenticate(token) is None
    store.close()


def test_a_second_batch_with_the_first_batchs_ids_is_refused_naming_id_prefix(tmp_path):
    db = tmp_path / "labels.sqlite"
    first = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(2))
    invoke("import", "--pairs", first, "--db", db)
    second = write_pairs_file(tmp_path / "more.jsonl",
                              [Pair(p.pair_id, f"new {p.prompt}", p.responses) for p in make_pairs(3)])
    result = invoke("import", "--pairs", second, "--db", db)
    assert isinstance(result.exception, UserError)
    assert "'p00000' is already stored" in str(result.exception)
    assert "nothing was added" in str(result.exception) and "--id-prefix" in str(result.exception)
    store = Store(db)
    assert store.pair_count() == 2  # all or nothing: p00002, new, was not added either
    store.close()


def test_export_prints_where_the_left_out_pairs_are(tmp_path):
    db = tmp_path / "labels.sqlite"
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(3))
    invoke("import", "--pairs", pairs, "--db", db)
    out = tmp_path / "D.jsonl"
    listed = tmp_path / "D.left_out.jsonl"
    output = invoke("export", "--db", db, "--out", out).output
    assert f"pairs left out: unlabelled 3 (listed in {listed})" in output
    assert len(listed.read_text().splitlines()) == 3  # a fresh database: every pair listed
    store = Store(db)
    erin = store.authenticate(store.add_annotator("erin"))
    for pair_id in ("p00000", "p00001", "p00002"):
        store.next_pair(erin)
        store.record_vote(erin, pair_id, "left", None, f"vote-{pair_id}")
    store.close()
    output = invoke("export", "--db", db, "--out", out).output
    assert f"removed {listed}" in output and not listed.exists()


def test_cli_mistakes_are_user_errors(tmp_path):
    db = tmp_path / "labels.sqlite"
    invoke("add-annotator", "frank", "--db", db)
    cases = [
        ("add-annotator", "frank", "--db", db),
        ("add-annotator", "bad name!", "--db", db),
        ("revoke-annotator", "nobody", "--db", db),
        ("status", "--db", tmp_path / "missing.sqlite"),
        ("serve", "--db", db, "--host", "0.0.0.0", "--open"),
        ("serve", "--db", db, "--overlap", "0"),
        ("serve", "--db", db),  # no pairs to serve
        ("auto", "--pairs", tmp_path / "none.jsonl", "--reward", "m:f", "--out", db,
         "--argmax", "--bt-sample"),
        ("export", "--db", db, "--out", tmp_path / "D.jsonl", "--raw", "--policy", "unanimous"),
        ("serve", "--db", db, "--port", "99999",
         "--pairs", write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(1))),
    ]
    for args in cases:
        result = invoke(*args)
        assert isinstance(result.exception, UserError), (args, result.output)
    # Serving a database that does not exist, with nothing to put in it, creates no empty file.
    result = invoke("serve", "--db", tmp_path / "new.sqlite")
    assert isinstance(result.exception, UserError) and "pass --pairs" in str(result.exception)
    assert not (tmp_path / "new.sqlite").exists()


def test_a_missing_db_names_every_command_that_creates_one(tmp_path):
    """The sentence named `label serve` and `label import` alone, though `label add-annotator`
    makes a database too (and `eval generate --judge human` does)."""
    missing = tmp_path / "missing.sqlite"
    result = invoke("export", "--db", missing, "--out", tmp_path / "D.jsonl")
    assert str(result.exception) == (
        f"{missing}: no such labels database; check --db (`label serve`, `label import`, "
        "`label add-annotator` and `eval generate --judge human` create one).")
    assert invoke("add-annotator", "frank", "--db", missing).exit_code == 0
    assert missing.is_file()


def test_auto_command(tmp_path):
    (tmp_path / "lenreward.py").write_text(
        "def score(prompt: str, response: str) -> float:\n    return 1.0\n")  # all ties
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(5))
    out = tmp_path / "D.jsonl"
    result = invoke("auto", "--pairs", pairs, "--reward", f"{tmp_path / 'lenreward.py'}:score",
                    "--out", out, "--argmax")
    assert result.exit_code == 0, result.output
    assert "wrote 0 rows" in result.output and "5 ties skipped" in result.output
    again = invoke("auto", "--pairs", pairs, "--reward", f"{tmp_path / 'lenreward.py'}:score",
                   "--out", out, "--argmax", "--no-progress")
    assert again.exit_code == 0 and "labeling pairs" not in again.output, again.output
    result = invoke("auto", "--pairs", pairs, "--reward", f"{tmp_path / 'lenreward.py'}:score",
                    "--out", out, "--seed", "1")
    assert "wrote 5 rows (bt-sample)" in result.output
    # bt-sample writes ties as coin flips: said, not left for training to find out (it was silent).
    assert "5 ties (equal rewards) labeled by a coin flip (--argmax skips ties)" in result.output
    assert all(json.loads(line)["p"] == pytest.approx(0.5) for line in out.read_text().splitlines())


def test_auto_command_stopped_by_ctrl_c_says_what_is_kept_and_to_rerun(tmp_path):
    """Ctrl-C ended `label auto` without a word: nothing said the rows written were kept or that
    a rerun continues after them."""
    (tmp_path / "stops.py").write_text(
        "def score(prompt: str, response: str) -> float:\n"
        "    if response == 'first answer 2':\n"
        "        raise KeyboardInterrupt\n"
        "    return float(len(response))\n")
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(4))
    out = tmp_path / "D.jsonl"
    result = invoke("auto", "--pairs", pairs, "--reward", f"{tmp_path / 'stops.py'}:score", "--out", out,
                    "--batch-size", "1", "--no-progress")
    assert result.exit_code == 130
    assert f"stopped by Ctrl-C: {out} keeps 2 rows labeled so far; rerun the same command to continue." \
        in result.output
    assert len(out.read_text().splitlines()) == 2


def test_auto_command_counts_identical_pairs_and_refuses_another_pairs_file(tmp_path):
    (tmp_path / "lenreward.py").write_text(
        "def score(prompt, response):\n    return len(response.split()) / 5\n")
    reward = f"{tmp_path / 'lenreward.py'}:score"
    pairs = make_pairs(3)
    pairs[1] = Pair(pairs[1].pair_id, pairs[1].prompt, ("same", "same"))
    first = write_pairs_file(tmp_path / "first.jsonl", pairs)
    out = tmp_path / "D.jsonl"
    result = invoke("auto", "--pairs", first, "--reward", reward, "--out", out)
    assert result.exit_code == 0, result.output
    assert "wrote 2 rows (bt-sample)" in result.output
    assert "1 pair with identical responses skipped" in result.output
    # Another pairs file that reuses the same pair ids must not count as already labeled.
    other = write_pairs_file(tmp_path / "other.jsonl",
                             [Pair(p.pair_id, "another prompt", p.responses) for p in pairs])
    result = invoke("auto", "--pairs", other, "--reward", reward, "--out", out)
    assert isinstance(result.exception, UserError)
    assert f"{out}, line 1" in str(result.exception)


def test_auto_command_says_which_of_n_responses_it_left_out(tmp_path):
    (tmp_path / "lenreward.py").write_text(
        "def score(prompt, response):\n    return float(len(response))\n")
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", [
        Pair("four", "p", ("", "short", "a longer one", "short"))])
    result = invoke("auto", "--pairs", pairs, "--reward", f"{tmp_path / 'lenreward.py'}:score",
                    "--out", tmp_path / "D.jsonl", "--argmax")
    assert result.exit_code == 0, result.output
    assert "wrote 1 row (argmax)" in result.output
    assert "1 empty and 1 repeated response left out before picking best and worst" in result.output
    again = invoke("auto", "--pairs", pairs, "--reward", f"{tmp_path / 'lenreward.py'}:score",
                   "--out", tmp_path / "D.jsonl", "--argmax")
    assert "wrote 0 rows (argmax), 1 was already there" in again.output  # not "1 were"


def test_paths_to_people_refuse_more_than_two_responses(tmp_path, monkeypatch):
    """`label serve`, `label import` and the demo's --human show people two responses: a record
    with three is refused by file and line, never cut to its first two."""
    from types import SimpleNamespace

    import uvicorn

    import preftune.demo.human as human

    def never_serve(*args, **kwargs):  # a path that accepted the file would serve it and block
        raise AssertionError("served a file with three responses")

    monkeypatch.setattr(uvicorn, "run", never_serve)
    monkeypatch.setattr(human, "_start_server", never_serve)

    pairs = write_pairs_file(tmp_path / "pairs.jsonl", [
        *make_pairs(1), Pair("three", "p", ("one", "two", "three"))])
    sentence = (rf"{pairs}, line 2: pair 'three' has 3 responses, but people compare two at a "
                r"time; sample with `preftune sample --n 2` for people, or label this file with "
                r"`preftune label auto`, which keeps the best and the worst\.")
    db = tmp_path / "labels.sqlite"
    for args in [("serve", "--db", db, "--pairs", pairs), ("import", "--db", db, "--pairs", pairs)]:
        result = invoke(*args)
        assert isinstance(result.exception, UserError), (args, result.output)
        assert re.fullmatch(sentence, str(result.exception)), str(result.exception)
    with pytest.raises(UserError, match=sentence):
        human.label_with_people(pairs, db, tmp_path / "D.jsonl", SimpleNamespace(host="127.0.0.1"))
    store = Store(db)
    assert store.pair_count() == 0, "nothing from the refused file is queued"
    with pytest.raises(UserError, match="pair 'three' has 3 responses, but a labeling database"):
        store.add_pairs([Pair("three", "p", ("one", "two", "three"))])  # a caller building Pairs itself
    store.close()


def test_serve_again_without_overlap_keeps_the_recorded_one(tmp_path, monkeypatch):
    """A restart without --overlap served with 1 and recorded it, so pairs stopped going to the
    second and third annotators; a start that then failed to bind had changed it too."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: served.append(kwargs["port"]))
    db = tmp_path / "labels.sqlite"
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(2))
    assert "(overlap 3)" in invoke("serve", "--db", db, "--pairs", pairs, "--overlap", "3").output
    assert "(overlap 3)" in invoke("serve", "--db", db).output
    assert "(overlap 2)" in invoke("serve", "--db", db, "--overlap", "2").output
    store = Store(db)
    assert store.recorded_overlap() == 2
    store.close()
    assert "(overlap 1)" in invoke("serve", "--db", tmp_path / "new.sqlite", "--pairs", pairs).output
    assert len(served) == 4


def test_serve_on_a_public_address_warns_of_plain_http(tmp_path, monkeypatch):
    """--host 0.0.0.0 printed only "serving ... at http://0.0.0.0", never that login links and
    cookies then cross the network unencrypted."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    db = tmp_path / "labels.sqlite"
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(2))
    assert invoke("add-annotator", "alice", "--db", db).exit_code == 0
    warning = "over plain HTTP: login links and cookies travel unencrypted"
    assert warning in invoke("serve", "--db", db, "--pairs", pairs, "--host", "0.0.0.0").output
    assert warning not in invoke("serve", "--db", db, "--host", "127.0.0.1").output


def test_serve_counts_one_pair_in_the_singular(tmp_path, monkeypatch):
    """It said "1 new pairs" and "serving 1 pairs"."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(1))
    output = invoke("serve", "--db", tmp_path / "labels.sqlite", "--pairs", pairs).output
    assert "1 new pair, 0 already in" in output and "serving 1 pair at" in output


def test_a_db_in_a_missing_folder_or_a_folder_as_db_says_so(tmp_path):
    """Both read "not a usable labels database (unable to open database file)", as if a
    database were damaged."""
    result = invoke("add-annotator", "gina", "--db", tmp_path / "no-such-folder" / "x.sqlite")
    assert "which does not exist" in str(result.exception)
    result = invoke("add-annotator", "gina", "--db", tmp_path)
    assert f"--db {tmp_path} is a folder" in str(result.exception)


def test_import_and_serve_name_the_pairs_export_will_leave_out_whatever_the_votes(tmp_path, monkeypatch):
    """Pairs with identical responses or an empty one were served without a word, and every
    vote on them was spent for nothing: export leaves them out of D."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", [
        *make_pairs(2), Pair("same", "p", ("Yes.", "Yes.")), Pair("blank", "p", ("an answer", " ")),
        Pair("same too", "p", ("No.", "No."))])
    note = (f"{pairs}: 3 pairs (empty response 1, identical responses 2) will be left out of D by "
            f"`label export` whatever the votes")
    assert note in invoke("import", "--pairs", pairs, "--db", tmp_path / "a.sqlite").output
    assert note in invoke("serve", "--pairs", pairs, "--db", tmp_path / "b.sqlite").output
    one = write_pairs_file(tmp_path / "one.jsonl", [*make_pairs(2), Pair("same", "p", ("Yes.", "Yes."))])
    assert (f"{one}: 1 pair (identical responses 1) will be left out of D by `label export` whatever the "
            f"votes, since training cannot use it; to spare the annotators that work, remove it from {one}"
            ) in invoke("import", "--pairs", one, "--db", tmp_path / "d.sqlite").output
    clean = write_pairs_file(tmp_path / "clean.jsonl", make_pairs(2))
    assert "left out of D" not in invoke("import", "--pairs", clean, "--db", tmp_path / "c.sqlite").output


@pytest.mark.parametrize("cut, words", [
    (1, "1 response (with its prompt) was longer than the reward model's 8 tokens and was scored"),
    (2, "2 responses (with their prompts) were longer than the reward model's 8 tokens and were scored"),
])
def test_auto_counts_the_responses_the_reward_model_cut(tmp_path, monkeypatch, cut, words):
    """It said "1 responses ... were longer", then "1 response (with their prompts)"."""
    import preftune.labeling.auto

    stats = {"written": 1, "resumed_from": 0, "reward_truncated": cut, "reward_max_length": 8}
    monkeypatch.setattr(preftune.labeling.auto, "label_auto", lambda *args, **kwargs: stats)
    result = invoke("auto", "--pairs", tmp_path / "pairs.jsonl", "--reward", "rm",
                    "--out", tmp_path / "D.jsonl")
    assert words in result.output, result.output
