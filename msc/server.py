"""HTTP front end of a serving engine (FastAPI): `msc serve BUNDLE` runs it under uvicorn.

    POST /v1/generate   {"prompt_token_ids": [5, 17, 42], "max_new_tokens": 16,
                         optional: "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos"}
                        -> {"token_ids": [...], "finish_reason": "stop" | "length", "prompt_tokens": 3,
                            "completion_tokens": 16, "seconds": 0.41, "first_token_seconds": 0.05, "replica": 0}
    GET  /health        -> 200 {"status": "ok", "unfinished": 0, "served": 12, ...}; 503 once a role died

Errors: a malformed body is a 422 (FastAPI's validation, naming the field); a token id outside the
vocabulary or a request that can never fit the KV cache a 400; a broken or stopping engine a 503 with the
reason; a request not answered within the engine's request bound a 504. A client that goes away cancels
its request (the replica frees its KV pages at the next step). Token ids in, token ids out: bundles carry
no tokenizer.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from msc.engine.request import SamplingParams
from msc.errors import MscError
from msc.runtime.serving import ColocatedServingEngine, ServingEngine

DISCONNECT_POLL_S = 0.25


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_token_ids: list[int] = Field(min_length=1, description="the prompt as token ids")
    max_new_tokens: int = Field(16, ge=1, le=1 << 16, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_k: int = Field(0, ge=0, description="0: no limit")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = Field(None, description="the same seed gives the same tokens")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False


class GenerateResponse(BaseModel):
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    first_token_seconds: Optional[float]
    replica: int


def create_app(engine: ServingEngine | ColocatedServingEngine) -> FastAPI:
    """The API over a started engine (the caller owns its life cycle)."""
    app = FastAPI(title="msc", description="disaggregated MoE inference: generation over token ids")

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest, http: Request) -> GenerateResponse:
        try:
            params = SamplingParams(max_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                                    top_p=req.top_p, seed=req.seed, stop_token_ids=tuple(req.stop_token_ids),
                                    ignore_eos=req.ignore_eos)
            handle = engine.submit(req.prompt_token_ids, params=params)
        except MscError as e:
            status = 400 if engine.health()["status"] == "ok" else 503
            raise HTTPException(status_code=status, detail=str(e)) from None
        # NOTE: the engine's reader thread fills a concurrent Future; awaiting it keeps the event loop free.
        # Every DISCONNECT_POLL_S the handler looks whether the client went away, and if so cancels the
        # request, so an abandoned generation does not hold a place in the batch.
        fut = asyncio.wrap_future(handle.future)
        deadline = time.monotonic() + engine.request_timeout_s
        while True:
            done, _ = await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await http.is_disconnected():
                handle.cancel()
                raise HTTPException(status_code=499, detail="the client closed the connection")
            if time.monotonic() > deadline:
                handle.cancel()
                raise HTTPException(status_code=504, detail=f"no answer within {engine.request_timeout_s:.0f} s")
        try:
            result = fut.result()
        except MscError as e:
            status = 400 if engine.health()["status"] == "ok" else 503
            raise HTTPException(status_code=status, detail=str(e)) from None
        return GenerateResponse(token_ids=result.token_ids, finish_reason=result.finish_reason,
                                prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(result.token_ids),
                                seconds=result.seconds, first_token_seconds=result.first_token_s,
                                replica=result.replica)

    @app.get("/health")
    async def health() -> JSONResponse:
        h = engine.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    return app
