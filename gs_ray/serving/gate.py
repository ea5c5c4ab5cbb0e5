"""The gate in front of every route of the serving API, before a request's body is read: the API
keys (resolved in the driver, ``client_keys``; the Ingress gets their SHA-256s, each with its
client's name), the Host header of a keyless loopback server (DNS rebinding), each client's share
(``ClientLimits``: requests in progress and started per second, by API key, else by address),
the body's size (``serve.max_body_bytes``). Pure ASGI, no Ray: ``app.py`` installs it in its
Ingress replica (``install_gate``) and adds ``GateMiddleware`` to the FastAPI app."""

import hashlib
import hmac
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gs_ray.config import ServeConfig
from gs_ray.serving.pool import ServingError
from gs_ray.serving.protocol import OpenAIError

log = logging.getLogger(__name__)

API_KEY_ENV = "GS_RAY_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

OPEN_PATHS = frozenset({"/healthz"})  # the only path a request without the key may reach
DEFAULT_CLIENT = "default"  # the client of serve.api_key (or GS_RAY_API_KEY)
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_FILE_KEY_CHARS = 16  # a key of serve.api_keys_file is at least this long
MAX_TRACKED_CLIENTS = 4096  # addresses (keyless) a replica keeps a share for at once


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class Share:
    """What one client may take of an Ingress replica: requests in progress at once, requests
    started per second (sustained) and at once above that rate. None: no limit (``burst``:
    the default's)."""

    max_in_flight: int | None = None
    rate: float | None = None
    burst: int | None = None

    def over(self, default: "Share") -> "Share":
        """This share where it says something, else ``default``'s."""
        return Share(
            *(
                mine if mine is not None else theirs
                for mine, theirs in (
                    (self.max_in_flight, default.max_in_flight),
                    (self.rate, default.rate),
                    (self.burst, default.burst),
                )
            )
        )

    @property
    def limited(self) -> bool:
        return self.max_in_flight is not None or self.rate is not None


@dataclass(frozen=True)
class Clients:
    """Who may call, resolved in the driver (``client_keys``): the SHA-256 hex of each API key
    with its client's name (empty: no key needed), and the clients given a share of their own
    in ``serve.api_keys_file``."""

    keys: Mapping[str, str] = field(default_factory=dict)
    shares: Mapping[str, Share] = field(default_factory=dict)


class ClientLimits:
    """Each client's share of one Ingress replica (``Share``): requests in progress (a stream
    until it ends or its client leaves) and requests started per second (a token bucket of
    ``burst``). A client is its API key's name (its own share from the keys file, else the
    ``serve.client_*`` default), or, on a server without keys, its address. Over either
    limit: 429 with ``Retry-After``, before the body is read. Pure (a clock is passed in for
    tests); one event loop calls it, so no lock."""

    def __init__(
        self,
        default: Share,
        own: Mapping[str, Share] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ):
        self.default, self.own = default, dict(own or {})
        self.clock, self.max_clients = clock, max_clients
        self.in_flight: dict[str, int] = {}
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)

    @classmethod
    def for_serving(cls, cfg: ServeConfig, clients: Clients) -> "ClientLimits | None":
        default = Share(cfg.client_max_in_flight, cfg.client_rate, cfg.client_burst)
        if not default.limited and not any(s.limited for s in clients.shares.values()):
            return None
        return cls(default, {f"key {name}": s for name, s in clients.shares.items()})

    def share(self, client: str) -> Share:
        own = self.own.get(client)
        return self.default if own is None else own.over(self.default)

    def _tokens(self, client: str, share: Share, now: float) -> float:
        if share.rate is None:
            return math.inf
        tokens, when = self.buckets.get(client, (float(share.burst), now))
        return min(float(share.burst), tokens + (now - when) * share.rate)

    def _forget_idle(self, now: float) -> None:
        """Drop the clients with nothing in progress and a full bucket (their state is the
        default again), so that many addresses cannot grow the table without bound."""
        for client in list(self.buckets):
            share = self.share(client)
            if not self.in_flight.get(client) and self._tokens(client, share, now) >= share.burst:
                del self.buckets[client]

    def acquire(self, client: str) -> OpenAIError | None:
        """Start one request of ``client`` (then ``release`` it when it ends), or why not."""
        now, share = self.clock(), self.share(client)
        running = self.in_flight.get(client, 0)
        if share.max_in_flight is not None and running >= share.max_in_flight:
            return _too_many(
                f"{running} requests of this client are in progress, its limit "
                "(serve.client_max_in_flight, or in_flight= in serve.api_keys_file); retry "
                "when one has ended",
                1,
            )
        tokens = self._tokens(client, share, now)
        if tokens < 1:
            wait = (1 - tokens) / share.rate
            return _too_many(
                f"this client started more than {share.rate:g} requests per second, its limit "
                f"(serve.client_rate, or rate= in serve.api_keys_file; burst {share.burst}); "
                f"retry in {wait:.2f} s",
                math.ceil(wait),
            )
        if client not in self.buckets and client not in self.in_flight:
            if len(self.buckets.keys() | self.in_flight.keys()) >= self.max_clients:
                self._forget_idle(now)
            if len(self.buckets.keys() | self.in_flight.keys()) >= self.max_clients:
                return _too_many("too many clients at once; retry later", 1)
        if share.rate is not None:
            self.buckets[client] = (tokens - 1, now)
        self.in_flight[client] = running + 1
        return None

    def release(self, client: str) -> None:
        running = self.in_flight.get(client, 0) - 1
        if running > 0:
            self.in_flight[client] = running
        else:
            self.in_flight.pop(client, None)


