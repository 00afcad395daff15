"""An annotator in a real headless Chromium, against a real `label serve` subprocess."""

import json
import os
import re
from urllib.parse import urlsplit

import pytest
from labeling_helpers import make_pairs, running_server

from preftune.labeling.export import export
from preftune.labeling.pairs import Pair
from preftune.labeling.store import Store

pytestmark = pytest.mark.browser


def prepare(db, pairs):
    store = Store(db)
    store.add_pairs(pairs)
    token = store.add_annotator("grace")
    store.close()
    return token


def add_annotator(db, name):
    """A second annotator's login token."""
    store = Store(db)
    token = store.add_annotator(name)
    store.close()
    return token


def sign_in(page, url, token):
    """Open a login link and answer its question, as an annotator does."""
    page.goto(f"{url}/login?token={token}")
    page.get_by_role("button", name=re.compile("^Sign in as ")).click()
    page.wait_for_url(f"{url}/")


def shown_pair_index(page):
    """Which pair is on screen, and whether its first response is on the left."""
    left = page.locator("#left").text_content()
    right = page.locator("#right").text_content()
    match = re.fullmatch(r"(first|second) answer (\d+)", left)
    assert match and right == f"{'second' if match[1] == 'first' else 'first'} answer {match[2]}"
    return int(match[2]), match[1] == "first"


def wait_progress(page, done, left):
    """Wait for the progress to read `done` and `left`, and for the pair then on screen (if
    any) to take votes: a new pair ignores them for a moment (READ_AT_LEAST_MS in app.js)."""
    from playwright.sync_api import expect

    expect(page.locator("#progress-text")).to_have_text(f"{done} done · {left} left")
    expect(page.locator("#task:not([hidden]):not([data-pair-ready])")).to_have_count(0)


def test_vote_by_keyboard_and_mouse_then_undo(page, tmp_path):
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(4))
    with running_server(db) as (url, _):
        page.goto(f"{url}/login?token={token}")
        expect(page.get_by_role("heading", name="Sign in as grace?")).to_be_visible()
        page.get_by_role("button", name="Sign in as grace").click()
        wait_progress(page, 0, 4)
        assert page.url == f"{url}/", "the token leaves the address bar"
        wait_progress(page, 0, 4)
        expect(page.locator("#annotator")).to_have_text("grace")
        shot = os.environ.get("PREFTUNE_SCREENSHOT") or str(tmp_path / "page.png")
        page.screenshot(path=shot, full_page=True)

        first, first_on_left = shown_pair_index(page)
        page.keyboard.press("1")  # left is better
        wait_progress(page, 1, 3)
        second, _ = shown_pair_index(page)
        page.get_by_role("button", name=re.compile("Right is better")).click()
        wait_progress(page, 2, 2)
        page.keyboard.press("u")  # the mouse vote on `second` is withdrawn...
        wait_progress(page, 1, 3)
        assert shown_pair_index(page)[0] == second, "...and its pair comes back"
        page.keyboard.press("t")
        wait_progress(page, 2, 2)
        third, _ = shown_pair_index(page)
        page.locator("#reason").fill("both miss the point; 1 and t typed here are not keys")
        page.get_by_role("button", name=re.compile("Both bad")).click()
        wait_progress(page, 3, 1)
        page.keyboard.press("g")
        expect(page.locator("#guidelines-text")).to_contain_text("Both bad")

    store = Store(db)
    votes = store.live_votes()
    store.close()
    assert [(v["pair_id"], v["choice"]) for v in votes] == [
        (f"p{first:05d}", "left"), (f"p{second:05d}", "tie"), (f"p{third:05d}", "both_bad")]
    assert votes[0]["left_index"] == (0 if first_on_left else 1)
    assert votes[2]["reason"].startswith("both miss the point")
    out = tmp_path / "D.jsonl"
    export(db, out)
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    winner = "first" if first_on_left else "second"
    assert row["pair_id"] == f"p{first:05d}" and row["chosen"] == f"{winner} answer {first}"


PAYLOADS = [
    "<script>window.__pwned = 'script'; alert(1)</script>",
    "<img src=x onerror=\"window.__pwned = 'img'; alert(2)\">",
]


def test_hostile_responses_show_as_text(page, tmp_path):
    db = tmp_path / "labels.sqlite"
    prompt = [{"role": "user", "content": "<b>bold?</b><svg onload=alert(3)>"},
              {"role": "<img src=x onerror=alert(4)>", "content": "<iframe src=javascript:alert(5)>"}]
    token = prepare(db, [Pair("evil", prompt, tuple(PAYLOADS))])
    dialogs, csp_reports = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: csp_reports.append(m.text))
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 1)
        shown = {page.locator("#left").text_content(), page.locator("#right").text_content()}
        assert shown == set(PAYLOADS)
        assert "<b>bold?</b><svg onload=alert(3)>" in page.locator("#prompt").text_content()
        assert page.locator("#task img, #task script, #task svg, #task iframe, #task b").count() == 0
        page.wait_for_timeout(300)
        assert page.evaluate("window.__pwned") is None
    assert dialogs == []


