"""`msc bench serve`: the load generator against msc's server on the tiny model (colocated, in process),
its length and arrival samplers, the SSE parsing of failures, and the CLI."""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from msc.bench import serve
from msc.cli import app

FIXED = dict(input_len=8, output_len=6, distribution="fixed", seed=0, model=None, timeout_s=120.0, progress=False)


@pytest.fixture(scope="module")
def server_url(tiny_bundle):
    with serve.local_server(tiny_bundle.path, colocated=True) as url:
        yield url


def _active_at(records: list[dict], t: float) -> int:
    return sum(1 for r in records if r["start_s"] <= t < r["end_s"])


def test_closed_loop_measures_every_request(server_url):
    res = serve.run_bench(server_url, num_requests=12, concurrency=4, request_rate=None, **FIXED)
    recs = res["per_request"]
    assert res["errors"] == 0 and res["requests"] == 12, res["error_messages"]
    assert [r["index"] for r in recs] == list(range(12))
    for r in recs:
        assert r["input_len"] == 8 and r["tokens"] == 6 == r["usage_tokens"] and r["finish_reason"] == "length"
        assert 0 < r["ttft_s"] <= r["latency_s"]
        assert r["ttft_s"] + 5 * r["tpot_s"] <= r["latency_s"] + 1e-9  # the last token came before the end
    # closed loop of 4 clients: never more than 4 requests in flight, and 4 at the start
    assert max(_active_at(recs, r["start_s"]) for r in recs) <= 4
    assert _active_at(recs, max(sorted(r["start_s"] for r in recs)[:4])) == 4
    for key in ("ttft_s", "tpot_s", "latency_s"):
        stats, values = res[key], [r[key] for r in recs]
        assert stats["p50"] <= stats["p90"] <= stats["p99"] <= max(values)
        assert stats["p50"] == pytest.approx(float(np.percentile(values, 50)))
        assert stats["p99"] == pytest.approx(float(np.percentile(values, 99)))
        assert stats["mean"] == pytest.approx(statistics.fmean(values))
    duration = max(r["end_s"] for r in recs) - min(r["start_s"] for r in recs)
    assert res["duration_s"] == pytest.approx(duration)
    assert res["output_tokens_per_s"] == pytest.approx(sum(r["tokens"] for r in recs) / duration)
    assert res["input_tokens_per_s"] == pytest.approx(12 * 8 / duration)
    assert res["requests_per_s"] == pytest.approx(12 / duration)
    assert res["config"]["model"] == res["config"]["served_model"] and res["config"]["max_model_len"] > 14
    assert res["meta"]["msc"] and res["meta"]["date"] and res["meta"]["cores"] >= 1
    json.dumps(res)  # the result is JSON as it is


def test_open_loop_sends_each_request_at_its_arrival(server_url):
    rate, n = 100.0, 8
    res = serve.run_bench(server_url, num_requests=n, concurrency=None, request_rate=rate,
                          **{**FIXED, "input_len": 4, "output_len": 3})
    assert res["errors"] == 0 and res["config"]["mode"] == "open loop"
    planned = serve.plan_requests(n, input_len=4, output_len=3, distribution="fixed", max_model_len=None, seed=0,
                                  request_rate=rate)
    for r, p in zip(res["per_request"], planned):
        assert r["start_s"] >= p.arrival_s - 1e-3  # never early (and the first one at once)
    assert planned[0].arrival_s == 0 and all(a.arrival_s < b.arrival_s for a, b in zip(planned, planned[1:]))


@pytest.mark.parametrize("options,status,text", [
    ({"model": "bogus"}, 404, "the model 'bogus' does not exist"),
    ({"input_len": 5000}, 400, "at most 4096 tokens per sequence"),  # longer than the tiny model's 4096-token context
])
def test_a_failed_request_is_counted_not_fatal(server_url, options, status, text):
    res = serve.run_bench(server_url, num_requests=3, concurrency=2, request_rate=None, **{**FIXED, **options})
    assert res["requests"] == 0 and res["errors"] == 3
    assert [r["status"] for r in res["per_request"]] == [status] * 3
    (message, count), = res["error_messages"].items()
    assert text in message and count == 3
    assert res["latency_s"]["p50"] is None and res["output_tokens_per_s"] == 0


