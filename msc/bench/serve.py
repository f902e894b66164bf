"""`msc bench serve`: a load generator for an OpenAI-compatible server (msc's own, or any other).

Method. Every request is a streaming `POST /v1/completions` whose prompt is a list of random token ids
(so a bundle without a tokenizer can be measured too), with `temperature: 0`, `ignore_eos: true` (a vLLM
extension msc honours, so each request generates exactly its `max_tokens`), `stream: true` and
`stream_options: {"include_usage": true}`. Requests go out in one of two ways:

- closed loop (`concurrency` C, no rate): C clients, each sending its next request as soon as its last
  one finished, so exactly C requests are in flight until the work runs out;
- open loop (`request_rate` λ requests/s): request i is due at the i-th arrival of a Poisson process
  (exponential gaps of mean 1/λ from a seeded RNG; the first request at 0), whether or not earlier ones
  have finished; `concurrency` then caps how many are in flight (a due request waits for a free slot).

Per request the client records, on its own clock (`time.perf_counter`), from the moment the request is
sent: the time to the first chunk that carries tokens (TTFT), the time per output token after the first
(TPOT = (last token time − first token time) / (tokens − 1)), the end-to-end latency, and the tokens
received (the `token_ids` of every chunk, checked against `usage.completion_tokens`). A request that
fails (an HTTP error status, an error event in the stream, a broken connection, no answer within
`timeout_s`) is recorded with its error and counted; it never ends the run. The run's duration is from
the first request sent to the last one finished; throughputs count the completed requests only.

Lengths. `distribution="fixed"` gives every request exactly `input_len` prompt tokens and `output_len`
generated tokens. `distribution="reference"` draws each request's two lengths independently from
log-normal distributions whose medians are `input_len` and `output_len` (defaults 571 and 159: the
median input and output of the production workload in the MegaScale-Infer paper) with σ = 0.5 in log
space: the paper gives medians only, and σ = 0.5 is our assumption, a moderately spread workload (the
middle 50 % of draws lie within ×0.71–×1.40 of the median, 90 % within ×0.44–×2.28; the mean is 1.13× the
median). Each draw is rounded and clipped to [1, 4 × median] (so a rare huge draw cannot dominate a short
run), and then cut so that input + output fits the server's `max_model_len` (read from /v1/models).

Shared prefix. `shared_prefix` N > 0 starts every prompt with the same N token ids (drawn once, from the
prompts' own RNG), the rest of each prompt its own: a system prompt, the workload prefix caching is for. A
prompt shorter than N + 1 keeps its last token its own. Where the server reports prefix-cache counters in its
Prometheus metrics (msc's `msc_prefix_cache_*_tokens_total`), the result has the tokens looked up and found
during the run (scraped before and after it); a server without them, or with prefix caching off, gives None.

Servers. `--url` measures a server that runs elsewhere; `local_server` starts msc's server for a bundle in
this process. For figures, prefer a separate `msc serve` process: in-process, the client's HTTP parsing
competes with the server's event loop (and, --colocated, with the engine's thread) for the GIL.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from msc.errors import MscError

DEFAULT_INPUT_LEN = 571  # MegaScale-Infer's production workload: median input tokens
DEFAULT_OUTPUT_LEN = 159  # ... and median output tokens
DEFAULT_CONCURRENCY = 64  # closed loop when neither a concurrency nor a rate is given
REFERENCE_SIGMA = 0.5  # log-space spread of the "reference" lengths (the paper gives medians only)
REFERENCE_CLIP = 4  # reference lengths are clipped to [1, REFERENCE_CLIP × median]
DEFAULT_TOKEN_RANGE = (10, 200)  # prompt token ids are drawn from [lo, hi): inside the tiny model's 256
DISTRIBUTIONS = ("fixed", "reference")
PERCENTILES = (50, 90, 99)


# ---------------------------------------------------------------------- the workload
@dataclass
class Planned:
    """One request of the run, decided before it starts: its prompt, its output length, when it is due."""

    index: int
    prompt: list[int]
    output_len: int
    arrival_s: float | None = None  # open loop: due this long after the run starts


def reference_lengths(n: int, input_median: int, output_median: int, max_model_len: int | None,
                      rng: random.Random, sigma: float = REFERENCE_SIGMA) -> list[tuple[int, int]]:
    """n (input, output) length pairs: log-normal with these medians and log-space sigma, rounded, clipped
    to [1, REFERENCE_CLIP × median], then cut so that input + output ≤ max_model_len."""
    pairs = []
    for _ in range(n):
        inp = _clip(round(rng.lognormvariate(math.log(input_median), sigma)), input_median)
        out = _clip(round(rng.lognormvariate(math.log(output_median), sigma)), output_median)
        pairs.append(_fit(inp, out, max_model_len))
    return pairs


def _clip(value: int, median: int) -> int:
    return max(1, min(value, REFERENCE_CLIP * median))


def _fit(inp: int, out: int, max_model_len: int | None) -> tuple[int, int]:
    """(input, output) cut to the context. NOTE: the output length is kept and the prompt shortened, since
    decoding is what this benchmark is mostly about; the output is cut only if alone it leaves no room."""
    if max_model_len is None or inp + out <= max_model_len:
        return inp, out
    out = min(out, max_model_len - 1)
    return min(inp, max_model_len - out), out


def arrival_times(n: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times (s) of n requests of a Poisson process at `rate` per second, the first at 0.
    NOTE: the first request goes out at once rather than after a first gap, so the measured duration
    is not padded with an idle start."""
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def plan_requests(n: int, *, input_len: int, output_len: int, distribution: str, max_model_len: int | None,
                  seed: int, request_rate: float | None = None,
                  token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE, shared_prefix: int = 0) -> list[Planned]:
    """The run's requests. NOTE: lengths, prompt ids and arrivals each have their own seeded RNG, so that
    changing one aspect (say the rate) leaves the others' draws as they were."""
    rngs = {k: random.Random(f"msc-bench-serve:{seed}:{k}") for k in ("lengths", "prompts", "arrivals")}
    if distribution == "fixed":
        lengths = [(input_len, output_len)] * n
    elif distribution == "reference":
        lengths = reference_lengths(n, input_len, output_len, max_model_len, rngs["lengths"])
    else:
        raise MscError(f"distribution '{distribution}': expected one of {', '.join(DISTRIBUTIONS)}")
    arrivals = arrival_times(n, request_rate, rngs["arrivals"]) if request_rate else [None] * n
    lo, hi = token_range
    shared = [rngs["prompts"].randrange(lo, hi) for _ in range(shared_prefix)]
    plans = []
    for i, (inp, out) in enumerate(lengths):
        common = shared[:min(shared_prefix, inp - 1)]
        own = [rngs["prompts"].randrange(lo, hi) for _ in range(inp - len(common))]
        plans.append(Planned(i, common + own, out, arrivals[i]))
    return plans


