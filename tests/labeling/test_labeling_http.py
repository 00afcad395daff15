"""Every route of the labeling app through Starlette's TestClient, refusals included."""

import re
import sqlite3

import pytest
from labeling_helpers import make_pairs
from starlette.testclient import TestClient

from preftune.errors import UserError
from preftune.labeling.app import MAX_BODY, check_bind, create_app, is_loopback
from preftune.labeling.store import Store


def snapshot(store):
    """Everything a request could change, read through a separate connection."""
    with sqlite3.connect(store.path) as db:
        return (
            db.execute("SELECT * FROM votes ORDER BY id").fetchall(),
            db.execute("SELECT * FROM assignments ORDER BY pair_id, annotator_id").fetchall(),
            db.execute("SELECT pair_id, filled, done FROM pairs ORDER BY seq").fetchall(),
            db.execute("SELECT * FROM annotators ORDER BY id").fetchall(),
        )


def vote(client, pair_id, choice="left", key="k-000001", headers=None, **extra):
    return client.post("/api/vote", json={"pair_id": pair_id, "choice": choice, "key": key,
                                          **extra}, headers=headers)


def test_page_needs_login_and_has_no_inline_script(store, alice):
    anonymous = TestClient(create_app(store))
    page = anonymous.get("/")
    assert page.status_code == 401 and "personal link" in page.text
    _, client = alice
    page = client.get("/")
    assert page.status_code == 200
    assert '<script src="/static/app.js" defer></script>' in page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "inline script in the page"
    assert " on" not in re.sub(r"\s+", " ", page.text).lower().replace(" one", "")


