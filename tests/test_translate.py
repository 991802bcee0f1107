"""`dhad data translate`: chunking, resumable exactly-once output, retries, quality rules, chrF wiring.

The teacher is (a) a fake OpenAI-compatible server started here on 127.0.0.1 that "translates" by
transliterating Latin letters to Arabic ones (so a document's correct translation is known exactly,
chunk order included) and injects 429s, 503s, timeouts and malformed bodies on a schedule it logs,
and (b) a tiny dhad model through the engine.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from dhad.synth.backends import BackendUnavailable, GenParams, OpenAIBackend
from dhad.synth.translate import (QualityConfig, TranslateConfig, TranslateError, chrf, recover_jsonl, repetition,
                                 script_ratio, sidecar, split_text, translate_corpus)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# The fake teacher

AR = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"          # 28 letters; a-z map to the first 26
TR = {c: AR[i] for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
INV = {v: k for k, v in TR.items()}


def translit(s: str) -> str:
    return "".join(TR.get(ch.lower(), ch) if ch.isascii() else ch for ch in s)


def untranslit(s: str) -> str:
    return "".join(INV.get(ch, ch) for ch in s)


def fake_translator(messages, body):
    system, text = messages[0]["content"], messages[-1]["content"]
    if "into English" in system:        # the round trip: Arabic letters back to (lower-case) Latin
        return untranslit(text)
    if "ZZLATIN" in text:
        return text
    if "ZZSHORT" in text:
        return "نعم"
    if "ZZREPEAT" in text:
        return ("كلام مكرر هنا " * (len(text) // 14 + 1)).strip()
    return translit(text)


def fault_schedule(key: str, attempt: int) -> str | None:
    """The fault a request's *first* attempt gets, from a hash of its content (retries succeed)."""
    if attempt:
        return None
    return {0: "http_429", 1: "http_5xx", 2: "timeout", 3: "malformed_json", 4: "malformed_shape"}.get(
        int(hashlib.sha1(key.encode()).hexdigest(), 16) % 8)


class FakeOpenAI:
    """A threaded http.server speaking enough of the OpenAI API: POST /v1/chat/completions, GET /v1/models."""

    def __init__(self, answer=fake_translator, faults=fault_schedule, delay: float = 0.0, hang_s: float = 3.0,
                 fail_status: dict | None = None, models_hang: float = 0.0):
        self.answer, self.faults, self.delay, self.hang_s = answer, faults, delay, hang_s
        self.fail_status = fail_status or {}          # content substring -> HTTP status always returned
        self.models_hang = models_hang                # GET /models answers only after this long (0: at once)
        self.injected: Counter = Counter()
        self.attempts: Counter = Counter()
        self.gets: Counter = Counter()                # GET requests received, by path
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code, body: bytes, headers=()):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in headers:
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:   # the client gave up (timeout) and closed the socket
                    pass

            def do_GET(self):
                with outer.lock:
                    outer.gets[self.path] += 1
                if self.path == "/v1/models" and outer.models_hang:
                    time.sleep(outer.models_hang)
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-teacher"}]}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                msgs = body["messages"]
                key = msgs[-1]["content"]
                for sub, code in outer.fail_status.items():
                    if sub in key:
                        return self._send(code, json.dumps({"error": f"status {code}"}).encode())
                with outer.lock:
                    n = outer.attempts[key]
                    outer.attempts[key] += 1
                    fault = outer.faults(key, n) if outer.faults else None
                    if fault:
                        outer.injected["malformed" if fault.startswith("malformed") else fault] += 1
                if outer.delay:
                    time.sleep(outer.delay)
                if fault == "http_429":
                    return self._send(429, b'{"error": "rate limited"}', [("Retry-After", "0")])
                if fault == "http_5xx":
                    return self._send(503, b'{"error": "overloaded"}')
                if fault == "timeout":
                    time.sleep(outer.hang_s)
                    return self._send(200, b"{}")
                if fault == "malformed_json":
                    return self._send(200, b'{"choices": [{"message": {"content": "tru')
                if fault == "malformed_shape":
                    return self._send(200, b'{"object": "chat.completion", "choices": []}')
                text = outer.answer(msgs, body)
                self._send(200, json.dumps({
                    "id": "x", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(key), "completion_tokens": len(text),
                              "total_tokens": len(key) + len(text)}}, ensure_ascii=False).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def client(url, **kw):
    # 2 s: below the fake server's injected hang (3 s), above a slow answer on a loaded 2-core CI machine
    kw = {"timeout": 2.0, "concurrency": 8, "max_retries": 4, "backoff": 0.01, **kw}
    return OpenAIBackend(url, **kw)