PREFIX_METRICS = ("msc_prefix_cache_queried_tokens_total", "msc_prefix_cache_hit_tokens_total")


async def prefix_counters(client: httpx.AsyncClient, url: str) -> dict | None:
    """The server's prefix-cache token counters (summed over labels), or None where it has none."""
    try:
        r = await client.get(url + "/metrics")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    found = {name: 0.0 for name in PREFIX_METRICS}
    seen = False
    for line in r.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in found:
            found[name] += float(line.rsplit(" ", 1)[1])
            seen = True
    return found if seen else None


def parse_token_range(text: str) -> tuple[int, int]:
    """'LO..HI' (ids drawn from [LO, HI)) as a pair; MscError otherwise."""
    lo, sep, hi = text.partition("..")
    try:
        pair = (int(lo), int(hi))
    except ValueError:
        pair = None
    if not sep or pair is None or not 0 <= pair[0] < pair[1]:
        raise MscError(f"--token-range '{text}': expected LO..HI with 0 <= LO < HI, like 10..200 (ids in [LO, HI))")
    return pair


# ---------------------------------------------------------------------- one request
@dataclass
class Record:
    """What the client saw of one request; times in seconds, start_s and end_s since the run started."""

    index: int
    input_len: int
    output_len: int  # requested (max_tokens)
    start_s: float = 0.0
    end_s: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    usage_tokens: int | None = None
    finish_reason: str | None = None
    status: int | None = None
    error: str | None = None