def test_reference_lengths_have_the_requested_medians_and_bounds():
    n, rng = 4000, random.Random(1)
    pairs = serve.reference_lengths(n, 571, 159, None, rng)
    ins, outs = [p[0] for p in pairs], [p[1] for p in pairs]
    assert statistics.median(ins) == pytest.approx(571, rel=0.05)
    assert statistics.median(outs) == pytest.approx(159, rel=0.05)
    assert min(ins) >= 1 and max(ins) == 4 * 571 and min(outs) >= 1 and max(outs) == 4 * 159  # clipped, and reached
    inner = [math.log(x / 571) for x in ins if x < 4 * 571]
    assert statistics.pstdev(inner) == pytest.approx(serve.REFERENCE_SIGMA, rel=0.1)
    assert serve.reference_lengths(50, 571, 159, None, random.Random(1)) == pairs[:50]  # seeded
    assert serve.reference_lengths(50, 571, 159, None, random.Random(2)) != pairs[:50]
    # a short context: every pair fits it, and the output length is kept wherever it fits alone
    fitted = serve.reference_lengths(n, 571, 159, 600, random.Random(1))
    assert all(i >= 1 and i + o <= 600 for i, o in fitted)
    assert [o for _, o in fitted] == [min(o, 599) for o in outs]
    assert serve.reference_lengths(5, 4, 4, 2, random.Random(0)) == [(1, 1)] * 5


def test_planned_prompts_and_arrivals_are_seeded():
    plans = serve.plan_requests(200, input_len=30, output_len=5, distribution="reference", max_model_len=64, seed=3,
                                request_rate=50.0, token_range=(10, 20))
    assert all(10 <= t < 20 for p in plans for t in p.prompt)
    assert all(len(p.prompt) + p.output_len <= 64 for p in plans)
    again = serve.plan_requests(200, input_len=30, output_len=5, distribution="reference", max_model_len=64, seed=3,
                                request_rate=50.0, token_range=(10, 20))
    assert [(p.prompt, p.output_len, p.arrival_s) for p in plans] == [(p.prompt, p.output_len, p.arrival_s) for p in again]
    gaps = np.diff(serve.arrival_times(5000, 50.0, random.Random(0)))
    assert gaps.min() > 0 and gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert np.std(gaps) == pytest.approx(1 / 50, rel=0.1)  # exponential: the deviation equals the mean


def test_a_shared_prefix_starts_every_prompt_and_keeps_the_rest_random():
    plans = serve.plan_requests(50, input_len=40, output_len=5, distribution="reference", max_model_len=200, seed=1,
                                shared_prefix=24, token_range=(10, 200))
    first = max(plans, key=lambda p: len(p.prompt)).prompt[:24]
    for p in plans:
        k = min(24, len(p.prompt) - 1)
        assert p.prompt[:k] == first[:k]  # the shared part (a prompt keeps its last token its own)
    tails = {tuple(p.prompt[24:28]) for p in plans if len(p.prompt) >= 28}
    assert len(tails) > 1  # the rest differs between requests
    plain = serve.plan_requests(50, input_len=40, output_len=5, distribution="reference", max_model_len=200, seed=1)
    assert [len(p.prompt) for p in plain] == [len(p.prompt) for p in plans]  # lengths do not depend on it


