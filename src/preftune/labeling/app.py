"""The annotators' web page and its JSON API (Starlette).

Model outputs are untrusted, so the server never puts them into HTML: the page is a fixed file,
and `static/app.js` fetches pairs as JSON and shows them with `textContent`. The one page the
server fills in is the sign-in question, with the annotator's name (letters, digits and _ . @ -
only, escaped all the same). Every response carries a Content-Security-Policy that allows
scripts from our own static folder only.

Routes: `/` page, `/login?token=` (GET asks "Sign in as NAME?", POST sets the cookie),
`/logout`, `/api/next`, `/api/vote`, `/api/undo`, `/api/progress`, `/api/guidelines`,
`/healthz`, `/favicon.ico`, `/static/*`.
"""

from __future__ import annotations

import html
import ipaddress
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from preftune.errors import UserError
from preftune.labeling.store import CHOICES, Annotator, NotSaved, Rejected, Store
from preftune.wording import counted

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"
MAX_BODY = 64 * 1024
MAX_REASON = 2000
COOKIE = "preftune_token"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,100}$")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}  # change nothing here; every other method is checked
DEFAULT_PORTS = {"http": 80, "https": 443}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Not no-referrer: under it a browser sends `Origin: null` with a form's POST, and the sign-in
    # form's own POST would fail the Origin check. same-origin still sends nothing to other sites.
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}

DEFAULT_GUIDELINES = """\
Read the prompt, then both responses. Pick the response you would rather receive.

1  Left is better      2  Right is better
t  Tie: equally good (or equally acceptable)
b  Both bad: neither response is acceptable
s  Skip: you cannot judge this one (unclear prompt, outside your expertise)
u  Undo your last vote

Judge helpfulness, correctness and harmlessness first; style and length last.
A longer answer is not better by itself. Which side a response is on is random.
The optional reason helps us understand hard cases."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_without_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0]


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL or an Origin header; None for `null` or anything unparsable."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number, or out of range
        return None
    if not parts.scheme or not parts.hostname or port is None:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


def foreign_origin(scheme: str, headers: dict[str, str]) -> str | None:
    """The other site a request came from (by its Origin, else its Referer), as
    `scheme://host`; None when it came from this server's own pages or from no page at all
    (curl, scripts: a browser always sends Origin with a POST)."""
    claimed = (headers.get("origin") or headers.get("referer") or "").strip()
    if not claimed:
        return None
    own = _origin(f"{scheme}://{headers.get('host', '')}")
    if own is not None and _origin(claimed) == own:
        return None
    try:  # only the origin is repeated back, never a Referer's path and query
        parts = urlsplit(claimed)
        shown = f"{parts.scheme}://{parts.netloc}" if parts.netloc else claimed
    except ValueError:
        shown = claimed
    return shown[:100]


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class GuardMiddleware:
    """Security headers on every response, a 64 KiB cap on bodies, an Origin check on every
    request that may change something (no other site's page can vote, undo, sign in or sign out
    for the annotator), and (for `--open`) a Host check so that a web page using DNS rebinding
    cannot reach an unauthenticated server."""

    def __init__(self, app, max_body: int = MAX_BODY, loopback_hosts_only: bool = False):
        self.app = app
        self.max_body = max_body
        self.loopback_hosts_only = loopback_hosts_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not scope["path"].startswith("/static/"):
                    headers["cache-control"] = "no-store"
            await send(message)

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_without_port(headers.get("host", ""))
        if self.loopback_hosts_only and not is_loopback(host):
            return await _error(400, "unknown host.")(scope, receive, send_with_headers)
        foreign = foreign_origin(scope["scheme"], headers)
        if scope["method"] not in SAFE_METHODS and foreign is not None:
            own = f"{scope['scheme']}://{headers.get('host', '')}"
            return await _error(
                403, f"refused: this request came from another site ({foreign}), not from this "
                     f"server's own pages at {own}; if you reach the server through a reverse "
                     "proxy, make it pass the Host header and X-Forwarded-Proto (SECURITY.md)."
            )(scope, receive, send_with_headers)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            status = 413 if declared.isdigit() else 400
            return await _error(status, "request body too large (limit 64 KiB).")(
                scope, receive, send_with_headers
            )
        body, too_large = await self._read_body(receive)
        if too_large:
            return await _error(413, "request body too large (limit 64 KiB).")(
                scope, receive, send_with_headers
            )
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)

    async def _read_body(self, receive) -> tuple[bytes, bool]:
        """Read the whole body, stopping as soon as it passes the cap (chunked uploads too)."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", False
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def _sign_in_question(name: str, current: Annotator | None) -> str:
    """The page a login link opens: whose link it is, and a button that signs in."""
    page = (TEMPLATES_DIR / "confirm.html").read_text(encoding="utf-8")
    note = ""
    if current is not None:
        note = (f'<p class="note">This browser is signed in as {html.escape(current.name)} now; '
                "signing in replaces that.</p>")
    return page.replace("{current}", note).replace("{name}", html.escape(name))


