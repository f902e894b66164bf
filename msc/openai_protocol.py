"""The OpenAI API's request bodies and error shape, as far as msc serves them (pydantic models).

Fields follow OpenAI's completions and chat completions APIs, plus the extensions vLLM users know
(`top_k`, `stop_token_ids`, `ignore_eos`). Unknown fields are refused, and so are OpenAI fields msc
does not implement when they ask for something (a non-zero penalty, a logit bias): a request is never
silently served differently from what it asked. Types are strict (pydantic strict mode): "8" and true are
not integers, 8.0 is not an integer either, and every float must be finite.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_N = 16  # choices per request
MAX_ERROR_TEXT = 400  # characters of an error's message (and of its param) at most
# NOTE: strict types everywhere a client's JSON is read: a typo'd type is refused, never coerced (true -> 1)
STRICT = dict(extra="forbid", strict=True, allow_inf_nan=False)
# OpenAI fields msc does not implement: the values that ask for nothing (accepted), and why others are refused
UNIMPLEMENTED = {
    "presence_penalty": ((0, 0.0), "penalties are not implemented by msc; leave it 0"),
    "frequency_penalty": ((0, 0.0), "penalties are not implemented by msc; leave it 0"),
    "logit_bias": ((None, {}), "logit_bias is not implemented by msc"),
    "best_of": ((None, 1), "best_of is not implemented by msc (use n)"),
    "suffix": ((None, ""), "suffix (insertion) is not implemented by msc"),
}


class ApiError(Exception):
    """An error answered as OpenAI's JSON body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.type, self.code)


def error_response(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error body; message and param cut to MAX_ERROR_TEXT characters, so that no error echoes a large
    input back (an unknown field's name, a value quoted by a validator)."""
    return JSONResponse({"error": {"message": shorten(message), "type": type,
                                   "param": None if param is None else shorten(param), "code": code}},
                        status_code=status)


def shorten(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """text, or its first characters and how many more there were; anything UTF-8 cannot carry (a lone
    surrogate) escaped, so that the error itself can always be sent."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class StreamOptions(BaseModel):
    model_config = ConfigDict(**STRICT)
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(**STRICT)

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1: no limit (a vLLM extension)")
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    user: Optional[str] = None  # accepted and ignored, as OpenAI's own servers only log it
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "best_of", "suffix", check_fields=False)
    @classmethod
    def _not_implemented(cls, v, info: ValidationInfo):
        """OpenAI fields msc accepts only at their do-nothing value (see UNIMPLEMENTED)."""
        allowed, why = UNIMPLEMENTED[info.field_name]
        if v not in allowed:
            raise ValueError(why)
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("applies to streamed responses; set stream: true or leave it out")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return v

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[Union[str, list[int]]]]  # text, token ids, or a list of either
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list, each text or token ids; ApiError for an empty one."""
        p = self.prompt
        items: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items or any(len(x) == 0 for x in items):
            raise ApiError(400, "prompt must not be empty", "prompt")
        return items


class ContentPart(BaseModel):
    model_config = ConfigDict(**STRICT)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # name, tool_call_id ... go to the chat template as they are
    model_config = ConfigDict(**{**STRICT, "extra": "allow"})
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True  # a vLLM extension

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class GenerateRequest(BaseModel):
    """msc's native request: token ids in, token ids out."""

    model_config = ConfigDict(**STRICT)

    prompt_token_ids: list[int] = Field(min_length=1, description="the prompt as token ids")
    max_new_tokens: int = Field(16, ge=1, le=1 << 16, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_k: int = Field(0, ge=0, description="0: no limit")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = Field(None, description="the same seed gives the same tokens")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)


class GenerateResponse(BaseModel):
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    first_token_seconds: Optional[float]
    replica: int
    logprobs: Optional[list] = None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def validation_param(loc: tuple) -> str | None:
    """The parameter a pydantic error location names ('body', 'messages', 0, 'role' -> 'messages[0].role')."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in _TYPE_TAGS or "[" in str(p) or str(p).startswith("function-"):
            continue  # the member of a union pydantic tried: not a parameter name
        else:
            out += ("." if out else "") + str(p)
    return out or None