# ---------------------------------------------------------------------------------------------
# A small corpus

WORDS = ("the of and river city people long ago built a bridge over water where merchants met every "
         "morning to trade salt wool copper and stories about distant kingdoms beyond mountains").split()


def sentence(rng: random.Random) -> str:
    s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
    return s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!", '."'])


def paragraph(rng, n):
    return " ".join(sentence(rng) for _ in range(n))


def make_corpus(root: Path) -> dict:
    """english/books.jsonl (tagged rows), english/notes.txt (untagged), web/pages.jsonl (low quality)."""
    rng = random.Random(0)
    (root / "english").mkdir(parents=True)
    (root / "web").mkdir()
    rows = []
    for i in range(8):
        paras = [paragraph(rng, rng.randint(1, 4)) for _ in range(rng.randint(1, 3))]
        rows.append({"id": f"b{i}", "quality": "high", "title": f"book {i}", "text": "\n\n".join(paras)})
    rows.append({"id": "long", "quality": "high", "text": "\n\n".join(paragraph(rng, 6) for _ in range(5))})
    rows.append({"id": "latin", "quality": "high", "text": "ZZLATIN " + paragraph(rng, 2)})
    rows.append({"id": "short", "quality": "high", "text": "ZZSHORT " + paragraph(rng, 2)})
    rows.append({"id": "loop", "quality": "high", "text": "ZZREPEAT " + paragraph(rng, 3)})
    rows.append({"id": "lowq", "quality": "low", "text": paragraph(rng, 2)})
    rows.append({"id": "notag", "text": paragraph(rng, 2)})
    with open(root / "english" / "books.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (root / "english" / "notes.txt").write_text("\n\n".join(paragraph(rng, 2) for _ in range(3)) + "\n")
    with open(root / "web" / "pages.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": i, "text": paragraph(rng, 2)}) + "\n")
    texts = {f"english/books.jsonl#{r['id']}": r["text"] for r in rows}
    return texts


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []


def outputs(out: Path):
    kept, rej = read_jsonl(out), read_jsonl(sidecar(out, "rejected.jsonl"))
    return kept, rej


# ---------------------------------------------------------------------------------------------
# Splitting

@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["word", "كلمة", "Ab.", "هل؟", "end!", "x" * 40, " ", "  ", "\n", "\n\n",
                                 "\n \n\n", '."', "…", "۔", "\t"]), max_size=80),
       st.integers(min_value=1, max_value=60))
def test_split_text_covers_the_text_exactly(parts, max_chars):
    text = "".join(parts)
    chunks = split_text(text, max_chars)
    assert "".join(c.text + c.sep for c in chunks) == text.strip()
    for c in chunks:
        assert c.text and c.text == c.text.strip() and len(c.text) <= max_chars
        assert c.sep.strip() == ""
    assert chunks == [] or chunks[-1].sep == ""


def test_split_prefers_paragraphs_then_arabic_and_latin_sentences():
    ar = "هذه الجملة الأولى. هل هذه الجملة الثانية؟ نعم، وهذه الثالثة!"
    en = "First sentence here. Second one?"
    text = f"{ar}\n\n{en}"
    assert [c.text for c in split_text(text, 200)] == [text]                      # fits: one chunk
    assert [(c.text, c.sep) for c in split_text(text, 70)] == [(ar, "\n\n"), (en, "")]   # paragraph break
    got = split_text(ar, 40)
    assert [c.text for c in got] == ["هذه الجملة الأولى.", "هل هذه الجملة الثانية؟", "نعم، وهذه الثالثة!"]
    assert split_text('He said "Stop." Then left.', 18)[0].text == 'He said "Stop."'