def test_left_right_order_is_balanced(page, tmp_path):
    n = 80
    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(n))
    first_on_left = 0
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        for done in range(n):
            wait_progress(page, done, n - done)
            first_on_left += shown_pair_index(page)[1]
            page.keyboard.press("2" if done % 2 else "1")
        wait_progress(page, n, 0)
        assert page.locator("#finished").is_visible()
    # Fair coin: mean n/2, sd sqrt(n)/2 ~ 4.5; 4 sd fails a correct server once in 15,000 runs.
    assert abs(first_on_left - n / 2) <= 4 * (n ** 0.5) / 2, first_on_left
    store = Store(db)
    left_votes = sum(v["choice"] == "left" for v in store.live_votes())
    store.close()
    assert left_votes == n // 2



def stored_votes(db):
    store = Store(db)
    votes = [(v["pair_id"], v["choice"]) for v in store.live_votes()]
    store.close()
    return votes


def test_a_stopped_server_is_said_and_no_vote_is_lost_or_doubled(page, tmp_path):
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    banner = page.locator("#banner")
    # Later a vote reaches the server but its answer is lost. The route is in place from the
    # start and switched on by a flag: a route added just before a key press can miss the
    # request it was meant for on a loaded machine.
    lose_answers, lost = [], []

    def maybe_lose_the_answer(route):
        if not lose_answers:
            route.continue_()
            return
        if not lost:
            lost.append(route.fetch().status)
        route.abort()

    page.route("**/api/vote", maybe_lose_the_answer)
    with running_server(db) as (url, proc):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        first, _ = shown_pair_index(page)
        proc.terminate()
        proc.wait()
        page.keyboard.press("1")
        # Four tries over about 3 s, then the banner; generous timeouts for a loaded machine.
        expect(banner).to_contain_text("vote is NOT saved: the server cannot be reached",
                                       timeout=15_000)
        assert not page.locator("#card-left.picked").count(), "no card looks chosen"
        wait_progress(page, 0, 3)
    port = int(url.rsplit(":", 1)[1])
    with running_server(db, port=port):
        expect(banner).to_have_text("The server is back: vote again to save this pair.",
                                    timeout=15_000)
        page.keyboard.press("1")
        wait_progress(page, 1, 2)
        expect(banner).to_be_hidden()
        second, _ = shown_pair_index(page)

        # The vote reaches the server but its answer is lost: the page says "not saved", the
        # annotator presses another key, and the page confirms what was really stored.
        lose_answers.append(True)
        page.keyboard.press("t")
        expect(banner).to_contain_text("NOT saved", timeout=15_000)
        lose_answers.clear()
        page.keyboard.press("b")
        expect(page.locator("#toast")).to_have_text("Saved: Tie")
        wait_progress(page, 2, 1)
    assert lost == [200]
    assert stored_votes(db) == [(f"p{first:05d}", "left"), (f"p{second:05d}", "tie")]


# The server's own answer to a write on a full disk (tests/labeling/test_labeling_disk_full.py).
DISK_FULL = ("the server cannot write to its labels database (the disk it is on is full); your "
             "earlier votes are kept; tell whoever runs the server, then try again.")


def refused_while(disk_full: list, keys: list | None = None):
    """A route answering 503 with DISK_FULL while `disk_full` is non-empty, then passing requests
    to the server; `keys` collects each vote's key."""
    def route_request(route):
        if keys is not None:
            keys.append(route.request.post_data_json["key"])
        if disk_full:
            route.fulfill(status=503, content_type="application/json",
                          body=json.dumps({"error": DISK_FULL}))
        else:
            route.continue_()
    return route_request


def test_a_vote_the_server_could_not_save_stays_said_and_one_press_saves_it_once(page, tmp_path):
    """The labels database cannot be written (a full disk): the vote's 503 sentence was a toast
    in the bottom corner that faded after 6 s, easy to miss while reading the next response.
    It now stays in the top bar until a vote is saved; the pair, the reason typed and the vote's
    key stay, so one press retries and the vote is stored once."""
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    refusal, disk_full, keys = DISK_FULL, [True], []
    page.route("**/api/vote", refused_while(disk_full, keys))
    banner = page.locator("#banner")
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        first, _ = shown_pair_index(page)
        page.locator("#reason").fill("clearer")
        page.keyboard.press("Escape")
        page.keyboard.press("1")
        expect(banner).to_have_text("Not saved: " + refusal)
        assert shown_pair_index(page)[0] == first, "the page stays on the pair"
        assert not page.locator("#card-left.picked").count(), "no card looks chosen"
        expect(page.locator("#reason")).to_have_value("clearer")
        wait_progress(page, 0, 3)

        disk_full.clear()  # space freed
        page.keyboard.press("1")
        wait_progress(page, 1, 2)
        expect(banner).to_be_hidden()
    assert len(keys) == 2 and keys[0] == keys[1], "the retry is the same vote"
    store = Store(db)
    assert [(v["pair_id"], v["choice"], v["reason"]) for v in store.live_votes()] == [
        (f"p{first:05d}", "left", "clearer")]
    store.close()


