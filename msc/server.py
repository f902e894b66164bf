"""HTTP front end of a serving engine (FastAPI): `msc serve BUNDLE` runs it under uvicorn.

    POST /v1/completions        OpenAI's completions: text or token-id prompts, streaming, n, stop, logprobs
    POST /v1/chat/completions   OpenAI's chat completions through the tokenizer's chat template
    GET  /v1/models             the one model this server serves
    POST /v1/generate           msc's native call: token ids in, token ids out
    GET  /health                200 {"status": "ok", "running": ..., ...}; 503 once a role died
    GET  /metrics               Prometheus text format

Errors are OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}: 400 for an invalid
parameter (malformed JSON, non-finite numbers, wrong types and unknown fields included: never FastAPI's 422
shape; a prompt or token limit beyond what the deployment holds: msc.admission), 413 for a body over the
server's bound, 401 for a missing API key, 404 for an unknown model or path, 503 for a broken or stopping
engine, 504 for a request not answered within the engine's request bound. A client that goes away cancels its request (the replica
frees its KV pages at the next step). The OpenAI routes live in msc.openai_routes.
"""
from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from msc.engine.build import max_seq_len_of
from msc.engine.request import SamplingParams
from msc.errors import MscError
from msc.http_middleware import MAX_BODY_BYTES, ServerGate, StrictJSONRoute
from msc.metrics import ServerMetrics
from msc.openai_protocol import ApiError, GenerateRequest, GenerateResponse, error_response, validation_param
from msc.openai_routes import ServeState, await_unless_gone, engine_error, register
from msc.runtime.serving import ColocatedServingEngine, ServingEngine


def create_app(engine: ServingEngine | ColocatedServingEngine, *, tokenizer=None, model_name: str | None = None,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The API over a started engine (the caller owns its life cycle). tokenizer: a transformers tokenizer
    for text requests (None: token ids only); model_name: the id /v1/models lists (default: the bundle's
    folder name); api_key: required as `Authorization: Bearer KEY` on /v1/ paths when given."""
    manifest = engine.bundle.manifest
    name = model_name or engine.bundle.path.name
    metrics = ServerMetrics(name)
    state = ServeState(engine, tokenizer, name, max_seq_len_of(manifest), metrics)
    app = FastAPI(title="msc", description="disaggregated MoE inference with an OpenAI-compatible API")
    app.router.route_class = StrictJSONRoute  # NaN, Infinity and 1e400 are invalid JSON (before any route is added)
    app.state.msc = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        param = validation_param(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"unknown parameter '{param}'", param)
        msg = first.get("msg", "invalid value").removeprefix("Value error, ")
        return error_response(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), type=kind, code=getattr(e, "code", None))

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest, http: Request) -> GenerateResponse:
        try:
            params = SamplingParams(max_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                                    top_p=req.top_p, seed=req.seed, stop_token_ids=tuple(req.stop_token_ids),
                                    ignore_eos=req.ignore_eos, logprobs=req.logprobs)
            handle = engine.submit(req.prompt_token_ids, params=params)
        except MscError as e:
            raise engine_error(engine, e, "prompt_token_ids", {"max_tokens": "max_new_tokens"}) from None
        # NOTE: the engine's reader thread fills a concurrent Future; awaiting it keeps the event loop free
        fut = asyncio.wrap_future(handle.future)
        await await_unless_gone(http, fut, handle.cancel, engine.request_timeout_s)
        try:
            result = fut.result()
        except MscError as e:
            raise engine_error(engine, e, "prompt_token_ids") from None
        metrics.request_done(len(req.prompt_token_ids), len(result.token_ids), result.finish_reason, result.seconds,
                             result.first_token_s)
        return GenerateResponse(token_ids=result.token_ids, finish_reason=result.finish_reason,
                                prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(result.token_ids),
                                seconds=result.seconds, first_token_seconds=result.first_token_s,
                                replica=result.replica, logprobs=result.logprobs)

    register(app, state)

    @app.get("/health")
    async def health() -> JSONResponse:
        h = {**engine.health(), **engine.stats(), "model": name, "tokenizer": tokenizer is not None}
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(engine.stats()), media_type=metrics.content_type)

    # NOTE: the gate wraps the whole app (FastAPI included), so bodies are bounded before they are parsed
    app.add_middleware(ServerGate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    return app


class ServerThread:
    """An app under uvicorn on a background thread (tests, `msc bench serve --bundle`):

        with ServerThread(app) as url:   # http://127.0.0.1:PORT once it accepts connections
            ...
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
        import socket
        import threading

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self.server.run, name="msc-http", daemon=True)
        self._start_timeout_s = start_timeout_s

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise MscError(f"the HTTP server on {self.url} stopped while starting (port taken?)")
            if time.monotonic() > deadline:
                raise MscError(f"the HTTP server on {self.url} did not start within {self._start_timeout_s:.0f} s")
            self._thread.join(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