async def _json_body(request: Request) -> dict:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        # Also a CSRF guard: a cross-site form cannot send application/json without CORS.
        raise Rejected(415, "send the request body as application/json.")
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...]]]] nested too deep
        raise Rejected(400, "the request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise Rejected(400, "the request body must be a JSON object.")
    try:
        # JSON may spell a lone UTF-16 surrogate ("\\ud800"); SQLite cannot store it and
        # raised UnicodeEncodeError, a 500, for a reason or pair id holding one.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(400, "the request body holds an unpaired surrogate (\\ud800-\\udfff); "
                            "send valid UTF-8 text.") from None
    return data


def _vote_fields(data: dict) -> tuple[str, str, str | None, str]:
    unknown = set(data) - {"pair_id", "choice", "reason", "key"}
    if unknown:
        raise Rejected(422, f"unknown field(s): {', '.join(sorted(unknown))}.")
    pair_id, choice, reason, key = (data.get(k) for k in ("pair_id", "choice", "reason", "key"))
    if not isinstance(pair_id, str) or not 0 < len(pair_id) <= 200:
        raise Rejected(422, "pair_id must be a non-empty string.")
    if choice not in CHOICES:
        raise Rejected(422, f"choice must be one of: {', '.join(CHOICES)}.")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise Rejected(422, f"reason must be text of at most {MAX_REASON} characters.")
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise Rejected(422, "key must be 8-100 letters, digits, - or _ (one per vote, reused "
                            "when retrying).")
    return pair_id, choice, (reason or "").strip() or None, key