def test_an_undo_the_server_could_not_save_says_so_and_stays_said(page, tmp_path):
    """An undo refused with a 503 (a full disk) was a fading toast holding only the server's
    sentence, which never said that the vote still stands; it now says 'Not undone: ...' in the
    top bar, and pressing u again once there is room withdraws that one vote."""
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    refusal, disk_full = DISK_FULL, [True]
    page.route("**/api/undo", refused_while(disk_full))
    banner = page.locator("#banner")
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        first, _ = shown_pair_index(page)
        page.keyboard.press("1")
        wait_progress(page, 1, 2)
        page.keyboard.press("u")
        expect(banner).to_have_text("Not undone: " + refusal)
        wait_progress(page, 1, 2)
        disk_full.clear()
        page.keyboard.press("u")
        wait_progress(page, 0, 3)
        expect(banner).to_be_hidden()
        assert shown_pair_index(page)[0] == first
    assert stored_votes(db) == []


def test_a_revoked_link_says_to_ask_for_a_new_one(page, tmp_path):
    """`label revoke-annotator` mid-session: the next vote is a 401. The page said only 'You are
    signed out. Open your personal login link again', and that link, revoked, no longer works;
    it now says why votes are no longer saved and to ask for a new link if it fails."""
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        page.keyboard.press("1")
        wait_progress(page, 1, 2)
        store = Store(db)
        store.revoke_annotator("grace")
        store.close()
        page.keyboard.press("2")
        signed_out = page.locator("#signed-out")
        expect(signed_out).to_be_visible()
        expect(page.locator("#task")).to_be_hidden()
        expect(signed_out).to_contain_text("can no longer save votes (your login link was "
                                           "revoked")
        expect(signed_out).to_contain_text("ask the person running the labeling server for a "
                                           "new one")
        page.goto(f"{url}/login?token={token}")  # the old link: the same advice, no sign-in
        expect(page.locator("body")).to_contain_text("ask the person running the labeling "
                                                     "server for a new one")
        assert page.get_by_role("button", name=re.compile("^Sign in")).count() == 0
    assert len(stored_votes(db)) == 1


NOT_CONFIRMED = ("Your vote is not confirmed: the server has not answered for 45 s. Press your "
                 "choice again; that is safe (a vote the server did save is stored once).")


def vote_left_unanswered(page, tmp_path, reaches_server):
    """Press 1 while the server takes the vote and never answers (a hung proxy, a machine
    asleep behind a tunnel); after 45 s on the page's clock (ANSWER_TIMEOUT_MS in app.js,
    above the store's 30 s busy timeout) the page must give up and say so, then one press
    must save the vote once. With `reaches_server` the vote was saved before the answer
    hung, so the retry is answered 409 already_saved. Returns the statuses the server gave,
    the keys sent and the votes stored."""
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    hang, held, statuses, keys = [True], [], [], []

    def hang_or_answer(route):
        keys.append(route.request.post_data_json["key"])
        if hang:
            if reaches_server:
                statuses.append(route.fetch().status)
            held.append(route)  # neither fulfilled nor aborted: the page waits for its answer
            return
        response = route.fetch()
        statuses.append(response.status)
        route.fulfill(response=response)

    page.clock.install()  # the 45 s pass on the page's clock, moved by hand
    page.route("**/api/vote", hang_or_answer)
    banner = page.locator("#banner")
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        first, _ = shown_pair_index(page)
        with page.expect_request("**/api/vote"):
            page.keyboard.press("1")
        page.clock.run_for(44_000)
        expect(banner).to_be_hidden()  # a locked database may take 30 s: still waiting
        page.clock.run_for(2_000)
        expect(banner).to_have_text(NOT_CONFIRMED)
        assert shown_pair_index(page)[0] == first, "the page stays on the pair"
        assert not page.locator("#card-left.picked").count(), "no card looks chosen"
        wait_progress(page, 0, 3)

        hang.clear()  # the server answers again
        page.keyboard.press("1")
        expect(page.locator("#toast")).to_have_text("Saved: Left is better")
        wait_progress(page, 1, 2)
        expect(banner).to_be_hidden()
        assert shown_pair_index(page)[0] != first, "the next pair is shown"
    assert len(held) == 1
    assert len(keys) == 2 and keys[0] == keys[1], "the retry is the same vote"
    return statuses, stored_votes(db), first


def test_a_vote_left_unanswered_is_given_up_said_and_one_press_saves_it(page, tmp_path):
    """The vote never reached the database: the retry stores it, once."""
    statuses, votes, first = vote_left_unanswered(page, tmp_path, reaches_server=False)
    assert statuses == [200]
    assert votes == [(f"p{first:05d}", "left")]


def test_a_vote_saved_but_left_unanswered_is_shown_saved_after_one_press(page, tmp_path):
    """The vote was saved and only its answer hung: the retry is answered 409 already_saved,
    which the page shows as saved and moves on; one vote is stored."""
    statuses, votes, first = vote_left_unanswered(page, tmp_path, reaches_server=True)
    assert statuses == [200, 409]
    assert votes == [(f"p{first:05d}", "left")]


