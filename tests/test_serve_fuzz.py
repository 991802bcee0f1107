"""Schema fuzzing of a running `dhad serve` (issue 17's acceptance): schemathesis generates requests from
the server's own OpenAPI spec -- valid ones and invalid ones -- and every response must pass all of
schemathesis' checks (the CLI's ``--checks all``: no 5xx, documented status codes, content types,
headers and bodies matching the response schemas, invalid data rejected, valid data accepted).

On top of schemathesis' generation, a third of the bodies are also sent mutated the way JSON parsers
let through and schemathesis never produces: a number replaced by ``NaN`` / ``Infinity`` / ``-Infinity``,
by a denormal (``5e-324``, ``1e-45``, ``1e-300``), or a lone surrogate escape (``"\\ud800"``) put into a
string or a key. Those must get a 4xx in OpenAI's error shape (a denormal may also be served: 200).

At least 5,000 generated cases (``DHAD_FUZZ_CASES`` scales it) against a `dhad serve` subprocess on the
tiny demo model with ``--max-new-tokens-limit 4``, so a served request costs a few decode steps.
Cases are generated in two processes, and sent by worker threads while the next one is generated.
"""
from __future__ import annotations

import collections
import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, is_check_class, load_all_checks
from schemathesis.config import SchemathesisConfig

TOTAL_CASES = int(os.environ.get("DHAD_FUZZ_CASES", "5200"))
OPERATIONS = [("/health", "GET"), ("/v1/models", "GET"), ("/v1/models/{model}", "GET"), ("/score", "POST"),
              ("/v1/chat/completions", "POST"), ("/v1/completions", "POST")]