def test_rules_scores():
    assert script_ratio("مرحبا بالعالم", "ar") == 1.0 and script_ratio("hello", "ar") == 0.0
    assert script_ratio("مرحبا abc", "en") == pytest.approx(3 / 8)
    assert repetition("one two three four five six seven eight") == 0.0
    # 12 words, the 3-gram "a b c" repeats: words 3..11 are inside a repeated 3-gram
    assert repetition("a b c a b c a b c a b c") == pytest.approx(9 / 12)


# ---------------------------------------------------------------------------------------------
# recovery of a torn output file

def test_recover_jsonl_drops_a_torn_tail(tmp_path):
    p = tmp_path / "o.jsonl"
    good = [json.dumps({"id": f"d{i}", "text": "نص"}, ensure_ascii=False) for i in range(3)]
    p.write_text("\n".join(good) + "\n" + '{"id": "d3", "te', encoding="utf-8")
    ids, info = recover_jsonl(p)
    assert ids == ["d0", "d1", "d2"] and info["dropped_bytes"] == len('{"id": "d3", "te')
    assert p.read_text(encoding="utf-8") == "\n".join(good) + "\n"
    p.write_text(good[0] + "\n" + '{"id": "x", "text"\n', encoding="utf-8")   # complete line, bad JSON, at the end
    ids, info = recover_jsonl(p)
    assert ids == ["d0"] and p.read_text(encoding="utf-8") == good[0] + "\n"
    p.write_text(good[0] + "\nnot json\n" + good[1] + "\n", encoding="utf-8")  # in the middle: reported, kept
    ids, info = recover_jsonl(p)
    assert ids == ["d0", "d1"] and info == {"dropped_bytes": 0, "corrupt_lines": 1}


# ---------------------------------------------------------------------------------------------
# Against the fake endpoint

def cfg_for(root, out, **kw):
    base = dict(inputs=["english"], out=str(out), data_root=str(root), source_quality={"english": "high"},
                max_chunk_chars=300, progress=False)
    base.update(kw)
    return TranslateConfig(**base)


def test_translate_with_faults_retries_and_rules(tmp_path):
    texts = make_corpus(tmp_path / "data")
    out = tmp_path / "ar.jsonl"
    with FakeOpenAI() as srv:
        be = client(srv.url)
        rep = translate_corpus(cfg_for(tmp_path / "data", out), be)
    kept, rej = outputs(out)
    # selection: tagged high rows + untagged notes.txt paragraphs via english=high; the "low" row is not
    want = {k for k in texts if not k.endswith("#lowq")} | {f"english/notes.txt:{n}" for n in (1, 3, 5)}
    got = [r["id"] for r in kept + rej]
    assert sorted(got) == sorted(want) and len(got) == len(set(got))
    assert rep["docs"]["not_selected"] == 1 and rep["selection"]["by_tag"] == {"high": 16, "low": 1}
    # every kept translation is exactly the transliteration of the whole source: chunks reassembled in order
    for r in kept:
        assert r["text"] == translit(r["source_text"].strip())
    long = next(r for r in kept if r["id"].endswith("#long"))
    assert long["chunks"] >= 5 and long["text"].count("\n\n") == 4
    assert long["meta"] == {"id": "long", "quality": "high"}
    # rules: each trigger rejected by its rule, and the per-rule report agrees with the files
    by_id = {r["id"].split("#")[-1]: r["rejected"] for r in rej}
    assert by_id == {"latin": "script_ratio", "short": "length_ratio", "loop": "repetition"}
    assert {k: v["rejected"] for k, v in rep["rules"].items()} == \
        {"empty_output": 0, "script_ratio": 1, "length_ratio": 1, "repetition": 1, "round_trip_chrf": 0}
    assert rep["docs"]["kept"] == len(kept) and rep["docs"]["rejected"] == 3
    # every injected fault was seen and retried; nothing failed for good
    errs = Counter(rep["backend"]["errors"])
    assert sum(srv.injected.values()) > 5
    for kind in ("http_429", "http_5xx", "malformed"):
        assert errs[kind] == srv.injected[kind], (kind, errs, srv.injected)
    assert errs["timeout"] >= srv.injected["timeout"] > 0
    assert rep["backend"]["retries"] == sum(errs.values()) and rep["docs"]["failed"] == 0
    assert json.loads(sidecar(out, "report.json").read_text())["docs"] == rep["docs"]