def test_two_tabs_and_a_second_sign_in_in_one_browser(page, tmp_path):
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(4))
    ada = add_annotator(db, "ada")
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 4)
        tab = page.context.new_page()
        tab.goto(url)
        wait_progress(tab, 0, 4)
        shown, _ = shown_pair_index(page)
        assert shown_pair_index(tab)[0] == shown, "one open pair, shown in both tabs"
        page.keyboard.press("1")
        wait_progress(page, 1, 3)
        tab.keyboard.press("2")  # too late: this pair is answered
        expect(tab.locator("#toast")).to_contain_text("already answered")
        wait_progress(tab, 1, 3)
        assert shown_pair_index(tab)[0] != shown, "the stale tab moved on by itself"

        # Ada opens her link in this browser: the cookie, so the identity, is now hers.
        tab.goto(f"{url}/login?token={ada}")
        expect(tab.locator(".note")).to_have_text("This browser is signed in as grace now; "
                                                  "signing in replaces that.")
        tab.get_by_role("button", name="Sign in as ada").click()
        expect(tab.locator("#annotator")).to_have_text("ada")
        page.keyboard.press("t")
        expect(page.locator("#banner")).to_contain_text("now votes as ada, not grace")
        expect(page.locator("#annotator")).to_have_text("ada")
    assert stored_votes(db) == [(f"p{shown:05d}", "left")]


def test_keyboard_only_focus_typing_and_undo(page, tmp_path):
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        tie = page.get_by_role("button", name=re.compile("^Tie"))
        visited = []
        while not tie.evaluate("b => b === document.activeElement"):
            page.keyboard.press("Tab")
            visited.append(page.evaluate("document.activeElement.id"))
        # Long texts scroll inside their boxes: Tab stops there so that arrows can scroll them.
        assert {"prompt", "left", "right"} <= set(visited), visited
        # The focus ring: at least 3:1 against the page behind it (WCAG 1.4.11).
        ring = tie.evaluate("b => getComputedStyle(b).outlineColor")
        behind = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
        assert contrast(ring, behind) >= 3, (ring, behind)
        page.keyboard.press("Enter")
        wait_progress(page, 1, 2)
        assert tie.evaluate("b => b === document.activeElement"), "focus stays on the button"

        first, _ = shown_pair_index(page)
        page.locator("#reason").press_sequentially("1 2 tbsu g: none of these is a key")
        page.keyboard.press("Escape")
        wait_progress(page, 1, 2)
        expect(page.locator("#guidelines")).to_be_hidden()
        page.keyboard.press("2")
        wait_progress(page, 2, 1)
        page.keyboard.press("u")
        expect(page.locator("#toast")).to_have_text("Undone: your “Right is better” on this "
                                                   "pair; vote again.")
        wait_progress(page, 1, 2)
        assert shown_pair_index(page)[0] == first
        expect(page.locator("#reason")).to_have_value("1 2 tbsu g: none of these is a key")
        # A pasted reason over the server's 2,000 characters is neither cut nor sent.
        long_reason = "Ünïcode reason. " * 130
        page.locator("#reason").fill(long_reason)
        expect(page.locator("#reason-limit")).to_contain_text("2079 characters long")
        page.keyboard.press("Escape")
        page.keyboard.press("1")
        expect(page.locator("#toast")).to_contain_text("Not saved: The reason is 2079 characters")
        expect(page.locator("#reason")).to_have_value(long_reason)
        wait_progress(page, 1, 2)
        page.locator("#reason").fill("short again")
        expect(page.locator("#reason-limit")).to_be_hidden()
        page.keyboard.press("Escape")
        page.keyboard.press("u")  # a second undo goes one vote further back
        expect(page.locator("#toast")).to_contain_text("your “Tie”")
        wait_progress(page, 0, 3)
    assert stored_votes(db) == []


def contrast(first, second):
    """WCAG contrast ratio of two computed CSS colours (rgb()/rgba(), alpha ignored)."""
    def luminance(css):
        channels = [int(c) / 255 for c in re.findall(r"[\d.]+", css)[:3]]
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    high, low = sorted([luminance(first), luminance(second)], reverse=True)
    return (high + 0.05) / (low + 0.05)


ODD = [
    Pair("long", "Write at length.", (
        "\n\n".join(f"Paragraph {i}. " + "A sentence of some length. " * 30 for i in range(40)),
        "x" * 6000)),
    Pair("rtl", "Greet me in Arabic.", ("مرحبا بك. هذه جملة عربية طويلة. " * 200, "   \n\t ")),
    Pair("same", "Say hi.", ("hi", "hi")),
]