def test_the_servers_prefix_cache_hits_are_reported(server_url):
    """msc's colocated server with prefix caching: requests sharing 48 tokens (three pages) find them cached once
    the first has run (a closed loop of one client: each request after the first)."""
    res = serve.run_bench(server_url, num_requests=4, concurrency=1, request_rate=None,
                          **{**FIXED, "input_len": 56}, shared_prefix=48)
    assert res["errors"] == 0 and res["config"]["shared_prefix"] == 48
    pc = res["prefix_cache"]
    assert pc["queried_tokens"] == 4 * 56
    assert pc["hit_tokens"] == 3 * 48 and pc["hit_rate"] == pytest.approx(3 * 48 / (4 * 56))


def _sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _chunk(ids, finish=None):
    return {"choices": [{"index": 0, "text": "", "token_ids": ids, "finish_reason": finish}]}


USAGE3 = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}


@pytest.mark.parametrize("body,error", [
    (_sse(_chunk([1, 2]), _chunk([3], "length"), USAGE3, "[DONE]"), None),  # several tokens in one chunk
    # a server without token_ids (vLLM by default): chunks with text are timed, usage gives the count
    (_sse({"choices": [{"index": 0, "text": "ab"}]}, {"choices": [{"index": 0, "text": "c", "finish_reason": "length"}]},
          USAGE3, "[DONE]"), None),
    (_sse(_chunk([1]), {"error": {"message": "role expert.1 exited"}}, "[DONE]"), "role expert.1 exited"),
    (_sse(_chunk([1]), _chunk([2])), "without data: [DONE]"),
    (_sse(_chunk([1]), _chunk([2], "length"), USAGE3, "[DONE]"), "usage.completion_tokens is 3 but 2"),
])
def test_stream_failures_are_recorded(body, error):
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["ignore_eos"] is True
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await serve.send_request(client, "http://test", serve.Planned(0, [5, 6], 3), None, 0.0, 10.0)

    rec = asyncio.run(go())
    if error is None:
        assert rec.error is None and rec.tokens == 3 == rec.usage_tokens and rec.finish_reason == "length"
        assert rec.ttft_s <= rec.latency_s and rec.tpot_s is not None
    else:
        assert error in rec.error and rec.latency_s is None


def test_a_broken_connection_is_recorded():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await serve.send_request(client, "http://test", serve.Planned(0, [5], 1), None, 0.0, 10.0)

    rec = asyncio.run(go())
    assert rec.error == "ConnectError: connection refused" and rec.status is None


def test_cli_runs_a_bundle_and_writes_json(tiny_bundle, tmp_path):
    path = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "serve", "--bundle", str(tiny_bundle.path), "--colocated",
                                   "--num-requests", "6", "--concurrency", "3", "--input-len", "8", "--output-len",
                                   "4", "--distribution", "fixed", "--no-progress", "-o", str(path)])
    assert res.exit_code == 0, res.output
    assert "TTFT ms" in res.output and "output tokens/s" in res.output
    result = json.loads(path.read_text())
    assert result["requests"] == 6 and result["errors"] == 0
    assert all(r["tokens"] == 4 for r in result["per_request"])
    assert result["config"]["colocated"] and result["config"]["concurrency"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temporary file left behind


@pytest.mark.parametrize("args,text", [
    ([], "exactly one of --url"),
    (["--url", "http://127.0.0.1:9", "--bundle", "x"], "exactly one of --url"),
    (["--url", "http://127.0.0.1:9", "--colocated"], "apply to --bundle"),
    (["--url", "http://127.0.0.1:9", "--token-range", "20..10"], "--token-range '20..10'"),
    (["--url", "http://127.0.0.1:9", "--distribution", "uniform"], "distribution 'uniform'"),
    (["--url", "http://127.0.0.1:9", "--request-rate", "0"], "request rate must be above 0"),
    (["--url", "http://127.0.0.1:9"], "cannot reach the server at http://127.0.0.1:9"),
])
def test_cli_refuses_bad_options(tmp_path, args, text):
    path = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "serve", *args, "--num-requests", "2", "-o", str(path)])
    assert res.exit_code == 1
    assert text in " ".join((res.stderr or res.output).split())
    assert not path.exists()
