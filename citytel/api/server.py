"""``citytel api``: the read-only SensorThings API v1.1 server.

A plain ASGI callable served by uvicorn (uvloop, httptools). SensorThings' OData-style URLs
(``/Things('a')/Datastreams?$expand=...``) are not a web router's shape, so the app reads them
itself (citytel.api.odata) and needs no framework; msgspec writes the JSON.

Each request: who is asking (the key, else 401), within its rate (else 429), with room in the
access log (else 503); then the path is walked entity by entity, each read with the client's
scope (an entity outside it is 403, one that does not exist 404), and the answer is one SQL
query per page (plus one per expanded entity). Every answer says which usage terms apply and,
for lists, the scope they were read under.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import msgspec
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from citytel.api.audit import Access, AuditLog
from citytel.api.clients import Client, ClientCache, key_from_headers
from citytel.api.entities import EntitySet, Row, build_model
from citytel.api.odata import Options, RequestError, Resource, parse_options, parse_path
from citytel.api.queries import Scope, Statement, count_statement, page_cursor, select_statement
from citytel.config import ApiSettings, Settings
from citytel.core import metrics
from citytel.core.heap import freeze_startup_heap, watch_collections
from citytel.core.sensorthings import VERSION

__all__ = ["ApiApp", "run_api"]

log = logging.getLogger("citytel.api")

AsgiScope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ROOT = "/" + VERSION
# The service root as this request's client sees it (its Host header), for the links in the
# answer; a context variable, because requests run concurrently.
_IMMUTABLE_ENTRIES = 100_000
_BASE: ContextVar[str] = ContextVar("citytel_api_base", default="http://localhost" + _ROOT)
_CONFORMANCE = [
    "http://www.opengis.net/spec/iot_sensing/1.1/req/datamodel",
    "http://www.opengis.net/spec/iot_sensing/1.1/req/resource-path/resource-path-to-entities",
    "http://www.opengis.net/spec/iot_sensing/1.1/req/request-data",
]


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client: ``rate`` requests a second, up to ``burst`` at once."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def wait_seconds(self, client: str, rate: float, burst: int, now: float) -> float:
        """0 if the request may go now (a token is taken), else how long until it may."""
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate


@dataclass(frozen=True)
class _Parent:
    """The entity a collection in the path belongs to: ``Datastreams('x')`` of ``.../Observations``."""

    set_name: str
    row: Row


@dataclass
class _Request:
    base: str  # scheme://host/v1.1
    path: str
    query: str
    pairs: list[tuple[str, str]]
    client: Client


class ApiApp:
    """The ASGI application. ``pool`` is opened on the lifespan's start-up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.api: ApiSettings = settings.api
        self.model = build_model(settings, _BASE.get)
        self.pool = AsyncConnectionPool(
            settings.database.conninfo("api"),
            min_size=1,
            max_size=self.api.pool_size,
            kwargs={"autocommit": True, "row_factory": dict_row},
            configure=self._configure,
            open=False,
            # A request waits this long for a connection, then gets 503 (the database is down or busy).
            timeout=3.0,
        )
        self.clients = ClientCache(self.pool, self.api.key_cache_seconds)
        self.audit = AuditLog(self.pool, self.api.audit_flush_seconds, self.api.audit_max_pending)
        self.limiter = RateLimiter()
        # Entities that never change once they exist (a Datastream is a series, whose device,
        # kind, district and metric are fixed): found once, then answered from memory.
        self._immutable: dict[tuple[str, tuple[tuple[str, Any], ...]], Row] = {}
        self.ready = False

    async def _configure(self, connection: psycopg.AsyncConnection[Any]) -> None:
        await connection.execute(f"SET statement_timeout = {int(self.api.statement_timeout_ms)}")
        await connection.execute("SET TimeZone = 'UTC'")

    # --- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.pool.open(wait=False)
                self.audit.start()
                self.ready = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.ready = False
                await self.audit.stop()
                await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: AsgiScope, send: Send) -> None:
        started = time.perf_counter()
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        path = scope["path"]
        query = scope["query_string"].decode("latin-1")
        method = scope["method"]
        client: Client | None = None
        entities = 0
        extra: list[tuple[str, str]] = []
        try:
            if path in ("/healthz", "/readyz"):
                await self._plain(send, 200 if (path == "/healthz" or self.ready) else 503)
                return
            if method not in ("GET", "HEAD"):
                raise HttpError(405, "this API is read-only: GET only", [("allow", "GET, HEAD")])
            client = await self._authenticate(headers)
            self._admit(client)
            request = _Request(self._base_url(scope, headers), path, query, parse_qsl(query), client)
            body, entities = await self._answer(request)
            status = 200
            extra = self._terms_headers(client)
        except HttpError as error:
            status = error.status
            body = {"code": error.status, "type": "error", "message": error.message}
            extra = error.headers
        except RequestError as error:
            status = 400
            body = {"code": 400, "type": "error", "message": str(error)}
        except psycopg.errors.QueryCanceled:
            status = 503
            body = {
                "code": 503,
                "type": "error",
                "message": f"the query ran over {self.api.statement_timeout_ms} ms;"
                " narrow it with $filter (a time range) or a smaller $top",
            }
        except psycopg.errors.DataError:
            status = 400
            body = {"code": 400, "type": "error", "message": "the database refused a value in the request"}
        except (psycopg.OperationalError, TimeoutError) as error:
            log.warning("database unavailable: %s", type(error).__name__)
            status = 503
            body = {"code": 503, "type": "error", "message": "the city's database is unavailable; retry shortly"}
            extra = [("retry-after", "2")]
        except Exception:
            log.exception("request %s failed", path)
            status = 500
            body = {"code": 500, "type": "error", "message": "internal error; it has been logged"}
        encoded = msgspec.json.encode(body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json; charset=utf-8"),
                    (b"content-length", str(len(encoded)).encode()),
                    *((name.encode("latin-1"), value.encode("latin-1")) for name, value in extra),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else encoded})
        elapsed = time.perf_counter() - started
        metrics.API_REQUESTS.labels(str(status)).inc()
        metrics.API_DURATION.observe(elapsed)
        remote = scope.get("client") or ("", 0)
        self.audit.record(
            Access(
                datetime.now(UTC),
                client.client_id if client else None,
                method,
                path[:2000],
                query[:4000],
                status,
                entities,
                elapsed * 1000.0,
                str(remote[0]),
            )
        )

    async def _plain(self, send: Send, status: int) -> None:
        body = b"ok\n" if status == 200 else b"not ready\n"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    def _base_url(self, scope: AsgiScope, headers: dict[str, str]) -> str:
        if self.api.public_url:
            return self.api.public_url.rstrip("/") + _ROOT
        host = headers.get("host") or f"{scope['server'][0]}:{scope['server'][1]}"
        return f"{scope.get('scheme', 'http')}://{host}{_ROOT}"

    async def _authenticate(self, headers: dict[str, str]) -> Client:
        claimed, key = key_from_headers(headers)
        challenge = [("www-authenticate", 'Basic realm="citytel", Bearer')]
        if not key or len(key) > 200:
            raise HttpError(401, "a client key is required (HTTP Basic: client name and key; or Bearer key)", challenge)
        client = await self.clients.find(key)
        if client is None or (claimed is not None and claimed != client.client_id):
            raise HttpError(401, "unknown, rotated or revoked key", challenge)
        return client

    def _admit(self, client: Client) -> None:
        rate = client.rate_per_second or self.api.rate_per_second
        burst = client.burst or self.api.burst
        wait = self.limiter.wait_seconds(client.client_id, rate, burst, time.monotonic())
        if wait > 0:
            raise HttpError(429, f"over {rate:g} requests a second", [("retry-after", str(max(1, round(wait))))])
        if not self.audit.admit():
            raise HttpError(503, "the access log is behind; retry shortly", [("retry-after", "2")])

    def _terms(self, client: Client) -> dict[str, Any]:
        terms: dict[str, Any] = {"@citytel.usageTerms": client.terms or self.api.default_terms}
        url = client.terms_url or self.api.default_terms_url
        if url:
            terms["@citytel.usageTermsUrl"] = url
        return terms

    def _terms_headers(self, client: Client) -> list[tuple[str, str]]:
        url = client.terms_url or self.api.default_terms_url
        return [("link", f'<{url}>; rel="license"')] if url else []

    # --- resources ----------------------------------------------------------------------------
    async def _answer(self, request: _Request) -> tuple[dict[str, Any], int]:
        if request.path.rstrip("/") == _ROOT:
            return self._service_document(request), 0
        if not request.path.startswith(_ROOT + "/"):
            raise HttpError(404, f"the service root is {_ROOT}")
        _BASE.set(request.base)
        resource = parse_path(request.path[len(_ROOT) :])
        options = parse_options(request.pairs, self.api.max_top)
        scope = request.client.scope
        async with self.pool.connection() as connection:
            entity_set, row, equal, parent = await self._walk(connection, resource, scope)
            if row is not None:  # one entity (the path ended with a key or a to-one step)
                if resource.property is not None:
                    return self._property(entity_set, row, resource.property), 1
                body = await self._render(connection, entity_set, row, options, scope)
                return self._select(body, options) | self._terms(request.client), 1
            return await self._collection(connection, request, entity_set, options, scope, equal, parent)

    def _service_document(self, request: _Request) -> dict[str, Any]:
        return {
            "value": [{"name": name, "url": f"{request.base}/{name}"} for name in self.model],
            "serverSettings": {"conformance": _CONFORMANCE},
            **self._terms(request.client),
            "@citytel.scope": request.client.scope.describe(),
        }

    def _entity_set(self, name: str) -> EntitySet:
        found = self.model.get(name)
        if found is None:
            raise HttpError(404, f"no entity set {name}; there are {', '.join(self.model)}")
        return found

    async def _one(
        self,
        connection: psycopg.AsyncConnection[Any],
        entity_set: EntitySet,
        equal: dict[str, Any],
        scope: Scope,
    ) -> Row:
        """The one entity matching ``equal``: 403 if it exists outside the scope, 404 if not."""
        cache_key = (entity_set.name, tuple(sorted(equal.items())))
        row = self._immutable.get(cache_key)
        if row is None:
            row = await self._fetchone(connection, select_statement(entity_set, Options(), None, equal, 1))
            if row is None:
                raise HttpError(404, f"no such {entity_set.singular}")
            if entity_set.immutable:
                if len(self._immutable) >= _IMMUTABLE_ENTRIES:
                    self._immutable.clear()
                self._immutable[cache_key] = row
        if not scope.admits(row, entity_set.scoped):
            raise HttpError(403, f"this {entity_set.singular} is outside your scope: {scope.describe()}")
        return row

    async def _walk(
        self, connection: psycopg.AsyncConnection[Any], resource: Resource, scope: Scope
    ) -> tuple[EntitySet, Row | None, dict[str, Any], _Parent | None]:
        """Follow the path: returns the last step's set and either its one entity, or (for a
        collection) the column values its members must have and the entity they belong to."""
        first = resource.segments[0]
        entity_set = self._entity_set(first.name)
        equal: dict[str, Any] = {}
        row: Row | None = None
        parent: _Parent | None = None
        if first.id is not None:
            row = await self._one(connection, entity_set, entity_set.key_of(first.id), scope)
        for segment in resource.segments[1:]:
            if row is None:
                raise HttpError(400, f"{segment.name}: navigate from one entity, e.g. {entity_set.name}('id')/...")
            navigation = entity_set.navigation.get(segment.name)
            if navigation is None:
                raise HttpError(404, f"a {entity_set.singular} has no {segment.name}")
            equal = {target: row[source] for target, source in navigation.joins}
            parent = _Parent(entity_set.name, row)
            entity_set = self._entity_set(navigation.target)
            if segment.id is not None:
                row = await self._one(connection, entity_set, equal | entity_set.key_of(segment.id), scope)
            elif not navigation.many:
                row = await self._one(connection, entity_set, equal, scope)
            else:
                row = None
        if resource.property is not None and row is None:
            raise HttpError(400, f"{resource.property}: a property of one entity, e.g. {entity_set.name}('id')/...")
        return entity_set, row, equal, parent

    @staticmethod
    async def _fetchall(connection: psycopg.AsyncConnection[Any], statement: Statement) -> list[Row]:
        # Prepared: a request shape is planned once per connection (see citytel.api.queries).
        cursor = await connection.execute(statement.text, statement.params, prepare=True)
        return await cursor.fetchall()

    @staticmethod
    async def _fetchone(connection: psycopg.AsyncConnection[Any], statement: Statement) -> Row | None:
        cursor = await connection.execute(statement.text, statement.params, prepare=True)
        row: Row | None = await cursor.fetchone()
        return row

    def _property(self, entity_set: EntitySet, row: Row, name: str) -> dict[str, Any]:
        body = entity_set.render(row)
        if name not in body:
            raise HttpError(404, f"a {entity_set.singular} has no property {name}")
        return {name: body[name]}

    async def _collection(
        self,
        connection: psycopg.AsyncConnection[Any],
        request: _Request,
        entity_set: EntitySet,
        options: Options,
        scope: Scope,
        equal: dict[str, Any],
        parent: _Parent | None,
    ) -> tuple[dict[str, Any], int]:
        top = options.top if options.top is not None else self.api.default_top
        if options.expand and top > self.api.max_expand_parents:
            raise RequestError(f"with $expand, $top may be at most {self.api.max_expand_parents}")
        body: dict[str, Any] = {}
        if options.count:
            counted = await self._fetchone(connection, count_statement(entity_set, options, scope, equal))
            body["@iot.count"] = counted["count"] if counted else 0
        fast = entity_set.page
        if (
            fast is not None
            and parent is not None
            and parent.set_name == fast.parent
            and not (options.select or options.expand)
        ):
            # The fast path: a page of one parent's members written at once (the same as render).
            page = select_statement(entity_set, options, scope, equal, top, fast.columns)
            cursor = page_cursor(connection)
            await cursor.execute(page.text, page.params, prepare=True)
            fetched = await cursor.fetchall()
            more, returned = len(fetched) > top, min(len(fetched), top)
            body["value"] = msgspec.Raw(fast.render(parent.row, fetched[:top], request.base).encode())
        else:
            rows = await self._fetchall(connection, select_statement(entity_set, options, scope, equal, top))
            more, returned = len(rows) > top, min(len(rows), top)
            body["value"] = [
                self._select(await self._render(connection, entity_set, row, options, scope), options)
                for row in rows[:top]
            ]
        if more:
            pairs = [(name, value) for name, value in request.pairs if name != "$skip"]
            pairs.append(("$skip", str(options.skip + top)))
            if options.top is None:
                pairs.append(("$top", str(top)))
            body["@iot.nextLink"] = f"{request.base}{request.path[len(_ROOT) :]}?{urlencode(pairs, quote_via=quote)}"
        body |= self._terms(request.client)
        body["@citytel.scope"] = scope.describe()
        return body, returned

    async def _render(
        self,
        connection: psycopg.AsyncConnection[Any],
        entity_set: EntitySet,
        row: Row,
        options: Options,
        scope: Scope,
    ) -> dict[str, Any]:
        body = entity_set.render(row)
        for expand in options.expand:
            navigation = entity_set.navigation.get(expand.name)
            if navigation is None:
                raise RequestError(f"cannot expand {expand.name}: a {entity_set.singular} has no such navigation")
            target = self._entity_set(navigation.target)
            equal = {column: row[source] for column, source in navigation.joins}
            top = expand.options.top if expand.options.top is not None else self.api.default_top
            if not navigation.many:
                top = 1
            children = await self._fetchall(connection, select_statement(target, expand.options, scope, equal, top))
            rendered = [
                self._select(await self._render(connection, target, child, expand.options, scope), expand.options)
                for child in children[:top]
            ]
            if navigation.many:
                body[expand.name] = rendered
                if len(children) > top:
                    body[f"{expand.name}@iot.nextLink"] = (
                        f"{body[f'{expand.name}@iot.navigationLink']}?$top={top}&$skip={expand.options.skip + top}"
                    )
            else:
                body[expand.name] = rendered[0] if rendered else None
        return body

    @staticmethod
    def _select(body: dict[str, Any], options: Options) -> dict[str, Any]:
        if not options.select:
            return body
        wanted = {"@iot.id" if name in ("id", "@iot.id") else name for name in options.select}
        wanted |= {expand.name for expand in options.expand}
        unknown = {name for name in wanted if name not in body and not name.endswith("@iot.navigationLink")}
        if unknown:
            raise RequestError(f"$select: no property {', '.join(sorted(unknown))}")
        return {name: value for name, value in body.items() if name in wanted}


