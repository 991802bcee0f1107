"""`dhad serve` end to end on a real (tiny, trained-in-seconds) model behind a real uvicorn server.

Expected answers come from `dhad.generate` (prefill + cached decoding in one call, no engine, no
server): the server must return exactly what the library generates for the same conversation,
parameters and seed. Usage counts are checked against the tokenizer and `generate_ids`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

import dhad
from dhad import prompts
from dhad.engine import Engine
from dhad.generate import SamplingParams, generate_ids, generate_text
from dhad.serve.app import BackgroundServer, create_app
from dhad.serve.backend import Backend, load_backend
from dhad.serve.filters import BlocklistFilter, normalize_with_map

AR_Q = "كيف أجهز كوب شاهي؟"
EN_Q = "Hello, who are you?"
# The ALLaM card's "Sample input" (Arabic), verbatim.
CARD_AR = {"input_data": {"input_string": [{"role": "user", "content": "كيف أجهز كوب شاهي؟"}],
                          "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}}}
CARD_EN = {"input_data": {"input_string": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
                          "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}}}


@pytest.fixture(scope="module")
def ref(demo_dir):
    """The library path the server must agree with."""
    model, tok = dhad.load_model(demo_dir), dhad.load_tokenizer(demo_dir)
    fmt = prompts.get_format(demo_dir)

    def chat(messages, **kw):
        return generate_text(model, tok, messages, **kw)

    def chat_ids(messages, **kw):
        ids = tok.encode(prompts.render(messages, fmt))
        p = SamplingParams(stop_strings=fmt.stop_strings, **kw)
        return ids, generate_ids(model, [ids], p, tokenizer=tok)[0]

    def text(prompt, **kw):
        return generate_text(model, tok, prompt, **kw)

    return SimpleNamespace(model=model, tok=tok, fmt=fmt, chat=chat, chat_ids=chat_ids, text=text)


@pytest.fixture(scope="module")
def backend(demo_dir):
    b = load_backend(demo_dir, max_batch_size=8, max_queue=64)
    b.engine.start()
    yield b
    b.engine.shutdown(wait=False)


@pytest.fixture(scope="module")
def server(backend):
    with BackgroundServer(create_app(backend)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(q):
    return [{"role": "user", "content": q}]


def sse_events(lines):
    """JSON payloads of an SSE stream; asserts it ends with data: [DONE]."""
    data = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


# ---------------------------------------------------------------------------------------------
# OpenAI API with the official client


def test_openai_chat_plain(client, backend, ref):
    r = client.chat.completions.create(model=backend.model_name, messages=user(AR_Q), max_tokens=60, temperature=0)
    expected = ref.chat(user(AR_Q), max_new_tokens=60)
    assert any("\u0600" <= c <= "\u06ff" for c in expected)  # the demo model answers Arabic in Arabic
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    ids, new = ref.chat_ids(user(AR_Q), max_new_tokens=60)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(new)
    assert r.usage.total_tokens == len(ids) + len(new)
    assert r.choices[0].finish_reason == ("stop" if new[-1] == ref.tok.eos_token_id or len(new) < 60 else "length")
    assert r.model == backend.model_name


def test_openai_chat_streaming(client, backend, ref):
    messages = [{"role": "system", "content": "أنت مساعد مفيد."}] + user(EN_Q)
    stream = client.chat.completions.create(model=backend.model_name, messages=messages, max_tokens=40,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    expected = ref.chat(messages, max_new_tokens=40)
    assert "".join(deltas) == expected
    assert len(deltas) > 1  # streamed piece by piece, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    ids, new = ref.chat_ids(messages, max_new_tokens=40)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(new))


def test_openai_completions_plain_and_streaming(client, server, backend, ref):
    prompt = prompts.render(user(AR_Q), ref.fmt)  # raw text: /v1/completions applies no chat format
    r = client.completions.create(model=backend.model_name, prompt=prompt, max_tokens=12, temperature=0)
    expected = ref.text(prompt, max_new_tokens=12)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(ref.tok.encode(prompt))
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(resp.iter_lines()))
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == expected
    assert events[-1]["usage"]["completion_tokens"] == r.usage.completion_tokens
    # echo returns the prompt in front of the answer
    r2 = client.completions.create(model=backend.model_name, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert r2.choices[0].text == prompt + expected


def test_openai_client_errors(client, backend):
    with pytest.raises(openai.BadRequestError, match="limit of 4096"):
        client.chat.completions.create(model=backend.model_name, messages=user("hi"), max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=5)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model=backend.model_name, messages=user("hi"), temperature="hot")
    models = client.models.list()
    assert [m.id for m in models.data] == [backend.model_name]


# ---------------------------------------------------------------------------------------------
# The card's endpoint over raw HTTP


def test_score_card_schema(server, ref):
    for body in (CARD_AR, CARD_EN):
        r = httpx.post(server.url + "/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"output"} and isinstance(r.json()["output"], str)
    # greedy: exactly the library's answer
    body = {"input_data": {"input_string": user(AR_Q), "parameters": {"do_sample": False, "max_new_tokens": 60}}}
    r = httpx.post(server.url + "/score", json=body, timeout=60)
    assert r.json() == {"output": ref.chat(user(AR_Q), max_new_tokens=60)}
    # sampled with the card's parameters and a seed: reproducible, and the library's draw
    params = dict(CARD_AR["input_data"]["parameters"], seed=7, max_new_tokens=40)
    body = {"input_data": {"input_string": user(EN_Q), "parameters": params}}
    outs = [httpx.post(server.url + "/score", json=body, timeout=60).json()["output"] for _ in range(2)]
    assert outs[0] == outs[1] == ref.chat(user(EN_Q), do_sample=True, temperature=0.6, top_p=0.9, seed=7,
                                          max_new_tokens=40)
    # Arabic system prompt (the card: "System prompts can also be in Arabic")
    msgs = [{"role": "system", "content": "أنت علام، مساعد ذكاء اصطناعي."}] + user(AR_Q)
    body = {"input_data": {"input_string": msgs, "parameters": {"max_new_tokens": 30}}}
    assert httpx.post(server.url + "/score", json=body, timeout=60).json()["output"] == \
        ref.chat(msgs, max_new_tokens=30)


def test_score_jais_card_parameters(server, ref):
    # The Jais card: top_p 0.9, temperature 0.3, repetition_penalty 1.2, max_length 2048 (clamped to the
    # context here), min_length = input + 4.
    ids, _ = ref.chat_ids(user(EN_Q), max_new_tokens=1)
    params = {"do_sample": True, "top_p": 0.9, "temperature": 0.3, "repetition_penalty": 1.2,
              "min_length": len(ids) + 4, "max_length": 2048, "seed": 3}
    r = httpx.post(server.url + "/score", json={"input_data": {"input_string": user(EN_Q), "parameters": params}},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["output"] == ref.chat(user(EN_Q), max_new_tokens=None, **params)


# ---------------------------------------------------------------------------------------------
# Validation: clear 4xx, OpenAI's error shape


BAD = [
    ("/score", {"input_data": {"input_string": user("hi"), "parameters": {"temperature": "hot"}}},
     422, "input_data.parameters.temperature"),
    ("/score", {"input_data": {"input_string": user("hi"), "parameters": {"temprature": 0.5}}},
     422, "temprature: Extra inputs are not permitted"),
    ("/score", {"input_data": {"input_string": user("hi"), "parameters": {"max_new_tokens": 5000}}},
     400, "limit of 4096"),
    ("/score", {"input_data": {"input_string": user("كلمة " * 3000)}}, 400, "context is 512 tokens"),
    ("/score", {"input_data": {"input_string": [{"role": "assistant", "content": "hi"}]}}, 400, "expected role 'user'"),
    ("/score", {"input_data": {"input_string": [{"role": "robot", "content": "hi"}]}}, 422, "role"),
    ("/score", {"input_data": {"input_string": []}}, 422, "input_string"),
    ("/score", {"input_data": {"input_string": user("hi"), "parameters": {"do_sample": True, "temperature": 0}}},
     400, "temperature must be > 0"),
    ("/score", {"input_data": {"input_string": user("hi"), "parameters": {"do_sample": 1}}}, 422, "do_sample"),
    ("/score", {"input_string": user("hi")}, 422, "input_data"),
    ("/v1/chat/completions", {"messages": user("hi"), "presence_penalty": 0.5}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": user("hi"), "n": 2}, 400, "n must be 1"),
    ("/v1/chat/completions", {"messages": user("hi"), "max_tokens": "10"}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": user("hi"), "top_p": 0}, 422, "top_p"),
    ("/v1/chat/completions", {"messages": user("hi"), "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/completions", {"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{p}:{n}" for p, _, _, n in BAD])
def test_validation_errors(backend, path, body, status, needle):
    c = TestClient(create_app(backend))
    r = c.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    assert err["type"] and isinstance(err["message"], str)


def test_malformed_json_is_422(backend):
    c = TestClient(create_app(backend))
    r = c.post("/score", content=b'{"input_data": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# Hostile requests (issue 17): every one gets a clear 4xx in OpenAI's shape, or a 200 -- never a 5xx


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


HI = '"messages":[{"role":"user","content":"hi"}]'
HOSTILE = [  # (name, method, path, raw body, status, needle in the message or None, error code or None)
    ("surrogate-content", "POST", "/v1/chat/completions",
     b'{"messages":[{"role":"user","content":"\\ud800x"}],"max_tokens":2}', 422, "lone surrogate", "string_unicode"),
    ("surrogate-stop", "POST", "/v1/chat/completions",
     b'{' + HI.encode() + b',"max_tokens":2,"stop":"\\ud800"}', 422, "stop:", "string_unicode"),
    ("surrogate-stop-list", "POST", "/v1/chat/completions",
     b'{' + HI.encode() + b',"max_tokens":2,"stop":["ok","\\udfff"]}', 422, "stop", None),
    ("surrogate-prompt", "POST", "/v1/completions", b'{"prompt":"\\ud800x","max_tokens":2}', 422, "prompt:", None),
    ("surrogate-score", "POST", "/score",
     b'{"input_data":{"input_string":[{"role":"user","content":"\\udc00"}]}}', 422, "lone surrogate", None),
    ("surrogate-key", "POST", "/v1/chat/completions", b'{' + HI.encode() + b',"\\ud800\\ud800":1}', 422,
     "lone surrogate", "string_unicode"),
    ("surrogate-model", "POST", "/v1/chat/completions", b'{' + HI.encode() + b',"model":"\\udabc"}', 422, "model", None),
    ("nan-temperature", "POST", "/v1/chat/completions", b'{' + HI.encode() + b',"temperature":NaN}', 422,
     "temperature: must be a finite number", "finite_number"),
    ("neg-infinity-top-p", "POST", "/v1/chat/completions", b'{' + HI.encode() + b',"top_p":-Infinity}', 422,
     "top_p", None),
    ("infinity-penalty-score", "POST", "/score",
     b'{"input_data":{"input_string":[{"role":"user","content":"hi"}],"parameters":{"repetition_penalty":Infinity}}}',
     422, "repetition_penalty", None),
    ("nan-unknown-field", "POST", "/v1/completions", b'{"prompt":"hi","weird":NaN}', 422, "weird", "extra_forbidden"),
    ("nan-seed", "POST", "/v1/completions", b'{"prompt":"hi","seed":NaN}', 422, "seed", None),
    ("denormal-temperature", "POST", "/v1/chat/completions",
     b'{' + HI.encode() + b',"max_tokens":2,"temperature":1e-45}', 200, None, None),
    ("denormal-penalty", "POST", "/v1/chat/completions",
     b'{' + HI.encode() + b',"max_tokens":2,"repetition_penalty":5e-324}', 200, None, None),
    ("denormal-penalty-sampled", "POST", "/v1/chat/completions",
     b'{' + HI.encode() + b',"max_tokens":3,"repetition_penalty":5e-324,"temperature":1.0,"seed":1}', 200, None, None),
    ("denormal-top-p", "POST", "/v1/completions", b'{"prompt":"hi","max_tokens":2,"top_p":5e-324}', 200, None, None),
    ("denormal-score", "POST", "/score",
     b'{"input_data":{"input_string":[{"role":"user","content":"hi"}],'
     b'"parameters":{"do_sample":true,"temperature":1e-300,"max_new_tokens":2}}}', 200, None, None),
    ("huge-seed", "POST", "/v1/completions", b'{"prompt":"hi","seed":9007199254740993}', 422, "seed", None),
    ("n-2", "POST", "/v1/chat/completions", b'{' + HI.encode() + b',"n":2}', 400, "n must be 1", "unsupported_parameter"),
    ("prompt-too-long", "POST", "/v1/completions", _json({"prompt": "كلمة " * 3000, "max_tokens": 2}), 400,
     "context is 512 tokens", "context_length_exceeded"),
    ("prompt-too-many-chars", "POST", "/v1/completions", _json({"prompt": "x" * 20000}), 400,
     "characters; this server accepts at most 16384", "context_length_exceeded"),
    ("message-over-field-limit", "POST", "/v1/chat/completions",
     _json({"messages": [{"role": "user", "content": "a" * (1 << 20) + "b"}]}), 422, "at most 1048576", None),
    ("many-messages-over-char-limit", "POST", "/v1/chat/completions",
     _json({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "s" * 5000} for i in range(511)]}),
     400, "characters", "context_length_exceeded"),
    ("json-syntax", "POST", "/v1/chat/completions", b'{"messages": [1,2,3,4,5,6,7,8,9,10,11,12,13,14, x', 422,
     "not valid JSON at character 48", "json_invalid"),
    ("invalid-utf8", "POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xff\xfe"}]}', 400,
     "not valid UTF-8 (byte 0xff at offset 39)", "invalid_utf8"),
    ("deeply-nested", "POST", "/v1/completions", b'{"prompt":' + b"[" * 100000 + b"]" * 100000 + b"}", 400,
     "nested too deeply", None),
    ("big-bad-body", "POST", "/v1/completions", b'{"prompt":"hi","' + b"k" * (7 << 20) + b'":1}', 422,
     "more characters", "extra_forbidden"),
    ("no-route", "GET", "/nope", b"", 404, "no such endpoint: GET /nope", "not_found"),
    ("wrong-method", "DELETE", "/score", b"", 405, "allowed: POST", "method_not_allowed"),
    ("unknown-model", "GET", "/v1/models/gpt-4o", b"", 404, "not served here", "model_not_found"),
]


@pytest.mark.parametrize("name,method,path,body,status,needle,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests(server, name, method, path, body, status, needle, code):
    """Each request the hardening pass broke the server with (500s, a crashing 422 handler, FastAPI's
    {"detail"} shape, echoed input) now gets its documented status in OpenAI's error shape, with a
    bounded message."""
    r = httpx.request(method, server.url + path, content=body, timeout=60,
                      headers={"content-type": "application/json"} if body else {})
    assert r.status_code == status, r.text[:500]
    assert len(r.content) < 4096  # never the request echoed back
    if status == 200:
        out = r.json()
        text = out["output"] if path == "/score" else out["choices"][0].get("message", out["choices"][0])
        assert isinstance(text if isinstance(text, str) else text.get("content", text.get("text")), str)
        return
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and set(r.json()) == {"error"}
    assert needle in err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if code == "context_length_exceeded":  # the parameter the client sent
        assert err["param"] == ("prompt" if path == "/v1/completions" else "messages"), err
    if status == 405:
        assert r.headers["allow"] == "POST"


def test_denormal_sampling_is_greedy_and_streams_cleanly(server, ref):
    """temperature 1e-45 overflowed the logits (500 "probability tensor contains inf/nan"; a stream sent
    200 and then an error event). It is the limit of temperature -> 0: the greedy answer."""
    greedy = ref.chat(user(AR_Q), max_new_tokens=20)
    body = {"messages": user(AR_Q), "max_tokens": 20, "temperature": 1e-45, "seed": 3}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200
        events = sse_events(list(resp.iter_lines()))
    assert not any("error" in e for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == greedy
    body = {"input_data": {"input_string": user(AR_Q),
                           "parameters": {"do_sample": True, "temperature": 1e-300, "max_new_tokens": 20}}}
    assert httpx.post(server.url + "/score", json=body, timeout=60).json() == {"output": greedy}


def test_models_retrieve(client, backend):
    m = client.models.retrieve(backend.model_name)
    assert (m.id, m.object, m.owned_by) == (backend.model_name, "model", "dhad")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("org/other-model")


def test_request_body_limit_is_413_before_reading(backend):
    """A body above the limit is refused from its Content-Length, before it is read: the 413 arrives
    while the client is still sending (a raw socket sees it after the headers alone)."""
    from dhad.serve.limits import Limits
    with BackgroundServer(create_app(backend, limits=Limits(max_body_bytes=1 << 20))) as s:
        host, port = s.url[len("http://"):].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 67108864\r\n\r\n" + b"x" * 1000)  # 64 MB announced, 1000 bytes sent
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
        # a chunked body (no Content-Length) is counted as it arrives
        r = httpx.post(s.url + "/v1/completions", content=(b"x" * 65536 for _ in range(40)), timeout=60)
        assert r.status_code == 413 and "at most 1048576 bytes" in r.json()["error"]["message"]
        # under the limit: served as usual
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).status_code == 200


def _read_until_closed(sock) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_header_and_body_timeouts(backend):
    """A client that never finishes its headers (slowloris) or stalls mid-body gets 408 and loses the connection."""
    from dhad.serve.limits import Limits
    with BackgroundServer(create_app(backend, limits=Limits(header_timeout=0.5, body_timeout=0.5))) as s:
        host, port = s.url[len("http://"):].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            t0 = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # no blank line: headers never end
            for _ in range(3):  # a byte now and then does not extend the deadline
                time.sleep(0.2)
                with contextlib.suppress(OSError):
                    sock.sendall(b"x")
            data = _read_until_closed(sock)  # head and body may come in separate segments
            assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5, data[:200]
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n{\"prompt\":")
            data = _read_until_closed(sock)
            assert data.startswith(b"HTTP/1.1 408") and b"stalled" in data, data[:300]
        # a keep-alive connection gets a fresh deadline per request
        with httpx.Client(base_url=s.url, timeout=30) as http:
            for _ in range(3):
                assert http.get("/health").status_code == 200
                time.sleep(0.3)


def test_non_ascii_api_key(backend):
    """A UTF-8 key could never match: header bytes arrive decoded as latin-1 and were compared as UTF-8."""
    key = "مفتاح-ключ-🔑"
    c = TestClient(create_app(backend, api_key=key))
    assert c.get("/v1/models", headers={"Authorization": b"Bearer " + key.encode()}).status_code == 200
    assert c.get("/v1/models", headers={"X-API-Key": key.encode()}).status_code == 200
    r = c.get("/v1/models", headers={"Authorization": b"Bearer " + key[:-1].encode()})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models", headers={"Authorization": b"Bearer " + key.encode("utf-16")}).status_code == 401


def test_tokenizer_error_is_400(backend, monkeypatch):
    """Text the tokenizer refuses (`TokenizerError`: a lone surrogate, an invalid code point) is the client's 400."""
    from dhad.tokenizer import TokenizerError

    def refuse(text, add_special_tokens=False):
        raise TokenizerError("lone surrogate U+D800 at character 3")

    monkeypatch.setattr(backend, "encode", refuse)
    c = TestClient(create_app(backend))
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": user("hi")}),
                       ("/score", {"input_data": {"input_string": user("hi")}})):
        r = c.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_text", r.text
        assert "U+D800" in r.json()["error"]["message"]