def _too_many(message: str, retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        429,
        message,
        None,
        "rate_limit_exceeded",
        "rate_limit_error",
        headers={"Retry-After": str(max(1, retry_after_s))},
    )


@dataclass(frozen=True)
class Gate:
    """What every request passes before its body is read (``GateMiddleware``): an API key (the
    SHA-256 of each, with its client's name), the Host header where no key is set on a
    loopback host (a web page must not reach the server through a name that resolves to
    127.0.0.1: DNS rebinding), the client's share (``limits``), and the body's size."""

    keys: Mapping[str, str]  # SHA-256 hex of a key -> its client's name; empty: no key needed
    max_body_bytes: int
    loopback_hosts_only: bool
    limits: ClientLimits | None = field(default=None, compare=False)

    @classmethod
    def for_serving(cls, cfg: ServeConfig, clients: Clients | None) -> "Gate":
        clients = clients or Clients()
        return cls(
            dict(clients.keys),
            cfg.max_body_bytes,
            not clients.keys and cfg.host in LOOPBACK_HOSTS,
            ClientLimits.for_serving(cfg, clients),
        )

    def admit(
        self, path: str, headers: dict[str, str], peer: str | None
    ) -> tuple[OpenAIError | None, str | None]:
        """(why a request with these headers is refused before its body is read, or None; the
        client whose share it takes, or None where it takes none: ``release`` it when done)."""
        if path in OPEN_PATHS:
            return None, None
        if self.loopback_hosts_only and host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
            return OpenAIError(
                400,
                "Host: this server answers only to a loopback name "
                "(localhost, 127.0.0.1, [::1]) when it has no API key",
                "host",
                "invalid_host",
            ), None
        client = f"address {peer or 'unknown'}"
        if self.keys:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).hexdigest()
            bearer, name = scheme.lower() == "bearer", None
            for known, who in self.keys.items():  # every digest, each in constant time
                if hmac.compare_digest(digest, known) and bearer:
                    name = who
            if name is None:
                return OpenAIError(
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    None,
                    "invalid_api_key",
                    "authentication_error",
                ), None
            client = f"key {name}"
        length = headers.get("content-length", "0").strip() or "0"
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return self.too_large(), None
        if self.limits is None:
            return None, None
        refused = self.limits.acquire(client)
        return (refused, None) if refused is not None else (None, client)

    def release(self, client: str | None) -> None:
        if client is not None and self.limits is not None:
            self.limits.release(client)

    def too_large(self) -> OpenAIError:
        return OpenAIError(
            413,
            f"the request body is over {self.max_body_bytes} bytes (serve.max_body_bytes)",
            None,
            "request_too_large",
        )


_GATE: list[Gate] = []  # this replica's gate, set by the Ingress (install_gate)


def install_gate(gate: Gate) -> None:
    """Give this process's ``GateMiddleware`` its gate (called in the Ingress's constructor;
    a module function so that the Ingress, pickled by value into its replica, reaches this
    module's state)."""
    _GATE[:] = [gate]


