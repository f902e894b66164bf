"""The OpenAI-compatible server on a real loopback port, driven by the `openai` client, against transformers.

The checkpoint is written by transformers' own save_pretrained (a tiny random Mixtral) with a byte-level
BPE tokenizer and a chat template; msc compiles it (tokenizer by reference) and serves it on its role
processes (1 attention replica, 2 expert nodes).
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. Serving a large mixture of experts model is about keeping "
        "every accelerator busy. Ünïcödé wörds and emoji 🙂 take several bytes. ") * 8
MAX_SEQ = 256


def _byte_level_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(checkpoint folder, transformers model, tokenizer)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = tmp_path_factory.mktemp("hf_ckpt")
    tok = _byte_level_tokenizer(300)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                        max_position_embeddings=MAX_SEQ)
    model = MixtralForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


@pytest.fixture(scope="module")
def server(hf, tmp_path_factory):
    """(base url, the engine) of `msc serve` on the compiled checkpoint."""
    from msc.compiler import compile_spec
    from msc.runtime.serving import ServingEngine
    from msc.server import ServerThread, create_app
    from msc.spec import parse_spec
    from msc.tokenizer import load_tokenizer

    folder, _, _ = hf
    spec = parse_spec({"model": {"path": str(folder), "dtype": "float32"}, "device": "cpu",
                       "plan": {"experts": {"nodes": 2}, "batch_size": 40}})
    bundle = compile_spec(spec, tmp_path_factory.mktemp("bundles") / "tiny-chat")
    assert (bundle.path / bundle.manifest["model"]["tokenizer"]).resolve() == folder.resolve()
    engine = ServingEngine(bundle.path).start(timeout_s=180)
    app = create_app(engine, tokenizer=load_tokenizer(bundle.path, bundle.manifest), model_name="tiny-chat")
    try:
        with ServerThread(app) as url:
            yield url, engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    from msc.verify import reference_generate

    return reference_generate(hf[1], ids, n)


def test_greedy_text_completion_equals_transformers(client, hf):
    tok = hf[2]
    for prompt in ["The quick brown fox", "Ünïcödé wörds 🙂 and", "Serving a large"]:
        ids = tok(prompt).input_ids
        want = tok.decode(_hf_greedy(hf, ids, 12), skip_special_tokens=True)
        r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(r.choices[0].token_ids) <= 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_goes_through_the_chat_template(client, hf):
    tok = hf[2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fox?"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
    want = tok.decode(_hf_greedy(hf, ids, 10), skip_special_tokens=True)
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_sends_several_chunks_then_done_and_the_same_text(client, server):
    kwargs = dict(model="tiny-chat", prompt="The lazy dog", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 8 and "".join(texts) == whole
    assert chunks[-1].usage.completion_tokens == 16 and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # the raw stream: server-sent events ending with [DONE]
    with httpx.stream("POST", server[0] + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
                            "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines[:-1])
    plain = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                           temperature=0)
    assert streamed == plain.choices[0].message.content


def test_seeded_sampling_repeats_and_n_gives_n_choices(client):
    kw = dict(model="tiny-chat", prompt="Once upon a time", max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, n=3, **kw)
    b = client.completions.create(seed=7, n=3, **kw)
    c = client.completions.create(seed=8, n=3, **kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert [ch.token_ids for ch in a.choices] != [ch.token_ids for ch in c.choices]
    assert len({tuple(ch.token_ids) for ch in a.choices}) > 1  # the choices are different draws
    assert a.usage.completion_tokens == 30


def test_a_stop_string_ends_the_text_just_before_it(client, hf):
    tok = hf[2]
    prompt = "The quick brown fox"
    full = tok.decode(_hf_greedy(hf, tok(prompt).input_ids, 24), skip_special_tokens=True)
    stop = full[5:7]
    assert stop and full.find(stop) >= 0
    r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_32_concurrent_clients_of_mixed_lengths_all_finish_with_their_own_answers(client, hf):
    tok = hf[2]
    words = TEXT.split()
    jobs = [(" ".join(words[i % 20:i % 20 + 1 + i % 7]), 2 + (i * 5) % 23) for i in range(32)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            prompt, n = jobs[i]
            r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=n, temperature=0)
            results[i] = r.choices[0].text
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors and sorted(results) == list(range(32))
    for i in (0, 7, 13, 31):  # spot checks against transformers, each prompt alone
        prompt, n = jobs[i]
        assert results[i] == tok.decode(_hf_greedy(hf, tok(prompt).input_ids, n), skip_special_tokens=True)


def _running(url: str) -> int:
    return httpx.get(url + "/health", timeout=10).json()["running"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    url, engine = server
    assert _running(url) == 0
    body = {"model": "tiny-chat", "prompt": "The", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(6)]  # a few events: the request is decoding
            assert any(ln.startswith("data: ") for ln in got)
            assert _running(url) == 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while _running(url) != 0:
        assert time.monotonic() < deadline, "the abandoned stream still holds its place in the batch"
        time.sleep(0.05)
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'msc_requests_finished_total{finish_reason="cancelled",model_name="tiny-chat"}' in metrics


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    h = httpx.get(server[0] + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["tokenizer"] is True and h["kv_pages_total"] > 0
    text = httpx.get(server[0] + "/metrics", timeout=10).text
    for name in ("msc_requests_running", "msc_requests_waiting", "msc_kv_pages_used", "msc_generation_tokens_total",
                 "msc_time_to_first_token_seconds_bucket", "msc_time_per_output_token_seconds_bucket",
                 "msc_request_errors_total"):
        assert name in text, name


def test_logprobs_are_the_models_log_softmax(client, hf):
    tok, model = hf[2], hf[1]
    prompt = "The quick"
    ids = tok(prompt).input_ids
    r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    out = r.choices[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1:].double(), -1)  # [3, V]
    for i, t in enumerate(out):
        assert abs(lp.token_logprobs[i] - ref[i, t].item()) < 1e-4
        assert len(lp.top_logprobs[i]) <= 2 and max(lp.top_logprobs[i].values()) == pytest.approx(ref[i].max().item(), abs=1e-4)


# ---------------------------------------------------------------------- bad input
BAD = [
    ("/v1/completions", b"{not json", "the body is not valid JSON", None),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "unknown parameter 'frobnicate'", "frobnicate"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_SEQ}, f"at most {MAX_SEQ} tokens per sequence", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "fox " * 400, "max_tokens": 4}, f"at most {MAX_SEQ} tokens per sequence", "prompt"),
    ("/v1/completions", {"prompt": [5, 319, 320], "max_tokens": 4}, "outside the model's vocabulary", "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt must not be empty", "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role", "messages[0].role"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "not implemented", "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "not implemented", "best_of"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "set stream: true", "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs logprobs",
     "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, "does not exist", "model"),
    ("/v1/completions", b"{" + b'"prompt": "' + b"a" * (10 << 20) + b'"}', "larger than", None),
]


@pytest.mark.parametrize("path,body,text,param", BAD, ids=[b[2][:24] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_parameter_and_the_server_keeps_serving(server, hf, path, body, text, param):
    url = server[0]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    expected = 404 if param == "model" else 413 if "larger than" in text else 400
    assert r.status_code == expected, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and text in err["message"] and err["param"] == param
    ok = httpx.post(url + "/v1/completions", json={"prompt": "The fox", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_an_api_key_is_required_when_set(server):
    from msc.server import ServerThread, create_app

    app = create_app(server[1], model_name="k", api_key="s3cret")
    with ServerThread(app) as url:
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        bad = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0).models.list()
        assert [m.id for m in good.data] == ["k"]
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # health stays open for probes


def test_echo_returns_the_prompt_before_the_completion(client):
    plain = client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=5, temperature=0)
    echoed = client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "The quick" + plain.choices[0].text


def test_a_list_of_prompts_and_n_streamed_gives_every_choice_its_own_index(client):
    chunks = list(client.completions.create(model="tiny-chat", prompt=["The fox", [5, 17, 42]], n=2, max_tokens=4,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    texts: dict[int, list[int]] = {}
    for c in chunks:
        for ch in c.choices:
            texts.setdefault(ch.index, []).extend(ch.token_ids or [])
    assert sorted(texts) == [0, 1, 2, 3] and all(len(v) == 4 for v in texts.values())
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: both choices of a prompt agree


def test_a_client_that_disconnects_before_a_plain_answer_frees_its_slot(server):
    import socket
    from urllib.parse import urlparse

    url = server[0]
    u = urlparse(url)
    payload = json.dumps({"prompt": [5, 6, 7], "max_tokens": 220, "ignore_eos": True}).encode()
    before = _cancelled(url)
    with socket.create_connection((u.hostname, u.port)) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        deadline = time.monotonic() + 30
        while _running(url) == 0:  # the request is in the engine
            assert time.monotonic() < deadline
    deadline = time.monotonic() + 30
    while _running(url) != 0:
        assert time.monotonic() < deadline, "the abandoned request still holds its place in the batch"
        time.sleep(0.05)
    assert _cancelled(url) == before + 1


def _cancelled(url: str) -> float:
    metrics = httpx.get(url + "/metrics", timeout=10).text
    lines = [ln for ln in metrics.splitlines() if ln.startswith('msc_requests_finished_total{finish_reason="cancelled"')]
    return float(lines[0].split()[-1]) if lines else 0.0


def _metric(text: str, name: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{"))


def test_a_repeated_prompt_is_served_from_the_prefix_cache(client, server, hf):
    """The same long prompt twice: the second request's full pages come from the replica's prefix cache (the
    /metrics counters say how many tokens), and both answers are transformers' greedy tokens."""
    from msc.verify import reference_generate

    url, _ = server
    tok, model = hf[2], hf[1]
    prompt = TEXT[:300]
    ids = tok(prompt).input_ids
    before = httpx.get(url + "/metrics", timeout=10).text
    outs = [client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].token_ids for _ in range(2)]
    after = httpx.get(url + "/metrics", timeout=10).text
    assert outs[0] == outs[1] == reference_generate(model, ids, 4)
    hits = _metric(after, "msc_prefix_cache_hit_tokens_total") - _metric(before, "msc_prefix_cache_hit_tokens_total")
    queried = (_metric(after, "msc_prefix_cache_queried_tokens_total")
               - _metric(before, "msc_prefix_cache_queried_tokens_total"))
    assert queried >= 2 * len(ids)  # (other tests' requests may land in the same window)
    assert hits >= (len(ids) - 1) // 16 * 16 > 0  # every full page of the prompt but the last token's
