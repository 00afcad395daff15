"""The labeling server as a real process: many annotators at once, kill -9, raw HTTP."""

import os
import re
import signal
import socket
import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from labeling_helpers import make_pairs, running_server

from preftune.labeling.store import Store


def prepare_db(path, n_pairs, n_annotators):
    store = Store(path)
    store.add_pairs(make_pairs(n_pairs))
    tokens = [store.add_annotator(f"annotator{i:02d}") for i in range(n_annotators)]
    store.close()
    return tokens


def annotate(url, token, max_votes, replay):
    """Vote until no pair is left (bounded); returns the acknowledged vote ids."""
    acked = []
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for i in range(max_votes + 1):
            pair = client.get("/api/next").json()["pair"]
            if pair is None:
                break
            body = {"pair_id": pair["pair_id"], "choice": ["left", "right", "tie"][i % 3],
                    "key": f"{token[:12]}-{i:06d}"}
            response = client.post("/api/vote", json=body)
            assert response.status_code == 200, response.text
            acked.append(response.json()["vote_id"])
            if replay:  # a browser retrying after a lost answer
                again = client.post("/api/vote", json=body)
                assert again.status_code == 409 and again.json()["vote_id"] == acked[-1]
    return acked


def check_stored_once(db, acked, n_annotators, votes_each):
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, annotator_id, pair_id FROM votes").fetchall()
    assert sorted(r[0] for r in rows) == sorted(acked), "acknowledged votes == stored votes"
    assert len({(r[1], r[2]) for r in rows}) == len(rows), "an annotator voted a pair twice"
    per_annotator = Counter(r[1] for r in rows)
    assert len(per_annotator) == n_annotators
    assert set(per_annotator.values()) == {votes_each}


def run_crowd(tmp_path, n_annotators, votes_each, replay):
    db = tmp_path / "crowd.sqlite"
    tokens = prepare_db(db, votes_each, n_annotators)
    with running_server(db, "--overlap", str(n_annotators)) as (url, _):
        start = time.perf_counter()
        with ThreadPoolExecutor(n_annotators) as pool:
            results = list(pool.map(lambda t: annotate(url, t, votes_each, replay), tokens))
        elapsed = time.perf_counter() - start
    acked = [vote_id for ids in results for vote_id in ids]
    assert len(acked) == n_annotators * votes_each
    check_stored_once(db, acked, n_annotators, votes_each)
    return len(acked) / elapsed


def test_20_annotators_50_votes_each_with_replays(tmp_path):
    rate = run_crowd(tmp_path, n_annotators=20, votes_each=50, replay=True)
    print(f"\n20 x 50 votes (each replayed once): {rate:.0f} votes/s")


@pytest.mark.slow
def test_bench_50_annotators_100_votes_each(tmp_path):
    rate = run_crowd(tmp_path, n_annotators=50, votes_each=100, replay=False)
    print(f"\n50 x 100 votes: {rate:.0f} votes/s sustained (vote + next pair per vote)")
    assert rate > 20


def test_an_acknowledged_vote_survives_kill_9(tmp_path):
    db = tmp_path / "kill.sqlite"
    [token] = prepare_db(db, 5, 1)
    acked = []
    with running_server(db) as (url, proc):
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}) as client:
            for i in range(3):
                pair_id = client.get("/api/next").json()["pair"]["pair_id"]
                response = client.post("/api/vote", json={
                    "pair_id": pair_id, "choice": "right", "key": f"kill-{i:06d}"})
                assert response.json()["saved"] is True
                acked.append((response.json()["vote_id"], pair_id))
        os.kill(proc.pid, signal.SIGKILL)  # right after the last acknowledgement
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    store = Store(db, must_exist=True)
    stored = [(v["id"], v["pair_id"]) for v in store.live_votes()]
    store.close()
    assert stored == acked


def raw_get(url, target):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("latin-1")


def test_no_path_escapes_the_static_folder_over_raw_http(tmp_path):
    db = tmp_path / "raw.sqlite"
    prepare_db(db, 1, 1)
    with running_server(db) as (url, _):
        assert raw_get(url, "/static/app.css").startswith("HTTP/1.1 200")
        for target in ["/static/../store.py", "/static/../../labeling/app.py",
                       "/static/..%2fstore.py", "/static/%2e%2e/%2e%2e/records.py",
                       "/static/....//store.py", "/static/%2fetc%2fpasswd"]:
            answer = raw_get(url, target)
            status = answer.split("\r\n", 1)[0]
            assert status.split()[1] in {"400", "404"}, (target, status)
            assert "import " not in answer and "root:" not in answer


def test_the_page_waits_longer_than_a_locked_database_may_hold_a_vote():
    # app.js gives up on an answer after ANSWER_TIMEOUT_MS; a write waiting on a locked database
    # (store.py's busy_timeout) must be answered before that, or every such vote reads as lost.
    package = Path(__file__).resolve().parents[2] / "src" / "preftune" / "labeling"
    page = int(re.search(r"ANSWER_TIMEOUT_MS = (\d+);", (package / "static" / "app.js").read_text()).group(1))
    database = int(re.search(r"PRAGMA busy_timeout=(\d+)", (package / "store.py").read_text()).group(1))
    assert page > database, f"the page gives up after {page} ms, a locked database may take {database} ms"