CONFIG = {"checks": {
    # 400: a valid request the model cannot serve (prompt longer than the context, max_tokens above the
    # server's limit, n != 1, penalties); 404: a `model` other than the served one; 429: queue full.
    "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "429"]},
    "negative_data_rejection": {"expected-statuses": ["400", "404", "405", "413", "415", "422", "429"]},
}}
HOSTILE = ["nan", "infinity", "-infinity", "denormal", "surrogate-value", "surrogate-key"]
DENORMALS = [5e-324, 1e-45, 1e-300, 1e-40]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(demo_dir, tmp_path_factory, wait_healthy):
    """`dhad serve` on the demo model, in its own process (as a deployment runs it)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dhad", "serve", "--model", str(demo_dir), "--port", str(port),
                                 "--max-new-tokens-limit", "4", "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 120, lambda: log.read_text(errors="replace"))
        yield url, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def schema(served):
    url, _ = served
    return schemathesis.openapi.from_url(url + "/openapi.json", config=SchemathesisConfig.from_dict(CONFIG))


def test_openapi_lists_the_endpoints(schema):
    spec = schema.raw_schema
    for path, method in OPERATIONS:
        assert method.lower() in spec["paths"][path], path
    body = spec["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ScoreRequest")
    for path in ("/score", "/v1/chat/completions", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "413", "422", "429", "503"):  # documented, all in OpenAI's error shape
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


# --- the hostile mutations -----------------------------------------------------------------------

def _leaves(obj, path=()):
    """(path, value) of every leaf, and of every dict (for its keys)."""
    if isinstance(obj, dict):
        yield path, obj
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _set(obj, path, value):
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return obj


def mutate(body, kind: str, draw) -> bytes:
    """``body`` (a generated JSON value) as raw JSON with one hostile change; ``draw`` picks where."""
    body = json.loads(json.dumps(body, default=repr))  # a private copy
    leaves = list(_leaves(body))
    if kind in ("nan", "infinity", "-infinity", "denormal"):
        value = {"nan": math.nan, "infinity": math.inf, "-infinity": -math.inf}.get(kind) or draw(st.sampled_from(DENORMALS))
        numbers = [p for p, v in leaves if isinstance(v, float)] if kind == "denormal" else []  # a float field
        numbers = numbers or [p for p, v in leaves if isinstance(v, (int, float)) and not isinstance(v, bool)]
        dicts = [p for p, v in leaves if isinstance(v, dict)]
        if numbers:
            body = _set(body, draw(st.sampled_from(numbers)), value)
        elif dicts:  # no number to replace: add one
            _get(body, draw(st.sampled_from(dicts)))["temperature"] = value
        else:
            body = value
    else:
        surrogate = chr(draw(st.integers(0xD800, 0xDFFF)))
        if kind == "surrogate-value":
            strings = [p for p, v in leaves if isinstance(v, str)]
            if strings:
                p = draw(st.sampled_from(strings))
                s = _get(body, p)
                i = draw(st.integers(0, len(s)))
                body = _set(body, p, s[:i] + surrogate + s[i:])
            else:
                kind = "surrogate-key"
        if kind == "surrogate-key":
            dicts = [p for p, v in leaves if isinstance(v, dict)]
            if dicts:
                _get(body, draw(st.sampled_from(dicts)))["x" + surrogate] = 1
            else:
                body = surrogate
    # allow_nan writes NaN / Infinity literals (Python's parser reads them); ensure_ascii writes \udXXX escapes
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


# --- the run ------------------------------------------------------------------------------------
# Generating a case costs this process 10-20 ms of CPU (hypothesis + schemathesis), far more than the
# server spends answering it, so the operations are fuzzed in two processes (the machine's two cores);
# in each, worker threads send a case's requests while the next case is generated.

def _plan() -> list[tuple[str, str, str, int]]:
    """(path, method, mode, examples) adding up to TOTAL_CASES, the costliest first (a 2-process pool
    then balances): most go to the three POST operations, in both modes."""
    n_path = TOTAL_CASES // 13
    per_post = -(-(TOTAL_CASES - 2 - n_path) // 6)
    posts = [(path, "POST", mode, per_post) for mode in ("negative", "positive")
             for path in ("/v1/chat/completions", "/score", "/v1/completions")]
    return posts + [("/v1/models/{model}", "GET", "positive", n_path), ("/health", "GET", "positive", 1),
                    ("/v1/models", "GET", "positive", 1)]


def fuzz_part(url: str, path: str, method: str, mode: str, examples: int) -> tuple[int, list]:
    """Fuzz one operation in one mode (in a worker process): (cases generated, [(operation, kind, status,
    problem or None)] for every request sent)."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=SchemathesisConfig.from_dict(CONFIG))
    op = next(o for o in (r.ok() for r in schema.get_all_operations()) if o.path == path and o.method.upper() == method)
    load_all_checks()
    checks = [c for c in CHECKS.get_all() if not is_check_class(c)]  # the CLI's --checks all
    local = threading.local()

    def session() -> requests.Session:
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return local.s

    def send(case, raw: bytes | None, kind: str | None):
        """One generated case: its request with every check, then (if drawn) its hostile twin."""
        out = []
        r = case.call(session=session(), timeout=60)
        problem = None
        try:
            case.validate_response(r, checks=checks)
        except (Exception, BaseExceptionGroup) as e:  # schemathesis' FailureGroup is a BaseExceptionGroup
            problem = f"{e}"[:1500]
        out.append((op.label, "generated", r.status_code, problem))
        if raw is not None:
            r = session().request(method, url + case.formatted_path, data=raw, timeout=60,
                                  headers={"content-type": "application/json"})
            problem = None
            if r.status_code >= 500 or (kind != "denormal" and r.status_code < 400):
                problem = f"{kind}: {r.status_code} {r.text[:300]}"
            elif r.status_code >= 400:
                body = r.json()
                if set(body) != {"error"} or set(body["error"]) != {"message", "type", "param", "code"} or \
                        len(r.content) > 4096:
                    problem = f"{kind}: not OpenAI's error shape or too long: {r.text[:300]}"
            out.append((op.label, kind, r.status_code, problem if problem is None else f"{problem}\n  sent: {raw[:400]!r}"))
        return out

    futures, generated = [], [0]
    with ThreadPoolExecutor(4) as pool:
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)), data=st.data())
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def generate(case, data):
            generated[0] += 1
            raw = kind = None
            # which mutation: a hash of the generated body spreads them evenly (hypothesis would favour a
            # sampled_from's first items) and stays a function of what was drawn (as hypothesis requires)
            h = zlib.crc32(json.dumps(case.body, sort_keys=True, default=repr).encode()) if method == "POST" else 1
            if isinstance(case.body, (dict, list)) and h % 3 == 0:
                kind = HOSTILE[h // 3 % len(HOSTILE)]
                raw = mutate(case.body, kind, data.draw)
            futures.append(pool.submit(send, case, raw, kind))

        generate()
        return generated[0], [x for f in futures for x in f.result()]


@pytest.mark.slow
def test_fuzz_all_checks_no_server_errors(served):
    url, log = served
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = [pool.submit(fuzz_part, url, *task) for task in _plan()]
        done = [p.result() for p in parts]
    elapsed = time.perf_counter() - t0
    generated = sum(n for n, _ in done)
    results = [x for _, rs in done for x in rs]

    statuses = collections.Counter((label, kind, status) for label, kind, status, _ in results)
    problems = [(label, kind, status, p) for label, kind, status, p in results if p is not None]
    summary = "\n".join(f"  {k}: {v}" for k, v in sorted(statuses.items(), key=str))
    print(f"\n{generated} generated cases, {len(results)} requests in {elapsed:.1f} s (2 processes)\n{summary}")
    assert generated >= min(TOTAL_CASES, 5000)
    assert {label for label, *_ in results} == {f"{m} {p}" for p, m in OPERATIONS}
    server_errors = [r for r in results if r[2] >= 500]
    assert not server_errors, "\n".join(str(x) for x in server_errors[:5]) + "\n" + log.read_text(errors="replace")[-3000:]
    distinct = {}
    for label, kind, status, p in problems:
        distinct.setdefault((label, kind, status, p.splitlines()[0][:80]), p)
    assert not problems, f"{len(problems)} failed checks; distinct:\n" + "\n\n".join(list(distinct.values())[:8])
    assert sum(1 for r in results if r[1] in HOSTILE) > TOTAL_CASES // 8  # the mutations really ran