def create_app(store: Store, open_mode: bool = False, guidelines: str | None = None) -> Starlette:
    """The labeling app over `store`. With `open_mode`, requests without a token vote as one
    shared anonymous annotator (the CLI allows that on loopback addresses only)."""
    guidelines_text = guidelines if guidelines is not None else DEFAULT_GUIDELINES
    open_identity = store.open_annotator() if open_mode else None

    async def annotator_of(request: Request) -> Annotator:
        token = request.cookies.get(COOKIE)
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer "):]
        found = await run_in_threadpool(store.authenticate, token) if token else None
        if found is None and open_identity is not None and not token:
            return open_identity
        if found is None:
            raise Rejected(401, "missing or invalid token; open your personal login link again.")
        return found

    reported = [None]  # the NotSaved last told to whoever runs the server, until a vote is saved

    def api(handler):
        """Wrap an API handler: resolve the annotator and turn `Rejected` into a JSON error, and
        a write the database refused (`NotSaved`: a full disk) into a 503 that the page shows
        ("Not saved: ..."), instead of a 500 and a traceback in the server's terminal."""

        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request, await annotator_of(request))
            except Rejected as e:
                return _error(e.status, e.message, **e.extra)
            except NotSaved as e:
                if reported[0] != str(e):  # once, not once per vote while the disk stays full
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    reported[0] = str(e)
                return _error(503, f"the server cannot write to its labels database ({e.why}); "
                                   "your earlier votes are kept; tell whoever runs the server, "
                                   "then try again.")
            if request.method == "POST":  # a write went through: a next refusal is news
                reported[0] = None
            return response

        return endpoint

    async def page(request: Request) -> Response:
        try:
            await annotator_of(request)
        except Rejected:
            return FileResponse(TEMPLATES_DIR / "login.html", status_code=401)
        return FileResponse(TEMPLATES_DIR / "index.html")

    async def signed_in_as(request: Request) -> Annotator | None:
        token = request.cookies.get(COOKIE)
        return await run_in_threadpool(store.authenticate, token) if token else None

    async def login(request: Request) -> Response:
        """GET asks "Sign in as NAME?"; only the POST of that page's button sets the cookie.
        A link is not enough, so another site cannot sign a browser in as the holder of a token
        of its choosing (whose name the annotator's votes would then go to): its page's POST
        fails the Origin check, and a link to GET only shows the question."""
        token = request.query_params.get("token", "")
        who = await run_in_threadpool(store.authenticate, token)
        if who is None:
            return FileResponse(TEMPLATES_DIR / "login.html", status_code=401)
        if request.method != "POST":  # HEAD too: a safe method, so the Origin check lets it by
            current = await signed_in_as(request)
            if current is None or current.id != who.id:
                return HTMLResponse(_sign_in_question(who.name, current))
            return RedirectResponse("/", status_code=303)  # signed in as this annotator already
        # Redirect so the token leaves the address bar. Lax (not Strict), so that a link to the
        # page from mail or chat opens it signed in: the cookie crosses sites only with top-level
        # GETs, and no GET stores a vote or changes who is signed in.
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, token, max_age=90 * 24 * 3600, httponly=True, samesite="lax",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(request: Request) -> Response:
        response = JSONResponse({"logged_out": True})
        response.delete_cookie(COOKIE, httponly=True, samesite="lax",
                               secure=request.url.scheme == "https")
        return response

    async def next_pair(request: Request, who: Annotator) -> Response:
        pair = await run_in_threadpool(store.next_pair, who)
        progress = await run_in_threadpool(store.progress, who)
        waiting = 0
        if pair is None:
            # Without an open assignment of theirs, every pair counted in `remaining` is one this
            # annotator has not answered and cannot get now: others hold all its slots. The page
            # says how many, since such pairs come back if their holders leave them.
            waiting = progress["remaining"]
            progress.update(remaining=0, total=progress["done"])
        return JSONResponse({"pair": pair, "progress": progress, "annotator": who.name,
                             "waiting": waiting})

    async def vote(request: Request, who: Annotator) -> Response:
        pair_id, choice, reason, key = _vote_fields(await _json_body(request))
        vote_id = await run_in_threadpool(store.record_vote, who, pair_id, choice, reason, key)
        return JSONResponse({"saved": True, "vote_id": vote_id})

    async def undo(request: Request, who: Annotator) -> Response:
        data = await _json_body(request)
        vote_id = data.get("vote_id")
        # The bound: SQLite integers are 64-bit, a larger one raised OverflowError (a 500).
        if set(data) - {"vote_id"} or not (
            vote_id is None or (type(vote_id) is int and 0 < vote_id < 2**63)
        ):
            raise Rejected(422, "undo takes only an optional positive integer vote_id.")
        return JSONResponse({"undone": await run_in_threadpool(store.undo, who, vote_id)})

    async def progress(request: Request, who: Annotator) -> Response:
        return JSONResponse(await run_in_threadpool(store.progress, who))

    async def guidelines_route(request: Request, who: Annotator) -> Response:
        return JSONResponse({"text": guidelines_text})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def favicon(request: Request) -> Response:
        # Browsers ask for it on every page load; a 404 put an error in the console each time.
        return Response(status_code=204)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, exc.detail)

    routes = [
        Route("/", page),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/next", api(next_pair)),
        Route("/api/vote", api(vote), methods=["POST"]),
        Route("/api/undo", api(undo), methods=["POST"]),
        Route("/api/progress", api(progress)),
        Route("/api/guidelines", api(guidelines_route)),
        Route("/healthz", healthz),
        Route("/favicon.ico", favicon),
        # StaticFiles resolves every path inside its own directory and refuses anything else.
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(GuardMiddleware, loopback_hosts_only=open_mode)
    return app


def check_bind(host: str, open_mode: bool, store: Store) -> None:
    """Refuse addresses other machines can reach unless every voter needs a token."""
    if is_loopback(host):
        return
    if open_mode:
        raise UserError(
            f"--open (anonymous voting) is only allowed on a loopback address, not {host!r}; "
            f"drop --open and give each annotator a link with `preftune label add-annotator`."
        )
    if store.active_token_count() == 0:
        raise UserError(
            f"refusing to listen on {host!r} with no annotator tokens in {store.path}; "
            f"add one first with `preftune label add-annotator NAME --db {store.path}`."
        )


def serve(
    db: str | Path,
    pairs: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    overlap: int | None = None,
    open_mode: bool = False,
    guidelines: str | Path | None = None,
    echo=print,
) -> None:
    """Import `pairs` (if given) into `db` and serve the labeling page until interrupted."""
    import uvicorn

    from preftune.labeling.export import unusable_note
    from preftune.labeling.pairs import load_pairs

    if not 0 < port < 65536:  # else a traceback from bind, after the pairs were imported
        raise UserError(f"--port must be between 1 and 65535, got {port}.")
    if pairs is None and not Path(db).exists():  # refused before Store would create an empty one
        raise UserError(f"{db} does not exist and no --pairs were given; pass --pairs pairs.jsonl "
                        "to create it.")
    store = Store(db)
    try:
        # A restart without --overlap keeps the one recorded: silently serving with 1 would
        # stop sending pairs to the second and third annotators a lead had asked for.
        overlap = overlap if overlap is not None else store.recorded_overlap() or 1
        store.set_overlap(overlap)
        check_bind(host, open_mode, store)
        if pairs is not None:
            loaded = load_pairs(pairs, for_people=True)
            added, present = store.add_pairs(loaded)
            echo(f"{pairs}: {counted(added, 'new pair')}, {present} already in {db}")
            note = unusable_note(pairs, loaded)
            if note:
                echo(note)
        if store.pair_count() == 0:
            raise UserError(f"{db} holds no pairs yet; pass --pairs pairs.jsonl.")
        text = None
        if guidelines is not None:
            if not Path(guidelines).is_file():
                raise UserError(f"--guidelines {guidelines}: no such file.")
            text = Path(guidelines).read_text(encoding="utf-8")
        app = create_app(store, open_mode=open_mode, guidelines=text)
        shown = f"[{host}]" if ":" in host else host
        echo(f"serving {counted(store.pair_count(), 'pair')} at http://{shown}:{port}/ (overlap {overlap})")
        if open_mode:
            echo("--open: anyone who can reach this address votes, as one anonymous annotator")
        elif not is_loopback(host):
            # check_bind allowed it, but a lead may not know the server speaks plain HTTP.
            echo(f"{host} is reachable from other machines over plain HTTP: login links and "
                 "cookies travel unencrypted; on a network you do not trust, keep 127.0.0.1 "
                 "and put a TLS reverse proxy in front (SECURITY.md)")
        elif store.active_token_count() == 0:
            echo(f"no annotators yet: `preftune label add-annotator NAME --db {db}` prints a link")
        # No access log: login URLs carry tokens in their query string.
        uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
    finally:
        store.close()
