"""`dhad eval vicuna`: Vicuna-80 pairwise against a scripted OpenAI-compatible judge (verdicts,
failures, position bias, a kill -9 mid-run), and once end to end with `dhad serve` as the judge."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dhad.evaluate import mtbench as M
from dhad.evaluate import vicuna as V

pytestmark = pytest.mark.data
REPO = Path(__file__).resolve().parents[1]
LIMIT = 8  # questions per language


class FakeJudge:
    """Chat completions judging the two answers of a prompt (Jais <answer1>/<answer2> tags or
    FastChat's Assistant A/B), by what the answers say:
      GOOD -> the better answer (9 vs 3, or [[A]]/[[B]]); POSBIAS -> the first answer always wins;
      HALFTIE (in the first answer) -> a tie in that order only; MUMBLE -> no verdict at all;
      FAIL -> HTTP 500 every time; FLAKY -> HTTP 500 on the first request of each prompt.
    Every request's (lang, question id, order) is recorded; `delay` slows each answer."""

    def __init__(self, delay: float = 0.0):
        self.asked: list[tuple] = []
        self.seen: set[str] = set()
        self.delay = delay
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, text = outer.reply(body)
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                                  if status == 200 else {"error": {"message": text}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reply(self, body) -> tuple[int, str]:
        user = body["messages"][-1]["content"]
        if "<answer1>" in user:
            a1 = user.split("<answer1>", 1)[1].split("</answer1>", 1)[0]
            a2 = user.split("<answer2>", 1)[1].split("</answer2>", 1)[0]
        else:
            a1 = user.split("[The Start of Assistant A's Answer]", 1)[1].split("[The End of Assistant A's Answer]")[0]
            a2 = user.split("[The Start of Assistant B's Answer]", 1)[1].split("[The End of Assistant B's Answer]")[0]
        lang, qid, first = re.search(r"(\w\w)-q(\d+)-([AB])", a1).groups()
        with self.lock:
            self.asked.append((lang, int(qid), "ab" if first == "A" else "ba"))
            fresh = user not in self.seen
            self.seen.add(user)
        time.sleep(self.delay)
        both = a1 + a2
        if "FAIL" in both or ("FLAKY" in both and fresh):
            return 500, "overloaded"
        if "MUMBLE" in both:
            return 200, "Both answers have merits."
        if "POSBIAS" in both:
            s1, s2 = 8, 2
        elif "HALFTIE" in a1:
            s1 = s2 = 5
        else:
            s1, s2 = (9 if "GOOD" in a1 else 3), (9 if "GOOD" in a2 else 3)
        if "<answer1>" in user:
            return 200, f"Answer 1 is ... <score1>{s1}</score1> and <score2> {s2} </score2>"
        return 200, "[[A]]" if s1 > s2 else "[[B]]" if s2 > s1 else "[[C]]"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def judge():
    j = FakeJudge()
    yield j
    j.close()


# Model A's and B's answers per question (position in the first LIMIT questions), and the result
# under each protocol: the Jais "consistent" rule and FastChat's.
SCRIPT = [  # (A says, B says, jais result, pair-v2 result)
    ("GOOD", "meh", "win", "win"),
    ("meh", "GOOD", "loss", "loss"),
    ("GOOD", "GOOD", "tie", "tie"),
    ("POSBIAS", "x", "tie", "tie"),        # first position always wins: flips with the swap
    ("HALFTIE GOOD", "meh", "win", "tie"),  # tie in one order, a win in the other
    ("MUMBLE", "x", "unparseable", "unparseable"),
    ("FAIL", "x", "error", "error"),
    ("FLAKY GOOD", "meh", "win", "win"),   # retried, then judged
]


def _write_answers(d: Path, who: str, qs_by_lang: dict, skip: tuple = ()) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for lang, qs in qs_by_lang.items():
        rows = [{"question_id": q.question_id, "model_id": f"model-{who}",
                 "choices": [{"index": 0, "turns": [f"{lang}-q{q.question_id}-{who} " + SCRIPT[i][0 if who == "A" else 1]]}]}
                for i, q in enumerate(qs) if q.question_id not in skip]
        (d / f"answers_{lang}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return d


@pytest.fixture
def answer_dirs(tmp_path, shared_data):
    qs = {lang: V.load_questions(shared_data, lang)[:LIMIT] for lang in ("ar", "en")}
    return _write_answers(tmp_path / "a", "A", qs), _write_answers(tmp_path / "b", "B", qs), qs


def _expected(col: int, qs) -> dict:
    want = {"win": 0, "tie": 0, "loss": 0, "error": 0, "unparseable": 0, "no_answer": 0}
    for row in SCRIPT[:len(qs)]:
        want[row[col]] += 1
    return want


@pytest.mark.parametrize("kind,col", [("jais", 2), ("pair-v2", 3)])
def test_scripted_verdicts_both_orders_and_counted_failures(kind, col, judge, answer_dirs, shared_data, tmp_path):
    a, b, qs = answer_dirs
    client = M.ChatClient(judge.url, "fake-judge", retries=0)
    s = V.run_vicuna(V.Side("A", answers=a), V.Side("B", answers=b), client, tmp_path / "out", data_dir=shared_data,
                     judge_prompts=kind, limit=LIMIT, parallel=3, retries=2, backoff=0.01, progress=False)
    for lang in ("ar", "en"):
        d = s["languages"][lang]
        assert {k: d[k] for k in _expected(col, qs[lang])} == _expected(col, qs[lang]), (lang, d)
        judged = d["win"] + d["tie"] + d["loss"]
        assert d["judged"] == judged and d["win_rate"] == pytest.approx(d["win"] / judged)
        assert sum(c["questions"] for c in d["categories"].values()) == LIMIT
    # every game asked in both orders; FAIL asked 1 + 2 retries per order, FLAKY twice per order
    asked = judge.asked
    for lang in ("ar", "en"):
        for i, q in enumerate(qs[lang]):
            n = {o: asked.count((lang, q.question_id, o)) for o in ("ab", "ba")}
            assert n == {"ab": 3, "ba": 3} if SCRIPT[i][0] == "FAIL" else \
                n == {"ab": 2, "ba": 2} if SCRIPT[i][0].startswith("FLAKY") else n == {"ab": 1, "ba": 1}, (i, n)
    rows = [json.loads(x) for x in (tmp_path / "out/judgments.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * 2 * LIMIT
    err = [r for r in rows if r["status"] == "error"]
    assert len(err) == 4 and all("HTTP 500" in r["error"] and r["attempts"] == 3 for r in err)
    assert (tmp_path / "out/vicuna.md").read_text(encoding="utf-8").count("\nA | B | ") == 2
    assert (tmp_path / "out/vicuna.png").stat().st_size > 1000
    if kind == "jais":  # the Jais team's prompts and judge settings, the Arabic prompt for Arabic
        ar = next(r for r in rows if r["lang"] == "ar")
        assert ar["judge_prompt"] == "jais-ar-generic"


def test_jais_prompt_is_the_team_s_and_positions_swap(judge, answer_dirs, shared_data, tmp_path):
    a, b, qs = answer_dirs
    seen = []

    class Spy(M.ChatClient):
        def chat(self, messages, temperature=0.0, max_tokens=1024):
            seen.append((messages, temperature, max_tokens))
            return super().chat(messages, temperature, max_tokens)

    V.run_vicuna(V.Side("A", answers=a), V.Side("B", answers=b), Spy(judge.url, "j", retries=0), tmp_path / "o",
                 data_dir=shared_data, langs=("ar",), limit=1, retries=0, progress=False)
    prompts = json.loads((shared_data / "eval/vicuna_bench_ar/jais/gpt4_prompts.json").read_text(encoding="utf-8"))
    p = prompts["ar"]["generic"]
    q = qs["ar"][0]
    a1, b1 = f"ar-q{q.question_id}-A GOOD", f"ar-q{q.question_id}-B meh"
    want = [[{"role": "system", "content": p["system_prompt"]},
             {"role": "user", "content": p["prompt_template"].format(question=q.turns[0], answer_1=x, answer_2=y,
                                                                     prompt_end=p["prompt_end"])}]
            for x, y in ((a1, b1), (b1, a1))]
    assert sorted(json.dumps(m, ensure_ascii=False) for m, _, _ in seen) == sorted(json.dumps(w, ensure_ascii=False) for w in want)
    assert {(t, n) for _, t, n in seen} == {(0.2, 2048)}
    assert q.turns[0] == json.loads((shared_data / "eval/vicuna_bench_ar/jais/vicuna_questions.jsonl")
                                    .read_text(encoding="utf-8").splitlines()[0])["question_ar"]


def test_missing_answers_are_counted_not_dropped(judge, tmp_path, shared_data):
    qs = {"en": V.load_questions(shared_data, "en")[:3]}
    a = _write_answers(tmp_path / "a", "A", qs)
    b = _write_answers(tmp_path / "b", "B", qs, skip=(qs["en"][1].question_id,))
    s = V.run_vicuna(V.Side("A", answers=a), V.Side("B", answers=b), M.ChatClient(judge.url, "j", retries=0),
                     tmp_path / "o", data_dir=shared_data, langs=("en",), limit=3, progress=False)
    d = s["languages"]["en"]
    assert (d["win"], d["loss"], d["no_answer"], d["questions"]) == (1, 0, 1, 3) and d["tie"] == 1


def test_parse_scores_follows_the_jais_harness():
    assert V.parse_scores("x <score1>7</score1> y <score2> 8.5 </score2>") == (7.0, 8.5)
    assert V.parse_scores("<score1>score: 10</score1><score2>n/a 3</score2>") == (10.0, 3.0)
    assert V.parse_scores("<score1>7</score1> only one") is None
    assert V.combine("jais", "model_a", "tie") == "model_a" and V.combine("pair-v2", "model_a", "tie") == "tie"
    assert V.combine("jais", "model_a", "model_b") == "tie" and V.combine("jais", "model_b", "model_b") == "model_b"


def test_a_killed_run_resumes_without_asking_again(answer_dirs, shared_data, tmp_path):
    """kill -9 the CLI mid-judging; the rerun asks only the games without a judgment on disk."""
    a, b, qs = answer_dirs
    judge = FakeJudge(delay=0.15)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dhad", "eval", "vicuna", "--answers", str(a), "--baseline-answers", str(b),
           "--judge-endpoint", judge.url, "--judge-model", "fake", "--limit", str(LIMIT), "--parallel", "2",
           "--retries", "1", "--backoff", "0.01", "--data", str(shared_data), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log = out / "judgments.jsonl"
        deadline = time.monotonic() + 120
        while not (log.is_file() and log.read_text(encoding="utf-8").count("\n") >= 10):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with open(log, "ab") as f:
            f.write(b'{"model_a": "a", "question_id": 1, "st')  # and a torn last line, as a kill mid-write leaves
        done = {(r["lang"], r["question_id"], r["order"]) for r in
                (json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()[:-1]) if r["status"] != "error"}
        assert 10 <= len(done) < 2 * 2 * LIMIT
        n_first = len(judge.asked)
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        again = judge.asked[n_first:]
        assert not set(again) & done  # nothing already judged is asked again
        games = {(lang, q.question_id, o) for lang in qs for q in qs[lang] for o in ("ab", "ba")}
        assert set(again) == games - done
        s = json.loads((out / "vicuna.json").read_text(encoding="utf-8"))
        for lang in ("ar", "en"):
            d = s["languages"][lang]
            assert {k: d[k] for k in _expected(2, qs[lang])} == _expected(2, qs[lang])
        rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
        assert {(r["lang"], r["question_id"], r["order"]) for r in rows} == games
    finally:
        judge.close()


@pytest.mark.slow
def test_end_to_end_with_dhad_serve_as_the_judge(demo_dir, shared_data, tmp_path):
    """A local model (generated here) against the same model behind `dhad serve` (its app under
    uvicorn), judged by that server with the Jais prompts; the tiny judge writes no <score> tags,
    so every game is counted as unparseable -- all 8 judgments asked, recorded and counted, none
    lost. (The Jais judge prompt is ~540 tokens in the demo's 512-token BPE: the served copy gets a
    2,048-token ALiBi context.)"""
    import shutil

    import dhad
    from dhad.serve.app import BackgroundServer, create_app
    from dhad.serve.backend import load_backend

    judge_dir = tmp_path / "judge-model"
    shutil.copytree(demo_dir, judge_dir)
    cfg = json.loads((judge_dir / "config.json").read_text())
    (judge_dir / "config.json").write_text(json.dumps({**cfg, "n_positions": 2048}))
    backend = load_backend(judge_dir, model_name="judge", max_batch_size=4)
    backend.engine.start()
    try:
        with BackgroundServer(create_app(backend)) as server:
            url = server.url + "/v1"
            model, tok = dhad.load_model(demo_dir), dhad.load_tokenizer(demo_dir)
            local = V.Side("local", chat=M.local_chat_fn(model, tok, max_new_tokens=12))
            answerer, judge = M.ChatClient(url, "judge"), M.ChatClient(url, "judge", retries=0)
            served = V.Side("served", chat=M.endpoint_chat_fn(answerer, 12))
            s = V.run_vicuna(local, served, judge, tmp_path / "v", data_dir=shared_data, limit=2, judge_max_tokens=16,
                             parallel=2, retries=1, backoff=0.1, progress=False)
            answerer.close()
            judge.close()
    finally:
        backend.engine.shutdown()
    rows = [json.loads(x) for x in (tmp_path / "v/judgments.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and {r["status"] for r in rows} <= {"ok", "unparseable"}, rows
    assert all(isinstance(r["judgment"], str) and r["judge_prompt"] == f"jais-{r['lang']}-generic" for r in rows)
    for lang in ("ar", "en"):
        d = s["languages"][lang]
        assert d["questions"] == 2 and d["error"] == 0 and d["no_answer"] == 0
        assert d["win"] + d["tie"] + d["loss"] + d["unparseable"] == 2
        assert len((tmp_path / f"v/answers_{lang}_local.jsonl").read_text(encoding="utf-8").splitlines()) == 2
        assert len((tmp_path / f"v/answers_{lang}_served.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert s["judge"] == "judge" and s["asked_this_run"] == 8


def test_saved_answers_from_a_directory(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one/answers_ar_m.jsonl").write_text("", encoding="utf-8")
    assert V.answer_file(tmp_path / "one", "ar") == tmp_path / "one/answers_ar_m.jsonl"  # a vicuna run's output
    (tmp_path / "one/answers_ar.jsonl").write_text("", encoding="utf-8")
    assert V.answer_file(tmp_path / "one", "ar") == tmp_path / "one/answers_ar.jsonl"
    (tmp_path / "two").mkdir()
    for n in ("a", "b"):
        (tmp_path / f"two/answers_en_{n}.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(M.MTBenchError, match="2 answers_en_\\*.jsonl files: name the file"):
        V.answer_file(tmp_path / "two", "en")