@pytest.mark.parametrize("width, height", [(1280, 860), (390, 844)])
def test_long_and_odd_responses_stay_readable(browser, tmp_path, width, height):
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, ODD)
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(10_000)
    no_sideways_scroll = ("document.documentElement.scrollWidth <= "
                          "document.documentElement.clientWidth")
    try:
        with running_server(db) as (url, _):
            sign_in(page, url, token)
            wait_progress(page, 0, 3)
            assert page.evaluate(no_sideways_scroll), "6,000 unbroken characters wrap"
            stacked = width < 860  # then "left" is the top card, and its heading says so
            expect(page.locator("#card-left h2")).to_have_text(
                "LEFT (TOP) 1" if stacked else "LEFT 1", use_inner_text=True)
            for button in page.locator("header button, .controls button").all():
                box = button.bounding_box()
                assert 0 <= box["x"] and box["x"] + box["width"] <= width, button.text_content()
            # Over the top bar (the sign-in button's place may be a response, whose own box a
            # wheel would scroll), read to the end of the page, then vote.
            page.mouse.move(1, 1)
            page.mouse.wheel(0, 3000)
            page.wait_for_timeout(300)
            assert page.evaluate("window.scrollY") > 0
            page.get_by_role("button", name=re.compile("Skip")).click()
            wait_progress(page, 1, 2)
            assert page.evaluate("window.scrollY") == 0, "the next pair starts at its prompt"
            expect(page.locator("#prompt")).to_have_text("Greet me in Arabic.")
            blank = page.locator(".response-text.blank")
            expect(blank).to_have_text("(this response is only whitespace)")
            arabic = page.locator(".response-text:not(.blank)")
            # Right to left text sits against the right edge of its box.
            gap = arabic.evaluate("""el => {
                const range = document.createRange(); range.selectNodeContents(el);
                return el.getBoundingClientRect().right - range.getBoundingClientRect().right; }""")
            assert gap < 2, gap
            assert page.evaluate(no_sideways_scroll)
            expect(page.locator("#identical")).to_be_hidden()
            page.keyboard.press("s")
            wait_progress(page, 2, 1)
            expect(page.locator("#identical")).to_be_visible()
    finally:
        context.close()


def test_the_end_offers_undo_and_says_what_others_hold(page, tmp_path):
    from playwright.sync_api import expect

    from preftune.labeling.status import status

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    bob = add_annotator(db, "bob")
    with running_server(db) as (url, _):
        other = page.context.browser.new_context().new_page()
        sign_in(other, url, bob)  # bob looks at a pair and leaves it open
        wait_progress(other, 0, 3)
        sign_in(page, url, token)
        for done in range(2):
            wait_progress(page, done, 3 - done)
            page.keyboard.press("1")
        wait_progress(page, 2, 0)
        expect(page.locator("#finished")).to_be_visible()
        expect(page.locator("#waiting")).to_contain_text("1 more pair is being labelled by "
                                                          "another annotator")
        page.get_by_role("button", name=re.compile("Undo last vote")).click()
        wait_progress(page, 1, 2)  # "left" counts the pair bob holds too
        page.keyboard.press("2")
        wait_progress(page, 2, 0)
        other.keyboard.press("1")
        wait_progress(other, 1, 0)
        page.get_by_role("button", name="Check for new pairs").click()
        expect(page.locator("#toast")).to_have_text("Still nothing new for you.")
        expect(page.locator("#waiting")).to_be_hidden()
        other.context.close()
    shown = {a["name"]: a["votes"] for a in status(db)["annotators"]}
    assert shown == {"grace": 2, "bob": 1}, "`label status` agrees with the page"


def test_a_response_cut_at_the_token_limit_says_so(page, tmp_path):
    """An annotator must not take a sampler's cut-off ending for the model's own."""
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, [Pair("cut", "Tell a story.", ("Once upon a time the", "The end."),
                              truncated=(True, False)),
                         Pair("whole", "Say hi.", ("hi", "hello"))])
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 2)
        cut_side = "left" if page.locator("#left").text_content() == "Once upon a time the" \
            else "right"
        whole_side = {"left": "right", "right": "left"}[cut_side]
        expect(page.locator(f"#{cut_side}-cut")).to_be_visible()
        expect(page.locator(f"#{cut_side}-cut")).to_contain_text("length limit")
        expect(page.locator(f"#{whole_side}-cut")).to_be_hidden()
        page.keyboard.press("t")
        wait_progress(page, 1, 1)
        expect(page.locator("#left-cut")).to_be_hidden()
        expect(page.locator("#right-cut")).to_be_hidden()


def test_keys_work_on_hebrew_russian_and_french_layouts(page, tmp_path):
    """The shortcuts are keys in their places: on a Hebrew layout T types "א", on a French
    one 1 types "&"; a Latin letter is taken as typed (Dvorak's T key types "y")."""
    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(4))

    def press(key, code):
        page.evaluate("([key, code]) => document.body.dispatchEvent(new KeyboardEvent("
                      "'keydown', {key, code, bubbles: true, cancelable: true}))", [key, code])

    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 4)
        press("y", "KeyT")  # Dvorak: "y" is no shortcut, whatever its place
        page.wait_for_timeout(300)
        wait_progress(page, 0, 4)
        press("א", "KeyT")  # Hebrew: tie
        wait_progress(page, 1, 3)
        press("&", "Digit1")  # French: left
        wait_progress(page, 2, 2)
        press("é", "Digit2")  # French: right
        wait_progress(page, 3, 1)
        press("г", "KeyU")  # Russian: undo the right vote
        wait_progress(page, 2, 2)
        press("и", "KeyB")  # Russian: both bad
        wait_progress(page, 3, 1)
    votes = Store(db).live_votes()
    assert [v["choice"] for v in votes] == ["tie", "left", "both_bad"]


def test_a_reason_in_hebrew_reads_right_to_left(page, tmp_path):
    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(1))
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 1)
        reason = page.locator("#reason")
        reason.fill("התשובה השמאלית נכונה.")
        assert reason.evaluate("el => getComputedStyle(el).direction") == "rtl"
        reason.fill("The left one is right.")
        assert reason.evaluate("el => getComputedStyle(el).direction") == "ltr"