def request_body(p: Planned, model: str | None) -> dict:
    body = {"prompt": p.prompt, "max_tokens": p.output_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    return body


async def send_request(client: httpx.AsyncClient, url: str, p: Planned, model: str | None, t0: float,
                       timeout_s: float) -> Record:
    """Send one request and stream its answer; every failure ends up in the record's `error`."""
    rec = Record(p.index, len(p.prompt), p.output_len)
    start = time.perf_counter()
    rec.start_s = start - t0
    try:
        await asyncio.wait_for(_stream_into(rec, client, url, request_body(p, model), start), timeout_s)
    except asyncio.TimeoutError:
        rec.error = f"no complete answer within {timeout_s:g} s ({rec.tokens} tokens so far)"
    except Exception as e:  # noqa: BLE001  NOTE: one request's failure is a measurement, never the run's end
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    end = time.perf_counter()
    rec.end_s = end - t0
    if rec.error is None:
        rec.latency_s = end - start
    return rec


async def _stream_into(rec: Record, client: httpx.AsyncClient, url: str, body: dict, start: float) -> None:
    """Fill rec from the server-sent events of one streaming completion."""
    first = last = None
    counted_ids = False  # the server sends token_ids (msc does); otherwise each chunk with text counts as one
    done = False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        rec.status = resp.status_code
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {_error_message(await resp.aread())}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                rec.error = f"error event in the stream: {_error_message(chunk)}"
                return
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids")
                n = len(ids) if ids is not None else int(bool(choice.get("text")))
                counted_ids = counted_ids or ids is not None
                if n:
                    last = time.perf_counter()
                    first = first if first is not None else last
                    rec.tokens += n
                rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
            if chunk.get("usage"):
                rec.usage_tokens = chunk["usage"].get("completion_tokens")
    if not done:
        rec.error = "the stream ended without data: [DONE]"
        return
    if rec.usage_tokens is not None and rec.usage_tokens != rec.tokens:
        if counted_ids:
            rec.error = f"usage.completion_tokens is {rec.usage_tokens} but {rec.tokens} token ids came"
            return
        rec.tokens = rec.usage_tokens  # text chunks only approximate tokens; the server's count is exact
    if first is not None:
        rec.ttft_s = first - start
        if rec.tokens > 1:
            rec.tpot_s = (last - first) / (rec.tokens - 1)


def _error_message(raw: bytes | dict) -> str:
    """The message of an OpenAI-style error body, else the body itself (shortened)."""
    try:
        body = json.loads(raw) if isinstance(raw, bytes) else raw
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return text[:300] or "(empty body)"


# ---------------------------------------------------------------------- the run
def _client(concurrency: int | None, timeout_s: float, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    # NOTE: the connection pool is as large as the requests in flight (unbounded for an uncapped open loop):
    # a request waiting for a pooled connection would count client-side queueing as server latency.
    # trust_env=False: no proxy from the environment between the benchmark and the server.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, headers=headers, trust_env=False)


async def server_info(client: httpx.AsyncClient, url: str) -> tuple[str, int | None]:
    """(the served model id, max_model_len or None) from GET /v1/models; MscError if unreachable."""
    try:
        resp = await client.get(f"{url}/v1/models")
    except httpx.HTTPError as e:
        raise MscError(f"cannot reach the server at {url}: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise MscError(f"GET {url}/v1/models answered {resp.status_code}: {_error_message(resp.content)}")
    try:
        entry = resp.json()["data"][0]
        return str(entry["id"]), entry.get("max_model_len")
    except (ValueError, KeyError, IndexError, TypeError):
        raise MscError(f"GET {url}/v1/models did not list a model: {resp.text[:300]}") from None


async def _closed_loop(plans: list[Planned], concurrency: int, send: Callable) -> None:
    """`concurrency` clients, each sending its next request as soon as its last one finished."""
    queue = iter(plans)  # NOTE: one event loop: next() on a shared iterator needs no lock

    async def client() -> None:
        for p in queue:
            await send(p)

    await asyncio.gather(*(client() for _ in range(min(concurrency, len(plans)))))


async def _open_loop(plans: list[Planned], concurrency: int | None, send: Callable, t0: float) -> None:
    """Each request sent at its arrival time (at most `concurrency` in flight when given)."""
    slots = asyncio.Semaphore(concurrency) if concurrency else None

    async def due(p: Planned) -> None:
        # NOTE: this sleep is the workload's pacing (the Poisson arrivals), not a wait for something to happen
        await asyncio.sleep(max(0.0, t0 + p.arrival_s - time.perf_counter()))
        if slots is None:
            await send(p)
            return
        async with slots:  # NOTE: TTFT and latency count from the send, after the wait for a free slot
            await send(p)

    await asyncio.gather(*(due(p) for p in plans))


async def run_bench_async(url: str, *, num_requests: int, concurrency: int | None, request_rate: float | None,
                          input_len: int, output_len: int, distribution: str, seed: int, model: str | None,
                          timeout_s: float, progress: bool, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
                          api_key: str | None = None, shared_prefix: int = 0) -> dict:
    """run_bench inside a running event loop."""
    _check_options(num_requests, concurrency, request_rate, input_len, output_len, distribution, timeout_s)
    if shared_prefix < 0:
        raise MscError(f"the shared prefix must be 0 or more tokens, got {shared_prefix}")
    if concurrency is None and request_rate is None:
        concurrency = DEFAULT_CONCURRENCY
    url = _base_url(url)
    async with _client(concurrency, timeout_s, api_key) as client:
        served, max_model_len = await server_info(client, url)
        plans = plan_requests(num_requests, input_len=input_len, output_len=output_len, distribution=distribution,
                              max_model_len=max_model_len, seed=seed, request_rate=request_rate, token_range=token_range,
                              shared_prefix=shared_prefix)
        before = await prefix_counters(client, url)
        records: list[Record] = []
        with _progress_bar(progress, num_requests) as advance:
            t0 = time.perf_counter()

            async def send(p: Planned) -> None:
                records.append(await send_request(client, url, p, model, t0, timeout_s))
                advance()

            if request_rate:
                await _open_loop(plans, concurrency, send, t0)
            else:
                await _closed_loop(plans, concurrency, send)
        after = await prefix_counters(client, url)
    records.sort(key=lambda r: r.index)
    prefix = None
    if before is not None and after is not None:
        queried, hit = (after[k] - before[k] for k in PREFIX_METRICS)
        if queried:  # none looked up: the server's prefix caching is off
            prefix = {"queried_tokens": queried, "hit_tokens": hit, "hit_rate": hit / queried}
    config = {"url": url, "model": model or served, "served_model": served, "max_model_len": max_model_len,
              "num_requests": num_requests, "mode": "open loop" if request_rate else "closed loop",
              "concurrency": concurrency, "request_rate": request_rate, "input_len": input_len,
              "output_len": output_len, "distribution": distribution,
              "sigma": REFERENCE_SIGMA if distribution == "reference" else None, "seed": seed,
              "token_range": list(token_range), "timeout_s": timeout_s, "shared_prefix": shared_prefix}
    result = summarize(config, records)
    result["prefix_cache"] = prefix  # the server's own count over the run (other clients' requests included)
    return result


def run_bench(url: str, *, num_requests: int, concurrency: int | None, request_rate: float | None, input_len: int,
              output_len: int, distribution: str, seed: int, model: str | None, timeout_s: float, progress: bool,
              token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE, api_key: str | None = None,
              shared_prefix: int = 0) -> dict:
    """Load the server at `url` (its base, e.g. http://127.0.0.1:8000) with num_requests streaming completions
    and return the result (see the module docstring and `summarize`). concurrency and request_rate both
    None: a closed loop of DEFAULT_CONCURRENCY clients. MscError for bad options or an unreachable server;
    failed requests are counted in the result instead."""
    return asyncio.run(run_bench_async(url, num_requests=num_requests, concurrency=concurrency,
                                       request_rate=request_rate, input_len=input_len, output_len=output_len,
                                       distribution=distribution, seed=seed, model=model, timeout_s=timeout_s,
                                       progress=progress, token_range=token_range, api_key=api_key,
                                       shared_prefix=shared_prefix))


def _check_options(num_requests, concurrency, request_rate, input_len, output_len, distribution, timeout_s) -> None:
    problems = [msg for bad, msg in [
        (num_requests < 1, "the number of requests must be at least 1"),
        (concurrency is not None and concurrency < 1, "the concurrency must be at least 1"),
        (request_rate is not None and not request_rate > 0, "the request rate must be above 0 requests/s"),
        (input_len < 1 or output_len < 1, "the input and output lengths must be at least 1"),
        (distribution not in DISTRIBUTIONS, f"distribution '{distribution}': expected one of {', '.join(DISTRIBUTIONS)}"),
        (not timeout_s > 0, "the request timeout must be above 0 s"),
    ] if bad]
    if problems:
        raise MscError("; ".join(problems))


def _base_url(url: str) -> str:
    """The server's base URL. NOTE: a trailing /v1 (as OpenAI clients take it) is accepted and dropped."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise MscError(f"--url '{url}': expected http://HOST:PORT or https://HOST:PORT")
    return url.removesuffix("/v1")


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over finished requests (on stderr); yields the function that advances it."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("requests", total=total)
        yield lambda: bar.advance(task)


# ---------------------------------------------------------------------- the result
def percentiles(values: list[float]) -> dict:
    """p50 / p90 / p99 (linear interpolation between order statistics, as numpy's default) and the mean;
    None each when there are no values."""
    if not values:
        return {**{f"p{q}": None for q in PERCENTILES}, "mean": None}
    xs = sorted(values)
    out = {}
    for q in PERCENTILES:
        pos = (len(xs) - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    out["mean"] = sum(xs) / len(xs)
    return out


def summarize(config: dict, records: list[Record]) -> dict:
    """The result: config, counts, throughputs over the run's duration (first send to last finish), latency
    statistics of the completed requests, error messages with their counts, every request's record, meta."""
    ok = [r for r in records if r.error is None]
    duration = max(r.end_s for r in records) - min(r.start_s for r in records) if records else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "config": config,
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "error_messages": errors,
        "duration_s": duration,
        "requests_per_s": per_s(len(ok)),
        "output_tokens_per_s": per_s(sum(r.tokens for r in ok)),
        "input_tokens_per_s": per_s(sum(r.input_len for r in ok)),
        "input_tokens_mean": sum(r.input_len for r in ok) / len(ok) if ok else None,
        "output_tokens_mean": sum(r.tokens for r in ok) / len(ok) if ok else None,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "latency_s": percentiles([r.latency_s for r in ok if r.latency_s is not None]),
        "per_request": [asdict(r) for r in records],
        "meta": meta(),
    }


def meta() -> dict:
    """Where the benchmark ran: machine, GPU (through torch, if it has one), versions, date (UTC)."""
    from datetime import datetime, timezone

    import msc
    from msc.bench import machine_info

    info = machine_info(("torch", "transformers", "httpx"))
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {**info, "msc": msc.__version__, "gpu": gpu,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_json(result: dict, path: Path) -> None:
    """Write the result to path through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
    except OSError as e:
        raise MscError(f"cannot write {path}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def print_table(result: dict, console: Any = None) -> None:
    """The result as two rich tables: latency statistics, then counts and throughputs."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    c = result["config"]
    load = (f"{c['request_rate']:g} req/s (Poisson)" + (f", at most {c['concurrency']} in flight" if c["concurrency"] else "")
            if c["mode"] == "open loop" else f"{c['concurrency']} concurrent clients")
    lengths = (f"{c['input_len']} in / {c['output_len']} out" if c["distribution"] == "fixed" else
               f"log-normal, medians {c['input_len']} in / {c['output_len']} out, σ {c['sigma']:g}")
    shared = f"; every prompt starts with the same {c['shared_prefix']} tokens" if c.get("shared_prefix") else ""
    console.print(f"[bold]msc bench serve[/]: {c['model']} at {c['url']}; {load}; {lengths}{shared}", highlight=False)
    t = Table()
    for col in ("metric", "mean", "p50", "p90", "p99"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for key, label, scale, fmt in (("ttft_s", "TTFT ms", 1e3, "{:.1f}"), ("tpot_s", "TPOT ms", 1e3, "{:.2f}"),
                                   ("latency_s", "latency s", 1.0, "{:.3f}")):
        stats = result[key]
        t.add_row(label, *("-" if stats[k] is None else fmt.format(stats[k] * scale)
                           for k in ("mean", "p50", "p90", "p99")))
    console.print(t)
    s = Table(show_header=False)
    s.add_column("what")
    s.add_column("value", justify="right")
    num = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for label, value in (("requests completed", str(result["requests"])), ("errors", str(result["errors"])),
                         ("duration s", num(result["duration_s"], "{:.2f}")),
                         ("requests/s", num(result["requests_per_s"], "{:.2f}")),
                         ("output tokens/s", num(result["output_tokens_per_s"], "{:,.1f}")),
                         ("input tokens/s", num(result["input_tokens_per_s"], "{:,.1f}")),
                         ("mean tokens in / out", f"{num(result['input_tokens_mean'], '{:.0f}')} / "
                                                  f"{num(result['output_tokens_mean'], '{:.0f}')}")):
        s.add_row(label, value)
    prefix = result.get("prefix_cache")
    if prefix is not None:
        s.add_row("prefix cache: tokens found / looked up",
                  f"{prefix['hit_tokens']:,.0f} / {prefix['queried_tokens']:,.0f} ({prefix['hit_rate']:.1%})")
    console.print(s)


# ---------------------------------------------------------------------- a server in this process
@contextmanager
def local_server(bundle_dir: str | Path, *, colocated: bool = False, device: str | None = None,
                 random_weights: bool = False) -> Iterator[str]:
    """msc's server for a bundle in this process, on a free loopback port; yields its base URL. The engine
    (role processes, or --colocated the engine thread) and the HTTP thread are stopped on exit."""
    from msc.runtime.serving import ColocatedServingEngine, ServingEngine
    from msc.server import ServerThread, create_app
    from msc.tokenizer import load_tokenizer

    kind = ColocatedServingEngine if colocated else ServingEngine
    engine = kind(bundle_dir, random_weights=random_weights, device=device)
    try:
        engine.start()
        app = create_app(engine, tokenizer=load_tokenizer(engine.bundle.path, engine.bundle.manifest))
        with ServerThread(app) as url:
            yield url
    finally:
        engine.close()
