"""SQLite storage for human labels: pairs, annotators, assignments and votes.

The database is the only state of the labeling server, so every write is one short
`BEGIN IMMEDIATE ... COMMIT` transaction in WAL mode, and a write is durable (the WAL fsynced)
before the caller answers the browser. Each thread keeps its own connection; writes inside this
process take one lock so that 50 annotators queue in order instead of spinning on SQLite's busy
handler (other processes, such as `label add-annotator` run while serving, are covered by
busy_timeout).

Durability uses group commit: connections run with synchronous=NORMAL (the commit is written to
the WAL without fsync), and after releasing the write lock each writer waits until one fsync of
the WAL covers its commit. While one thread fsyncs, others commit, and the next fsync covers
them all, so a slow disk costs one fsync per batch of votes instead of one per vote.

Tokens are never stored: an annotator's token is `selector.secret`, and the table keeps the
selector (to find the row) and the SHA-256 of the whole token (compared in constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from preftune.errors import UserError
from preftune.labeling.pairs import Pair

CHOICES = ("left", "right", "tie", "both_bad", "skip")
OPEN_ANNOTATOR = "(open)"  # the shared identity of `serve --open`; CLI names cannot collide
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
TOKEN_PATTERN = re.compile(r"^([0-9a-f]{12})\.([A-Za-z0-9_-]{20,100})$")
DEFAULT_LEASE_S = 30 * 60  # an unanswered assignment stops reserving its slot after this

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS pairs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  pair_id TEXT NOT NULL UNIQUE,
  prompt TEXT NOT NULL,              -- JSON: text or a list of chat messages
  response_0 TEXT NOT NULL,
  response_1 TEXT NOT NULL,
  truncated TEXT,                    -- JSON [bool, bool]: cut by max_new_tokens; NULL: neither
  filled INTEGER NOT NULL DEFAULT 0, -- live non-skip votes
  done INTEGER NOT NULL DEFAULT 0    -- filled >= overlap of the current server
);
CREATE INDEX IF NOT EXISTS pairs_not_done ON pairs(seq) WHERE done = 0;
CREATE TABLE IF NOT EXISTS annotators (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  selector TEXT NOT NULL UNIQUE,
  token_hash TEXT NOT NULL,
  created_at REAL NOT NULL,
  revoked_at REAL
);
CREATE TABLE IF NOT EXISTS assignments (
  pair_id TEXT NOT NULL REFERENCES pairs(pair_id),
  annotator_id INTEGER NOT NULL REFERENCES annotators(id),
  left_index INTEGER NOT NULL CHECK (left_index IN (0, 1)),
  state TEXT NOT NULL CHECK (state IN ('open', 'voted', 'skipped')),
  updated_at REAL NOT NULL,
  PRIMARY KEY (pair_id, annotator_id)
);
CREATE INDEX IF NOT EXISTS assignments_open ON assignments(annotator_id, state, updated_at);
CREATE TABLE IF NOT EXISTS votes (
  id INTEGER PRIMARY KEY,
  pair_id TEXT NOT NULL REFERENCES pairs(pair_id),
  annotator_id INTEGER NOT NULL REFERENCES annotators(id),
  choice TEXT NOT NULL CHECK (choice IN {CHOICES!r}),
  left_index INTEGER NOT NULL CHECK (left_index IN (0, 1)),
  reason TEXT,
  created_at REAL NOT NULL,
  idempotency_key TEXT NOT NULL,
  undone_at REAL,
  UNIQUE (annotator_id, idempotency_key)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_vote ON votes(pair_id, annotator_id)
  WHERE undone_at IS NULL;
CREATE INDEX IF NOT EXISTS votes_live ON votes(annotator_id, undone_at, id);
CREATE TABLE IF NOT EXISTS meta (    -- settings of the last server; an older database has none
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
"""


