"""POST /v1/completions and /v1/chat/completions over a serving engine, and GET /v1/models.

A request becomes one engine request per prompt and choice (`n`), all submitted at once so they share
the engine's steps. Each choice's tokens stream back step by step; `TextStream` turns them into text and
watches for stop strings (a choice that meets one is cancelled in the engine at once). With `stream` the
text goes out as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; without it the
whole answer comes back at the end. Either way a client that goes away cancels every choice of its
request, which frees their KV pages at the engine's next step.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from msc.admission import AdmissionError, Limits
from msc.detokenize import TextStream
from msc.errors import MscError
from msc.llm import SamplingParams as LLMParams
from msc.llm import submit_choices
from msc.metrics import ServerMetrics
from msc.openai_protocol import ApiError, ChatCompletionRequest, CompletionRequest, _Sampling

DISCONNECT_POLL_S = 0.25


@dataclass
class ServeState:
    """What the routes need: the engine, the tokenizer (None: token ids only), names and limits."""

    engine: Any  # msc.runtime.serving.ServingEngine or ColocatedServingEngine
    tokenizer: Any
    model_name: str
    max_seq_len: int
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           "model", code="model_not_found")

    def need_tokenizer(self, what: str, param: str = "prompt") -> Any:
        if self.tokenizer is None:
            hint = ("send the prompt as token ids to /v1/completions" if param == "messages"
                    else "send the prompt as token ids")
            raise ApiError(400, f"{what} needs a tokenizer, and this bundle has none (its checkpoint had no tokenizer "
                                f"files): {hint}", param)
        return self.tokenizer

    def token_text(self, tid: int) -> str:
        return self.tokenizer.decode([tid]) if self.tokenizer is not None else f"token_id:{tid}"


@dataclass
class Choice:
    """One engine request of an API request, and what it has produced so far."""

    index: int
    prompt_tokens: int
    handle: Any  # msc.runtime.serving.ServingRequest
    text: TextStream | None
    output: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    recorded: bool = False  # counted in the metrics (once, whichever path ends it first)


@dataclass
class Event:
    """A step's worth of one choice: new text and tokens, and the finish reason once it ends."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None


