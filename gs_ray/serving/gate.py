"""The gate in front of every route of the serving API, before a request's body is read: the API
key (resolved in the driver, ``api_key_digest``; the Ingress gets its SHA-256), the Host header of
a keyless loopback server (DNS rebinding), the body's size (``serve.max_body_bytes``). Pure ASGI,
no Ray: ``app.py`` installs it in its Ingress replica (``install_gate``) and adds
``GateMiddleware`` to the FastAPI app."""

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

from gs_ray.config import ServeConfig
from gs_ray.serving.pool import ServingError
from gs_ray.serving.protocol import OpenAIError

log = logging.getLogger(__name__)

API_KEY_ENV = "GS_RAY_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

OPEN_PATHS = frozenset({"/healthz"})  # the only path a request without the key may reach


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class Gate:
    """What every request passes before its body is read (``GateMiddleware``): the API key
    (its SHA-256), the Host header where no key is set on a loopback host (a web page must
    not reach the server through a name that resolves to 127.0.0.1: DNS rebinding), and the
    body's size."""

    key_sha256: str | None
    max_body_bytes: int
    loopback_hosts_only: bool

    @classmethod
    def for_serving(cls, cfg: ServeConfig, key_sha256: str | None) -> "Gate":
        return cls(
            key_sha256, cfg.max_body_bytes, key_sha256 is None and cfg.host in LOOPBACK_HOSTS
        )

    def refusal(self, path: str, headers: dict[str, str]) -> OpenAIError | None:
        """Why a request with these headers is refused before its body is read (None: pass)."""
        if path in OPEN_PATHS:
            return None
        if self.loopback_hosts_only and host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
            return OpenAIError(
                400,
                "Host: this server answers only to a loopback name "
                "(localhost, 127.0.0.1, [::1]) when it has no API key",
                "host",
                "invalid_host",
            )
        if self.key_sha256 is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.key_sha256):
                return OpenAIError(
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    None,
                    "invalid_api_key",
                    "authentication_error",
                )
        length = headers.get("content-length", "0").strip() or "0"
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return self.too_large()
        return None

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
    """ASGI middleware in front of every route: refuses by headers (``Gate.refusal``: key,
    Host, declared length) before anything reads the body, then reads the body itself,
    counting, so that a chunked body over the limit is cut off at the limit (413). No gate
    installed yet: 503 (nothing is served unchecked)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if not _GATE:
            refused: OpenAIError | None = OpenAIError(503, "not ready", None, None, "server_error")
        else:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in scope.get("headers", [])
            }
            refused = _GATE[0].refusal(path, headers)
        if refused is not None:
            return await refused.response()(scope, receive, send)
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


def api_key_digest(cfg: ServeConfig) -> str | None:
    """The API key, resolved here (the driver: ``serve.api_key``, else ``GS_RAY_API_KEY`` of
    the shell that builds the app), as its SHA-256 hex digest for the Ingress. Refuses a
    host other than loopback with no key unless ``serve.allow_no_key`` says so; logs whether
    requests need a key."""
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and cfg.host not in LOOPBACK_HOSTS and not cfg.allow_no_key:
        raise ServingError(
            f"serve.host is {cfg.host!r} (not loopback) but no API key is set: set "
            f"{API_KEY_ENV} (or serve.api_key) where gs-ray serve runs, or pass "
            "--serve.allow_no_key true to serve without one"
        )
    log.info(
        "gs-ray serve: requests %s",
        "need an API key (Authorization: Bearer KEY)" if key else "need no API key",
    )
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()