def test_round_trip_chrf_is_sacrebleus(tmp_path):
    import sacrebleu
    make_corpus(tmp_path / "data")
    out = tmp_path / "ar.jsonl"
    with FakeOpenAI(faults=None) as srv:
        rep = translate_corpus(cfg_for(tmp_path / "data", out, round_trip=True,
                                       quality_rules=QualityConfig(min_chrf=0.0)), client(srv.url))
    kept, _ = outputs(out)
    assert kept and rep["round_trip"]["docs"] == len(kept)
    for r in kept:   # the fake's back-translation loses case: not 100, and computed by sacrebleu itself
        assert r["back_translation"] == r["source_text"].strip().lower()
        assert r["scores"]["chrf"] == round(sacrebleu.sentence_chrf(r["back_translation"], [r["source_text"]]).score, 4)
        assert r["scores"]["chrf"] < 100
    hyps, refs = [r["back_translation"] for r in kept], [r["source_text"] for r in kept]
    assert rep["round_trip"]["corpus_chrf"] == round(sacrebleu.corpus_chrf(hyps, [refs]).score, 4)
    assert chrf("abc def", "abc def") == 100.0


def test_interrupted_and_resumed_in_process(tmp_path):
    texts = make_corpus(tmp_path / "data")
    out = tmp_path / "ar.jsonl"
    with FakeOpenAI() as srv:
        r1 = translate_corpus(cfg_for(tmp_path / "data", out, inputs=["english/books.jsonl"], limit=5), client(srv.url))
        assert r1["docs"]["translated"] == 5
        with open(out, "ab") as f:   # a crash in the middle of a write
            f.write('{"id": "english/books.jsonl#b7", "text": "نص مقطو'.encode())
        r2 = translate_corpus(cfg_for(tmp_path / "data", out, inputs=["english/books.jsonl"]), client(srv.url))
    kept, rej = outputs(out)
    got = [r["id"] for r in kept + rej]
    want = {k for k in texts if not k.endswith("#lowq")}
    assert sorted(got) == sorted(want) and len(got) == len(set(got))
    assert r2["docs"]["already_done"] == 5 and r2["docs"]["translated"] == len(want) - 5
    assert r2["resume"]["kept_file"]["dropped_bytes"] > 0
    assert all(r["text"] == translit(r["source_text"].strip()) for r in kept)


KILL_SCRIPT = """
import sys
from dhad.synth.backends import OpenAIBackend
from dhad.synth.translate import TranslateConfig, translate_corpus
root, out, url = sys.argv[1:4]
translate_corpus(TranslateConfig(inputs=["english"], out=out, data_root=root, source_quality={"english": "high"},
                                 max_chunk_chars=120, progress=False),
                 OpenAIBackend(url, timeout=5.0, concurrency=2, backoff=0.01))
"""


def test_killed_process_then_restarted_loses_and_duplicates_nothing(tmp_path):
    texts = make_corpus(tmp_path / "data")
    out = tmp_path / "ar.jsonl"
    with FakeOpenAI(faults=None, delay=0.03) as srv:
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "data"), str(out), srv.url],
                             cwd=REPO, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline and p.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.02)
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        p.send_signal(signal.SIGKILL)
        p.wait()
        n_before = out.read_bytes().count(b"\n") + sidecar(out, "rejected.jsonl").read_bytes().count(b"\n")
        rep = translate_corpus(cfg_for(tmp_path / "data", out, max_chunk_chars=120), client(srv.url))
    kept, rej = outputs(out)
    got = [r["id"] for r in kept + rej]
    want = {k for k in texts if not k.endswith("#lowq")} | {f"english/notes.txt:{n}" for n in (1, 3, 5)}
    assert sorted(got) == sorted(want) and len(got) == len(set(got))
    assert rep["docs"]["already_done"] == n_before >= 4
    # (with 120-char chunks a ZZ trigger affects only its own chunk, so those documents are not plain)
    assert all(r["text"] == translit(r["source_text"].strip()) for r in kept if "ZZ" not in r["source_text"])