def test_unexpected_error_is_500_in_openai_shape(backend, monkeypatch):
    def boom(*a, **k):
        raise KeyError("internal detail")

    monkeypatch.setattr(backend, "chat_prompt", boom)
    r = TestClient(create_app(backend), raise_server_exceptions=False).post(
        "/v1/chat/completions", json={"messages": user("hi")})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal server error (KeyError)", "type": "server_error",
                                  "param": None, "code": None}}


# ---------------------------------------------------------------------------------------------
# API key, 429, 503


def test_api_key(backend, monkeypatch):
    c = TestClient(create_app(backend, api_key="s3cret"))
    assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # public
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "API key" in r.json()["error"]["message"]
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cre"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.post("/score", json=CARD_AR).status_code == 401
    # the official client sends the key as a bearer token
    good = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=c, max_retries=0)
    assert good.models.list().data[0].id == backend.model_name
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=c, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # from the environment
    monkeypatch.setenv("DHAD_API_KEY", "from-env")
    c2 = TestClient(create_app(backend))
    assert c2.get("/v1/models").status_code == 401
    assert c2.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


@pytest.fixture(scope="module")
def slow_backend(demo_dir):
    """One row, no queue, and 4 ms per forward pass (a bigger model's pace), so that a long request
    reliably holds the row while the test acts."""
    model, tok = dhad.load_model(demo_dir), dhad.load_tokenizer(demo_dir)
    model.register_forward_pre_hook(lambda m, a: time.sleep(0.004))
    b = Backend.from_engine(Engine(model, tok, max_batch_size=1, max_queue=0), model_dir=demo_dir)
    b.engine.start()
    yield b
    b.engine.shutdown(wait=False)