class Rejected(Exception):
    """A request the store refuses; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def check_db_path(path: str | Path) -> None:
    """Refuse a --db that names a folder or sits in a missing one: sqlite would say only
    "unable to open", and `eval generate` checks it before sampling, not after."""
    if Path(path).is_dir() or not Path(path).parent.is_dir():
        problem = "is a folder" if Path(path).is_dir() else f"is in {Path(path).parent}, which does not exist"
        raise UserError(f"--db {path} {problem}; name a database file in an existing folder.")


class NotSaved(UserError):
    """SQLite refused a write for a reason outside preftune: a full disk, a read-only file or
    folder, another process holding the database locked. Nothing of the refused write is kept
    (its transaction is rolled back), and everything committed before is intact. `why` is the
    reason in a few words, for the annotator's page; the message adds the file and what to do."""

    def __init__(self, path: Path, why: str, remedy: str):
        super().__init__(f"{path}: could not write to this labels database: {why}; {remedy}, "
                         "then try again (the labels already saved in it are kept).")
        self.why = why


def not_saved(path: Path, error: sqlite3.Error) -> NotSaved | None:
    """The `NotSaved` for an error that says the disk or another process refused a write; None
    for any other error (a bug, kept with its traceback)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:  # Python 3.10 gives no code (nor the sqlite3.SQLITE_* names below)
        return None
    primary = code & 0xFF  # extended codes keep it in the low byte
    if primary == sqlite3.SQLITE_FULL:
        return NotSaved(path, "the disk it is on is full", "free space on that disk")
    if primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return NotSaved(path, "it or its folder is read-only",
                        "make both writable for the user running preftune (chmod u+w), or move "
                        "the database to a folder that is")
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return NotSaved(path, "another process has kept it locked for over 30 seconds",
                        "let the other `preftune label` command or server using it finish, or "
                        "stop it")
    if primary == sqlite3.SQLITE_IOERR:
        return NotSaved(path, f"the disk reported an error ({error})",
                        "check the disk it is on (full, removed or failing)")
    return None


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _add_truncated_column(conn: sqlite3.Connection) -> None:
    """A database made before pairs kept their `truncated` marks gains the column (NULL: the
    responses were not marked, as before); two processes opening it at once both try."""
    if "truncated" in {row[1] for row in conn.execute("PRAGMA table_info(pairs)")}:
        return
    try:
        conn.execute("ALTER TABLE pairs ADD COLUMN truncated TEXT")
    except sqlite3.OperationalError as e:
        if "duplicate column" not in str(e):
            raise


class Store:
    """One labels database. Safe to share between threads; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        overlap: int | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        must_exist: bool = False,
    ):
        if must_exist and not Path(path).is_file():
            raise UserError(
                f"{path}: no such labels database; check --db (`label serve`, `label import`, "
                f"`label add-annotator` and `eval generate --judge human` create one)."
            )
        check_db_path(path)
        self.path = Path(path)
        self.overlap = 1
        self.lease_s = lease_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._commits = 0  # commits written to the WAL by this process
        self._synced = 0  # commits known to be on disk
        try:
            conn = self._conn()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            _add_truncated_column(conn)
        except sqlite3.DatabaseError as e:
            refused = not_saved(self.path, e)  # a new database on a full disk, say
            if refused is not None:
                raise refused from None
            raise UserError(f"{self.path}: not a usable labels database ({e}).") from None
        if overlap is not None:
            self.set_overlap(overlap)

    def set_overlap(self, overlap: int) -> None:
        """How many annotators label each pair. Only the serving process sets it: `done`
        flags follow the overlap of the running server, which may differ from the last run."""
        if overlap < 1:
            raise UserError(f"--overlap must be at least 1, got {overlap}.")
        self.overlap = overlap
        with self._write() as db:
            db.execute("UPDATE pairs SET done = (filled >= ?)", (overlap,))
            # Kept with the `done` flags it explains, so `label status` can say what is left.
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('overlap', ?)",
                       (str(overlap),))

    def recorded_overlap(self) -> int | None:
        """The overlap the last server ran with; None for a database no server has recorded."""
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'overlap'").fetchone()
        return None if row is None else int(row["value"])

    # -- connections and transactions -------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=30, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")  # fsync is ours: see `_wait_durable`
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; with `durable`, return only once it is fsynced. A write the
        disk or another process refuses (full, read-only, locked) raises `NotSaved`, with
        nothing of it kept."""
        with self._write_lock:
            try:
                conn = self._conn()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    # On a full disk SQLite has rolled back already, and a ROLLBACK would fail
                    # ('no transaction is active') in place of the reason; a refused COMMIT
                    # (locked) leaves it open, and every later BEGIN here would fail.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as e:
                refused = not_saved(self.path, e)
                if refused is None:
                    raise
                raise refused from None
            self._commits += 1
            mine = self._commits
        if durable:
            self._wait_durable(mine)

    def _wait_durable(self, commit: int) -> None:
        """Group commit: one fsync of the WAL covers every commit written before it starts."""
        with self._sync_lock:
            if self._synced >= commit:
                return  # another thread's fsync already covered this commit
            covered = self._commits
            wal = Path(f"{self.path}-wal")
            # The WAL only disappears once checkpointed into the (then synced) main file.
            fd = os.open(wal if wal.exists() else self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._synced = covered

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs; readers never wait for writers in WAL."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def snapshot(self):
        """A context in which this thread's reads (pairs, votes, annotators) all see the database
        at one moment, so that a report made while the server runs adds up: without it, a pair
        imported and voted on between reading the pairs and reading the votes gave a vote whose
        pair was not in the export."""
        return self._read()

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # -- pairs ------------------------------------------------------------------------------

    def add_pairs(self, pairs: Iterable[Pair]) -> tuple[int, int]:
        """Insert new pairs; returns (added, already present). A changed pair is an error."""
        added = present = 0
        with self._write() as db:
            for pair in pairs:
                if len(pair.responses) != 2:  # shown to people side by side: two, never the first two
                    raise UserError(
                        f"{self.path}: pair {pair.pair_id!r} has {len(pair.responses)} responses, "
                        f"but a labeling database holds two per pair; sample with `preftune sample "
                        f"--n 2` for people, or label it with `preftune label auto`."
                    )
                prompt = json.dumps(pair.prompt, ensure_ascii=False)
                row = db.execute(
                    "SELECT prompt, response_0, response_1 FROM pairs WHERE pair_id = ?",
                    (pair.pair_id,),
                ).fetchone()
                if row is None:
                    truncated = json.dumps(list(pair.truncated)) if any(pair.truncated) else None
                    db.execute(
                        "INSERT INTO pairs (pair_id, prompt, response_0, response_1, truncated, done) "
                        "VALUES (?, ?, ?, ?, ?, 0)",
                        (pair.pair_id, prompt, *pair.responses, truncated),
                    )
                    added += 1
                elif tuple(row) == (prompt, *pair.responses):
                    present += 1
                else:
                    # `preftune sample` numbers every file p000000, p000001, ...: a second batch
                    # of prompts added to a round meets the first batch's ids here.
                    raise UserError(
                        f"{self.path}: pair {pair.pair_id!r} is already stored with a different "
                        f"prompt or responses, so nothing was added; give changed pairs new pair "
                        f"ids (sample a second batch of prompts with `preftune sample --id-prefix "
                        f"b2-`, so its ids differ from the first's)."
                    )
        return added, present

    def pair_count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    def pairs(self) -> dict[str, dict]:
        rows = self._conn().execute(
            "SELECT pair_id, prompt, response_0, response_1, truncated FROM pairs ORDER BY seq"
        )
        return {
            r["pair_id"]: {
                "prompt": json.loads(r["prompt"]),
                "responses": (r["response_0"], r["response_1"]),
                "truncated": tuple(json.loads(r["truncated"])) if r["truncated"] else (False, False),
            }
            for r in rows
        }

    # -- annotators -------------------------------------------------------------------------

    def add_annotator(self, name: str, reissue: bool = False) -> str:
        """Create annotator `name` (or give it a new token) and return the token, shown once."""
        if not NAME_PATTERN.match(name):
            raise UserError(
                f"annotator name {name!r} is not allowed; use 1-64 letters, digits or _ . @ -."
            )
        selector = secrets.token_hex(6)
        token = f"{selector}.{secrets.token_urlsafe(32)}"
        with self._write() as db:
            exists = db.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()
            if exists and not reissue:
                raise UserError(
                    f"annotator {name!r} already exists in {self.path}; pass --reissue to give "
                    f"them a new link (the old one stops working) or choose another name."
                )
            if exists:
                db.execute(
                    "UPDATE annotators SET selector = ?, token_hash = ?, revoked_at = NULL "
                    "WHERE id = ?",
                    (selector, hash_token(token), exists["id"]),
                )
            else:
                db.execute(
                    "INSERT INTO annotators (name, selector, token_hash, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (name, selector, hash_token(token), time.time()),
                )
        return token

    def revoke_annotator(self, name: str) -> None:
        """The annotator's token stops working at once; their votes are kept, and the pairs
        they were shown but had not answered go to others now, not once their lease runs out
        (30 minutes in which nobody could label them). Reissued, they get those pairs back
        first, as before."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE annotators SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (time.time(), name),
            )
            if cur.rowcount == 0:
                raise UserError(
                    f"no active annotator named {name!r} in {self.path}; "
                    f"`preftune label status` lists them."
                )
            db.execute(  # an updated_at of 0 is a lease long expired
                "UPDATE assignments SET updated_at = 0 WHERE state = 'open' AND annotator_id = "
                "(SELECT id FROM annotators WHERE name = ?)",
                (name,),
            )

    def active_token_count(self) -> int:
        return self._conn().execute(
            "SELECT COUNT(*) FROM annotators WHERE revoked_at IS NULL AND name != ?",
            (OPEN_ANNOTATOR,),
        ).fetchone()[0]

    def open_annotator(self) -> Annotator:
        """The single identity shared by everyone voting on a `--open` server."""
        with self._write() as db:
            row = db.execute("SELECT id FROM annotators WHERE name = ?", (OPEN_ANNOTATOR,))
            row = row.fetchone()
            if row is None:
                # A random hash nobody knows the preimage of: this identity cannot log in.
                cur = db.execute(
                    "INSERT INTO annotators (name, selector, token_hash, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (OPEN_ANNOTATOR, "open-" + secrets.token_hex(6), secrets.token_hex(32),
                     time.time()),
                )
                return Annotator(cur.lastrowid, OPEN_ANNOTATOR)
            return Annotator(row["id"], OPEN_ANNOTATOR)

    def authenticate(self, token: str | None) -> Annotator | None:
        """The annotator holding `token`, or None; the hash comparison is constant-time."""
        match = TOKEN_PATTERN.match(token or "")
        selector = match.group(1) if match else ""
        row = self._conn().execute(
            "SELECT id, name, token_hash, revoked_at FROM annotators WHERE selector = ?",
            (selector,),
        ).fetchone()
        expected = row["token_hash"] if row else hash_token(secrets.token_hex(16))
        # Always hash and compare, so an unknown selector costs the same as a wrong secret.
        ok = hmac.compare_digest(hash_token(token or ""), expected)
        if not ok or row is None or row["revoked_at"] is not None:
            return None
        return Annotator(row["id"], row["name"])

    def annotators(self) -> list[dict]:
        rows = self._conn().execute(
            "SELECT id, name, created_at, revoked_at FROM annotators ORDER BY id"
        )
        return [dict(r) for r in rows]

    # -- assignments and votes ----------------------------------------------------------------

    def next_pair(self, annotator: Annotator) -> dict | None:
        """The pair this annotator should label now, or None when nothing is left for them.

        An open assignment (shown but not voted, or reopened by undo) comes back first, the most
        recently reopened one on top; otherwise the first pair that is not done, not seen by this
        annotator, and has fewer than `overlap` votes plus fresh reservations.
        """
        row = self._open_assignment(self._conn(), annotator.id)
        if row is None:
            # Not fsynced: an assignment lost to a power cut is simply made again.
            with self._write(durable=False) as db:
                row = self._open_assignment(db, annotator.id) or self._assign(db, annotator.id)
        if row is None:
            return None
        pair = self._conn().execute(
            "SELECT prompt, response_0, response_1, truncated FROM pairs WHERE pair_id = ?",
            (row["pair_id"],),
        ).fetchone()
        responses = (pair["response_0"], pair["response_1"])
        truncated = json.loads(pair["truncated"]) if pair["truncated"] else [False, False]
        left = row["left_index"]
        return {
            "pair_id": row["pair_id"],
            "prompt": json.loads(pair["prompt"]),
            "left": responses[left],
            "right": responses[1 - left],
            # The sampler stopped these at max_new_tokens: the page says so, or an annotator
            # would judge the cut-off ending as the model's own.
            "left_truncated": truncated[left],
            "right_truncated": truncated[1 - left],
        }

    @staticmethod
    def _open_assignment(db: sqlite3.Connection, annotator_id: int):
        return db.execute(
            "SELECT pair_id, left_index FROM assignments WHERE annotator_id = ? AND "
            "state = 'open' ORDER BY updated_at DESC LIMIT 1",
            (annotator_id,),
        ).fetchone()

    def _available_pairs_sql(self, select: str) -> str:
        return (
            f"SELECT {select} FROM pairs p WHERE p.done = 0 AND NOT EXISTS ("
            "  SELECT 1 FROM assignments a WHERE a.pair_id = p.pair_id AND a.annotator_id = ?)"
            " AND (SELECT COUNT(*) FROM assignments a WHERE a.pair_id = p.pair_id AND"
            "  (a.state = 'voted' OR (a.state = 'open' AND a.updated_at >= ?))) < ?"
        )

    def _assign(self, db: sqlite3.Connection, annotator_id: int):
        now = time.time()
        sql = self._available_pairs_sql("p.pair_id") + " ORDER BY p.seq LIMIT 1"
        row = db.execute(sql, (annotator_id, now - self.lease_s, self.overlap)).fetchone()
        if row is None:
            return None
        left_index = secrets.randbelow(2)  # the order is recorded, so it need not be seeded
        db.execute(
            "INSERT INTO assignments (pair_id, annotator_id, left_index, state, updated_at) "
            "VALUES (?, ?, ?, 'open', ?)",
            (row["pair_id"], annotator_id, left_index, now),
        )
        return {"pair_id": row["pair_id"], "left_index": left_index}

    def progress(self, annotator: Annotator) -> dict:
        """Pairs this annotator has answered and how many are left for them.

        `remaining` counts pairs not done and not answered by this annotator, plus their open
        assignments on done pairs. Pairs reserved by others are included, so it may be a few
        too high while others work; it costs two index scans instead of a per-pair subquery.
        """
        with self._read() as db:
            done = db.execute(
                "SELECT COUNT(*) FROM assignments WHERE annotator_id = ? AND state != 'open'",
                (annotator.id,),
            ).fetchone()[0]
            remaining = db.execute(
                "SELECT (SELECT COUNT(*) FROM pairs WHERE done = 0)"
                " - (SELECT COUNT(*) FROM assignments a JOIN pairs p USING (pair_id)"
                "    WHERE a.annotator_id = ? AND a.state != 'open' AND p.done = 0)"
                " + (SELECT COUNT(*) FROM assignments a JOIN pairs p USING (pair_id)"
                "    WHERE a.annotator_id = ? AND a.state = 'open' AND p.done = 1)",
                (annotator.id, annotator.id),
            ).fetchone()[0]
        return {"done": done, "remaining": remaining, "total": done + remaining}

    def record_vote(
        self, annotator: Annotator, pair_id: str, choice: str, reason: str | None, key: str
    ) -> int:
        """Store one vote and return its id; raises `Rejected` and changes nothing otherwise."""
        if choice not in CHOICES:
            raise Rejected(422, f"choice must be one of {', '.join(CHOICES)}.")
        with self._write() as db:
            replay = db.execute(
                "SELECT id, choice FROM votes WHERE annotator_id = ? AND idempotency_key = ?",
                (annotator.id, key),
            ).fetchone()
            if replay is not None:
                # `choice` is the stored one: a retry may carry another choice than the first
                # try, whose answer was lost; the page must confirm what was really saved.
                raise Rejected(409, "this vote was already saved.", already_saved=True,
                               vote_id=replay["id"], choice=replay["choice"])
            if db.execute("SELECT 1 FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone() is None:
                raise Rejected(404, "unknown pair id.")
            assignment = db.execute(
                "SELECT left_index, state FROM assignments WHERE pair_id = ? AND annotator_id = ?",
                (pair_id, annotator.id),
            ).fetchone()
            # `stale`: the page shows a pair that is no longer this annotator's to answer (voted
            # in another tab, or another annotator signed in in this browser); it loads the next.
            if assignment is None:
                raise Rejected(409, "this pair was not given to you; load the next pair.",
                               stale=True)
            if assignment["state"] != "open":
                raise Rejected(409, "you already voted on this pair; undo that vote to change it.",
                               stale=True)
            now = time.time()
            cur = db.execute(
                "INSERT INTO votes (pair_id, annotator_id, choice, left_index, reason, "
                "created_at, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (pair_id, annotator.id, choice, assignment["left_index"], reason or None, now, key),
            )
            state = "skipped" if choice == "skip" else "voted"
            self._set_state(db, pair_id, annotator.id, state, now, +1 if state == "voted" else 0)
            return cur.lastrowid

    def undo(self, annotator: Annotator, vote_id: int | None = None) -> dict:
        """Withdraw the annotator's latest live vote (or `vote_id`); the pair comes back to them."""
        with self._write() as db:
            sql = ("SELECT id, pair_id, choice, reason FROM votes WHERE annotator_id = ? AND "
                   "undone_at IS NULL")
            args: tuple = (annotator.id,)
            if vote_id is not None:
                sql, args = sql + " AND id = ?", (annotator.id, vote_id)
            vote = db.execute(sql + " ORDER BY id DESC LIMIT 1", args).fetchone()
            if vote is None:
                raise Rejected(409, "there is no vote of yours to undo.")
            now = time.time()
            db.execute("UPDATE votes SET undone_at = ? WHERE id = ?", (now, vote["id"]))
            filled_delta = 0 if vote["choice"] == "skip" else -1
            self._set_state(db, vote["pair_id"], annotator.id, "open", now, filled_delta)
        return {"vote_id": vote["id"], "pair_id": vote["pair_id"], "choice": vote["choice"],
                "reason": vote["reason"]}

    def _set_state(self, db, pair_id: str, annotator_id: int, state: str, now: float, delta: int):
        db.execute(
            "UPDATE assignments SET state = ?, updated_at = ? WHERE pair_id = ? AND annotator_id = ?",
            (state, now, pair_id, annotator_id),
        )
        if delta:
            db.execute(
                "UPDATE pairs SET filled = filled + ?, done = (filled + ? >= ?) WHERE pair_id = ?",
                (delta, delta, self.overlap, pair_id),
            )

    def live_votes(self) -> list[dict]:
        """Every vote not undone, oldest first, with the annotator's name."""
        rows = self._conn().execute(
            "SELECT v.id, v.pair_id, a.name AS annotator, v.choice, v.left_index, v.reason, "
            "v.created_at FROM votes v JOIN annotators a ON a.id = v.annotator_id "
            "WHERE v.undone_at IS NULL ORDER BY v.id"
        )
        return [dict(r) for r in rows]
