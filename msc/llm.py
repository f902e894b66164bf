"""The offline Python API, in the style vLLM users know:

    import msc
    llm = msc.LLM("out/tiny")                      # the bundle's role processes (colocated=True: in process)
    outs = llm.generate(["Hello, my name is"], msc.SamplingParams(max_tokens=32, temperature=0.8, seed=1))
    print(outs[0].outputs[0].text)
    llm.close()                                    # or use it as a context manager

Prompts are text (through the bundle's tokenizer) or token-id lists. Every prompt and choice is
submitted at once, so they share the engine's steps (continuous batching), exactly as served requests do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from msc.detokenize import TextStream
from msc.engine.request import SamplingParams as EngineParams
from msc.errors import MscError


@dataclass(frozen=True)
class SamplingParams:
    """How each prompt is continued: n choices of at most max_tokens tokens. temperature 0 is greedy;
    top_k 0 and top_p 1 keep every token; seed makes the sampling repeat (choice i uses seed + i); a choice
    ends at the model's end-of-sequence token (unless ignore_eos), at one of stop_token_ids, or just before
    one of the `stop` strings; logprobs k returns each token's log-probability and the k most likely."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise MscError(f"n must be a positive integer, got {self.n!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        self.for_choice(0)  # checks the rest

    def for_choice(self, i: int) -> EngineParams:
        return EngineParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            seed=None if self.seed is None else self.seed + i, stop_token_ids=tuple(self.stop_token_ids),
                            ignore_eos=self.ignore_eos, logprobs=self.logprobs)


def submit_choices(engine, tokenizer, ids: list[int], params: SamplingParams) -> list[tuple]:
    """The params.n choices of one prompt, submitted at once (choice i samples with seed + i), each with the
    stream that turns its tokens into text and watches for the stop strings: [(ServingRequest, TextStream or
    None)]. MscError, with the choices already submitted cancelled, if a choice cannot be submitted."""
    if params.stop and tokenizer is None:
        raise MscError("stop strings need a tokenizer, and this bundle has none: use stop_token_ids")
    runs: list[tuple] = []
    try:
        for i in range(params.n):
            handle = engine.submit(ids, params=params.for_choice(i))
            runs.append((handle, TextStream(tokenizer, list(params.stop)) if tokenizer is not None else None))
    except BaseException:
        for handle, _ in runs:
            handle.cancel()
        raise
    return runs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list | None = None  # per token: [its log-probability, [[token id, log-probability], ...]]


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    """A bundle loaded for offline generation; see the module docstring."""

    def __init__(self, bundle_dir: str | Path, *, colocated: bool = False, device: str | None = None,
                 random_weights: bool = False, checkpoint: str | Path | None = None):
        """checkpoint: the checkpoint folder to read instead of the bundle's own (a bundle copied without it);
        checked against the bundle first. Its tokenizer, too, when the bundle's tokenizer is its checkpoint's."""
        from msc.runtime.serving import ColocatedServingEngine, ServingEngine
        from msc.tokenizer import load_tokenizer

        if colocated:
            self.engine = ColocatedServingEngine(bundle_dir, random_weights=random_weights, device=device,
                                                 checkpoint=checkpoint)
        else:
            self.engine = ServingEngine(bundle_dir, random_weights=random_weights, device=device, checkpoint=checkpoint)
        self.tokenizer = load_tokenizer(self.engine.bundle.path, self.engine.bundle.manifest, self.engine.checkpoint)
        self.engine.start()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.close()

    def generate(self, prompts: str | list[int] | list[str | list[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) at once; outputs in prompt order. MscError for a
        prompt the engine refuses (nothing is left running)."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        outs, runs = [], []
        try:
            for p in prompts:
                if isinstance(p, str):
                    if self.tokenizer is None:
                        raise MscError("a text prompt needs a tokenizer, and this bundle has none: give token ids")
                    ids = self.tokenizer(p).input_ids
                else:
                    ids = list(p)
                out = RequestOutput(p if isinstance(p, str) else None, ids)
                outs.append(out)
                runs += [(out, i, handle, text) for i, (handle, text) in
                         enumerate(submit_choices(self.engine, self.tokenizer, ids, params))]
            for out, i, handle, text in runs:
                out.outputs.append(self._collect(i, handle, text))
        finally:
            for _, _, handle, _ in runs:
                if not handle.done():
                    handle.cancel()
        return outs

    def _collect(self, index: int, handle, text: TextStream | None) -> CompletionOutput:
        pieces, toks = [], []
        for step_toks in handle.stream(timeout=self.engine.request_timeout_s):
            toks += step_toks
            if text is not None:
                pieces.append(text.add(step_toks))
                if text.stopped:
                    handle.cancel()
                    lps = handle.logprobs[:len(toks)] if handle.params.logprobs is not None else None
                    return CompletionOutput(index, "".join(pieces), toks, "stop", lps)
        done = handle.result(timeout=self.engine.request_timeout_s)
        if text is not None:
            pieces.append(text.finish())
        return CompletionOutput(index, "".join(pieces), toks, done.finish_reason, done.logprobs)