# ---------------------------------------------------------------------------------------------
# Bad input

def test_unknown_source_and_empty_and_invalid_utf8(tmp_path):
    root = tmp_path / "data"
    make_corpus(root)
    with pytest.raises(TranslateError, match=r"unknown source 'englsh'.*has: english, web"):
        translate_corpus(cfg_for(root, tmp_path / "o.jsonl", inputs=["englsh"]), client("http://127.0.0.1:9/v1"))
    (root / "empty").mkdir()
    (root / "empty" / "e.jsonl").write_bytes(b"")
    with pytest.raises(TranslateError, match=r"no documents .*e\.jsonl"):
        translate_corpus(cfg_for(root, tmp_path / "o.jsonl", inputs=["empty"]), client("http://127.0.0.1:9/v1"))
    # an empty file next to a good one, and a line of invalid UTF-8: counted skips, the rest translated
    (root / "mixed").mkdir()
    (root / "mixed" / "a.jsonl").write_bytes(
        b'{"id": 1, "text": "A fine sentence about the river."}\n'
        b'{"id": 2, "text": "Broken \xff\xfe bytes here."}\n'
        b'{"id": 3, "text": ""}\n'
        b'{"id": 4, "text": "Another sentence about the bridge."}\n')
    (root / "mixed" / "b.txt").write_bytes(b"")
    out = tmp_path / "m.jsonl"
    with FakeOpenAI(faults=None) as srv:
        rep = translate_corpus(cfg_for(root, out, inputs=["mixed"], quality=()), client(srv.url))
    assert sorted(r["id"] for r in outputs(out)[0]) == ["mixed/a.jsonl#1", "mixed/a.jsonl#4"]
    sk = rep["read"]["skipped"]
    assert sk["invalid_utf8"] == 1 and sk["empty"] == 1 and sk["empty_file"] == 1
    assert any("a.jsonl:2" in e for e in rep["read"]["skipped_examples"]["invalid_utf8"])


def test_endpoint_that_never_answers(tmp_path):
    root = tmp_path / "data"
    make_corpus(root)
    sink = socket.socket()      # accepts connections (kernel backlog) and never answers
    sink.bind(("127.0.0.1", 0))
    sink.listen(64)
    url = f"http://127.0.0.1:{sink.getsockname()[1]}/v1"
    t0 = time.perf_counter()
    try:
        with pytest.raises(BackendUnavailable, match=r"never answered.*timeout"):
            translate_corpus(cfg_for(root, tmp_path / "o.jsonl"),
                             client(url, model="m", timeout=0.3, max_retries=1, concurrency=2))
    finally:
        sink.close()
    assert time.perf_counter() - t0 < 10
    assert read_jsonl(tmp_path / "o.jsonl") == []
    closed = socket.socket()    # nothing listening: connection refused
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(BackendUnavailable, match="never answered.*connect"):
        translate_corpus(cfg_for(root, tmp_path / "o.jsonl"),
                         client(f"http://127.0.0.1:{port}/v1", max_retries=1, concurrency=2))


def test_model_lookup_runs_once_for_all_requests(tmp_path):
    """No model name, and an endpoint whose GET /models never answers: the one lookup is retried, and every
    request waits for it — requests used to take turns behind a lock, each waiting out its own timeouts
    (8 in flight x 2 attempts = 16 lookups; 33.6 s instead of 4 s at concurrency 16 with --timeout 1
    --max-retries 2). The stopped run still writes its report."""
    root = tmp_path / "data"
    make_corpus(root)
    out = tmp_path / "o.jsonl"
    with FakeOpenAI(models_hang=2.0) as srv:
        with pytest.raises(BackendUnavailable) as e:
            translate_corpus(cfg_for(root, out), client(srv.url, timeout=0.3, max_retries=1, concurrency=8))
        assert srv.gets["/v1/models"] == 2 and not srv.attempts   # no chat request was sent
    assert re.search(r"never answered \(GET .*/v1/models\): 2 attempts, last timeout", str(e.value))
    rep = json.loads(sidecar(out, "report.json").read_text())
    assert rep["status"] == "stopped" and "never answered" in rep["error"]
    assert rep["backend"]["errors"] == {"timeout": 2} and rep["backend"]["requests"] == 2
    assert rep["docs"]["translated"] == 0 and rep["read"]["records"] > 0


