"""The HTTP server against hostile and malformed requests: hypothesis-generated bodies for /v1/generate,
/v1/completions and /v1/chat/completions (random JSON values, wrong types, huge and non-finite numbers,
deep nesting, unknown fields, junk bytes, huge strings), then the cases issue 25 named one by one.

Every answer must be below 500, every 4xx OpenAI's error body with a short message, and after the fuzzing
the server must answer a good request with the tokens transformers gives.

The app runs in process (FastAPI's TestClient) over a ColocatedServingEngine of the tiny Mixtral of
tests/test_openai_server.py (a real byte-level tokenizer and chat template), compiled with
runtime.max_seq_len 64 so that every request the fuzzer gets accepted generates at most 64 tokens.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from tests.test_openai_server import hf  # noqa: F401 (a fixture: the checkpoint, its model and tokenizer)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MAX_SEQ = 64
GOOD_PROMPT = [5, 17, 42, 99]
ROUTES = ("/v1/generate", "/v1/completions", "/v1/chat/completions")
FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def served(hf, tmp_path_factory):  # noqa: F811 (hf is the imported fixture)
    """(TestClient, engine, transformers model, tokenizer) of the app over a colocated engine."""
    from msc.compiler import compile_spec
    from msc.runtime.serving import ColocatedServingEngine
    from msc.server import create_app
    from msc.spec import parse_spec
    from msc.tokenizer import load_tokenizer

    # NOTE: the CPU decode path (SDPA over gathered pages), not Triton's interpreter that conftest turns on for the
    # kernel tests (some 50x slower a step): this file tests the HTTP layer, tests/kernels test the kernel
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    folder, model, tok = hf
    spec = parse_spec({"model": {"path": str(folder), "dtype": "float32"}, "device": "cpu",
                       "plan": {"experts": {"nodes": 2}, "batch_size": 8}, "runtime": {"max_seq_len": MAX_SEQ}})
    bundle = compile_spec(spec, tmp_path_factory.mktemp("fuzz") / "tiny-chat")
    engine = ColocatedServingEngine(bundle.path, device="cpu").start()
    app = create_app(engine, tokenizer=load_tokenizer(bundle.path, bundle.manifest), model_name="tiny-chat")
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, engine, model, tok
    finally:
        engine.close()
        mp.undo()


def _post(client, path: str, body) -> "object":
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def _good_tokens(client, n: int = 6) -> list[int]:
    r = _post(client, "/v1/generate", {"prompt_token_ids": GOOD_PROMPT, "max_new_tokens": n})
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def _reference(model, ids: list[int], n: int) -> list[int]:
    from msc.verify import reference_generate

    return reference_generate(model, ids, n)


def _check_answer(r, path: str) -> None:
    """No 5xx; a 4xx is OpenAI's error body with a short message; a 200 is a whole answer."""
    assert r.status_code < 500, (path, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text[:500]
        assert isinstance(err["message"], str) and err["message"], r.text[:500]
        assert len(err["message"]) < 600 and (err["param"] is None or len(err["param"]) < 600), r.text[:800]
        assert "Traceback" not in err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    else:
        body = r.json()
        assert ("token_ids" in body) if path == "/v1/generate" else ("choices" in body and "usage" in body), body


# ------------------------------------------------------------------------- generated request bodies
@dataclass(frozen=True)
class Raw:
    """JSON text written as it is (NaN, 1e400, deep nesting), which json.dumps cannot make."""

    text: str


def _dump(v) -> str:
    """JSON text of v; Raw pieces verbatim, floats as Python's json writes them (NaN and Infinity included)."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_dump(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_dump(x) for x in v) + "]"
    return json.dumps(v)  # allow_nan: NaN, Infinity, -Infinity


ODD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e308", "4.9e-324", "-0", "1" + "0" * 40,
               "9" * 5000, "0.5e-400", "1E+2"]
NESTED = [Raw("[" * d + "]" * d) for d in (30, 900, 5000, 60_000)] + [Raw('{"a":' * 3000 + "1" + "}" * 3000)]
HUGE = ["x" * 200_000, "🙂" * 50_000, "\x00\ud7ff" * 10]
LONE_SURROGATES = [Raw('"\\ud800"'), Raw('"a\\udfff"')]  # valid JSON escapes that no UTF-8 text can hold

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(ODD_NUMBERS).map(Raw), st.sampled_from(["8", "true", "1.5", ""]),
    st.sampled_from(LONE_SURROGATES),
)
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                           st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)
hostile = st.one_of(json_values, st.sampled_from(NESTED), st.sampled_from(HUGE))


def mostly(plausible, odds: int = 5):
    """plausible but once in `odds` draws, then a hostile value: generated requests are often valid enough to run."""
    return st.sampled_from([False] * (odds - 1) + [True]).flatmap(lambda bad: hostile if bad else plausible)


token_ids = st.lists(st.integers(0, 330), min_size=0, max_size=12)
small = st.integers(1, 8)
texts = st.sampled_from(["The quick brown fox", "Ünïcödé 🙂", "", " ", "a" * 300, *LONE_SURROGATES])
roles = st.sampled_from(["user"] * 4 + ["system", "assistant", "wizard"])
messages = st.sampled_from([False] * 7 + [True]).flatmap(lambda empty: st.just([]) if empty else st.lists(
    st.fixed_dictionaries({"role": roles, "content": mostly(texts, 12)}), min_size=1, max_size=2))
booleans = mostly(st.booleans())

SAMPLING = {
    "temperature": mostly(st.sampled_from([0, 0.0, 0.7, 1.0, 2.0, 1e-300, 1e300])),
    "top_p": mostly(st.sampled_from([1, 0.5, 1e-30, 0, 2])),
    "top_k": mostly(st.sampled_from([0, -1, 1, 5, 10**30, 2**63, -(2**63)])),
    "seed": mostly(st.integers(-(2**70), 2**70)),
    "stop_token_ids": mostly(token_ids),
    "ignore_eos": booleans,
}
FIELDS = {
    "/v1/generate": {"prompt_token_ids": mostly(token_ids), "max_new_tokens": mostly(small),
                     "logprobs": mostly(st.integers(0, 21)), **SAMPLING},
    "/v1/completions": {"prompt": mostly(st.one_of(texts, token_ids, st.lists(st.one_of(texts, token_ids), max_size=3))),
                        "max_tokens": mostly(small), "n": mostly(st.integers(1, 3)), "stream": booleans,
                        "stop": mostly(texts), "logprobs": mostly(st.integers(0, 3)), "echo": booleans,
                        "model": mostly(st.sampled_from(["tiny-chat", "tiny-chat", "gpt-9", *LONE_SURROGATES])),
                        "presence_penalty": mostly(st.just(0)),
                        "logit_bias": mostly(st.just({})), "best_of": mostly(st.just(1)), "suffix": hostile,
                        "user": mostly(texts), "stream_options": mostly(st.just({"include_usage": True})), **SAMPLING},
    "/v1/chat/completions": {"messages": mostly(messages, 8), "max_tokens": mostly(small),
                             "max_completion_tokens": mostly(small), "n": mostly(st.integers(1, 3)), "stream": booleans,
                             "logprobs": booleans, "top_logprobs": mostly(st.integers(0, 3)),
                             "add_generation_prompt": booleans, **SAMPLING},
}


@st.composite
def request_bodies(draw, path: str) -> bytes:
    """A body for `path`: mostly its own fields (some missing, each plausible or hostile) plus unknown ones,
    else any JSON value or junk bytes."""
    kind = draw(st.sampled_from(["fields"] * 6 + ["value", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "value":
        return _dump(draw(hostile)).encode()
    fields = FIELDS[path]
    required = ["prompt_token_ids", "prompt", "messages"]
    chosen = [f for f in required if f in fields and draw(st.sampled_from([True] * 9 + [False]))]  # mostly there
    chosen += draw(st.lists(st.sampled_from(sorted(set(fields) - set(required))), unique=True, max_size=4))
    body = {name: draw(fields[name]) for name in chosen}
    if draw(st.sampled_from([False] * 9 + [True])):  # an unknown field (or a known one again), its name maybe a lone surrogate
        body[draw(st.one_of(st.text(min_size=1, max_size=30), st.just("\ud800")))] = draw(hostile)
    return _dump(body).encode()


@pytest.fixture(scope="module")
def before_fuzzing(served):
    """The tokens of the good request before any fuzzing, checked against transformers."""
    client, _, model, _ = served
    tokens = _good_tokens(client)
    assert tokens == _reference(model, GOOD_PROMPT, 6)
    return tokens


@pytest.mark.parametrize("path", ROUTES)
def test_generated_requests_never_get_a_5xx_and_the_server_keeps_answering(served, before_fuzzing, path):
    """150 generated bodies per route (450 in all, the same every run): no 5xx, well-formed errors, and the
    good request's tokens afterwards are those before (and transformers')."""
    client, engine, _, _ = served
    seen: dict[int, int] = {}

    @FUZZ
    @given(body=request_bodies(path))
    def one(body: bytes) -> None:
        r = _post(client, path, body)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        _check_answer(r, path)

    one()
    assert sum(seen.values()) >= 150 and seen.get(400, 0) > 0 and seen.get(200, 0) >= 10, seen
    assert engine.health()["status"] == "ok"
    assert _good_tokens(client) == before_fuzzing


# ------------------------------------------------------------------------- the cases one by one
def _error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("path,body,param", [
    ("/v1/generate", {"prompt_token_ids": [7] * 100_000, "max_new_tokens": 4}, "prompt_token_ids"),
    ("/v1/completions", {"prompt": [7] * 100_000, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "fox " * 100_000, "max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fox " * 100_000}], "max_tokens": 4}, "messages"),
])
def test_a_100k_token_prompt_is_a_400_naming_the_limit_then_good_requests_are_right(served, before_fuzzing, path, body,
                                                                                     param):
    client, engine, model, _ = served
    err = _error(_post(client, path, body))
    assert err["param"] == param and err["code"] == "context_length_exceeded"
    assert f"this deployment takes at most {MAX_SEQ} tokens per sequence (prompt + max_tokens)" in err["message"]
    assert "the prompt has" in err["message"] and "tokens" in err["message"]
    assert engine.stats()["kv_pages_used"] == 0 and engine.health()["unfinished"] == 0
    assert _good_tokens(client) == before_fuzzing == _reference(model, GOOD_PROMPT, 6)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/generate", {"prompt_token_ids": GOOD_PROMPT, "max_new_tokens": 65_536}, "max_new_tokens"),
    ("/v1/generate", {"prompt_token_ids": GOOD_PROMPT, "max_new_tokens": MAX_SEQ - len(GOOD_PROMPT) + 1}, "max_new_tokens"),
    ("/v1/completions", {"prompt": GOOD_PROMPT, "max_tokens": 65_536}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens"),
])
def test_a_max_tokens_beyond_the_sequence_limit_is_a_400(served, before_fuzzing, path, body, param):
    client, _, _, _ = served
    err = _error(_post(client, path, body))
    assert err["param"] == param and err["code"] == "context_length_exceeded"
    assert f"at most {MAX_SEQ} tokens per sequence" in err["message"] and "plus max_tokens" in err["message"]
    assert _good_tokens(client) == before_fuzzing


def test_the_longest_request_that_fits_is_served(served):
    client, _, _, _ = served
    r = _post(client, "/v1/generate", {"prompt_token_ids": GOOD_PROMPT, "max_new_tokens": MAX_SEQ - len(GOOD_PROMPT),
                                       "ignore_eos": True})
    assert r.status_code == 200 and len(r.json()["token_ids"]) == MAX_SEQ - len(GOOD_PROMPT)


@pytest.mark.parametrize("literal,why", [("NaN", "NaN is not a number JSON allows"),
                                         ("Infinity", "Infinity is not a number JSON allows"),
                                         ("-Infinity", "-Infinity is not a number JSON allows"),
                                         ("1e400", "the number 1e400 does not fit a 64-bit float"),
                                         ("-2.5E+999", "the number -2.5E+999 does not fit a 64-bit float")])
@pytest.mark.parametrize("path,template", [
    ("/v1/generate", '{"prompt_token_ids": [5, 17], "temperature": %s}'),
    ("/v1/completions", '{"prompt": [5, 17], "top_p": %s}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "seed": %s}'),
])
def test_non_finite_numbers_are_a_400_saying_so(served, path, template, literal, why):
    err = _error(_post(served[0], path, (template % literal).encode()))
    assert err["message"].startswith("the body is not valid JSON: ") and why in err["message"], err


@pytest.mark.parametrize("path,body,param", [
    ("/v1/generate", {"prompt_token_ids": [5, 17], "max_new_tokens": "8"}, "max_new_tokens"),
    ("/v1/generate", {"prompt_token_ids": [5, 17], "max_new_tokens": True}, "max_new_tokens"),
    ("/v1/generate", {"prompt_token_ids": [5, 17], "max_new_tokens": 8.0}, "max_new_tokens"),
    ("/v1/generate", {"prompt_token_ids": [5, "17"]}, "prompt_token_ids[1]"),
    ("/v1/generate", {"prompt_token_ids": [5, True]}, "prompt_token_ids[1]"),
    ("/v1/generate", {"prompt_token_ids": [5, 17], "temperature": "0.5"}, "temperature"),
    ("/v1/generate", {"prompt_token_ids": [5, 17], "ignore_eos": 1}, "ignore_eos"),
    ("/v1/completions", {"prompt": [5, 17], "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"prompt": [5, 17], "n": True}, "n"),
    ("/v1/completions", {"prompt": [5, 17], "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [5, 17], "seed": "7"}, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
])
def test_types_are_strict(served, path, body, param):
    """"8", true and 8.0 are not integers, 1 is not a boolean: refused (param named), never coerced."""
    err = _error(_post(served[0], path, body))
    assert err["param"] == param, err


def test_floats_still_take_integers(served, before_fuzzing):
    """Strictness does not refuse what JSON cannot tell apart: temperature 0 (an integer) is greedy."""
    r = _post(served[0], "/v1/generate", {"prompt_token_ids": GOOD_PROMPT, "max_new_tokens": 6, "temperature": 0,
                                          "top_p": 1})
    assert r.status_code == 200 and r.json()["token_ids"] == before_fuzzing


MB = 1 << 20


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/generate", {"prompt_token_ids": [5], "x" * MB: 1}, 400, "x" * 400),  # an unknown field's name
    ("/v1/generate", {"prompt_token_ids": [5], "max_new_tokens": "y" * MB}, 400, "max_new_tokens"),
    ("/v1/generate", {"prompt_token_ids": "z" * MB}, 400, "prompt_token_ids"),
    ("/v1/completions", {"prompt": [5], "model": "m" * MB}, 404, "model"),
    ("/v1/completions", {"prompt": [5], "stop": ["s" * MB, ""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "r" * MB, "content": "hi"}]}, 400, "messages[0].role"),
])
def test_errors_never_echo_a_1mb_input(served, path, body, status, param):
    r = _post(served[0], path, body)
    err = _error(r, status)
    assert len(r.content) < 2000, len(r.content)
    assert err["param"] == param or err["param"].startswith(param), err["param"][:50]


def test_a_body_over_the_bound_is_a_413_and_the_server_keeps_answering(served, before_fuzzing):
    from msc.http_middleware import MAX_BODY_BYTES

    big = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    err = _error(_post(served[0], "/v1/completions", big), 413)
    assert err["code"] == "request_too_large" and f"larger than {MAX_BODY_BYTES} bytes" in err["message"]

    def chunks():  # no Content-Length: the bound is counted as the body streams in
        for _ in range(MAX_BODY_BYTES // MB + 2):
            yield b" " * MB

    r = served[0].post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert _error(r, 413)["code"] == "request_too_large"
    assert _good_tokens(served[0]) == before_fuzzing


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b'{"prompt": [5, 17], "model": "\\ud800"}'),  # once echoed into a 404 that could not be sent
    ("/v1/completions", b'{"prompt": "fox \\udc00"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udbff"}]}'),
    ("/v1/generate", b'{"prompt_token_ids": [5], "\\ud800": 1}'),
])
def test_a_lone_surrogate_is_a_400(served, before_fuzzing, path, body):
    err = _error(_post(served[0], path, body))
    assert "lone UTF-16 surrogate" in err["message"], err
    ok = _post(served[0], "/v1/completions", b'{"prompt": "fox \\ud83d\\ude42", "max_tokens": 2}')  # a pair: fine
    assert ok.status_code == 200, ok.text
    assert _good_tokens(served[0]) == before_fuzzing


def test_an_error_message_with_a_lone_surrogate_can_still_be_sent():
    from msc.openai_protocol import error_response

    body = json.loads(error_response(404, "the model '\ud800' does not exist", "\ud800").body)
    assert body["error"]["message"] == "the model '\\ud800' does not exist"


@pytest.mark.parametrize("body,why", [(b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                                      (b'{"prompt_token_ids": [1, 2], "seed": ' + b"9" * 5000 + b"}", "digits"),
                                      (b"\xff\xfe{junk", "the body is not valid JSON"),
                                      (b'{"prompt_token_ids": [1, 2] "max_new_tokens": 3}', "Expecting")])
def test_unreadable_json_is_a_400_with_a_short_reason(served, body, why):
    err = _error(_post(served[0], "/v1/generate", body))
    assert err["message"].startswith("the body is not valid JSON") and why in err["message"], err


def test_extreme_but_finite_sampling_values_do_not_break_the_engine(served, before_fuzzing):
    """A temperature of 1e-300 or 1e300, a top_p of 1e-30 and a seed of -2**70 are finite and in range: served,
    the engine unharmed; a top_k of 10**30 (which once overflowed the sampler's tensor and failed the whole
    engine) is refused naming top_k."""
    client, engine, _, _ = served
    for extra in ({"temperature": 1e-300}, {"temperature": 1e300}, {"temperature": 1.0, "top_p": 1e-30},
                  {"temperature": 1.0, "seed": -(2**70)}, {"temperature": 1.0, "top_k": 2**31 - 1}):
        r = _post(client, "/v1/generate", {"prompt_token_ids": GOOD_PROMPT, "max_new_tokens": 3, **extra})
        assert r.status_code == 200, r.text
        assert len(r.json()["token_ids"]) <= 3 and all(0 <= t < 320 for t in r.json()["token_ids"])
    for path, body in [("/v1/generate", {"prompt_token_ids": GOOD_PROMPT, "temperature": 1.0, "top_k": 10**30}),
                       ("/v1/completions", {"prompt": GOOD_PROMPT, "top_k": 2**63})]:
        assert "top_k must be an integer in [0, 2147483647]" in _error(_post(client, path, body))["message"]
    assert engine.health()["status"] == "ok" and _good_tokens(client) == before_fuzzing


# ------------------------------------------------------------------------- where the server listens
@pytest.mark.parametrize("host,public", [("127.0.0.1", False), ("127.3.0.1", False), ("::1", False), ("[::1]", False),
                                         ("localhost", False), ("0.0.0.0", True), ("::", True), ("10.1.2.3", True),
                                         ("example.org", True)])
def test_a_non_loopback_address_is_warned_about(caplog, host, public):
    from msc.http_middleware import public_address_warning

    with caplog.at_level(logging.WARNING, logger="msc.server"):
        msg = public_address_warning(host, api_key=None)
    assert (msg is not None) == public
    if public:
        assert host in msg and "no --api-key" in msg and any(host in rec.getMessage() for rec in caplog.records)
        assert "no --api-key" not in public_address_warning(host, api_key="k")
    else:
        assert not caplog.records


def test_strict_json_reads_what_json_reads(served):
    """strict_json_loads agrees with json.loads on every finite document (and keeps -0.0 and big integers)."""
    from msc.http_middleware import strict_json_loads

    for text in ['{"a": [1, 2.5, -0.0, 1e308, 4.9e-324, null, true, "NaN"]}', "12345678901234567890123", '"\\u00e9"']:
        assert strict_json_loads(text) == json.loads(text)
    assert math.copysign(1, strict_json_loads("-0.0")) == -1
