"""The outermost layer of the diagnose server: what every request passes and every answer carries.

- Host check (DNS rebinding): a page on another site whose name resolves to 127.0.0.1 sends
  its own name in the Host header; only the names of the bound address (or
  `diagnose.allowed_hosts`) are answered, anything else gets 400.
- Body limit: a body over `max_bytes` gets 413, whether it announces its length or
  arrives chunked.
- Security headers on every answer, errors included; an unexpected failure is a JSON 500
  (with the headers), never a plain-text traceback page.
"""

from __future__ import annotations

import logging
import socket

from starlette.exceptions import HTTPException

from safesail.diagnose.api.common import error_json

log = logging.getLogger(__name__)

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                                 b"form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"0.0.0.0", "::", ""}


class BodyTooLarge(HTTPException):
    """Raised while the body is read; an HTTPException so that FastAPI passes it on as it is (not as a 400)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is over {max_bytes} bytes; send a shorter query.")


def allowed_host_names(host: str, configured: list[str] | None = None) -> set[str] | None:
    """Host names the server answers to (lower case, no port); None means any."""
    if configured:
        names = {h.strip().lower().rstrip(".") for h in configured}
        return None if "*" in names else names
    host = host.strip().lower().strip("[]")
    names = {host}
    if host in LOOPBACK or host.startswith("127."):
        names |= LOOPBACK
    elif host in WILDCARD:
        names |= LOOPBACK
        for name in (socket.gethostname(), socket.getfqdn()):
            names.add(name.lower())
            try:
                names.update(socket.gethostbyname_ex(name)[2])
            except OSError:
                pass
    return names


def host_name(header: bytes | None) -> str | None:
    """The name part of a Host header: 'localhost:8765' -> 'localhost', '[::1]:8765' -> '::1'."""
    if header is None:
        return None
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0].rstrip(".") if text.count(":") == 1 else text.rstrip(".")


class GuardMiddleware:
    def __init__(self, app, max_bytes: int, allowed_hosts: set[str] | None):
        self.app, self.max_bytes, self.allowed_hosts = app, max_bytes, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                msg = dict(msg)
                msg["headers"] = list(msg.get("headers", [])) + SECURITY_HEADERS
            await send(msg)

        headers = dict(scope.get("headers") or [])
        name = host_name(headers.get(b"host"))
        if self.allowed_hosts is not None and name is not None and name not in self.allowed_hosts:
            answer = error_json(400, "bad_host", f"this server does not answer to the host name {name!r}; open it "
                                                 "by the address it is bound to, or add the name to "
                                                 "diagnose.allowed_hosts.")
            return await answer(scope, receive, send_with_headers)
        too_large = error_json(413, "too_large", f"the request body is over {self.max_bytes} bytes; send a "
                                                 "shorter query.")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send_with_headers)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return msg

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except BodyTooLarge:
            if not started:
                await too_large(scope, receive, send_with_headers)
        except Exception:  # noqa: BLE001 - answered as JSON; the traceback goes to the log
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await error_json(500, "internal", "the server failed on this request (see its log); try again or "
                                                  "report it.")(scope, receive, send_with_headers)