def test_rejected_requests_stop_the_run_naming_the_http_status(tmp_path):
    """A server that rejects every request (e.g. max_tokens over its limit): after 8 in a row the run stops,
    quoting the last failure's HTTP status and body, and the report keeps the counts of the stopped run."""
    import argparse
    from dhad.cli import CLIError
    from dhad.synth.cli import add_translate_arguments, run_translate
    root = tmp_path / "data"
    make_corpus(root)
    out = tmp_path / "o.jsonl"
    with FakeOpenAI(faults=None, fail_status={"": 400}) as srv:
        with pytest.raises(BackendUnavailable, match=r"8 requests in a row failed; stopping "
                                                     r"\(last: http://.*/chat/completions: HTTP 400: .*status 400"):
            translate_corpus(cfg_for(root, out), client(srv.url, model="m", concurrency=2))
        rep = json.loads(sidecar(out, "report.json").read_text())
        assert rep["status"] == "stopped" and "HTTP 400" in rep["error"]
        assert rep["docs"]["failed"] >= 1 and rep["backend"]["errors"] == {"http_4xx": rep["backend"]["failed"]}
        assert rep["backend"]["failed"] >= 8 and rep["teacher"] == "m"
        tp = argparse.ArgumentParser()
        add_translate_arguments(tp)
        args = tp.parse_args(["--data", str(root), "--sources", "english", "--out", str(tmp_path / "c.jsonl"),
                              "--endpoint", srv.url, "--no-progress", "--max-tokens", "5000"])
        with pytest.raises(CLIError, match=r"HTTP 400: .*status 400.*the counts so far are in .*c\.report\.json"):
            run_translate(args)
    assert json.loads((tmp_path / "c.report.json").read_text())["teacher"] == "fake-teacher"


def test_request_errors_are_counted_and_retried_next_run(tmp_path):
    root = tmp_path / "data"
    texts = make_corpus(root)
    out = tmp_path / "ar.jsonl"
    with FakeOpenAI(faults=None, fail_status={"ZZSHORT": 400}) as srv:
        # no injected hangs here: a generous timeout, so a loaded CI machine adds no timeout errors
        rep = translate_corpus(cfg_for(root, out, inputs=["english/books.jsonl"]), client(srv.url, timeout=15.0))
        assert rep["docs"]["failed"] == 1 and rep["backend"]["errors"] == {"http_4xx": 1}
        assert rep["failed_examples"][0]["id"].endswith("#short")
        srv.fail_status = {}
        rep2 = translate_corpus(cfg_for(root, out, inputs=["english/books.jsonl"]), client(srv.url))
        assert rep2["docs"]["translated"] == 1            # only the failed one
        srv.fail_status = {"": 401}
        with pytest.raises(BackendUnavailable, match="HTTP 401"):
            translate_corpus(cfg_for(root, tmp_path / "x.jsonl"), client(srv.url))
    got = [r["id"] for r in sum(outputs(out), [])]
    assert sorted(got) == sorted(k for k in texts if not k.endswith("#lowq"))


def test_backend_reports_malformed_and_gives_up(tmp_path):
    """A server whose every answer is malformed: counted per attempt, then the request fails."""
    import asyncio
    from dhad.synth.backends import RequestFailed
    with FakeOpenAI(faults=lambda key, attempt: "malformed_json" if attempt % 2 else "malformed_shape") as srv:
        be = client(srv.url, model="m", max_retries=2)

        async def ask():
            try:
                return await be.chat([{"role": "user", "content": "hi"}], GenParams(max_tokens=4))
            finally:
                await be.end_loop()  # close the HTTP client: a kept-alive connection would hold the server's thread

        with pytest.raises(RequestFailed, match="gave up after 3 attempts.*malformed"):
            asyncio.run(ask())
    assert be.stats.errors == {"malformed": 3} and be.stats.failed == 1 and be.stats.retries == 2
    assert srv.injected == {"malformed": 3}