# --- processes ---------------------------------------------------------------------------------


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket every worker binds on its own; the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _serve(settings: Settings, worker: int) -> None:
    import uvicorn

    api = settings.api
    app = ApiApp(settings)
    metrics.serve_metrics(settings.metrics.host, settings.metrics.api_port + worker, lambda: app.ready)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    sock = _listening_socket(api.host, api.port)
    # Each request makes short-lived objects by the hundred: full collections must not walk
    # the start-up heap (citytel/core/heap.py).
    frozen = freeze_startup_heap()
    watch_collections()
    log.info("SensorThings API worker %d on http://%s:%d%s (%d start-up objects frozen)", worker, api.host, api.port,
             _ROOT, frozen)  # fmt: skip
    server.run(sockets=[sock])


def run_api(settings: Settings) -> None:
    """Serve until SIGTERM or Ctrl-C: ``api.workers`` processes, each with its own database
    pool and metrics port (``metrics.api_port`` + worker number)."""
    workers = settings.api.workers
    if workers == 1:
        _serve(settings, 0)
        return
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_serve, args=(settings, worker), daemon=False) for worker in range(workers)]
    for process in processes:
        process.start()
    stopping = False

    def stop(_signal: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(process.is_alive() for process in processes):
        time.sleep(0.5)
    stop(signal.SIGTERM, None)
    for process in processes:
        process.join(timeout=10)
