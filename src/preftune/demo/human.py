"""`preftune demo --human`: step 4 with people instead of the latent reward.

The labeling server of `preftune label serve` runs inside the demo process on a background
thread, bound to a loopback address, with one annotator ("researcher") whose personal login
link is printed. The demo waits until enough pairs carry a vote (or the researcher presses
Enter, or Ctrl-C), stops the server and exports D.jsonl as `preftune label export` does. Votes
live in labels.sqlite in the output folder, so a rerun continues the labeling where it stopped.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from preftune.errors import UserError

ANNOTATOR = "researcher"
POLL_SECONDS = 0.5


def labelled_pairs(store) -> int:
    """Pairs with at least one live vote (ties and "both bad" included: they were looked at)."""
    return len({vote["pair_id"] for vote in store.live_votes()})


def voted_pairs(db_path: Path) -> int:
    """Pairs people voted on in an earlier `--human` run's database (0 when there is none)."""
    from preftune.labeling.store import Store

    if not db_path.is_file():
        return 0
    store = Store(db_path, must_exist=True)
    try:
        return labelled_pairs(store)
    finally:
        store.close()


def _start_server(app, host: str, port: int):
    """uvicorn on a daemon thread; returns (server, thread) once it accepts connections."""
    import uvicorn

    # No access log: the login URL carries the token in its query string.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="preftune-labeling", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise UserError(f"the labeling server could not listen on {host}:{port} (is the port "
                            "in use?); pass another --port.")
        time.sleep(0.05)
    return server, thread


def _stdin_is_a_terminal() -> bool:
    import sys

    return sys.stdin is not None and sys.stdin.isatty()


def _enter_pressed() -> threading.Event:
    """Set when the researcher presses Enter; never set when stdin is not a terminal."""
    import sys

    pressed = threading.Event()
    if _stdin_is_a_terminal():
        threading.Thread(target=lambda: (sys.stdin.readline(), pressed.set()), daemon=True).start()
    return pressed


def wait_for_votes(store, target: int, total: int, echo, stop: threading.Event) -> int:
    """Poll the database until `target` pairs are labelled, Enter, Ctrl-C or `stop`."""
    shown = -1
    try:
        while True:
            done = labelled_pairs(store)
            if done != shown:
                echo(f"      {done}/{min(target, total)} pairs labelled")
                shown = done
            if done >= min(target, total) or stop.is_set():
                return done
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        echo("      stopped waiting (Ctrl-C)")
        return labelled_pairs(store)


def _check_existing(out: Path) -> bool:
    """True when `out` is an earlier export of people's votes; refuse machine labels there."""
    from preftune.records import read_records

    if not out.is_file():
        return False
    rows = read_records(out)
    if rows and "votes" not in rows[0]:
        raise UserError(f"{out} holds machine labels from a demo run without --human; choose "
                        "another --out for the human run.")
    return bool(rows)


def label_with_people(pairs_path: str | Path, db_path: str | Path, out: str | Path, settings,
                      echo=print, min_pairs: int = 1) -> str:
    """Serve the pairs for labeling, wait for votes, export D.jsonl; returns a one-line note.

    settings: a `pipeline.HumanLabeling` (host, port, target, wait_for_enter). min_pairs: the
    fewest preferences training can use (one optimizer step).
    """
    from preftune.labeling.app import create_app, is_loopback
    from preftune.labeling.export import export, left_out_path
    from preftune.labeling.pairs import load_pairs
    from preftune.labeling.store import Store

    if not is_loopback(settings.host):
        raise UserError(f"--host {settings.host}: the demo serves its labeling page on this "
                        "machine only (127.0.0.1); for annotators elsewhere use `preftune label "
                        "serve` with personal links, then `preftune label export`.")
    out = Path(out)
    if _check_existing(out):
        return f"kept the people's labels already in {out}"
    store = Store(db_path, overlap=1)  # one person labels: recorded, so `label status` knows what is left
    try:
        store.add_pairs(load_pairs(pairs_path, for_people=True))
        token = store.add_annotator(ANNOTATOR, reissue=True)  # a fresh link each run
        server, thread = _start_server(create_app(store), settings.host, settings.port)
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        echo(f"      open this link in your browser to label (keys 1/2 pick a side):\n"
             f"      http://{shown}:{settings.port}/login?token={token}")
        # Enter is read only from a terminal (not from a log's redirected or closed stdin).
        echo(f"      the demo continues after {settings.target} pairs"
             + (", or when you press Enter" if settings.wait_for_enter and _stdin_is_a_terminal()
                else ""))
        stop = threading.Event()
        if settings.wait_for_enter:
            pressed = _enter_pressed()
            threading.Thread(target=lambda: (pressed.wait(), stop.set()), daemon=True).start()
        try:
            wait_for_votes(store, settings.target, store.pair_count(), echo, stop)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    finally:
        store.close()
    report = export(db_path, out, policy="majority")
    if report["exported"] < min_pairs:
        out.unlink()  # not a finished D: a rerun must serve the pairs again, not keep this
        left_out_path(out).unlink(missing_ok=True)  # nor list the pairs left out of it
        raise UserError(f"only {report['exported']} pairs have a preference (ties, skips and "
                        f"'both bad' do not count); training needs at least {min_pairs}. Rerun "
                        f"the same command to label more: the votes are kept in {db_path}.")
    done = f"{report['exported']} preferences from your votes -> {out}"
    if report["left_out_file"]:  # the pairs not voted on, or without a preference, are not lost
        done += f"; the {sum(report['left_out'].values())} others are listed in {report['left_out_file']}"
    return done
