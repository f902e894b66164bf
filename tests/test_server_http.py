"""The HTTP front end (FastAPI) and `msc serve`, against transformers' generate."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from fastapi.testclient import TestClient

from msc.runtime.serving import ServingEngine
from msc.server import create_app
from msc.verify import reference_generate


@pytest.fixture(scope="module")
def client(tiny_bundle):
    eng = ServingEngine(tiny_bundle.path).start(timeout_s=180)
    with TestClient(create_app(eng)) as c:
        yield c
    eng.close()


def test_generate_returns_the_reference_tokens(client, tiny_hf):
    r = client.post("/v1/generate", json={"prompt_token_ids": [5, 17, 42], "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_ids"] == reference_generate(tiny_hf, [5, 17, 42], 6)
    assert body["prompt_tokens"] == 3 and body["completion_tokens"] == 6 and body["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("payload,status,text", [
    ({"prompt_token_ids": [5, 999]}, 400, "token id 999 is outside the model's vocabulary [0, 256)"),
    ({"prompt_token_ids": []}, 400, "prompt_token_ids"),
    ({"max_new_tokens": 4}, 400, "prompt_token_ids"),
    ({"prompt_token_ids": [1], "max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"prompt_token_ids": [1], "temperature": -0.5}, 400, "temperature"),
    ({"prompt_token_ids": [1], "top_p": 0}, 400, "top_p"),
    ({"prompt_token_ids": [1], "best_of": 2}, 400, "best_of"),
    ({"prompt_token_ids": [1] * 4000, "max_new_tokens": 200}, 400, "at most 4096 tokens per sequence"),
    ({"prompt_token_ids": [1, 2], "max_new_tokens": "8"}, 400, "max_new_tokens: Input should be a valid integer"),
    ({"prompt_token_ids": [1, 2], "max_new_tokens": True}, 400, "max_new_tokens: Input should be a valid integer"),
])
def test_bad_requests_get_a_clear_status_and_reason(client, payload, status, text):
    r = client.post("/v1/generate", json=payload)
    assert r.status_code == status
    assert text in r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}  # OpenAI's error shape


def test_a_100k_token_prompt_and_a_65536_token_limit_are_400s_then_the_roles_answer_right(client, tiny_hf):
    """Refused by admission in the server process: nothing reaches the attention role (the engine's submit
    raises at once), which stays up and answers the next request with transformers' tokens."""
    from msc.admission import AdmissionError

    engine = client.app.state.msc.engine
    r = client.post("/v1/generate", json={"prompt_token_ids": [7] * 100_000, "max_new_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_token_ids"
    assert r.json()["error"]["message"] == ("the prompt has 100000 tokens; this deployment takes at most 4096 tokens per "
                                            "sequence (prompt + max_tokens), and at least one must be left to generate")
    r = client.post("/v1/generate", json={"prompt_token_ids": [5, 17, 42], "max_new_tokens": 65_536})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_new_tokens"
    assert r.json()["error"]["code"] == "context_length_exceeded" and "65539 tokens" in r.json()["error"]["message"]
    with pytest.raises(AdmissionError):
        engine.submit([7] * 100_000, 4)  # raised before anything is sent to a role
    assert engine.health()["status"] == "ok" and engine.health()["unfinished"] == 0
    ok = client.post("/v1/generate", json={"prompt_token_ids": [5, 17, 42], "max_new_tokens": 6})
    assert ok.status_code == 200 and ok.json()["token_ids"] == reference_generate(tiny_hf, [5, 17, 42], 6)


def test_seeded_sampling_over_http_repeats(client):
    body = {"prompt_token_ids": [5, 17, 42], "max_new_tokens": 12, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    a, b = client.post("/v1/generate", json=body).json(), client.post("/v1/generate", json=body).json()
    c = client.post("/v1/generate", json={**body, "seed": 8}).json()
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12 and a["token_ids"] != c["token_ids"]


def test_health_reports_the_roles_and_what_was_served(client):
    h = client.get("/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["roles"] == ["attention.0", "expert.0", "expert.1"] and body["replicas"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_msc_serve_listens_on_localhost_answers_and_stops_cleanly_on_ctrl_c(tiny_bundle, tiny_hf):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from msc.cli import main; sys.exit(main())", "serve",
                             str(tiny_bundle.path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # up once /health answers (role processes started, weights loaded)
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "msc serve did not come up within 180 s"
            try:
                status, body = _get(base + "/health")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        assert status == 200 and body["status"] == "ok"
        status, body = _get(base + "/v1/generate", {"prompt_token_ids": [7, 7], "max_new_tokens": 5})
        assert status == 200 and body["token_ids"] == reference_generate(tiny_hf, [7, 7], 5)
        # a client that asks for a long generation and goes away: the server cancels its request
        payload = json.dumps({"prompt_token_ids": [3, 4, 5], "max_new_tokens": 4000, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            while _get(base + "/health")[1]["unfinished"] == 0:  # the request has reached the engine
                assert time.monotonic() < deadline + 60
        while _get(base + "/health")[1]["cancelled"] == 0:  # bounded by the deadline below
            assert time.monotonic() < deadline + 120, "the abandoned request was not cancelled"
        assert _get(base + "/health")[1]["unfinished"] == 0
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        assert "/v1/generate" in out and "stopped: served 2 requests" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_msc_version_and_log_level():
    from typer.testing import CliRunner

    import msc
    from msc.cli import app

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"msc {msc.__version__}"
    r = CliRunner().invoke(app, ["--log-level", "loud", "inspect", "nowhere"])
    assert r.exit_code == 1 and "--log-level 'loud'" in r.output
