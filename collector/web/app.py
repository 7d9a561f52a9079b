"""The fleet view: a page at `/`, its JSON API under `/api/`, CSV export and live updates.

It has its own listener (`[web] endpoint`) and reads the database through its own read-only
connections (a bounded pool, each on its own thread), never the writer's: a page polling the
API costs the export path no event-loop time beyond parsing the request, a long read (a CSV
export's chunk, a search) does not hold up the others, and several collectors sharing one
database file show in one view. CSV exports are streamed a chunk at a time, each chunk read
only once the client took the previous one. Every parameter is checked (collector.web.params)
before it reaches a query: out of range is a 400 with a message, never a 5xx.

Live updates: `/api/events` is a server-sent event stream. While anyone listens, one task asks
the database every LIVE_CHECK_S whether it changed since it last looked and tells every
listener once per change; the page then fetches what it shows again. SQLite: `PRAGMA
data_version`, which moves on every commit by another connection. PostgreSQL has no such
counter: the task reads the counter rows in collector_meta that every flush already updates
(span ids accounted, usage held), one primary-key read (collector.store.postgres.
QueryConnection.change_signal); the stale sweep alone does not move them. A commit by any
collector on the database shows within about a second.

On PostgreSQL the same queries (collector.web.queries) run on a read-only psycopg
connection (collector.store.postgres.QueryConnection).

Auth: with tokens ([auth], collector.config.auth), every route but the sign-in form needs a
token with the read role: in an `Authorization: Bearer <token>` header (scripts), or by the
cookie the sign-in form sets. The cookie holds a random server-side session id
(collector.web.sessions), not the token; it is HttpOnly, SameSite=Strict, and Secure (with the
__Host- prefix) when the view is served over TLS. Sign-in and sign-out are POST only, and
refused when the browser says the form came from another site (Origin, Sec-Fetch-Site): no
other page can sign a visitor in or out. Without tokens, only requests whose Host is one of
the listener's names are answered (DNS rebinding; collector.security.HostCheck).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from collector import report
from collector.budgets.status import read_status
from collector.budgets.status import to_json as budgets_json
from collector.config import Endpoint
from collector.config.auth import ROLE_READ
from collector.config.budgets import Budget
from collector.receivers.common import start_app
from collector.receivers.connections import Connections
from collector.security import Security, bearer_token
from collector.store.base import Reader as UsageReader
from collector.store.base import StorageError
from collector.store.sqlite import BUSY_TIMEOUT_MS
from collector.web import export, params, queries
from collector.web.sessions import SESSION_TTL_S, WebSession, WebSessions

if TYPE_CHECKING:
    from collector.store.postgres import ConnectOptions, QueryConnection

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STATIC_DIR = Path(__file__).parent / "static"
LIVE_CHECK_S = 0.5
KEEPALIVE_S = 15.0
STOP_GRACE_S = 2.0
# Read-only connections (and threads) the API's requests share: a CSV export, a search or a
# slow page holds one at a time, so the others keep answering. The live-update watcher has
# one more of its own (PRAGMA data_version is per connection, so it must always ask the same).
READER_THREADS = 4
COOKIE = "collector_session"
# Over TLS: a cookie only ever set by and sent to this origin over TLS, never by a subdomain.
SECURE_COOKIE = "__Host-collector_session"
# Sec-Fetch-Site values of a form posted by our own page (or typed by the user).
OWN_SITES = ("same-origin", "none")
JSON_HEADERS = {"Cache-Control": "no-store"}
# Rules for the browser: only our own scripts, styles and API; no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; "
                                "style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    # Nothing to other sites; our own forms still carry their Origin (with no-referrer a
    # browser sends `Origin: null`, which the sign-in check must treat as another site).
    "Referrer-Policy": "same-origin",
}
# Budget instances /api/budgets lists per budget: a glob over users may match thousands, and the
# page wants the ones that spend most.
API_BUDGET_INSTANCES = 500
PUBLIC_PATHS = frozenset({"/login", "/static/app.css", "/static/login.js", "/api/auth"})


class WebError(Exception):
    """The web listener could not start (address in use, bad address)."""


# What a read can fail with: SQLite's errors, or PostgreSQL's as StorageError.
READ_ERRORS = (sqlite3.Error, StorageError)


class Reader:
    """A bounded pool of read-only connections, one per thread (`threads` of them): queries
    never wait on the event loop, the loop never waits on the database, and a slow query (a
    search, an export's chunk) holds one connection while the others answer. `source`: the
    SQLite file, or the PostgreSQL server. Each thread opens its connection when it first
    reads, and a fresh one after a read error (the file may have been replaced or locked)."""

    def __init__(self, source: Path | ConnectOptions, *, threads: int = READER_THREADS) -> None:
        self._source = source
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="collector-web")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[sqlite3.Connection | QueryConnection] = set()

    def _connection(self) -> sqlite3.Connection | QueryConnection:
        conn: sqlite3.Connection | QueryConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if isinstance(self._source, Path):
                uri = f"{self._source.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                       check_same_thread=False)
            else:
                from collector.store.postgres import QueryConnection

                conn = QueryConnection(self._source)
            self._local.conn = conn
            with self._lock:
                self._open.add(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return fn(self._connection(), *args)
        except READ_ERRORS:
            self._drop()
            raise

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(connection, *args)` on one of the pool's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn,
                                                                *args)

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run `fn(*args)` on one of the pool's threads (for readers that open their own)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """Wait for the reads in flight, then close every connection."""
        self._pool.shutdown(wait=True)
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            with contextlib.suppress(*READ_ERRORS):
                conn.close()


def _data_version(conn: sqlite3.Connection | QueryConnection) -> int:
    if isinstance(conn, sqlite3.Connection):
        return int(conn.execute("PRAGMA data_version").fetchone()[0])
    return conn.change_signal()


class WebServer:
    """The fleet view's listener. start() returns once it listens; stop() is safe anytime."""

    def __init__(self, endpoint: Endpoint, source: Path | ConnectOptions,
                 usage: UsageReader, *, security: Security | None = None,
                 now: Callable[[], dt.datetime] | None = None,
                 connections: Connections | None = None,
                 dimensions: Sequence[str] = (),
                 budgets: tuple[Budget, ...] = ()) -> None:
        """`source`: what the view's own connection opens (collector.store.web_source);
        `usage`: the storage Reader the agent, user and host reports go through;
        `security`: its tokens (shared with the receivers, so a reload reaches both), TLS and
        the Host names it answers without tokens; `dimensions`: the configured ones
        ([attribution]), each a who-spends page, a filter and a CSV column; `budgets`: the
        configured budgets /api/budgets reports on (read through `usage`, so on either
        backend)."""
        self.endpoint = endpoint
        self._dimensions = tuple(dimensions)
        self._source = source
        self._usage = usage
        self._security = security or Security()
        self._hosts = self._security.hosts  # None: no Host check (the daemon always has one)
        self._signins = WebSessions()
        self._tls = self._security.tls is not None
        self._cookie = SECURE_COOKIE if self._tls else COOKIE
        self._now = now or (lambda: dt.datetime.now(dt.UTC))
        self._reader: Reader | None = None
        self._watch_reader: Reader | None = None
        self._runner: web.AppRunner | None = None
        self._listeners: set[asyncio.Queue[int]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._connections = connections
        self._budgets = budgets

    async def start(self) -> None:
        self._reader = Reader(self._source)
        self._watch_reader = Reader(self._source, threads=1)
        app = web.Application(middlewares=[self._guard])
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/login", self._login_form)
        r.add_post("/login", self._login)
        r.add_post("/logout", self._logout)
        r.add_get("/api/auth", self._auth_state)
        r.add_get("/api/overview", self._overview)
        r.add_get("/api/sessions", self._sessions)
        r.add_get("/api/sessions.csv", self._sessions_csv)
        r.add_get("/api/session", self._session)  # ?id=: any id, whatever its characters
        r.add_get("/api/sessions/{id}", self._session)
        r.add_get("/api/filters", self._filters)
        r.add_get("/api/filters/search", self._search)
        r.add_get("/api/who/{kind}", self._who)
        r.add_get("/api/dimensions", self._dimensions_list)
        r.add_get("/api/budgets", self._budget_status)
        r.add_get("/api/events", self._events)
        r.add_static("/static/", STATIC_DIR, append_version=False)
        try:
            self._runner = await start_app(app, self.endpoint, shutdown_timeout=STOP_GRACE_S,
                                           ssl_context=self._security.server_ssl_context(),
                                           listener="web", label="fleet view",
                                           connections=self._connections)
        except (OSError, ssl.SSLError) as exc:
            self._reader.close()
            self._watch_reader.close()
            self._reader = self._watch_reader = None
            raise WebError(f"cannot listen for the web view on {self.endpoint}: "
                           f"{exc.strerror or exc}") from None
        log.info("fleet view on %s://%s/", "https" if self._tls else "http", self.endpoint)

    async def stop(self) -> None:
        self._stopping.set()
        for queue in list(self._listeners):
            queue.put_nowait(-1)  # event streams end, so the runner's cleanup need not wait
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        for reader in (self._reader, self._watch_reader):
            if reader is not None:
                await asyncio.get_running_loop().run_in_executor(None, reader.close)
        self._reader = self._watch_reader = None

    # -- auth ---------------------------------------------------------------------------------

    @property
    def _authenticating(self) -> bool:
        return self._security.authenticating

    def _session_of(self, request: web.Request) -> tuple[str, WebSession] | None:
        """The live sign-in session the cookie names, made from a token still in effect."""
        session_id = request.cookies.get(self._cookie)
        if not session_id:
            return None
        session = self._signins.get(session_id)
        if session is None:
            return None
        credentials = self._security.credentials
        if credentials is None or not credentials.still_valid(
                session.token_name, session.token_digest, ROLE_READ):
            self._signins.end(session_id)  # its token was revoked (or lost the read role)
            return None
        return session_id, session

    def _refusal(self, request: web.Request) -> web.StreamResponse | None:
        """None when the request may read; else the answer: 401 (or the sign-in form) without
        a valid token, 403 for a token without the read role."""
        header = request.headers.get("Authorization")
        if header is not None:
            token = bearer_token(header)
            credentials = self._security.credentials
            found = None if token is None or credentials is None else credentials.identify(token)
            if found is None:
                return web.json_response({"error": "invalid bearer token"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
            if ROLE_READ not in found.roles:
                return web.json_response(
                    {"error": f"token {found.name!r} does not have the read role"}, status=403)
            return None
        if self._session_of(request) is not None:
            return None
        if request.path.startswith("/api/"):
            return web.json_response({"error": "sign in: send the bearer token"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        raise web.HTTPSeeOther("/login")

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if not self._authenticating:
            if self._hosts is not None and not self._hosts.allows(request.headers.get("Host")):
                return web.Response(status=403, text=(
                    "this collector does not answer to that Host name; add it to "
                    "web.allowed_hosts if it is one of its names\n"))
        elif request.path not in PUBLIC_PATHS:
            refused = self._refusal(request)
            if refused is not None:
                refused.headers.update(SECURITY_HEADERS)
                return refused
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def _cross_site(self, request: web.Request) -> bool:
        """Whether the browser says this form was posted from another site's page."""
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None:  # the browser's own word, where it gives one
            return site not in OWN_SITES
        origin = request.headers.get("Origin")
        if origin is None:
            return False  # not sent by a browser that would send a cross-site form
        _, _, netloc = origin.partition("://")
        return netloc.lower() != request.headers.get("Host", "").lower()

    async def _auth_state(self, request: web.Request) -> web.StreamResponse:
        """Whether signing in is needed, and by whom the page is signed in (for its header)."""
        signed = self._session_of(request) if self._authenticating else None
        return web.json_response({"auth": self._authenticating,
                                  "token": signed[1].token_name if signed else None},
                                 headers=JSON_HEADERS)

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        if not self._authenticating:
            raise web.HTTPSeeOther("/")
        return web.FileResponse(STATIC_DIR / "login.html", headers={"Cache-Control": "no-store"})

    async def _login(self, request: web.Request) -> web.StreamResponse:
        if not self._authenticating or self._security.credentials is None:
            raise web.HTTPSeeOther("/")
        if self._cross_site(request):
            return web.Response(status=403, text="sign-in from another site refused\n")
        form = await request.post()
        given = str(form.get("token", "")).strip()
        found = self._security.credentials.identify(given) if given else None
        if found is None:
            raise web.HTTPSeeOther("/login?failed=1")
        if ROLE_READ not in found.roles:
            raise web.HTTPSeeOther("/login?failed=role")
        previous = request.cookies.get(self._cookie)
        if previous:
            self._signins.end(previous)  # a fresh id at every sign-in (no fixation)
        session_id = self._signins.create(found.name, found.digest)
        response = web.HTTPSeeOther("/")
        response.set_cookie(self._cookie, session_id, max_age=SESSION_TTL_S, httponly=True,
                            samesite="Strict", path="/", secure=self._tls)
        raise response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        if self._cross_site(request):
            return web.Response(status=403, text="sign-out from another site refused\n")
        session_id = request.cookies.get(self._cookie)
        if session_id:
            self._signins.end(session_id)
        response = web.HTTPSeeOther("/login" if self._authenticating else "/")
        response.del_cookie(self._cookie, path="/", secure=self._tls, httponly=True,
                            samesite="Strict")
        raise response

    def end_revoked_sessions(self) -> int:
        """After a reload: end the sessions whose token is gone (requests re-check anyway;
        this frees them). Returns how many ended."""
        credentials = self._security.credentials
        if credentials is None:
            return 0
        return self._signins.end_where(lambda s: credentials.still_valid(
            s.token_name, s.token_digest, ROLE_READ))

    # -- pages and API ------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def _read(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._reader is not None
        try:
            return await self._reader.run(fn, *args)
        except READ_ERRORS as exc:
            log.warning("fleet view: cannot read the database: %s", exc)
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": f"cannot read the database: {exc}"}),
                content_type="application/json") from None

    async def _overview(self, request: web.Request) -> web.StreamResponse:
        data = await self._read(queries.overview, self._now())
        return web.json_response(data, headers=JSON_HEADERS)

    def _query(self, request: web.Request, *, paged: bool = True) -> queries.SessionQuery:
        with _bad_query():
            return queries.SessionQuery.parse(request.query, paged=paged,
                                              dimensions=self._dimensions)

    async def _sessions(self, request: web.Request) -> web.StreamResponse:
        data = await self._read(queries.sessions_page, self._query(request))
        return web.json_response(data, headers=JSON_HEADERS)

    async def _session(self, request: web.Request) -> web.StreamResponse:
        """One session: `/api/session?id=ID` (what the page uses: a query parameter carries
        any id, `.`, `..`, `/`, `?` and `#` included), or `/api/sessions/ID` for ids a path
        segment can hold."""
        with _bad_query():
            if "id" in request.match_info:
                session_id = params.storable(request.match_info["id"], "session id")
            else:
                session_id = params.text(request.query, "id") or ""
                if not session_id:
                    raise params.BadQuery("id: the session id is required")
        data = await self._read(queries.session_detail, session_id)
        if data is None:
            return web.json_response({"error": "no such session"}, status=404)
        return web.json_response(data, headers=JSON_HEADERS)

    async def _dimensions_list(self, request: web.Request) -> web.StreamResponse:
        """The configured dimensions, in order: the page's extra who-spends pages and filters."""
        return web.json_response({"dimensions": list(self._dimensions)}, headers=JSON_HEADERS)

    async def _filters(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._read(queries.filter_values, self._dimensions),
                                 headers=JSON_HEADERS)

    async def _search(self, request: web.Request) -> web.StreamResponse:
        """`?field=model|agent|user|host&q=TEXT&limit=N`: the values a filter can take that
        match TEXT (queries.search_values), for values beyond /api/filters' top ones."""
        with _bad_query():
            field = params.choice(request.query, "field",
                                  (*queries.SEARCH_FIELDS, *self._dimensions), "")
            needle = params.text(request.query, "q")
            if needle is None:
                raise params.BadQuery("q: the text to search for is required")
            limit = params.integer(request.query, "limit", queries.SEARCH_DEFAULT, 1,
                                   queries.SEARCH_MAX)
        data = await self._read(queries.search_values, field, needle, limit)
        return web.json_response(data, headers=JSON_HEADERS)

    async def _who(self, request: web.Request) -> web.StreamResponse:
        """The agent, user, host, credential or a dimension's report, as `collector report KIND
        --json` gives it (`since`, `until`: local dates in `tz`, UTC by default)."""
        kind = request.match_info["kind"]
        kinds = (*report.LABEL_REPORTS, *self._dimensions)
        if kind not in kinds:
            return web.json_response({"error": f"kind must be one of {', '.join(kinds)}"},
                                     status=400)
        with _bad_query():
            since = params.date(request.query, "since")
            until = params.date(request.query, "until")
            zone_name, tz = params.zone(request.query, "tz", "UTC")
        lo, hi = report.hour_bounds(since, until, tz)
        assert self._reader is not None
        try:
            rows = await self._reader.call(
                lambda: self._usage.read_usage(group=kind, lo=lo, hi=hi))
        except READ_ERRORS as exc:
            return web.json_response({"error": f"cannot read the database: {exc}"}, status=503)
        result = report.build_report(kind, (report.RollupRow(*r) for r in rows),
                                     tz=tz, timezone=zone_name, since=since,
                                     until=until, dimensions=self._dimensions)
        data = report.to_json(result, tz)
        for line, item in zip(result.lines, data["lines"], strict=True):
            item["cost_text"] = report.format_usd(line.usage.cost_cents)
        data["totals"]["cost_text"] = report.format_usd(result.totals.cost_cents)
        return web.json_response(data, headers=JSON_HEADERS)

    async def _budget_status(self, request: web.Request) -> web.StreamResponse:
        """Each budget instance in its current period, as `collector budgets --json` gives
        it (at most API_BUDGET_INSTANCES per budget, the largest spenders; `omitted` counts
        the rest), with the amounts also as the reports format them."""
        now_ns = int(self._now().timestamp()) * 1_000_000_000
        assert self._reader is not None
        try:
            status = await self._reader.call(read_status, self._usage, self._budgets, now_ns,
                                             API_BUDGET_INSTANCES)
        except READ_ERRORS as exc:
            return web.json_response({"error": f"cannot read the database: {exc}"},
                                     status=503)
        data = budgets_json(status)
        for line, item in zip(status.instances, data["budgets"], strict=True):
            item["spend_text"] = report.format_usd(line.spend_cents)
            item["limit_text"] = report.format_usd(line.limit_cents)
            item["projected_text"] = report.format_usd(line.projected_cents)
        return web.json_response(data, headers=JSON_HEADERS)

    async def _sessions_csv(self, request: web.Request) -> web.StreamResponse:
        """All matching sessions, in the table's order, streamed: a chunk of rows is read
        (on a reader thread, which it then gives back) only once the client has taken the
        previous one, so an export's memory is one chunk and a slow client holds no reader."""
        query = self._query(request, paged=False)
        chunk = await self._read(queries.export_chunk, query)  # errors here are a 503
        response = web.StreamResponse(headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": 'attachment; filename="sessions.csv"', **JSON_HEADERS})
        response.headers.update(SECURITY_HEADERS)
        await response.prepare(request)
        await response.write(export.header(self._dimensions).encode())
        assert self._reader is not None
        while True:
            await response.write(export.rows(chunk.sessions, self._dimensions).encode())
            if chunk.next is None:
                break
            try:
                chunk = await self._reader.run(queries.export_chunk, query, chunk.next)
            except READ_ERRORS as exc:
                # The status is sent: end the connection without the last chunk marker, so
                # the client sees a cut download, not a complete-looking short file.
                log.warning("fleet view: CSV export cut short: cannot read the database: %s",
                            exc)
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response

    # -- live ---------------------------------------------------------------------------------

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[int] = asyncio.Queue()
        self._listeners.add(queue)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())
        try:
            await response.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
            while not self._stopping.is_set():
                try:
                    version = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if version < 0:
                    break
                await response.write(f"event: commit\ndata: {version}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._listeners.discard(queue)
        return response

    async def _watch(self) -> None:
        """Tell listeners when the database changed; runs while anyone listens."""
        assert self._watch_reader is not None
        last: int | None = None
        while self._listeners and not self._stopping.is_set():
            started = time.monotonic()
            version: int | None = last
            try:
                version = await self._watch_reader.run(_data_version)
            except READ_ERRORS as exc:
                log.debug("fleet view: data_version: %s", exc)
            if version is not None and last is not None and version != last:
                for queue in self._listeners:
                    queue.put_nowait(version)
            last = version
            await asyncio.sleep(max(LIVE_CHECK_S - (time.monotonic() - started), 0.05))


@contextlib.contextmanager
def _bad_query() -> Iterator[None]:
    """A BadQuery raised inside becomes a 400 with its message."""
    try:
        yield
    except params.BadQuery as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(exc)}),
                                 content_type="application/json") from None