# ---------------------------------------------------------------------------------------------
# Through a tiny dhad model and the engine

@pytest.fixture(scope="module")
def tiny_model_and_tok():
    import torch
    from dhad.config import Config
    from dhad.model import Transformer
    from dhad.tokenizer import train_bpe
    torch.manual_seed(0)
    rng = random.Random(1)
    texts = [paragraph(rng, 3) for _ in range(40)] + ["هذه جملة عربية عن النهر والمدينة والجسر." * 3] * 5
    tok = train_bpe(texts, vocab_size=512, min_frequency=1)
    model = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    return model, tok


def test_engine_backend_equals_generate_and_resumes(tmp_path, tiny_model_and_tok):
    import asyncio
    from dhad.synth.backends import EngineBackend
    from dhad.generate import generate_text
    model, tok = tiny_model_and_tok
    be = EngineBackend(model, tok, max_batch_size=4)
    try:
        convs = [[{"role": "system", "content": "Translate."}, {"role": "user", "content": f"The river {i}."}]
                 for i in range(5)]

        async def all_at_once():
            return await asyncio.gather(*(be.chat(m, GenParams(max_tokens=10)) for m in convs))
        got = asyncio.run(all_at_once())
        want = [generate_text(model, tok, m, fmt=be.fmt, max_new_tokens=10) for m in convs]
        assert got == want
        assert be.engine.stats()["decode_steps"] < 5 * 10       # the requests shared decode steps

        root = tmp_path / "data"
        texts = make_corpus(root)
        out = tmp_path / "ar.jsonl"
        kw = dict(inputs=["english/books.jsonl"], max_chunk_chars=150, gen=GenParams(max_tokens=6))
        r1 = translate_corpus(cfg_for(root, out, limit=3, **kw), be)
        r2 = translate_corpus(cfg_for(root, out, **kw), be)
    finally:
        be.close()
    kept, rej = outputs(out)
    got = [r["id"] for r in kept + rej]
    assert sorted(got) == sorted(k for k in texts if not k.endswith("#lowq")) and len(got) == len(set(got))
    assert r1["docs"]["translated"] == 3 and r2["docs"]["already_done"] == 3
    assert r1["backend"]["completion_tokens"] > 0
    # a random tiny model does not translate: the rules must reject it (and say which rule)
    assert len(rej) >= len(got) - 1 and all(r["rejected"] in ("empty_output", "script_ratio", "length_ratio") for r in rej)


def test_through_dhad_serve_equals_the_engine_backend(tmp_path, tiny_model_and_tok):
    """The OpenAI backend against the real `dhad serve` app (in process, over httpx's ASGI transport)
    gives the same translations as the in-process engine backend: the request body fits the server's
    strict schema and greedy decoding is the same path."""
    import httpx
    from dhad.synth.backends import EngineBackend
    from dhad.engine import Engine
    from dhad.serve.app import create_app
    model, tok = tiny_model_and_tok
    root = tmp_path / "data"
    make_corpus(root)
    kw = dict(inputs=["english/books.jsonl"], max_chunk_chars=150, gen=GenParams(max_tokens=6), limit=6)
    engine = Engine(model, tok, max_batch_size=4).start()
    try:
        app = create_app(engine, fmt="chatml", model_name="tiny")
        be = OpenAIBackend("http://dhad.test/v1", transport=httpx.ASGITransport(app=app), concurrency=4)
        rep = translate_corpus(cfg_for(root, tmp_path / "http.jsonl", **kw), be)
    finally:
        engine.shutdown(wait=False)
    direct = EngineBackend(model, tok, fmt="chatml", max_batch_size=4)
    try:
        translate_corpus(cfg_for(root, tmp_path / "direct.jsonl", **kw), direct)
    finally:
        direct.close()
    via_http = {r["id"]: r["text"] for r in sum(outputs(tmp_path / "http.jsonl"), [])}
    in_proc = {r["id"]: r["text"] for r in sum(outputs(tmp_path / "direct.jsonl"), [])}
    assert len(via_http) == 6 and via_http == in_proc
    assert rep["backend"]["errors"] == {} and rep["backend"]["completion_tokens"] > 0