class GateMiddleware:
    """ASGI middleware in front of every route: refuses by headers (``Gate.admit``: key,
    Host, declared length, the client's share) before anything reads the body, then reads the
    body itself, counting, so that a chunked body over the limit is cut off at the limit (413);
    the client's share is given back when the request ends. No gate installed yet: 503
    (nothing is served unchecked)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if not _GATE:
            refused = OpenAIError(503, "not ready", None, None, "server_error")
            return await refused.response()(scope, receive, send)
        gate = _GATE[0]
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        peer = scope.get("client")
        refused, client = gate.admit(path, headers, peer[0] if peer else None)
        if refused is not None:
            return await refused.response()(scope, receive, send)
        try:
            return await self._pass(scope, receive, send)
        finally:
            gate.release(client)  # the request has ended (a stream: its last chunk, or a hang-up)

    async def _pass(self, scope, receive, send) -> None:
        if scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > _GATE[0].max_body_bytes:
                return await _GATE[0].too_large().response()(scope, receive, send)
            if not message.get("more_body"):
                break
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return body.pop() if body else await receive()

        return await self.app(scope, replay, send)


SHARE_FIELDS = {
    "in_flight": ("max_in_flight", int),
    "rate": ("rate", float),
    "burst": ("burst", int),
}


def _share(where: str, name: str, options: list[str]) -> Share:
    """A client's own share from its line's ``in_flight=N rate=R burst=B`` options."""
    given: dict[str, int | float] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key not in SHARE_FIELDS:
            raise ServingError(
                f"{where}: {option[:80]!r} is not one of in_flight=N, rate=R, burst=N"
            )
        attr, kind = SHARE_FIELDS[key]
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if attr in given or not (math.isfinite(number) and number > 0):
            raise ServingError(
                f"{where}: {key} of {name!r} must be given once, as a positive "
                f"{'integer' if kind is int else 'number'} (got {value[:40]!r})"
            )
        given[attr] = number
    return Share(**given)


def read_api_keys_file(path: str | os.PathLike) -> dict[str, tuple[str, Share]]:
    """``serve.api_keys_file``: one client per line, ``NAME KEY [in_flight=N] [rate=R]
    [burst=N]`` (blank lines and ``#`` comments skipped; the options give the client a share
    of its own, else ``serve.client_*``), as {name: (key, share)}. Refuses, naming the file
    and line: a file others may read (it must be 0600 or stricter), a malformed line, a name
    outside ``CLIENT_NAME``, a key under ``MIN_FILE_KEY_CHARS`` characters, a name or a key
    given twice."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ServingError(f"serve.api_keys_file {path}: cannot read it ({e})") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServingError(
            f"serve.api_keys_file {path}: others may read it (mode {stat.filemode(mode)}); "
            f"chmod 600 {path}"
        )
    clients: dict[str, tuple[str, Share]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"serve.api_keys_file {path}, line {number}"
        parts = line.split()
        if len(parts) < 2:
            raise ServingError(f"{where}: expected NAME KEY [in_flight=N] [rate=R] [burst=N]")
        name, key, options = parts[0], parts[1], parts[2:]
        if not CLIENT_NAME.fullmatch(name):
            raise ServingError(
                f"{where}: client name {name[:80]!r} is not 1-64 letters, digits or _.@-"
            )
        if len(key) < MIN_FILE_KEY_CHARS:
            raise ServingError(
                f"{where}: the key of {name!r} has {len(key)} characters; use at least "
                f"{MIN_FILE_KEY_CHARS} (e.g. python -c "
                "'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if name in clients:
            raise ServingError(f"{where}: client {name!r} is named twice")
        if any(key == other for other, _ in clients.values()):
            raise ServingError(f"{where}: the key of {name!r} is another client's too")
        clients[name] = (key, _share(where, name, options))
    if not clients:
        raise ServingError(f"serve.api_keys_file {path}: no NAME KEY line in it")
    return clients


def client_keys(cfg: ServeConfig) -> Clients:
    """Who may call, resolved here (the driver): ``serve.api_key``, else ``GS_RAY_API_KEY`` of
    the shell that builds the app, as the client "default", and ``serve.api_keys_file``'s
    clients with their own shares; for the Ingress, each key only as its SHA-256 (no key
    leaves the driver). Refuses a host other than loopback with no key unless
    ``serve.allow_no_key`` says so; logs whether requests need a key."""
    named = read_api_keys_file(cfg.api_keys_file) if cfg.api_keys_file else {}
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if key is not None:
        if DEFAULT_CLIENT in named or any(key == k for k, _ in named.values()):
            raise ServingError(
                f"serve.api_keys_file {cfg.api_keys_file}: the client {DEFAULT_CLIENT!r} or its "
                f"key is serve.api_key's ({API_KEY_ENV}); name it otherwise"
            )
        named = {DEFAULT_CLIENT: (key, Share()), **named}
    if not named and cfg.host not in LOOPBACK_HOSTS and not cfg.allow_no_key:
        raise ServingError(
            f"serve.host is {cfg.host!r} (not loopback) but no API key is set: set "
            f"{API_KEY_ENV} (or serve.api_key, or serve.api_keys_file) where gs-ray serve runs, "
            "or pass --serve.allow_no_key true to serve without one"
        )
    log.info(
        "gs-ray serve: requests %s",
        f"need an API key (Authorization: Bearer KEY; {len(named)} client(s))"
        if named
        else "need no API key",
    )
    return Clients(
        {hashlib.sha256(k.encode()).hexdigest(): name for name, (k, _) in named.items()},
        {name: share for name, (_, share) in named.items() if share != Share()},
    )