def test_login_sets_a_private_cookie_and_refuses_bad_tokens(store):
    token = store.add_annotator("bob")
    client = TestClient(create_app(store))
    response = client.post("/login", params={"token": token}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    for bad in ["", "nonsense", token[:-1] + ("A" if token[-1] != "A" else "B"),
                "000000000000." + token.split(".")[1]]:
        for method in ["GET", "POST"]:
            response = TestClient(create_app(store)).request(
                method, "/login", params={"token": bad}, follow_redirects=False)
            assert response.status_code == 401 and "set-cookie" not in response.headers


def test_a_login_link_only_asks_and_another_site_cannot_answer(store, alice):
    """Login CSRF: a link to /login?token= with someone else's token signed the browser in as
    them at once, and the annotator's votes went to that name. Opening a link now only asks
    "Sign in as NAME?"; the page's button POSTs, and a POST from another site is refused."""
    _, client = alice
    mallory = store.add_annotator("mallory")
    question = client.get("/login", params={"token": mallory}, follow_redirects=False)
    assert question.status_code == 200 and "set-cookie" not in question.headers
    assert "Sign in as mallory?" in question.text
    assert "This browser is signed in as alice now" in question.text
    assert '<form method="post"' in question.text and "action=" not in question.text
    assert not re.search(r"<script", question.text), "no script at all"
    assert client.get("/api/next").json()["annotator"] == "alice", "the link changed nothing"

    forged = client.post("/login", params={"token": mallory}, follow_redirects=False,
                         headers={"origin": "http://evil.example"})
    assert forged.status_code == 403 and "set-cookie" not in forged.headers
    assert client.get("/api/next").json()["annotator"] == "alice"

    # The button on the question page: the browser names this server as the Origin.
    answered = client.post("/login", params={"token": mallory}, follow_redirects=False,
                           headers={"origin": "http://testserver"})
    assert answered.status_code == 303 and "preftune_token=" in answered.headers["set-cookie"]
    assert client.get("/api/next").json()["annotator"] == "mallory"


def test_a_head_request_to_a_login_link_signs_no_one_in(store, alice):
    """HEAD, a safe method the Origin check lets through (and a page on any site can send with
    fetch), set the cookie as the button's POST does, without the question."""
    _, client = alice
    mallory = store.add_annotator("mallory")
    head = client.head("/login", params={"token": mallory}, follow_redirects=False,
                       headers={"origin": "http://evil.example"})
    assert head.status_code == 200 and "set-cookie" not in head.headers
    assert client.get("/api/next").json()["annotator"] == "alice"


def test_opening_ones_own_link_again_goes_straight_to_the_page(store, alice):
    token, client = alice
    again = client.get("/login", params={"token": token}, follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/"
    assert "set-cookie" not in again.headers
    fresh = TestClient(create_app(store)).get("/login", params={"token": token})
    assert fresh.status_code == 200 and "Sign in as alice?" in fresh.text
    assert "signed in as" not in fresh.text.replace("Sign in as", "")


@pytest.mark.parametrize("path", ["/", "/login?token=x", "/api/next", "/healthz",
                                  "/static/app.js", "/static/missing.js", "/nowhere"])
def test_every_response_carries_the_security_headers(alice, path):
    _, client = alice
    response = client.get(path, follow_redirects=False)
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "default-src 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"


def test_next_shows_both_responses_in_a_recorded_order(store, alice):
    _, client = alice
    first = client.get("/api/next").json()
    pair = first["pair"]
    stored = store.pairs()[pair["pair_id"]]
    assert {pair["left"], pair["right"]} == set(stored["responses"])
    assert pair["prompt"] == stored["prompt"]
    assert first["annotator"] == "alice"
    assert first["progress"] == {"done": 0, "remaining": 6, "total": 6}
    assert client.get("/api/next").json()["pair"] == pair, "a reload shows the same pair"
    assert vote(client, pair["pair_id"], "left").json()["saved"] is True
    saved = store.live_votes()[0]
    assert stored["responses"][saved["left_index"]] == pair["left"]


def test_replayed_vote_is_stored_once(store, alice):
    _, client = alice
    pair_id = client.get("/api/next").json()["pair"]["pair_id"]
    assert vote(client, pair_id, key="replay-1").status_code == 200
    before = snapshot(store)
    again = vote(client, pair_id, key="replay-1")
    assert again.status_code == 409 and again.json()["already_saved"] is True
    other_key = vote(client, pair_id, key="replay-2")
    assert other_key.status_code == 409 and "already voted" in other_key.json()["error"]
    assert snapshot(store) == before


@pytest.mark.parametrize("body, status, words", [
    ({"pair_id": "p99999", "choice": "left", "key": "k-000001"}, 404, "unknown pair"),
    ({"pair_id": "p00005", "choice": "left", "key": "k-000001"}, 409, "not given to you"),
    ({"pair_id": "p00000", "choice": "best", "key": "k-000001"}, 422, "choice"),
    ({"pair_id": "p00000", "choice": "left"}, 422, "key"),
    ({"pair_id": "p00000", "choice": "left", "key": "short"}, 422, "key"),
    ({"pair_id": 7, "choice": "left", "key": "k-000001"}, 422, "pair_id"),
    ({"pair_id": "p00000", "choice": "left", "key": "k-000001", "admin": True}, 422, "unknown"),
    ({"pair_id": "p00000", "choice": "left", "key": "k-000001", "reason": "x" * 2001}, 422,
     "reason"),
    ({"pair_id": "p00000", "choice": "left", "key": "k-000001", "reason": 5}, 422, "reason"),
])
def test_bad_votes_are_refused_and_change_nothing(store, alice, body, status, words):
    _, client = alice
    assert client.get("/api/next").json()["pair"]["pair_id"] == "p00000"
    before = snapshot(store)
    response = client.post("/api/vote", json=body)
    assert response.status_code == status
    assert words in response.json()["error"]
    assert snapshot(store) == before


@pytest.mark.parametrize("content, content_type, status", [
    (b"{not json", "application/json", 400),
    (b"\xff\xfe", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b"[" * 20_000 + b"]" * 20_000, "application/json", 400),  # json's parser recurses past the limit
    (b'{"pair_id": "p00000", "choice": "left", "key": "k-000001"}', "text/plain", 415),
    (b"pair_id=p00000&choice=left", "application/x-www-form-urlencoded", 415),
    # A lone surrogate is valid JSON but not storable text; it was a 500 from SQLite.
    (rb'{"pair_id": "p00000", "choice": "left", "key": "k-000001", "reason": "\ud800"}',
     "application/json", 400),
    (rb'{"pair_id": "p\udfff", "choice": "left", "key": "k-000001"}', "application/json", 400),
])
def test_malformed_bodies_are_refused(store, alice, content, content_type, status):
    _, client = alice
    client.get("/api/next")
    before = snapshot(store)
    response = client.post("/api/vote", content=content, headers={"content-type": content_type})
    assert response.status_code == status and response.json()["error"]
    assert snapshot(store) == before


def test_bodies_over_64_kib_get_413_declared_or_streamed(store, alice):
    _, client = alice
    pair_id = client.get("/api/next").json()["pair"]["pair_id"]
    before = snapshot(store)
    big = b'{"pair_id": "%s", "choice": "left", "key": "k-000001", "reason": "' % pair_id.encode()
    big += b"x" * MAX_BODY + b'"}'
    response = client.post("/api/vote", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "unsafe-inline" not in response.headers["content-security-policy"]

    def chunks():  # no content-length: the cap must hold while streaming
        for _ in range(20):
            yield b"x" * 8192

    response = client.post("/api/vote", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert snapshot(store) == before


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/next"), ("POST", "/api/vote"), ("POST", "/api/undo"),
    ("GET", "/api/progress"), ("GET", "/api/guidelines"),
])
def test_api_without_a_valid_token_is_401(store, method, path):
    token = store.add_annotator("carol")
    before = snapshot(store)
    for headers in [{}, {"authorization": "Bearer " + token[:-2] + "zz"},
                    {"authorization": "Bearer garbage"}]:
        client = TestClient(create_app(store))
        response = client.request(method, path, json={} if method == "POST" else None,
                                  headers=headers)
        assert response.status_code == 401, headers
        assert "token" in response.json()["error"]
    assert snapshot(store) == before


def test_revoked_annotator_is_locked_out_at_once(store, alice):
    _, client = alice
    assert client.get("/api/next").status_code == 200
    store.revoke_annotator("alice")
    assert client.get("/api/next").status_code == 401
    assert client.get("/").status_code == 401


def test_undo_brings_the_pair_back(store, alice):
    _, client = alice
    assert client.post("/api/undo", json={}).status_code == 409
    first = client.get("/api/next").json()["pair"]["pair_id"]
    vote(client, first, "right", key="undo-0001")
    second = client.get("/api/next").json()["pair"]["pair_id"]
    assert second != first
    assert client.post("/api/undo", json={"vote_id": 999}).status_code == 409
    assert client.post("/api/undo", json={"vote_id": "1"}).status_code == 422
    assert client.post("/api/undo", json={"vote_id": 2**63}).status_code == 422  # was a 500
    undone = client.post("/api/undo", json={}).json()["undone"]
    assert undone["pair_id"] == first and undone["choice"] == "right"
    assert store.live_votes() == []
    assert client.get("/api/next").json()["pair"]["pair_id"] == first, "undone pair first"
    assert vote(client, first, "tie", key="undo-0002").status_code == 200
    assert client.get("/api/next").json()["pair"]["pair_id"] == second
    assert [v["choice"] for v in store.live_votes()] == ["tie"]


def test_progress_and_guidelines(store, alice):
    _, client = alice
    for i in range(6):
        pair_id = client.get("/api/next").json()["pair"]["pair_id"]
        vote(client, pair_id, "skip" if i == 0 else "left", key=f"prog-{i:04d}")
    assert client.get("/api/progress").json() == {"done": 6, "remaining": 0, "total": 6}
    finished = client.get("/api/next").json()
    assert finished["pair"] is None and finished["progress"]["remaining"] == 0
    assert "Both bad" in client.get("/api/guidelines").json()["text"]
    custom = TestClient(create_app(store, guidelines="Prefer <b>short</b> answers."))
    custom.cookies.set("preftune_token", alice[0])
    assert custom.get("/api/guidelines").json() == {"text": "Prefer <b>short</b> answers."}


def test_logout_and_healthz(alice):
    _, client = alice
    assert client.get("/healthz").json() == {"ok": True}
    response = client.post("/logout", headers={"origin": "http://testserver"})
    assert response.status_code == 200
    cookie = response.headers["set-cookie"].lower()  # the cookie that deletes the token's
    assert "httponly" in cookie and "samesite=lax" in cookie
    assert client.get("/api/next").status_code == 401


@pytest.mark.parametrize("headers", [
    {"origin": "http://evil.example"},
    {"origin": "null"},  # what a sandboxed frame or a no-referrer page sends
    {"origin": "https://testserver"},  # same host, other scheme: another origin
    {"origin": "http://testserver:8080"},
    {"origin": "http://testserver.evil.example"},
    {"referer": "http://evil.example/prize.html?x=1"},  # no Origin: the Referer decides
    {"origin": "http://evil.example", "referer": "http://testserver/"},
])
@pytest.mark.parametrize("path", ["/api/vote", "/api/undo", "/logout"])
def test_another_sites_page_cannot_vote_undo_or_sign_out(store, alice, headers, path):
    """A form or script on another site rode on the annotator's cookie: a cross-site form could
    sign them out. Every POST from a page of another origin is now refused, unread."""
    _, client = alice
    vote(client, client.get("/api/next").json()["pair"]["pair_id"], key="k-before")
    shown = client.get("/api/next").json()["pair"]["pair_id"]
    body = {"/api/vote": {"pair_id": shown, "choice": "left", "key": "k-forged"},
            "/api/undo": {}, "/logout": None}[path]
    before = snapshot(store)
    response = client.post(path, json=body, headers=headers)
    assert response.status_code == 403 and "set-cookie" not in response.headers
    error = response.json()["error"]
    assert "came from another site" in error and "http://testserver" in error
    assert "prize.html" not in error, "only the origin is repeated"
    assert snapshot(store) == before
    assert client.get("/api/next").status_code == 200, "still signed in"


@pytest.mark.parametrize("headers", [
    {}, {"origin": "http://testserver"}, {"origin": "http://TestServer:80"},
    {"referer": "http://testserver/"},
])
def test_own_pages_and_scripts_without_an_origin_may_vote(store, alice, headers):
    _, client = alice
    pair_id = client.get("/api/next").json()["pair"]["pair_id"]
    assert vote(client, pair_id, headers=headers).status_code == 200
    assert client.get("/api/next", headers={"origin": "http://evil.example"}).status_code == 200, \
        "a GET changes nothing, and no CORS header lets another site read its answer"


@pytest.mark.parametrize("path", ["/static/%2e%2e/store.py", "/static/..%2fstore.py",
                                  "/static/%2e%2e%2fstore.py", "/static//etc/passwd",
                                  "/static/../app.py", "/templates/index.html"])
def test_static_files_never_leave_the_static_folder(alice, path):
    _, client = alice
    response = client.get(path)
    assert response.status_code == 404
    assert "import" not in response.text and "root:" not in response.text


def test_static_assets_are_served(alice):
    _, client = alice
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "innerHTML" not in js.text.replace("never innerHTML", "")
    assert client.get("/static/app.css").status_code == 200


def test_open_mode_votes_anonymously_on_loopback_hosts_only(store):
    client = TestClient(create_app(store, open_mode=True), base_url="http://127.0.0.1:8000")
    pair_id = client.get("/api/next").json()["pair"]["pair_id"]
    assert vote(client, pair_id, key="open-0001").status_code == 200
    assert store.live_votes()[0]["annotator"] == "(open)"
    rebound = TestClient(create_app(store, open_mode=True), base_url="http://evil.example")
    assert rebound.get("/api/next").status_code == 400
    wrong_token = client.get("/api/next", headers={"authorization": "Bearer nope"})
    assert wrong_token.status_code == 401


def test_overlap_gives_each_pair_to_k_different_annotators(tmp_path):
    store = Store(tmp_path / "o.sqlite", overlap=2)
    store.add_pairs(make_pairs(4))
    clients = {}
    for name in ["a", "b", "c"]:
        clients[name] = TestClient(create_app(store))
        clients[name].cookies.set("preftune_token", store.add_annotator(name))
    seen = {name: [] for name in clients}
    for round_ in range(6):
        for name, client in clients.items():
            pair = client.get("/api/next").json()["pair"]
            if pair:
                seen[name].append(pair["pair_id"])
                assert vote(client, pair["pair_id"], key=f"{name}-vote-{round_:05d}").status_code == 200
    for name, ids in seen.items():
        assert len(ids) == len(set(ids)), f"{name} saw a pair twice"
    per_pair = {}
    for ids in seen.values():
        for pair_id in ids:
            per_pair[pair_id] = per_pair.get(pair_id, 0) + 1
    assert per_pair == {p.pair_id: 2 for p in make_pairs(4)}
    store.close()


def test_a_skip_does_not_use_up_the_pair(tmp_path):
    store = Store(tmp_path / "s.sqlite", overlap=1)
    store.add_pairs(make_pairs(1))
    a, b = (store.authenticate(store.add_annotator(n)) for n in ["a", "b"])
    assert store.next_pair(a)["pair_id"] == "p00000"
    assert store.next_pair(b) is None, "reserved by a while a looks at it"
    store.record_vote(a, "p00000", "skip", None, "skip-0001")
    assert store.next_pair(a) is None
    assert store.next_pair(b)["pair_id"] == "p00000"
    store.close()


def test_an_abandoned_assignment_frees_its_slot_after_the_lease(tmp_path):
    store = Store(tmp_path / "l.sqlite", overlap=1, lease_s=-1)  # every lease already expired
    store.add_pairs(make_pairs(1))
    a, b = (store.authenticate(store.add_annotator(n)) for n in ["a", "b"])
    assert store.next_pair(a)["pair_id"] == "p00000"
    assert store.next_pair(b)["pair_id"] == "p00000"
    store.close()


def test_the_pair_a_revoked_annotator_held_goes_to_others_at_once(tmp_path):
    store = Store(tmp_path / "l.sqlite", overlap=1)
    store.add_pairs(make_pairs(1))
    a, b = (store.authenticate(store.add_annotator(n)) for n in ["a", "b"])
    assert store.next_pair(a)["pair_id"] == "p00000"
    assert store.next_pair(b) is None  # a holds the only slot
    store.revoke_annotator("a")
    assert store.next_pair(b)["pair_id"] == "p00000"
    store.add_annotator("a", reissue=True)
    assert store.next_pair(a)["pair_id"] == "p00000"  # still theirs to answer too
    store.close()


def test_binding_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_public_address_needs_tokens(tmp_path):
    store = Store(tmp_path / "b.sqlite")
    check_bind("127.0.0.1", open_mode=True, store=store)
    with pytest.raises(UserError, match="loopback"):
        check_bind("0.0.0.0", open_mode=True, store=store)
    with pytest.raises(UserError, match="add-annotator"):
        check_bind("0.0.0.0", open_mode=False, store=store)
    store.add_annotator("dana")
    check_bind("0.0.0.0", open_mode=False, store=store)
    store.close()


def test_what_the_page_needs_to_recover_without_a_reload(store, alice):
    """The 409s tell a stale page apart from a lost answer, and undo gives the reason back."""
    _, client = alice
    pair_id = client.get("/api/next").json()["pair"]["pair_id"]
    assert vote(client, pair_id, "left", key="first-try", reason="clearer").status_code == 200
    # The answer to the first try was lost; the retry carries the same key but another choice.
    retry = vote(client, pair_id, "right", key="first-try").json()
    assert retry["already_saved"] is True and retry["choice"] == "left", "the stored choice"
    # Another tab of the same annotator still shows the pair, with its own key.
    other_tab = vote(client, pair_id, "tie", key="other-tab").json()
    assert other_tab["stale"] is True and "already_saved" not in other_tab
    not_mine = vote(client, "p00005", "tie", key="not-mine").json()
    assert not_mine["stale"] is True
    undone = client.post("/api/undo", json={}).json()["undone"]
    assert undone == {"vote_id": 1, "pair_id": pair_id, "choice": "left", "reason": "clearer"}


def test_next_says_how_many_pairs_others_hold(tmp_path):
    store = Store(tmp_path / "w.sqlite", overlap=1)
    store.add_pairs(make_pairs(3))
    clients = {}
    for name in ["a", "b"]:
        clients[name] = TestClient(create_app(store))
        clients[name].cookies.set("preftune_token", store.add_annotator(name))
    held = clients["b"].get("/api/next").json()["pair"]["pair_id"]  # b looks at one, no vote
    for i in range(2):
        shown = clients["a"].get("/api/next").json()
        assert shown["waiting"] == 0
        assert vote(clients["a"], shown["pair"]["pair_id"], key=f"a-vote-{i}").status_code == 200
    finished = clients["a"].get("/api/next").json()
    assert finished["pair"] is None and finished["waiting"] == 1
    assert finished["progress"] == {"done": 2, "remaining": 0, "total": 2}
    assert vote(clients["b"], held, key="b-vote-0").status_code == 200
    assert clients["a"].get("/api/next").json()["waiting"] == 0, "nothing left anywhere"
    store.close()