def test_an_undo_whose_answer_was_lost_withdraws_one_vote_not_two(page, tmp_path):
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    lose_answers, lost = [], []

    def maybe_lose_the_answer(route):  # in place from the start, switched on by a flag
        if not lose_answers:
            route.continue_()
            return
        lose_answers.clear()
        lost.append(route.fetch().status)  # the server undoes the vote...
        route.abort()  # ...and the page never hears of it

    page.route("**/api/undo", maybe_lose_the_answer)
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        first, _ = shown_pair_index(page)
        page.keyboard.press("1")
        wait_progress(page, 1, 2)
        second, _ = shown_pair_index(page)
        page.keyboard.press("2")
        wait_progress(page, 2, 1)
        lose_answers.append(True)
        page.keyboard.press("u")
        expect(page.locator("#banner")).to_contain_text("Undo not confirmed", timeout=15_000)
        expect(page.locator("#banner")).to_contain_text("press u again to undo", timeout=15_000)
        page.keyboard.press("u")  # the annotator retries: the same vote, already withdrawn
        expect(page.locator("#toast")).to_have_text("That vote was already undone; vote again.")
        wait_progress(page, 1, 2)
        assert shown_pair_index(page)[0] == second
    assert lost == [200]
    assert stored_votes(db) == [(f"p{first:05d}", "left")], "the first vote stays"


def test_a_double_click_votes_once(page, tmp_path):
    """The next pair is on screen within milliseconds of a vote: the second click of a double
    click must not vote on (or undo) a pair the annotator has not read."""
    db = tmp_path / "labels.sqlite"
    # Prompts of one line each, so that the buttons stay where the first click found them.
    token = prepare(db, [Pair(f"p{i:05d}", f"prompt {i}", (f"first answer {i}",
                                                           f"second answer {i}"))
                         for i in range(3)])

    def first_click(name):
        box = page.get_by_role("button", name=re.compile(name)).bounding_box()
        page.mouse.click(box["x"] + 10, box["y"] + 10)

    def second_click():  # at the same place, as the second click of a double click
        page.mouse.down(click_count=2)
        page.mouse.up(click_count=2)

    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        first, _ = shown_pair_index(page)
        first_click("Left is better")
        # The worst case: the vote is saved and the next pair shown before the second click.
        wait_progress(page, 1, 2)
        second, _ = shown_pair_index(page)
        second_click()
        page.keyboard.press("t")
        wait_progress(page, 2, 1)
        assert stored_votes(db) == [(f"p{first:05d}", "left"), (f"p{second:05d}", "tie")]
        first_click("Undo")  # withdraws the tie...
        wait_progress(page, 1, 2)
        second_click()  # ...and only the tie
        page.keyboard.press("b")
        wait_progress(page, 2, 1)
    assert stored_votes(db) == [(f"p{first:05d}", "left"), (f"p{second:05d}", "both_bad")]


def test_a_double_key_press_or_a_quick_second_click_does_not_vote_on_the_next_pair(page,
                                                                                     tmp_path):
    """Pressing 1 twice 120 ms apart stored a vote on the next pair too, which nobody had read:
    the next pair is on screen within milliseconds of the first vote. A new pair now takes no
    vote until it has been shown for a moment; a deliberate vote after that is stored. The
    page's clock is paused and moved by hand, so that the 120 ms are 120 ms however loaded the
    machine is."""
    import time

    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    # Prompts of one line each, so that the buttons stay where the first click found them.
    token = prepare(db, [Pair(f"p{i:05d}", f"prompt {i}", (f"first answer {i}",
                                                           f"second answer {i}"))
                         for i in range(4)])
    ready = page.locator("#task[data-pair-ready]")

    def click(name):  # a click of its own (detail 1), not the second of a double click
        box = page.get_by_role("button", name=re.compile(name)).bounding_box()
        page.mouse.click(box["x"] + 10, box["y"] + 10)

    page.clock.install()
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 4)
        first, _ = shown_pair_index(page)
        page.clock.pause_at(time.time() + 1)  # from here the page's time moves only by hand

        page.keyboard.press("1")
        expect(page.locator("#progress-text")).to_have_text("1 done · 3 left")
        second, _ = shown_pair_index(page)  # the worst case: the next pair is already shown
        page.clock.run_for(120)
        page.keyboard.press("1")  # the second press of the double press: ignored
        page.clock.run_for(400)
        # A vote taken would have shown the third pair, whose wait the paused clock holds.
        expect(ready, "the second press voted on the next pair").to_have_count(1)
        expect(page.locator("#progress-text")).to_have_text("1 done · 3 left")
        assert shown_pair_index(page)[0] == second, "the second press voted on the next pair"
        assert stored_votes(db) == [(f"p{first:05d}", "left")], "the second pair is unvoted"
        page.keyboard.press("2")  # read, and voted on deliberately
        expect(page.locator("#progress-text")).to_have_text("2 done · 2 left")

        third, _ = shown_pair_index(page)
        page.clock.run_for(400)
        expect(ready).to_have_count(1)
        click("Tie")
        expect(page.locator("#progress-text")).to_have_text("3 done · 1 left")
        page.clock.run_for(120)
        click("Tie")  # a second click that the browser did not count as a double click
        page.clock.run_for(400)
        expect(ready, "the second click voted on the next pair").to_have_count(1)
        expect(page.locator("#progress-text")).to_have_text("3 done · 1 left")
        fourth, _ = shown_pair_index(page)
        page.keyboard.press("b")
        wait_progress(page, 4, 0)
    assert stored_votes(db) == [(f"p{first:05d}", "left"), (f"p{second:05d}", "right"),
                                (f"p{third:05d}", "tie"), (f"p{fourth:05d}", "both_bad")]


