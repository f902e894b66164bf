"""Admission: whether a request fits a deployment, decided from its bundle before anything is sent or allocated.

A sequence (prompt + the tokens it may generate) must fit both the engine's longest sequence
(`runtime.max_seq_len`, default the model's context capped at 4096: msc.engine.build.max_seq_len_of) and
one replica's KV pool (`runtime.kv_cache_tokens`, in whole pages). `_Server._new_request`
(msc.runtime.serving) checks every request here, so the native /v1/generate, the OpenAI routes and
`msc.LLM` refuse the same requests with the same message; the engine keeps its own check
(Engine.add_request) for the paths that reach it directly (`msc run` prompt files).

    limits = Limits.of(bundle.manifest)
    limits.check(len(prompt), max_tokens)   # AdmissionError naming the limit, or nothing
"""
from __future__ import annotations

from dataclasses import dataclass

from msc.engine.build import max_seq_len_of
from msc.engine.engine import PAGE_SIZE
from msc.errors import MscError


class AdmissionError(MscError):
    """A request that can never run on this deployment (the client's fault: HTTP 400 whatever the engine's
    health). param: which part of the request is too large, "prompt" or "max_tokens"."""

    code = "context_length_exceeded"

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Limits:
    """The most tokens one sequence of this deployment holds (prompt + max_tokens), and why."""

    max_seq_len: int  # the engine's longest sequence
    kv_tokens: int | None  # one replica's KV pool in tokens when the spec sets it; None: the engine's default

    @classmethod
    def of(cls, manifest: dict) -> "Limits":
        """The limits of a bundle's manifest (the same numbers msc.engine.build.engine_sizes gives its engine)."""
        return cls(max_seq_len_of(manifest), manifest["spec"]["runtime"].get("kv_cache_tokens"))

    @property
    def per_sequence(self) -> int:
        """Tokens one sequence may hold: max_seq_len, or less when an explicit KV pool is smaller.

        NOTE: the engine's default pool always holds one sequence of max_seq_len (engine_sizes refuses to
        start otherwise), so only an explicit runtime.kv_cache_tokens can lower the bound; the pool is
        allocated in whole pages, so its bound is its page count times the page size."""
        if self.kv_tokens is None:
            return self.max_seq_len
        return min(self.max_seq_len, -(-self.kv_tokens // PAGE_SIZE) * PAGE_SIZE)

    def _limit_text(self) -> str:
        why = "" if self.per_sequence == self.max_seq_len else f" (its KV pool holds {self.per_sequence} tokens)"
        return f"this deployment takes at most {self.per_sequence} tokens per sequence (prompt + max_tokens){why}"

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """AdmissionError unless a prompt of prompt_tokens plus max_tokens new ones fits one sequence."""
        limit = self.per_sequence
        if prompt_tokens >= limit:
            raise AdmissionError(f"the prompt has {prompt_tokens} tokens; {self._limit_text()}, and at least one "
                                 "must be left to generate", "prompt")
        if prompt_tokens + max_tokens > limit:
            raise AdmissionError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                                 f"{prompt_tokens + max_tokens} tokens; {self._limit_text()}", "max_tokens")

    def room(self, prompt_tokens: int) -> int:
        """The most new tokens a prompt of prompt_tokens may ask for (at least 1 once check passes)."""
        return self.per_sequence - prompt_tokens
