"""MT-bench: judge parsing and aggregation on recorded outputs, and the HTTP path against a fake
OpenAI-compatible server (answers and judge), through the library and through `dhad eval mt-bench`."""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dhad.evaluate import mtbench as M

# Judge outputs as GPT-4 writes them (FastChat single-v1 / pair-v2 formats)
RECORDED = [
    ("The response is relevant and accurate but lacks depth.\n\nRating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("The assistant's answer is incorrect. Rating: [3]", 3.0),  # FastChat's backup pattern
    ("I cannot evaluate this response.", None),                 # unparseable: never guessed
    ("Rating: [[11]]", None),                                    # outside 1-10
    ("Rating: [[0]]", None),
    ("[[10]]", 10.0),
]


@pytest.mark.parametrize("text,want", RECORDED)
def test_parse_rating(text, want):
    assert M.parse_rating(text) == want


def test_parse_verdict():
    assert M.parse_verdict("... Therefore [[A]]") == "A"
    assert M.parse_verdict("Final verdict: [[B]]") == "B"
    assert M.parse_verdict("It is a tie [[C]]") == "tie"
    assert M.parse_verdict("Both are fine.") == "error"


def test_summarize_single_by_hand():
    rows = [
        {"lang": "ar", "turn": 1, "category": "writing", "score": 8.0, "judgment": "[[8]]"},
        {"lang": "ar", "turn": 1, "category": "math", "score": 4.0, "judgment": "[[4]]"},
        {"lang": "ar", "turn": 2, "category": "writing", "score": 6.0, "judgment": "[[6]]"},
        {"lang": "ar", "turn": 2, "category": "math", "score": None, "judgment": "no idea"},  # unparseable
        {"lang": "en", "turn": 1, "category": "writing", "score": 9.0, "judgment": "[[9]]"},
        {"lang": "en", "turn": 2, "category": "writing", "score": 7.0, "judgment": "[[7]]"},
        {"lang": "en", "turn": None, "category": "math", "score": None, "error": "no answer"},
    ]
    s = M.summarize_single(rows, "m")
    ar, en = s["languages"]["ar"], s["languages"]["en"]
    assert (ar["turn_1"], ar["turn_2"], ar["average"]) == (6.0, 6.0, 6.0)
    assert ar["unparseable"] == 1 and ar["judged"] == 3
    assert (en["turn_1"], en["turn_2"], en["average"]) == (9.0, 7.0, 8.0) and en["errors"] == 1
    assert s["unparseable"] == 1
    from dhad.evaluate.results import mtbench_table
    table = mtbench_table([s])
    assert table.splitlines()[0] == ("Model | AR Average | AR Turn 1 | AR Turn 2 | EN Average | EN Turn 1 | EN Turn 2 |")
    assert "m | 6.00 | 6.00 | 6.00 | 8.00 | 9.00 | 7.00 |" in table and "Unparseable judge outputs" in table


def test_summarize_pairwise_swap_rules():
    def row(g1, g2, lang="en"):
        return {"lang": lang, "model_1": "a", "model_2": "b", "g1_winner": g1, "g2_winner": g2}
    rows = [row("model_1", "model_1"), row("model_1", "model_1"), row("model_2", "model_2"),
            row("model_1", "model_2"),  # flips with the positions -> tie (FastChat)
            row("tie", "tie"), row("error", "model_1"), row("model_1", "model_1", "ar")]
    s = M.summarize_pairwise(rows)
    en = s["languages"]["en"]
    assert (en["win"], en["loss"], en["tie"], en["unparseable"]) == (2, 1, 2, 1)
    assert en["win_rate"] == pytest.approx(2 / 5) and en["win_rate_adjusted"] == pytest.approx(3 / 5)
    assert s["languages"]["ar"]["win_rate"] == 1.0


# ---------------------------------------------------------------------------------------------
# Data and prompts

@pytest.mark.data
def test_questions_and_references(shared_data):
    en, ar = M.load_questions(shared_data, "en"), M.load_questions(shared_data, "ar")
    assert len(en) == len(ar) == 80
    assert [q.question_id for q in en] == [q.question_id for q in ar]
    assert [q.category for q in en] == [q.category for q in ar]
    math_en = [q for q in en if q.category in M.NEED_REF_CATS]
    assert len(math_en) == 30 and all(q.reference for q in math_en)
    assert all(q.reference for q in ar if q.category in M.NEED_REF_CATS)
    prompts = M.load_judge_prompts(shared_data)
    q = next(q for q in en if q.question_id == 101)
    name, system, user = M.single_prompt(prompts, q, ["first", "second"], 2)
    assert name == "single-math-v1-multi-turn" and "### Reference answer:\n" + q.reference[0] in user
    assert "### Assistant A:\nsecond" in user
    name, system, user = M.single_prompt(prompts, en[0], ["an answer", "x"], 1)
    assert name == "single-v1" and system == "You are a helpful assistant." and "[Question]\n" + en[0].turns[0] in user
    name, _, user = M.pair_prompt(prompts, en[0], ["A1", "A2"], ["B1", "B2"], 1)
    assert name == "pair-v2" and "[The Start of Assistant A's Answer]\nA1\n" in user


def test_generation_temperatures_follow_fastchat():
    assert M.generation_params("writing") == {"temperature": 0.7, "do_sample": True, "max_new_tokens": 1024}
    assert M.generation_params("math")["do_sample"] is False
    assert M.generation_params("humanities")["temperature"] == 0.1


# ---------------------------------------------------------------------------------------------
# HTTP: a fake OpenAI-compatible server that answers and judges

class FakeServer:
    """Chat completions: as a model it echoes the last user turn; as a judge it rates "GOOD" answers
    [[9]], "BAD" ones [[2]], answers containing "MUMBLE" with no rating, and in pairwise prompts
    prefers the assistant whose answer holds "GOOD" — or always says [[A]] for "BIASED" questions."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                text = outer.reply(body)
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def reply(body):
        user = body["messages"][-1]["content"]
        if body["model"] != "judge":
            return "answer to: " + user[:40]
        if "[The Start of Assistant A's Answer]" in user or "Assistant A's Conversation" in user and "Assistant B" in user:
            if "BIASED" in user:
                return "[[A]]"
            a = user.split("Assistant A", 1)[1].split("Assistant B", 1)[0]
            return "Verdict: [[A]]" if "GOOD" in a else "Verdict: [[B]]"
        answer = re.split(r"\[The Start of Assistant's Answer\]|### Assistant A:", user)[-1]
        if "MUMBLE" in answer:
            return "Hard to say."
        return "Rating: [[9]]" if "GOOD" in answer else "Rating: [[2]]"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


QS = [M.Question(81, "writing", ["Write a poem.", "Shorter."], "en"),
      M.Question(101, "math", ["2+2?", "3+3?"], "en", reference=["4", "6"]),
      M.Question(91, "roleplay", ["BIASED question", "again"], "en")]
PROMPTS = {p["name"]: p for p in [
    {"name": n, "system_prompt": "S", "prompt_template": t} for n, t in [
        ("single-v1", "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End]"),
        ("single-math-v1", "[Question]\n{question}\nref {ref_answer_1}\n[The Start of Assistant's Answer]\n{answer}\n[The End]"),
        ("single-v1-multi-turn", "### User:\n{question_1}\n### Assistant A:\n{answer_1}\n### User:\n{question_2}\n### Assistant A:\n{answer_2}"),
        ("single-math-v1-multi-turn", "ref {ref_answer_1} {ref_answer_2}\n### Assistant A:\n{answer_1}\n### Assistant A:\n{answer_2}"),
        ("pair-v2", "{question}\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"),
        ("pair-v2-multi-turn", "{question_1}{question_2}\nAssistant A's Conversation\n{answer_a_1}{answer_a_2}\nAssistant B's Conversation\n{answer_b_1}{answer_b_2}"),
        ("pair-math-v1", "{question}{ref_answer_1}\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n[The Start of Assistant B's Answer]\n{answer_b}\n"),
        ("pair-math-v1-multi-turn", "{ref_answer_1}{ref_answer_2}\nAssistant A's Conversation\n{answer_a_1}{answer_a_2}\nAssistant B's Conversation\n{answer_b_1}{answer_b_2}"),
    ]]}


def test_answers_use_category_temperatures_and_history(server, tmp_path):
    client = M.ChatClient(server.url, "model")
    rows = M.generate_answers(QS, M.endpoint_chat_fn(client, 64), "m", tmp_path / "answers_en.jsonl", progress=False)
    assert [r["question_id"] for r in rows] == [81, 101, 91]
    temps = [r["temperature"] for r in server.requests]
    assert temps == [0.7, 0.7, 0.0, 0.0, 0.7, 0.7]
    second = server.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == rows[0]["choices"][0]["turns"][0]
    assert M.load_answers(tmp_path / "answers_en.jsonl")[81] == rows[0]["choices"][0]["turns"]


def test_single_grading_over_http(server):
    answers = {81: ["GOOD poem", "GOOD short"], 101: ["BAD 5", "MUMBLE"], 91: ["GOOD", "BAD"]}
    rows = M.judge_single(QS, answers, M.ChatClient(server.url, "judge"), PROMPTS, "m", parallel=2, progress=False)
    by = {(r["question_id"], r["turn"]): r for r in rows}
    assert by[(81, 1)]["score"] == 9.0 and by[(101, 1)]["score"] == 2.0 and by[(101, 2)]["score"] is None
    assert by[(101, 1)]["judge_prompt"] == "single-math-v1" and by[(101, 2)]["judge_prompt"] == "single-math-v1-multi-turn"
    judge_reqs = [r for r in server.requests if r["model"] == "judge"]
    assert all(r["temperature"] == 0.0 and r["max_tokens"] == 2048 for r in judge_reqs)
    assert all(r["messages"][0] == {"role": "system", "content": "S"} for r in judge_reqs)
    s = M.summarize_single(rows, "m")["languages"]["en"]
    assert (s["turn_1"], s["turn_2"]) == (pytest.approx((9 + 2 + 9) / 3), pytest.approx((9 + 2) / 2))
    assert s["unparseable"] == 1


def test_pairwise_over_http_with_position_swap(server):
    a = {81: ["GOOD", "GOOD"], 101: ["meh", "meh"], 91: ["x", "y"]}
    b = {81: ["meh", "meh"], 101: ["GOOD", "GOOD"], 91: ["x", "y"]}
    rows = M.judge_pairwise(QS, a, b, M.ChatClient(server.url, "judge"), PROMPTS, "a", "b", progress=False)
    assert len(rows) == 6 and len([r for r in server.requests if r["model"] == "judge"]) == 12
    s = M.summarize_pairwise(rows)["languages"]["en"]
    # q81: a wins both turns; q101: b wins both; q91: the judge always says [[A]] -> flips -> ties
    assert (s["win"], s["loss"], s["tie"], s["unparseable"]) == (2, 2, 2, 0)


def test_unreachable_endpoint_is_a_clear_error():
    client = M.ChatClient("http://127.0.0.1:9/v1", "judge", timeout=2.0, retries=0)
    with pytest.raises(M.MTBenchError, match="unreachable"):
        client.chat([{"role": "user", "content": "hi"}])


@pytest.mark.data
def test_cli_answer_and_judge(server, tmp_path, shared_data, capsys):
    from dhad.cli import main

    out = tmp_path / "mt"
    assert main(["eval", "mt-bench", "answer", "--endpoint", server.url, "--served-model", "model", "--lang", "en,ar",
                 "--limit", "2", "--data", str(shared_data), "--out", str(out)]) == 0
    assert (out / "answers_ar.jsonl").is_file()
    assert main(["eval", "mt-bench", "judge", "--answers", str(out), "--judge-endpoint", server.url,
                 "--judge-model", "judge", "--lang", "en,ar", "--limit", "2", "--data", str(shared_data),
                 "--out", str(out)]) == 0
    summary = json.loads((out / "mtbench_single.json").read_text())
    assert summary["languages"]["ar"]["turn_1"] == 2.0  # the echo answers hold no "GOOD"
    assert "AR Average" in (out / "mtbench_single.md").read_text()
    assert main(["eval", "mt-bench", "judge", "--mode", "pairwise", "--answers", str(out), "--judge-endpoint",
                 server.url, "--judge-model", "judge", "--lang", "en", "--limit", "2", "--data", str(shared_data),
                 "--out", str(out)]) == 2  # pairwise needs --baseline: a clear CLI error
    assert "needs --baseline" in capsys.readouterr().err


def test_local_generation_goes_through_dhad_generate():
    import dataclasses

    import torch

    from dhad.config import Config
    from dhad.generate import generate_text
    from dhad.model import Transformer
    from dhad.tokenizer import train_bpe

    tok = train_bpe(["an answer to the question " * 20, "مرحبا بالعالم " * 20], 300)
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(Config.from_name("tiny-jais"), vocab_size=tok.vocab_size)).init_weights(seed=0)
    chat = M.local_chat_fn(model.eval(), tok, max_new_tokens=5)
    q = M.Question(101, "math", ["2+2?", "and 3+3?"], "en")  # math: greedy, so reproducible
    row = M.generate_answers([q], chat, "tiny", progress=False)[0]
    a1, a2 = row["choices"][0]["turns"]
    assert a1 == generate_text(model, tok, [{"role": "user", "content": "2+2?"}], max_new_tokens=5, do_sample=False).strip()
    assert a2 == generate_text(model, tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": a1},
                                            {"role": "user", "content": "and 3+3?"}], max_new_tokens=5,
                               do_sample=False).strip()
