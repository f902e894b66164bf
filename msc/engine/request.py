"""What a request is to the engine: its prompt, its sampling parameters, and the tokens it has made."""
from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass, field
from typing import Callable

from msc.errors import MscError

MAX_LOGPROBS = 20
MAX_TOP_K = (1 << 31) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen and when it stops (the OpenAI / vLLM names).

    temperature 0 is greedy; top_k 0 and top_p 1 keep every token; seed makes sampling repeatable (the same
    seed gives the same tokens whatever else is in the batch); stop_token_ids end the request like the
    model's end-of-sequence tokens do (unless ignore_eos); max_tokens bounds the new tokens."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the k most likely

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise MscError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise MscError(f"temperature must be >= 0, got {self.temperature!r}")
        # NOTE: bounded so that the sampler's int64 tensor of a batch's top_k can hold it (10**30 once failed the
        # whole step, and with it the server); any top_k of the vocabulary's size or more keeps every token
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 0 <= self.top_k <= MAX_TOP_K:
            raise MscError(f"top_k must be an integer in [0, {MAX_TOP_K}] (0: no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise MscError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise MscError(f"seed must be an integer, got {self.seed!r}")
        ids = tuple(self.stop_token_ids)
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
            raise MscError(f"stop_token_ids must be token ids (integers >= 0), got {list(ids)!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise MscError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def seed_value(self) -> int:
        """The seed as a non-negative 63-bit integer (a request without one gets one from its id, set by the engine)."""
        return (self.seed if self.seed is not None else 0) & ((1 << 63) - 1)


def seed_from(text: str) -> int:
    """A deterministic seed for a request that gave none (from its id)."""
    return zlib.crc32(text.encode())


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence the engine works on.

    computed: how many of its tokens (prompt + output) have K/V in the cache; the next step feeds the ones
    after them (a prompt chunk, or the last sampled token). After preemption computed is 0 and
    the prompt plus the outputs so far are recomputed as one longer prompt."""

    id: str
    prompt: list[int]
    params: SamplingParams
    seq_id: int = -1  # its sequence id in the KV cache (set by the engine)
    on_token: Callable[["Request", list[int]], None] | None = None  # called with the step's new tokens
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    computed: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    preemptions: int = 0
    logits: list = field(default_factory=list)  # per sampled token, when the engine keeps logits (verify)
    # per sampled token when params.logprobs is set: [its log-probability, [[token id, log-probability] of the
    # params.logprobs most likely tokens]] (of the model's distribution, before temperature and filters)
    logprobs: list = field(default_factory=list)
    # tokens sampled on the device and not yet read back (0 or 1: the engine's overlap reads a step's tokens
    # during the next step), and the row of its step's sampled tokens that holds it
    pending: int = 0
    pending_row: int = -1

    def token_slice(self, start: int, count: int) -> list[int]:
        """tokens[start:start + count] without building the whole list."""
        p = len(self.prompt)
        if start + count <= p:
            return self.prompt[start:start + count]
        if start >= p:
            return self.output[start - p:start - p + count]
        return self.prompt[start:] + self.output[:start + count - p]

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, a pending one (sampled, still on the device) included."""
        return len(self.prompt) + len(self.output) + self.pending

    @property
    def sampled_all(self) -> bool:
        """Every token max_tokens allows has been sampled (some may still be on their way back)."""
        return len(self.output) + self.pending >= self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