def test_a_long_link_in_the_guidelines_fits_a_phone(browser, tmp_path):
    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(1))
    guidelines = tmp_path / "guidelines.txt"
    guidelines.write_text("Read https://docs.example.com/annotation/guidelines/v3/"
                          "helpfulness-and-harmlessness#ties before you start.\n")
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(10_000)
    try:
        with running_server(db, "--guidelines", str(guidelines)) as (url, _):
            sign_in(page, url, token)
            wait_progress(page, 0, 1)
            page.keyboard.press("g")
            assert page.locator("#guidelines-text").is_visible()
            assert page.evaluate("document.documentElement.scrollWidth <= "
                                 "document.documentElement.clientWidth"), "no sideways scroll"
    finally:
        context.close()


def test_a_long_annotator_name_leaves_the_guidelines_button_on_a_phone(browser, tmp_path):
    db = tmp_path / "labels.sqlite"
    prepare(db, make_pairs(1))
    # A name `label add-annotator` allows (up to 64 letters, digits, _ . @ -) with no space.
    token = add_annotator(db, "vendor_batch_2026_11_annotator_0042_external_reviewer_team_b")
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(10_000)
    try:
        with running_server(db) as (url, _):
            sign_in(page, url, token)
            wait_progress(page, 0, 1)
            box = page.locator("#guidelines-toggle").bounding_box()
            assert box["x"] + box["width"] <= 390, box
            assert page.evaluate("document.documentElement.scrollWidth <= "
                                 "document.documentElement.clientWidth"), "no sideways scroll"
    finally:
        context.close()


def test_space_after_a_mouse_vote_scrolls_and_does_not_vote(page, tmp_path):
    """Space scrolls a page down; after a click it must not press the clicked button again,
    which would vote on the next pair before the annotator has read it."""
    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        first, _ = shown_pair_index(page)
        page.get_by_role("button", name=re.compile("Right is better")).click()
        wait_progress(page, 1, 2)
        second, _ = shown_pair_index(page)
        page.keyboard.press(" ")
        page.keyboard.press("t")
        wait_progress(page, 2, 1)
    assert stored_votes(db) == [(f"p{first:05d}", "right"), (f"p{second:05d}", "tie")]


def test_a_reason_being_typed_survives_an_undo(page, tmp_path):
    """Undo shows the previous pair; the reason half-written for the pair it replaced is kept
    for that pair and is back in the box when the pair is, not lost and not moved."""
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(3))
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 3)
        first, _ = shown_pair_index(page)
        page.keyboard.press("1")
        wait_progress(page, 1, 2)
        second, _ = shown_pair_index(page)
        page.locator("#reason").fill("a draft for the second pair")
        page.locator("#reason").press("Escape")
        page.keyboard.press("u")
        wait_progress(page, 0, 3)
        assert shown_pair_index(page)[0] == first
        expect(page.locator("#reason")).to_have_value("")  # not moved to the first pair
        page.keyboard.press("2")
        wait_progress(page, 1, 2)
        assert shown_pair_index(page)[0] == second
        expect(page.locator("#reason")).to_have_value("a draft for the second pair")
        page.keyboard.press("t")
        wait_progress(page, 2, 1)
        expect(page.locator("#reason")).to_have_value("")  # sent with its vote
    votes = Store(db).live_votes()
    assert [(v["pair_id"], v["reason"]) for v in votes] == [
        (f"p{first:05d}", None), (f"p{second:05d}", "a draft for the second pair")]


def test_text_direction_controls_are_shown_not_obeyed(page, tmp_path):
    """U+202E makes "\u202eevil\u202c" display as "live": the page shows each control as a
    visible mark, so the text reads in the order the model wrote it, and says it is there."""
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    evil, isolated = "\u202eevil\u202c", "a \u2067b\u2069 c \u2066d\u2069"
    token = prepare(db, [Pair("bidi", "say \u202eit", (evil, isolated))])
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 1)
        shown = {page.locator("#left").text_content(), page.locator("#right").text_content()}
        assert shown == {"⟨U+202E⟩evil⟨U+202C⟩", "a ⟨U+2067⟩b⟨U+2069⟩ c ⟨U+2066⟩d⟨U+2069⟩"}
        assert page.locator("#prompt").text_content() == "say ⟨U+202E⟩it"
        evil_side = "left" if "evil" in page.locator("#left").text_content() else "right"
        other_side = "right" if evil_side == "left" else "left"
        expect(page.locator(f"#{evil_side}-bidi")).to_have_text(
            "This response holds 2 invisible text-direction controls, shown as ⟨U+…⟩.")
        expect(page.locator(f"#{other_side}-bidi")).to_have_text(
            "This response holds 4 invisible text-direction controls, shown as ⟨U+…⟩.")
        page.keyboard.press("1" if evil_side == "left" else "2")
        wait_progress(page, 1, 0)
    out = tmp_path / "D.jsonl"
    export(db, out)
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["chosen"], row["rejected"]) == (evil, isolated), "stored as written"