def register(app: FastAPI, state: ServeState) -> None:
    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "msc", "max_model_len": state.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        state.check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs needs the prompt's log-probabilities, which msc does not compute",
                           "echo")
        prompts = []
        for p in req.prompts():
            if isinstance(p, str):
                prompts.append((p, state.need_tokenizer("a text prompt")(p).input_ids))
            else:
                prompts.append((None, list(p)))
        choices = _submit(state, req, [ids for _, ids in prompts], req.max_tokens, req.logprobs)
        echo = {c.index: _prompt_text(state, prompts[c.index // req.n]) for c in choices} if req.echo else {}
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}

        def completion_logprobs(c: Choice, lps: list | None, offset: int) -> dict | None:
            if req.logprobs is None or not lps:
                return None
            toks = [state.token_text(t) for t in c.token_ids[len(c.token_ids) - len(lps):]] if c.token_ids else []
            offsets, pos = [], offset
            for t in toks:
                offsets.append(pos)
                pos += len(t)
            return {"tokens": toks, "token_logprobs": [lp for lp, _ in lps],
                    "top_logprobs": [{state.token_text(t): v for t, v in top} for _, top in lps], "text_offset": offsets}

        if req.stream:
            async def chunks() -> AsyncIterator[dict]:
                for c in choices:
                    if c.index in echo:
                        yield {**head, "choices": [{"index": c.index, "text": echo[c.index], "logprobs": None,
                                                    "finish_reason": None}]}
                async for ev, c in _events(state, choices):
                    text_offset = len(echo.get(ev.index, "")) + len(c.output) - len(ev.text)
                    yield {**head, "choices": [{"index": ev.index, "text": ev.text, "token_ids": ev.token_ids,
                                                "logprobs": completion_logprobs(c, ev.logprobs, text_offset),
                                                "finish_reason": ev.finish_reason}]}
                if req.include_usage:
                    yield {**head, "choices": [], "usage": _usage(choices, req.n)}

            return _sse(state, chunks(), choices)

        await _run_to_end(state, http, choices)
        body = {**head, "choices": [
            {"index": c.index, "text": echo.get(c.index, "") + c.output, "token_ids": c.token_ids,
             "logprobs": completion_logprobs(c, c.logprobs, len(echo.get(c.index, ""))),
             "finish_reason": c.finish_reason} for c in choices], "usage": _usage(choices, req.n)}
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: Request):
        state.check_model(req.model)
        tok = state.need_tokenizer("a chat request", "messages")
        if getattr(tok, "chat_template", None) is None:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            text = tok.apply_chat_template([m.as_template_dict() for m in req.messages], tokenize=False,
                                           add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # noqa: BLE001 (the template's own complaint, e.g. roles out of order)
            raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        ids = tok(text, add_special_tokens=False).input_ids
        top = (req.top_logprobs or 0) if req.logprobs else None
        choices = _submit(state, req, [ids], req.token_limit, top, param="messages")
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name}

        def chat_logprobs(c: Choice, lps: list | None) -> dict | None:
            if not req.logprobs or not lps:
                return None
            ids_ = c.token_ids[len(c.token_ids) - len(lps):]
            entry = lambda t, v: {"token": state.token_text(t), "logprob": v,  # noqa: E731
                                  "bytes": list(state.token_text(t).encode())}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(tt, vv) for tt, vv in top_]}
                                for t, (lp, top_) in zip(ids_, lps)]}

        if req.stream:
            async def chunks() -> AsyncIterator[dict]:
                h = {**head, "object": "chat.completion.chunk"}
                for c in choices:
                    yield {**h, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}
                async for ev, c in _events(state, choices):
                    delta = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
                    yield {**h, "choices": [{"index": ev.index, "delta": delta, "token_ids": ev.token_ids,
                                             "logprobs": chat_logprobs(c, ev.logprobs),
                                             "finish_reason": ev.finish_reason}]}
                if req.include_usage:
                    yield {**h, "choices": [], "usage": _usage(choices, req.n)}

            return _sse(state, chunks(), choices)

        await _run_to_end(state, http, choices)
        body = {**head, "object": "chat.completion", "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.output}, "token_ids": c.token_ids,
             "logprobs": chat_logprobs(c, c.logprobs), "finish_reason": c.finish_reason} for c in choices],
            "usage": _usage(choices, req.n)}
        return JSONResponse(body)


# ---------------------------------------------------------------------- requests into the engine
def engine_error(engine, e: MscError, param: str | None, names: dict[str, str] | None = None) -> ApiError:
    """A request the engine refused or failed: the request's fault (400) while the engine is fine, else 503.
    A request too large for the deployment (msc.admission) is always a 400 naming the parameter: `param`
    for the prompt, names.get("max_tokens", "max_tokens") for the token limit."""
    if isinstance(e, AdmissionError):
        name = param if e.param == "prompt" else (names or {}).get(e.param, e.param)
        return ApiError(400, str(e), name, code=e.code)
    if engine.health()["status"] == "ok":
        return ApiError(400, str(e), param)
    return ApiError(503, str(e), type="service_unavailable")


def _submit(state: ServeState, req: _Sampling, prompts: list[list[int]], max_tokens: int | None,
            logprobs: int | None, param: str = "prompt") -> list[Choice]:
    """One engine request per prompt and choice; ApiError (nothing submitted) for a prompt or limit that
    does not fit the model's context."""
    if req.stop_strings and state.tokenizer is None:
        raise ApiError(400, "stop strings need a tokenizer, and this bundle has none: use stop_token_ids", "stop")
    plans = []
    limits = Limits.of(state.engine.bundle.manifest)
    for ids in prompts:
        # NOTE: the engine's submit checks each choice again (msc.admission); checking every prompt here first
        # means a request with one prompt too long submits none of its choices
        limit = max_tokens if max_tokens is not None else max(limits.room(len(ids)), 1)
        try:
            limits.check(len(ids), limit)
        except AdmissionError as e:
            raise engine_error(state.engine, e, param) from None
        plans.append((ids, limit))
    choices: list[Choice] = []
    try:
        for ids, limit in plans:
            try:
                params = LLMParams(n=req.n, max_tokens=limit, temperature=req.temperature, top_k=max(req.top_k, 0),
                                   top_p=req.top_p, seed=req.seed, stop=tuple(req.stop_strings),
                                   stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                                   logprobs=logprobs)
            except MscError as e:
                raise ApiError(400, str(e)) from None
            try:
                runs = submit_choices(state.engine, state.tokenizer, ids, params)
            except MscError as e:
                raise engine_error(state.engine, e, param) from None
            choices += [Choice(len(choices) + i, len(ids), handle, text) for i, (handle, text) in enumerate(runs)]
    except BaseException:
        for c in choices:
            c.handle.cancel()
        raise
    return choices


