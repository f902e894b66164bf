"""HTTP front end of a serving engine (FastAPI): `msc serve BUNDLE` runs it under uvicorn.

    POST /v1/generate   {"prompt_token_ids": [5, 17, 42], "max_new_tokens": 16}
                        -> {"token_ids": [...], "finish_reason": "stop" | "length", "prompt_tokens": 3,
                            "completion_tokens": 16, "seconds": 0.41, "replica": 0}
    GET  /health        -> 200 {"status": "ok", "queued": 0, "waves": 12, ...}; 503 once a role died

Errors: a malformed body is a 422 (FastAPI's validation, naming the field); a token id outside the
vocabulary a 400; a broken or stopping engine a 503 with the reason; a request not answered within the
engine's wave bound a 504. Token ids in, token ids out: bundles carry no tokenizer.
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from msc.errors import MscError
from msc.runtime.serving import ServingEngine


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_token_ids: list[int] = Field(min_length=1, description="the prompt as token ids")
    max_new_tokens: int = Field(16, ge=1, le=1 << 16, description="greedy tokens to generate at most")


class GenerateResponse(BaseModel):
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    replica: int


def create_app(engine: ServingEngine) -> FastAPI:
    """The API over a started engine (the caller owns its life cycle)."""
    app = FastAPI(title="msc", description="disaggregated MoE inference: greedy generation over token ids")

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        try:
            future = engine.submit(req.prompt_token_ids, req.max_new_tokens)
        except MscError as e:
            status = 400 if engine.health()["status"] == "ok" else 503
            raise HTTPException(status_code=status, detail=str(e)) from None
        # NOTE: the engine's threads fill a concurrent Future; awaiting it keeps the event loop free, so
        # many requests can wait for the same wave without a thread each.
        try:
            done = await asyncio.wait_for(asyncio.wrap_future(future), timeout=engine.wave_timeout_s * 2)
        except asyncio.TimeoutError:
            raise HTTPException(status_code=504, detail=f"no answer within {engine.wave_timeout_s * 2:.0f} s") from None
        except MscError as e:
            raise HTTPException(status_code=503, detail=str(e)) from None
        return GenerateResponse(token_ids=done.token_ids, finish_reason=done.finish_reason,
                                prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(done.token_ids),
                                seconds=done.seconds, replica=done.replica)

    @app.get("/health")
    async def health() -> JSONResponse:
        h = engine.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    return app
