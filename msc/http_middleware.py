"""What every HTTP request to `msc serve` passes through (a plain ASGI middleware, so streaming responses
and disconnect detection work as without it):

- a bound on the request body (a larger one is a 400 before the app parses anything),
- the API key, when the server has one (`Authorization: Bearer KEY` on every /v1/ path),
- one structured access-log line per request (logger "msc.access", JSON: method, path, status, ms, client)
  and the error counter of the metrics.
"""
from __future__ import annotations

import hmac
import json
import logging
import time

access_log = logging.getLogger("msc.access")

MAX_BODY_BYTES = 4 << 20  # 4 MiB: a 128k-token prompt as ids is about 1 MB of JSON


class _BodyTooLarge(Exception):
    pass


def _error_body(message: str, code: str | None, type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class ServerGate:
    def __init__(self, app, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, metrics=None):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = {"status": None}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        async def reply(status: int, body: bytes, extra_headers=()):
            await send_logged({"type": "http.response.start", "status": status,
                               "headers": [(b"content-type", b"application/json"), *extra_headers]})
            await send_logged({"type": "http.response.body", "body": body})

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            path = scope.get("path", "")
            if self.api_key is not None and path.startswith("/v1/"):
                auth = headers.get("authorization", "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                # NOTE: a constant-time comparison, so the key cannot be guessed from response times
                if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                    await reply(401, _error_body("missing or wrong API key: send 'Authorization: Bearer KEY'",
                                                 "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
                    return
            length = headers.get("content-length")
            too_big = (f"the request body is larger than {self.max_body} bytes, the most this server accepts")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await reply(400, _error_body(too_big, "request_too_large"))
                return
            seen = 0

            async def receive_bounded():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge
                return message

            try:
                await self.app(scope, receive_bounded, send_logged)
            except _BodyTooLarge:
                if state["status"] is None:
                    await reply(400, _error_body(too_big, "request_too_large"))
        finally:
            status = state["status"] or 499  # no response started: the client went away first
            if self.metrics is not None and status >= 400:
                self.metrics.error(status)
            client = scope.get("client")
            access_log.info(json.dumps({"method": scope.get("method"), "path": scope.get("path"), "status": status,
                                        "ms": round((time.perf_counter() - t0) * 1000, 2),
                                        "client": f"{client[0]}:{client[1]}" if client else None}))
