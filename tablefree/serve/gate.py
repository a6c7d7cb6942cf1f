"""ASGI middleware in front of every route: API key (401), body size limit (413), UTF-8 body (400), request metrics.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which would hide client disconnects from the routes.
"""

from __future__ import annotations

import hmac
import json
import time

from starlette.routing import Match

from .protocol import error_body

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# The status a request is counted under when its client hung up before the response ended (nginx's): the
# client's doing, never a 5xx.
CLIENT_CLOSED = 499


class RequestGate:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        outcome = RequestOutcome()
        started = time.perf_counter()

        async def send_counted(message):
            if message["type"] == "http.response.start":
                outcome.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                outcome.complete = True
            await send(message)

        async def receive_watched():
            message = await receive()
            if message["type"] == "http.disconnect" and not outcome.complete:
                outcome.client_closed = True
            return message

        try:
            if self.api_key and path.startswith(PROTECTED_PREFIXES) and not self._authorized(scope):
                return await self._reply(send_counted, 401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                         "authentication_error", extra=[(b"www-authenticate", b"Bearer")])
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
                return await self._reply(send_counted, 413, f"request body over the limit of {self.max_body_bytes} bytes",
                                         "invalid_request_error")
            chunks, size, more = [], 0, True
            while more:
                message = await receive_watched()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_body_bytes:
                    return await self._reply(send_counted, 413, f"request body over the limit of {self.max_body_bytes} bytes",
                                             "invalid_request_error")
            body = b"".join(chunks)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:  # JSON is UTF-8 (RFC 8259); say where it is not
                return await self._reply(send_counted, 400, f"the request body is not valid UTF-8 (byte {exc.start})",
                                         "invalid_request_error")
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive_watched()

            await self.app(scope, replay, send_counted)
        finally:
            endpoint = endpoint_of(scope)
            self.metrics.requests.labels(endpoint, str(outcome.counted_status())).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    @staticmethod
    async def _reply(send, status: int, message: str, type_: str, extra: list | None = None):
        payload = json.dumps(error_body(message, type_, status)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())] + (extra or [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class RequestOutcome:
    """What became of one request: the status it was answered with, whether its response ended, whether its client
    hung up first."""

    def __init__(self):
        self.status: int | None = None
        self.complete = False
        self.client_closed = False

    def counted_status(self) -> int:
        if self.client_closed:
            return CLIENT_CLOSED
        return 500 if self.status is None else self.status  # no answer and no hang-up: the route raised


def endpoint_of(scope) -> str:
    """The route a request is for, as its path template, known before the body arrives (a hang-up mid-body still
    names it); unmatched paths share one label so that a scan of random URLs cannot grow the metrics without bound."""
    for route in scope["app"].router.routes:
        if route.matches(scope)[0] is not Match.NONE:
            return route.path
    return "other"
