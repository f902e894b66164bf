"""What every HTTP request to `msc serve` passes through (a plain ASGI middleware, so streaming responses
and disconnect detection work as without it):

- a bound on the request body (a larger one is a 413 before the app parses anything),
- the API key, when the server has one (`Authorization: Bearer KEY` on every /v1/ path),
- one structured access-log line per request (logger "msc.access", JSON: method, path, status, ms, client)
  and the error counter of the metrics.

Then the routes parse JSON bodies strictly (`StrictJSONRoute`): NaN, Infinity, numbers too large for a
float (1e400) and lone UTF-16 surrogates ("\\ud800") are refused as invalid JSON instead of becoming
non-finite floats or strings that no UTF-8 answer can carry. `public_address_warning`
is what `msc serve` says when it listens beyond this machine.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import re
import time
from typing import Any, Callable

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute

access_log = logging.getLogger("msc.access")
log = logging.getLogger("msc.server")

MAX_BODY_BYTES = 4 << 20  # 4 MiB: a 128k-token prompt as ids is about 1 MB of JSON


class _BodyTooLarge(HTTPException):
    """The body grew past the bound while the app read it.

    NOTE: an HTTPException, because FastAPI turns any other exception raised while it reads a body into a
    generic 400; this one it re-raises, and the app's handler answers it (413, code request_too_large)."""

    code = "request_too_large"

    def __init__(self, message: str):
        super().__init__(413, message)


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
                await reply(413, _error_body(too_big, "request_too_large"))
                return
            seen = 0

            async def receive_bounded():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge(too_big)
                return message

            try:
                await self.app(scope, receive_bounded, send_logged)
            except _BodyTooLarge:
                if state["status"] is None:
                    await reply(413, _error_body(too_big, "request_too_large"))
        finally:
            status = state["status"] or 499  # no response started: the client went away first
            if self.metrics is not None and status >= 400:
                self.metrics.error(status)
            client = scope.get("client")
            access_log.info(json.dumps({"method": scope.get("method"), "path": scope.get("path"), "status": status,
                                        "ms": round((time.perf_counter() - t0) * 1000, 2),
                                        "client": f"{client[0]}:{client[1]}" if client else None}))


# ---------------------------------------------------------------------- strict JSON bodies
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (numbers must be finite)")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        shown = text if len(text) <= 32 else text[:29] + "..."
        raise ValueError(f"the number {shown} does not fit a 64-bit float (numbers must be finite)")
    return x


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape (JSON's only way to one)


def strict_json_loads(body: bytes | str) -> Any:
    """json.loads without Python's extensions: NaN, Infinity and numbers that overflow a float (1e400) are
    refused, and so are strings holding a lone UTF-16 surrogate ("\\ud800": no character, and no UTF-8 text
    can carry it back) and anything else json cannot read (bad UTF-8, nesting deeper than the interpreter's
    recursion limit, integers of more than 4300 digits), all as json.JSONDecodeError with a short reason.

    NOTE: FastAPI turns a JSONDecodeError raised while reading the body into its "json_invalid" validation
    error, which the app answers as a 400 "the body is not valid JSON: REASON"; any other exception would
    be a generic "error parsing the body"."""
    try:
        value = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("it is nested too deeply", "", 0) from None
    except ValueError as e:  # the two hooks above, UnicodeDecodeError, the int digit limit
        reason = str(e)
        raise json.JSONDecodeError(reason if len(reason) <= 200 else reason[:197] + "...", "", 0) from None
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    # NOTE: only a body with a surrogate escape is walked (escaped pairs, as json.dumps writes emoji, are common
    # and fine: json joins them into one character); a lone one would fail later, where text meets UTF-8
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        raise json.JSONDecodeError("a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                                   "which is not a character", "", 0)
    return value


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in a parsed JSON value holds a lone surrogate (no recursion: any depth)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


class StrictJSONRequest(Request):
    """A request whose .json() is strict_json_loads of its body."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A FastAPI route that reads its JSON body with strict_json_loads (set as the app router's route_class
    before the routes are added)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive, request._send))

        return strict


# ---------------------------------------------------------------------- where the server listens
def public_address_warning(host: str, api_key: str | None) -> str | None:
    """A warning (also logged on "msc.server") when `host` is not a loopback address, else None."""
    name = host.strip("[]")
    try:
        loopback = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    message = (f"listening on {host}: anyone who can reach this address can use the server"
               + ("" if api_key else " (no --api-key is set)"))
    log.warning(message)
    return message