def _prompt_text(state: ServeState, prompt: tuple[str | None, list[int]]) -> str:
    text, ids = prompt
    return text if text is not None else (state.tokenizer.decode(ids) if state.tokenizer is not None else "")


async def _choice_events(state: ServeState, c: Choice) -> AsyncIterator[Event]:
    """The events of one choice until it ends (MscError if the engine fails it)."""
    async for toks, lps in c.handle.chunks(timeout=state.engine.request_timeout_s):
        c.token_ids += toks
        if lps:
            c.logprobs += lps
        delta = c.text.add(toks) if c.text is not None else ""
        c.output += delta
        if c.text is not None and c.text.stopped:
            c.handle.cancel()  # a stop string: the engine drops it at its next step
            c.finish_reason = "stop"
            _record(state, c)
            yield Event(c.index, delta, toks, lps, "stop")
            return
        yield Event(c.index, delta, toks, lps, None)
    done = c.handle.result(timeout=0)
    tail = c.text.finish() if c.text is not None else ""
    c.output += tail
    c.finish_reason = c.finish_reason or done.finish_reason
    _record(state, c)
    yield Event(c.index, tail, [], None, c.finish_reason)


def _record(state: ServeState, c: Choice) -> None:
    if c.recorded:
        return
    c.recorded = True
    h = c.handle
    first = h.token_times[0] - h.submitted if h.token_times else None
    last = (h.token_times[-1] if h.token_times else time.monotonic()) - h.submitted
    state.metrics.request_done(c.prompt_tokens, len(c.token_ids), c.finish_reason or "unknown", last, first)


async def _events(state: ServeState, choices: list[Choice]) -> AsyncIterator[tuple[Event, Choice]]:
    """Every choice's events as they come, interleaved."""
    if len(choices) == 1:
        async for ev in _choice_events(state, choices[0]):
            yield ev, choices[0]
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for ev in _choice_events(state, c):
                await q.put((ev, c))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            await q.put((e, c))
        finally:
            await q.put((None, c))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            item, c = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item, c
    finally:
        for t in tasks:
            t.cancel()


def _cancel_unfinished(state: ServeState, choices: list[Choice]) -> None:
    """The request ended before these choices did (the client went away, or one failed): cancel them."""
    for c in choices:
        if c.finish_reason is None:
            c.handle.cancel()
            c.finish_reason = "cancelled"
            _record(state, c)


async def await_unless_gone(http: Request, waitable, on_gone, timeout_s: float | None = None) -> None:
    """Wait for `waitable` (a task or future); if the client goes away first, or timeout_s passes, call
    on_gone (cancel the work) and answer 499 / 504.

    NOTE: every DISCONNECT_POLL_S the handler looks whether its client went away, so an abandoned request
    does not keep its place in the batch."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        done, _ = await asyncio.wait({waitable}, timeout=DISCONNECT_POLL_S)
        if done:
            return
        if await http.is_disconnected():
            on_gone()
            raise ApiError(499, "the client closed the connection")
        if deadline is not None and time.monotonic() > deadline:
            on_gone()
            raise ApiError(504, f"no answer within {timeout_s:.0f} s", type="timeout")


async def _run_to_end(state: ServeState, http: Request, choices: list[Choice]) -> None:
    """Run every choice to its end; a client that goes away meanwhile cancels them (and gets no answer)."""

    async def consume() -> None:
        async for _ in _events(state, choices):
            pass

    task = asyncio.ensure_future(consume())
    try:
        await await_unless_gone(http, task, task.cancel)
        try:
            task.result()
        except MscError as e:
            raise engine_error(state.engine, e, None) from None
    finally:
        if not task.done():
            task.cancel()
        _cancel_unfinished(state, choices)


def _sse(state: ServeState, chunks: AsyncIterator[dict], choices: list[Choice]) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`; a failure mid-stream is sent as an
    error event. The choices are cancelled if the stream ends early (the client went away)."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except MscError as e:
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            _cancel_unfinished(state, choices)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for c in choices[::n])
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