def test_queue_full_is_429_and_closed_is_503(slow_backend, demo_dir):
    c = TestClient(create_app(slow_backend))
    occupier = slow_backend.engine.submit(slow_backend.encode("Hello"), max_new_tokens=400, min_new_tokens=400)
    next(iter(occupier))  # its first token: it holds the only row now
    r = c.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 5})
    assert not occupier.done
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    occupier.cancel()
    assert occupier.result(timeout=30).finish_reason == "cancelled"
    while slow_backend.engine.stats()["active"]:  # the row is released just after the final event
        time.sleep(0.01)
    assert c.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 5}).status_code == 200

    closed = load_backend(demo_dir)
    closed.engine.start()
    closed.engine.shutdown(wait=True)
    c = TestClient(create_app(closed))
    r = c.post("/score", json=CARD_AR)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    assert TestClient(create_app(slow_backend)).get("/health").json()["status"] == "ok"


def test_disconnected_stream_frees_its_slot(slow_backend):
    eng = slow_backend.engine
    with BackgroundServer(create_app(slow_backend)) as s:
        before = eng.stats()
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", s.url + "/v1/completions",
                             json={"prompt": "Hello", "max_tokens": 400, "min_tokens": 400, "stream": True}) as resp:
                assert resp.status_code == 200
                got = 0
                for ln in resp.iter_lines():
                    got += ln.startswith("data: ")
                    if got == 3:
                        break
            # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 30
        while eng.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        after = eng.stats()
        assert after["active"] == 0 and after["queued"] == 0
        assert after["cancelled"] == before["cancelled"] + 1
        assert after["generated_tokens"] - before["generated_tokens"] < 400  # stopped early, not finished
        # the freed row serves the next client (one row, no queue: it would be a 429 otherwise)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        while eng.stats()["active"]:
            time.sleep(0.01)
        # a non-streaming client that gives up (read timeout) frees the row too
        before = eng.stats()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/score", timeout=httpx.Timeout(60, read=1.0), json={"input_data": {
                "input_string": user("Hello"), "parameters": {"max_new_tokens": 400, "min_new_tokens": 400}}})
        deadline = time.monotonic() + 30
        while eng.stats()["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
            time.sleep(0.02)
        after = eng.stats()
        assert after["cancelled"] == before["cancelled"] + 1
        assert after["generated_tokens"] - before["generated_tokens"] < 400


# ---------------------------------------------------------------------------------------------
# Load: 64 concurrent clients


def test_64_concurrent_clients_get_complete_answers(server, backend, ref):
    questions = [AR_Q, EN_Q, "مرحبا، من أنت؟", "How do I prepare a cup of tea?"]
    expected = {q: ref.chat(user(q), max_new_tokens=40) for q in questions}
    raw = prompts.render(user(EN_Q), ref.fmt)
    expected_raw = ref.text(raw, max_new_tokens=20)

    async def one(http, i):
        q = questions[i % 4]
        kind = (i // 4) % 4
        if kind == 0:
            r = await http.post("/score", json={"input_data": {"input_string": user(q),
                                                               "parameters": {"max_new_tokens": 40}}})
            assert r.status_code == 200, r.text
            return r.json()["output"] == expected[q]
        if kind == 1:
            r = await http.post("/v1/chat/completions", json={"messages": user(q), "max_tokens": 40, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"] == expected[q]
        if kind == 2:
            async with http.stream("POST", "/v1/chat/completions",
                                   json={"messages": user(q), "max_tokens": 40, "temperature": 0, "stream": True}) as r:
                assert r.status_code == 200
                events = sse_events([ln async for ln in r.aiter_lines()])
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
            return text == expected[q] and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        async with http.stream("POST", "/v1/completions",
                               json={"prompt": raw, "max_tokens": 20, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events([ln async for ln in r.aiter_lines()])
        return "".join(e["choices"][0]["text"] for e in events) == expected_raw

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(64)))

    results = asyncio.run(main())
    assert sum(results) == 64, results
    st = backend.engine.stats()
    assert st["active"] == 0 and st["queued"] == 0


# ---------------------------------------------------------------------------------------------
# Content filter


def test_content_filter_blocks_input_and_cuts_output(backend, ref):
    answer = ref.chat(user(AR_Q), max_new_tokens=60)
    term = "الشاي"  # a word the demo model says in its Arabic answer
    assert term in answer
    cut = answer[:answer.index("أوراق")]  # "أوراق الشاي": the blocklist matches at the word start
    c = TestClient(create_app(backend, content_filter=BlocklistFilter(["أوراق الشاي", "bomb"])))
    # input: English whole word, Arabic with diacritics / alef variant still matches
    for text in ("how do I build a BOMB?", "كيف أحضر اوراقِ الشايِ؟"):
        r = c.post("/v1/chat/completions", json={"messages": user(text), "max_tokens": 5})
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter", r.text
    # output: stops before the blocked phrase, plain and streaming
    r = c.post("/v1/chat/completions", json={"messages": user(AR_Q), "max_tokens": 60, "temperature": 0})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == cut
    r = c.post("/v1/chat/completions",
               json={"messages": user(AR_Q), "max_tokens": 60, "temperature": 0, "stream": True})
    events = sse_events(r.text.splitlines())
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == cut
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    # off by default: the same request answers in full
    r = TestClient(create_app(backend)).post("/score", json={"input_data": {"input_string": user(AR_Q),
                                                                            "parameters": {"max_new_tokens": 60}}})
    assert r.json()["output"] == answer


def test_blocklist_normalisation_and_safe_prefix():
    f = BlocklistFilter(["nerve agent", "قنبلة"])
    assert f.find("Nerve   Agent!").term == "nerve agent"
    assert f.find("a nerve agentive word") is None  # English: whole words
    for s in ("والقنبلة", "قُنبُلة", "قنبلـــة", "ﻗﻨﺒﻠﺔ", "بالقنبلة"):  # clitic, harakat, tatweel, presentation forms
        assert f.find("صنع " + s) is not None, s
    assert f.find("منقنبلة") is None  # not at a word start
    text = "he said: nerve agent is bad"
    hit = f.find(text)
    assert text[hit.start:].startswith("nerve")
    # streaming: no released prefix ever contains part of a term that completes later
    for n in range(len(text) + 1):
        released = text[:f.safe_prefix(text[:n])]
        assert len(released) <= hit.start or f.find(text[:n]) is not None
    # the streaming shortcuts (scan from `start`, normalise only the tail) agree with normalising it all
    rng = random.Random(0)
    alphabet = list("ab nerve agent قنبلة") + ["\u064b", "\u0640", "ﻗ", "  "]
    for _ in range(500):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        st = rng.randint(0, len(t))
        norm, idx = normalize_with_map(t)
        m = f._re.search(norm, next((j for j, i in enumerate(idx) if i >= st), len(norm)))
        h = f.find(t, st)
        assert (h.start if h else None) == (idx[m.start()] if m else None), (t, st)
        p = len(norm) - (f._longest - 1)
        assert f.safe_prefix(t) == (idx[p] if p > 0 else 0), t


# ---------------------------------------------------------------------------------------------
# The CLI: graceful shutdown of a real `dhad serve` process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_graceful_shutdown(demo_dir, wait_healthy):
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # a 64-wide model: one thread is plenty
    proc = subprocess.Popen([sys.executable, "-m", "dhad", "serve", "--model", str(demo_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 90, lambda: "".join(log))
        body = {"prompt": "Hello", "max_tokens": 500, "min_tokens": 500, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            lines = []
            for ln in resp.iter_lines():
                lines.append(ln)
                if len(lines) == 2:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
        events = sse_events(lines)
        assert events[-1]["usage"]["completion_tokens"] == 500  # the in-flight request finished in full
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=5)
        out = "".join(log)
        assert "Waiting for connections to close" in out, out  # uvicorn waited for our stream
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_cli_errors(tmp_path, capsys):
    from dhad.cli import main
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--blocklist", str(tmp_path / "x.txt")]) == 2
    assert "--content-filter blocklist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    assert main(["serve", "--model", str(tmp_path), "--content-filter", "blocklist",
                 "--blocklist", str(tmp_path / "empty.txt")]) == 2
    assert "blocklist is empty" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--vllm-arg", "tensor_parallel_size=2"]) == 2
    assert "--vllm-arg needs --engine vllm" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--engine", "vllm", "--vllm-arg", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    for flag, value in (("--max-body-mb", "0"), ("--header-timeout", "-1"), ("--max-prompt-chars", "0")):
        assert main(["serve", "--model", str(tmp_path), flag, value]) == 2
        assert flag in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Load with hostile bodies (issue 17's acceptance)


@pytest.mark.slow
def test_small_requests_stay_fast_while_huge_bodies_arrive(demo_dir, tmp_path, wait_healthy):
    """64 clients send 2-token requests to a `dhad serve` process for 30 s while 64 MB bodies (refused with
    413 from their Content-Length) and 5 MB bodies (refused before tokenising: too many characters) arrive:
    every small request is answered, each 413 comes within 1 s, and p99 latency stays under 1 s. (Before:
    the 5 MB body was tokenised on the event loop and a 2-token request took 4.3 s; a 48 MB body was read
    and tokenised for 93 s.)

    On a shared machine the server may get a fraction of a core; 64 clients then wait longer whatever the
    bodies do. So the same clients first run 5 s without hostile bodies: when that baseline's p99 is
    already above 1 s, the bound is twice the baseline (the hostile bodies must not slow anyone down).
    All numbers, with the CPU time the server got, are printed."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dhad", "serve", "--model", str(demo_dir), "--port", str(port),
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env)

    def server_cpu_s() -> float:
        fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    big = b'{"prompt": "' + b"a" * (64 << 20) + b'"}'
    five = _json({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 10_000}
                               for i in range(501)], "max_tokens": 2})
    assert 5_000_000 < len(five) < 5_100_000
    hostile: list[tuple[str, int, float]] = []
    failures: list[str] = []

    def send_hostile():
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(6):
                time.sleep(3.0)
                name, path, body = ("64MB", "/v1/completions", big) if i % 2 == 0 else \
                    ("5MB", "/v1/chat/completions", five)
                t0 = time.perf_counter()
                r = http.post(path, content=body, headers={"content-type": "application/json"})
                hostile.append((name, r.status_code, time.perf_counter() - t0))

    # The small requests go over 64 keep-alive connections written by hand: httpx's client costs several
    # ms of CPU a request and, starved of CPU, serves its 64 coroutines unevenly -- it measured itself.
    small = _json({"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    request = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" \
        b"content-length: %d\r\n\r\n%s" % (len(small), small)

    async def client(stop_at, latencies):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if not head.startswith(b"HTTP/1.1 200") or json.loads(body)["usage"]["completion_tokens"] != 2:
                    failures.append(f"{head[:40]!r} {body[:200]!r}")
        except (OSError, asyncio.IncompleteReadError) as e:
            failures.append(repr(e))
        finally:
            writer.close()

    async def run(seconds: float) -> list[float]:
        latencies: list[float] = []
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(client(stop_at, latencies) for _ in range(64)))
        return sorted(latencies)

    def p99(lat: list[float]) -> float:
        return lat[int(len(lat) * 0.99)]

    try:
        wait_healthy(url, proc, 120, lambda: log.read_text())
        c0, w0 = server_cpu_s(), time.monotonic()
        base = asyncio.run(run(5))
        c1, w1 = server_cpu_s(), time.monotonic()
        sender = threading.Thread(target=send_hostile, name="hostile-bodies")
        sender.start()
        try:
            lat = asyncio.run(run(30))
        finally:
            sender.join(120)
        c2, w2 = server_cpu_s(), time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"\nbaseline: {len(base)} requests in 5 s, p50 {base[len(base) // 2] * 1000:.0f} ms, p99 "
          f"{p99(base) * 1000:.0f} ms, server CPU {(c1 - c0) / (w1 - w0):.0%} of a core\n"
          f"with hostile bodies: {len(lat)} requests in 30 s, p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 "
          f"{p99(lat) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms, server CPU {(c2 - c1) / (w2 - w1):.0%} of a core\n"
          "hostile: " + ", ".join(f"{n} -> {s} in {t * 1000:.0f} ms" for n, s, t in hostile))
    assert not failures, failures[:5]
    assert [(n, s) for n, s, _ in hostile] == [("64MB", 413), ("5MB", 400)] * 3
    assert all(t < 1.0 for n, _, t in hostile if n == "64MB"), hostile
    assert p99(lat) < max(1.0, 2 * p99(base)), (p99(base), p99(lat))
