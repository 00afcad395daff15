"""An annotator in a real headless Chromium, against a real `label serve` subprocess."""

import json
import os
import re

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


def shown_pair_index(page):
    """Which pair is on screen, and whether its first response is on the left."""
    left = page.locator("#left").text_content()
    right = page.locator("#right").text_content()
    match = re.fullmatch(r"(first|second) answer (\d+)", left)
    assert match and right == f"{'second' if match[1] == 'first' else 'first'} answer {match[2]}"
    return int(match[2]), match[1] == "first"


def wait_progress(page, done, left):
    from playwright.sync_api import expect

    expect(page.locator("#progress-text")).to_have_text(f"{done} done · {left} left")


def test_vote_by_keyboard_and_mouse_then_undo(page, tmp_path):
    from playwright.sync_api import expect

    db = tmp_path / "labels.sqlite"
    token = prepare(db, make_pairs(4))
    with running_server(db) as (url, _):
        page.goto(f"{url}/login?token={token}")
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
        page.goto(f"{url}/login?token={token}")
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
        page.goto(f"{url}/login?token={token}")
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