# ---------------------------------------------------------------------------------------------
# Real data: human translations pass the default rules; chrF of the round trip is sacrebleu's

@pytest.mark.data
def test_real_parallel_pairs(tmp_path, shared_data):
    import sacrebleu
    src = shared_data / "corpus" / "parallel" / "ntrex128_newstest2019_en_ar.jsonl"
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()[:60]]
    en2ar = {r["en"].strip(): r["ar"] for r in rows}
    ar2en = {r["ar"].strip(): " ".join(r["en"].split()[:-1]) for r in rows}   # a lossy "back-translation"

    def reference(messages, body):
        text = messages[-1]["content"]
        return ar2en[text] if "into English" in messages[0]["content"] else en2ar[text]

    out = tmp_path / "ar.jsonl"
    with FakeOpenAI(answer=reference, faults=None) as srv:
        rep = translate_corpus(TranslateConfig(inputs=[f"parallel={src}"], out=str(out), text_field="en",
                                               quality=(), limit=60, round_trip=True, progress=False),
                               client(srv.url))
    kept, rej = outputs(out)
    assert len(kept) + len(rej) == 60
    assert len(kept) >= 55, [(r["id"], r["rejected"], r["scores"]) for r in rej]   # human translations pass
    for r in kept:
        assert r["scores"]["chrf"] == round(sacrebleu.sentence_chrf(r["back_translation"], [r["source_text"]]).score, 4)
    assert rep["round_trip"]["corpus_chrf"] == round(
        sacrebleu.corpus_chrf([r["back_translation"] for r in kept], [[r["source_text"] for r in kept]]).score, 4)


# ---------------------------------------------------------------------------------------------
# The command-line functions (`dhad data translate` / `synth` call these)

def test_cli_functions(tmp_path, capsys):
    import argparse
    from dhad.cli import CLIError
    from dhad.synth.cli import add_synth_arguments, add_translate_arguments, run_synth, run_translate
    root = tmp_path / "data"
    make_corpus(root)
    tp, sp = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_translate_arguments(tp)
    add_synth_arguments(sp)
    with FakeOpenAI(faults=None) as srv:
        args = tp.parse_args(["--data", str(root), "--sources", "english", "--out", str(tmp_path / "o.jsonl"),
                              "--endpoint", srv.url, "--no-progress", "--max-chunk-chars", "200", "--round-trip"])
        assert run_translate(args) == 0
        kept, rej = outputs(tmp_path / "o.jsonl")
        printed = capsys.readouterr().out   # untagged and "low" rows are not selected without --source-quality
        assert f"translated 12 documents (en-ar): kept {len(kept)}, rejected {len(rej)}" in printed
        assert "not selected 5" in printed and "round trip: " in printed   # + the 3 untagged notes.txt paragraphs
        args = sp.parse_args(["--data", str(root / "english" / "books.jsonl"), "--out", str(tmp_path / "s.jsonl"),
                              "--endpoint", srv.url, "--no-progress", "--prompt-field", "text", "--limit", "2"])
        assert run_synth(args) == 0 and len(read_jsonl(tmp_path / "s.jsonl")) + \
            len(read_jsonl(sidecar(tmp_path / "s.jsonl", "rejected.jsonl"))) == 2
    d = ["--data", str(root), "--out", "x.jsonl"]
    bad = [(d + ["--sources", "nope", "--endpoint", "http://127.0.0.1:9/v1"], "unknown source 'nope': the inputs hold english, web"),
           (["--data", str(root / "nope"), "--out", "x.jsonl", "--endpoint", "http://127.0.0.1:9/v1"], "unknown source"),
           (d, "exactly one teacher"),
           (d + ["--model", str(tmp_path / "no-model")], "not a directory"),
           (d + ["--endpoint", "localhost:8000"], "expected an http"),
           (d + ["--endpoint", "http://h/v1", "--direction", "en-fr"], "unknown language 'fr'")]
    for argv, msg in bad:
        with pytest.raises(CLIError, match=msg):
            run_translate(tp.parse_args(argv))