def test_loading_the_page_logs_no_console_errors(page, tmp_path):
    """Browsers fetch /favicon.ico on every page load; a 404 there put an error in the console,
    where it hid the errors that matter."""
    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(2))
    errors = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 2)
        # Chromium's own favicon fetch is not among Playwright's network events; one made by
        # the page is awaited here, and a 404 logs the same console error.
        assert page.evaluate("fetch('/favicon.ico').then((r) => r.status)") == 204
    assert errors == []


def test_another_sites_page_cannot_sign_the_browser_in_or_out(page, tmp_path):
    """Login CSRF: a page elsewhere could sign the browser in as the holder of a token of its
    choosing, or out. Its form's POST carries its own Origin and is refused; a bare link only
    asks "Sign in as NAME?"."""
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(2))
    mallory = add_annotator(db, "mallory")
    with running_server(db) as (url, _):
        # The attacker's page: another origin (localhost, not 127.0.0.1), served by the test.
        elsewhere = url.replace("127.0.0.1", "localhost") + "/prize.html"
        targets = {"in": f"{url}/login?token={mallory}", "out": f"{url}/logout"}

        def attacker_page(route):
            target = targets[urlsplit(route.request.url).query]
            route.fulfill(content_type="text/html", body=f'<form method="post" action="{target}">'
                                                         "<button>Claim your prize</button></form>")

        page.route(elsewhere + "*", attacker_page)
        sign_in(page, url, token)
        wait_progress(page, 0, 2)
        for which in ["in", "out"]:
            page.goto(f"{elsewhere}?{which}")
            page.get_by_role("button", name="Claim your prize").click()
            expect(page.locator("body")).to_contain_text("came from another site")
        page.goto(f"{url}/login?token={mallory}")
        expect(page.get_by_role("heading", name="Sign in as mallory?")).to_be_visible()
        page.goto(url)
        expect(page.locator("#annotator")).to_have_text("grace")
        wait_progress(page, 0, 2)
        page.keyboard.press("1")
        wait_progress(page, 1, 1)
    assert [v["annotator"] for v in Store(db).live_votes()] == ["grace"]


def test_a_phone_in_landscape_shows_both_responses_and_the_buttons(browser, tmp_path):
    """On an 844x390 screen the prompt card, the stacked response cards and the sticky
    controls took the whole height: no response was in view without scrolling."""
    db = tmp_path / "labels.sqlite"
    long_turns = [{"role": "user", "content": "A question of several lines. " * 12},
                  {"role": "assistant", "content": "An earlier answer. " * 12},
                  {"role": "user", "content": "And the follow-up? " * 6}]
    token = prepare(db, [Pair("long", long_turns, ("Left answer. " * 200, "Right answer. " * 200))])
    context = browser.new_context(viewport={"width": 844, "height": 390})
    page = context.new_page()
    page.set_default_timeout(10_000)

    def uncovered(selector, x, y):
        """Whether the point (x, y) shows `selector` itself, not something drawn over it."""
        return page.evaluate("([s, x, y]) => { const hit = document.elementFromPoint(x, y); "
                             "return hit !== null && hit.closest(s) !== null; }", [selector, x, y])

    try:
        with running_server(db) as (url, _):
            sign_in(page, url, token)
            wait_progress(page, 0, 1)
            shot = os.environ.get("PREFTUNE_SCREENSHOT_LANDSCAPE") or str(tmp_path / "landscape.png")
            page.screenshot(path=shot)
            assert page.evaluate("window.scrollY") == 0
            for side in ["left", "right"]:
                box = page.locator(f"#{side}").bounding_box()
                line = page.locator(f"#{side}").evaluate(
                    "el => parseFloat(getComputedStyle(el).lineHeight)")
                # The first two lines of each response, clear of the top bar and the controls.
                for y in (box["y"] + line / 2, box["y"] + 1.5 * line):
                    assert uncovered(f"#{side}", box["x"] + 20, y), (side, box, y)
            for button in page.locator(".controls button").all():
                box = button.bounding_box()
                assert box["y"] >= 0 and box["y"] + box["height"] <= 390, box
                assert box["x"] >= 0 and box["x"] + box["width"] <= 844, box
                center = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                assert button.evaluate("(b, [x, y]) => b.contains(document.elementFromPoint(x, y))",
                                       list(center)), button.text_content()
    finally:
        context.close()


def test_a_long_conversation_opens_at_its_last_turn(page, tmp_path):
    """The prompt box scrolls; it is meant to open at the turn being answered. The first pair
    opened at the first turn: it was scrolled while the page was still hidden."""
    db = tmp_path / "labels.sqlite"
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}. " * 40}
             for i in range(9)]
    token = prepare(db, [Pair("talk", turns, ("one", "two"))])
    with running_server(db) as (url, _):
        sign_in(page, url, token)
        wait_progress(page, 0, 1)
        at_end = "el => el.scrollHeight > el.clientHeight && " \
                 "el.scrollTop + el.clientHeight >= el.scrollHeight - 1"
        assert page.locator("#prompt").evaluate(at_end)
