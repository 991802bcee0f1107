"""MT-bench (English and Arabic): two-turn answers, then GPT-4-style judging through any
OpenAI-compatible endpoint (a dhad server included). FastChat's `llm_judge` protocol, reproduced:

- answers: turn 1 from [user t1], turn 2 from [user t1, assistant a1, user t2]; the temperature is
  the category's (`temperature_config`: writing/roleplay 0.7, stem/humanities 0.1, the rest 0.0),
  greedy when it is below 1e-4; at most 1,024 new tokens (`gen_model_answer.py`).
- single-answer grading: `single-v1` for turn 1 and `single-v1-multi-turn` for turn 2, the
  `*-math-v1*` prompts with a reference answer for math / reasoning / coding (NEED_REF_CATS); the
  judge runs at temperature 0 with at most 2,048 tokens; the rating is parsed from "[[n]]" (FastChat
  falls back to "[n]"); anything else is *unparseable*: counted, reported and excluded, never guessed.
  Ratings outside 1-10 are unparseable too.
- pairwise: `pair-v2` (`pair-math-v1` with a reference), each pair judged twice with the answers'
  positions swapped; verdicts [[A]] / [[B]] / [[C]] (tie). A verdict that does not survive the swap
  counts as a tie, as FastChat's `show_result.py` does; errors are counted and excluded.
  win_rate = wins / (wins + losses + ties); win_rate_adjusted = (wins + ties / 2) / (same).
- English references are FastChat's GPT-4 reference answers; Arabic references are the ones in the
  Arabic question file (its `reference` field), except q123 which has none there: it gets GPT-4's
  English reference so that it is judged with the reference prompt like the other 29.
"""
from __future__ import annotations

import ast
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dhad.evaluate.report import atomic_write_jsonl

TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
MAX_NEW_TOKENS = 1024
JUDGE_MAX_TOKENS = 2048
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
LANGS = ("en", "ar")


class MTBenchError(Exception):
    """Missing question file, unreachable endpoint, malformed answer file (the message says which)."""


# ---------------------------------------------------------------------------------------------
# Data

@dataclass
class Question:
    question_id: int
    category: str
    turns: list[str]
    lang: str
    reference: list[str] | None = None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise MTBenchError(f"file not found: {path}")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                from dhad.evaluate.tasks import json_error
                raise MTBenchError(json_error(f"{path}:{i}", line, e)) from None
    return out


def mt_dir(data_dir, lang: str) -> Path:
    from dhad.evaluate.tasks import resolve_data_dir
    return resolve_data_dir(data_dir) / f"mt_bench_{lang}"


def load_questions(data_dir, lang: str) -> list[Question]:
    if lang not in LANGS:
        raise MTBenchError(f"unknown MT-bench language {lang!r} (have: {', '.join(LANGS)})")
    rows = _read_jsonl(mt_dir(data_dir, lang) / "question.jsonl")
    gpt4: dict[int, list[str]] = {}
    ref_file = mt_dir(data_dir, "en") / "reference_answer_gpt-4.jsonl"
    if ref_file.is_file():
        gpt4 = {r["question_id"]: r["choices"][0]["turns"] for r in _read_jsonl(ref_file)}
    out = []
    for i, r in enumerate(rows, 1):
        try:
            qid = int(r["question_id"])
            turns = list(r["turns"])
            cat = r["category"]
        except (KeyError, TypeError, ValueError) as e:
            raise MTBenchError(f"{mt_dir(data_dir, lang) / 'question.jsonl'}:{i}: malformed question ({e})") from None
        if lang == "en":
            ref = gpt4.get(qid) or r.get("reference")
        else:  # the translated reference; where a math/reasoning/coding one is missing (q123), GPT-4's English one
            ref = r.get("reference") or (gpt4.get(qid) if cat in NEED_REF_CATS else None)
        out.append(Question(qid, cat, turns, lang, ref))
    return out


def load_judge_prompts(data_dir) -> dict[str, dict]:
    """FastChat's judge_prompts.jsonl (shipped with the English set), by name."""
    return {p["name"]: p for p in _read_jsonl(mt_dir(data_dir, "en") / "judge_prompts.jsonl")}


def load_answers(path: str | os.PathLike) -> dict[int, list[str]]:
    """FastChat model_answer JSONL -> {question_id: [turn 1, turn 2]}."""
    out = {}
    for i, r in enumerate(_read_jsonl(Path(path)), 1):
        try:
            out[int(r["question_id"])] = list(r["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise MTBenchError(f"{path}:{i}: malformed answer row ({e})") from None
    return out


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible client (httpx)

class ChatClient:
    """POST {base_url}/chat/completions. `base_url` like http://localhost:8000/v1."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 600.0,
                 retries: int = 2, backoff: float = 1.0):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers)
        self.retries = retries
        self.backoff = backoff

    def chat(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        last = None
        for attempt in range(self.retries + 1):
            try:
                r = self.http.post(self.url, json=body)
                if (r.status_code >= 500 or r.status_code == 429) and attempt < self.retries:
                    last = f"HTTP {r.status_code}"  # overloaded or rate-limited: worth another try
                    time.sleep(self.backoff * (attempt + 1))
                    continue
                if r.status_code != 200:
                    raise MTBenchError(f"{self.url}: HTTP {r.status_code}: {r.text[:300]}")
                return r.json()["choices"][0]["message"]["content"] or ""
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    time.sleep(self.backoff * (attempt + 1))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise MTBenchError(f"{self.url}: unexpected response ({e})") from None
        raise MTBenchError(f"{self.url}: endpoint unreachable ({last})")

    def close(self):
        self.http.close()


# ---------------------------------------------------------------------------------------------
# Answer generation

def generation_params(category: str) -> dict:
    t = TEMPERATURE.get(category, 0.7)
    return {"temperature": t, "do_sample": t >= 1e-4, "max_new_tokens": MAX_NEW_TOKENS}


def local_chat_fn(model, tokenizer, fmt=None, max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0) -> Callable:
    """A `chat(messages, category)` over a dhad model, through `dhad.generate.generate_text`."""
    from dhad.generate import generate_text

    def chat(messages, category):
        p = generation_params(category)
        p["max_new_tokens"] = max_new_tokens
        kw = {"seed": seed} if p["do_sample"] else {}
        return generate_text(model, tokenizer, messages, fmt=fmt, **p, **kw)
    return chat


def endpoint_chat_fn(client: ChatClient, max_new_tokens: int = MAX_NEW_TOKENS) -> Callable:
    def chat(messages, category):
        return client.chat(messages, temperature=generation_params(category)["temperature"], max_tokens=max_new_tokens)
    return chat


def generate_answers(questions: Sequence[Question], chat: Callable[[list[dict], str], str], model_id: str,
                     out_path: str | os.PathLike | None = None, system: str | None = None,
                     progress: bool = True) -> list[dict]:
    """Two-turn answers in FastChat's model_answer format (+ "lang"), written atomically to out_path."""
    from tqdm import tqdm

    rows = []
    for q in tqdm(questions, desc=f"mt-bench answers ({questions[0].lang if questions else ''})", disable=not progress):
        messages = [{"role": "system", "content": system}] if system else []
        turns = []
        for t in q.turns:
            messages.append({"role": "user", "content": t})
            a = chat(list(messages), q.category).strip()
            messages.append({"role": "assistant", "content": a})
            turns.append(a)
        rows.append({"question_id": q.question_id, "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
                     "choices": [{"index": 0, "turns": turns}], "tstamp": time.time(), "lang": q.lang,
                     "category": q.category})
    if out_path is not None:
        atomic_write_jsonl(out_path, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Judge prompts and parsing

def parse_rating(judgment: str) -> float | None:
    """FastChat's single-answer rating: "[[n]]", else "[n]"; None (unparseable) otherwise or outside 1-10."""
    m = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not m:
        return None
    try:
        v = float(ast.literal_eval(m.group(1)))
    except (ValueError, SyntaxError):
        return None
    return v if 1.0 <= v <= 10.0 else None


def parse_verdict(judgment: str) -> str:
    """FastChat's pairwise verdict for pair-v2 prompts: "A", "B", "tie" or "error"."""
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    if "[[C]]" in judgment:
        return "tie"
    return "error"


def _ref(q: Question, i: int) -> str:
    return (q.reference[i] if q.reference and i < len(q.reference) else "") or ""


def single_prompt(prompts: dict, q: Question, answers: list[str], turn: int) -> tuple[str, str, str]:
    """(prompt name, system, user) for single grading of turn 1 or 2."""
    math = q.category in NEED_REF_CATS and bool(q.reference)
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    if turn == 1:
        kw = {"question": q.turns[0], "answer": answers[0]}
    else:
        kw = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": answers[0], "answer_2": answers[1]}
    if math:
        kw.update(ref_answer_1=_ref(q, 0), ref_answer_2=_ref(q, 1))
    return name, p["system_prompt"], p["prompt_template"].format(**kw)


def pair_prompt(prompts: dict, q: Question, a: list[str], b: list[str], turn: int) -> tuple[str, str, str]:
    math = q.category in NEED_REF_CATS and bool(q.reference)
    name = ("pair-math-v1" if math else "pair-v2") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    if turn == 1:
        kw = {"question": q.turns[0], "answer_a": a[0], "answer_b": b[0]}
    else:
        kw = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_a_1": a[0], "answer_a_2": a[1],
              "answer_b_1": b[0], "answer_b_2": b[1]}
    if math:
        kw.update(ref_answer_1=_ref(q, 0), ref_answer_2=_ref(q, 1))
    return name, p["system_prompt"], p["prompt_template"].format(**kw)


def _messages(system: str, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _map(fn, items, parallel: int, desc: str, progress: bool):
    from tqdm import tqdm

    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as ex:
        return list(tqdm(ex.map(fn, items), total=len(items), desc=desc, disable=not progress))


# ---------------------------------------------------------------------------------------------
# Judging

def judge_single(questions: Sequence[Question], answers: dict[int, list[str]], judge: ChatClient, prompts: dict,
                 model_id: str, parallel: int = 1, progress: bool = True) -> list[dict]:
    """One judgment per (question, turn); rows keep the judge's text and the parsed score (or None)."""
    jobs = [(q, t) for q in questions for t in (1, 2) if q.question_id in answers]
    missing = [q.question_id for q in questions if q.question_id not in answers]

    def run(job):
        q, turn = job
        ans = answers[q.question_id]
        if len(ans) < turn:
            return {"question_id": q.question_id, "turn": turn, "score": None, "error": f"answer has no turn {turn}"}
        name, system, user = single_prompt(prompts, q, ans, turn)
        judgment = judge.chat(_messages(system, user), temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)
        return {"question_id": q.question_id, "turn": turn, "judge_prompt": name, "judgment": judgment,
                "score": parse_rating(judgment)}

    rows = _map(run, jobs, parallel, "judging (single)", progress)
    cats = {q.question_id: q for q in questions}
    for r in rows:
        q = cats[r["question_id"]]
        r.update(model=model_id, judge=judge.model, lang=q.lang, category=q.category)
    for qid in missing:
        rows.append({"question_id": qid, "turn": None, "score": None, "error": "no answer", "model": model_id,
                     "lang": cats[qid].lang, "category": cats[qid].category})
    return rows


def judge_pairwise(questions: Sequence[Question], answers_1: dict[int, list[str]], answers_2: dict[int, list[str]],
                   judge: ChatClient, prompts: dict, model_1: str, model_2: str, parallel: int = 1,
                   progress: bool = True) -> list[dict]:
    """Each (question, turn) judged twice, positions swapped (game 1: A = model_1; game 2: A = model_2)."""
    jobs = [(q, t) for q in questions for t in (1, 2) if q.question_id in answers_1 and q.question_id in answers_2]

    def run(job):
        q, turn = job
        a1, a2 = answers_1[q.question_id], answers_2[q.question_id]
        name, system, user = pair_prompt(prompts, q, a1, a2, turn)
        g1 = judge.chat(_messages(system, user), temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)
        _, system2, user2 = pair_prompt(prompts, q, a2, a1, turn)
        g2 = judge.chat(_messages(system2, user2), temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)
        w1 = {"A": "model_1", "B": "model_2"}.get(v := parse_verdict(g1), v)
        w2 = {"A": "model_2", "B": "model_1"}.get(v := parse_verdict(g2), v)
        return {"question_id": q.question_id, "turn": turn, "judge_prompt": name, "lang": q.lang,
                "category": q.category, "model_1": model_1, "model_2": model_2, "judge": judge.model,
                "g1_judgment": g1, "g2_judgment": g2, "g1_winner": w1, "g2_winner": w2}

    return _map(run, jobs, parallel, "judging (pairwise)", progress)


# ---------------------------------------------------------------------------------------------
# Aggregation

def summarize_single(rows: Iterable[dict], model_id: str | None = None) -> dict:
    """turn 1 / turn 2 / average per language (FastChat: the mean over all valid turn scores)."""
    rows = list(rows)
    out = {"model": model_id or (rows[0].get("model") if rows else None), "languages": {}, "unparseable": 0,
           "errors": 0}
    for lang in sorted({r["lang"] for r in rows}):
        rs = [r for r in rows if r["lang"] == lang]
        ok = [r for r in rs if r.get("score") is not None]
        unparsed = sum(1 for r in rs if r.get("score") is None and "judgment" in r)
        errors = sum(1 for r in rs if r.get("score") is None and "judgment" not in r)

        def mean(xs):
            xs = list(xs)
            return sum(xs) / len(xs) if xs else None

        out["languages"][lang] = {
            "turn_1": mean(r["score"] for r in ok if r["turn"] == 1),
            "turn_2": mean(r["score"] for r in ok if r["turn"] == 2),
            "average": mean(r["score"] for r in ok),
            "judged": len(ok), "unparseable": unparsed, "errors": errors,
            "categories": {c: mean(r["score"] for r in ok if r["category"] == c)
                           for c in sorted({r["category"] for r in ok})},
        }
        out["unparseable"] += unparsed
        out["errors"] += errors
    return out


def summarize_pairwise(rows: Iterable[dict]) -> dict:
    """Win / loss / tie of model_1 against model_2 per language (FastChat show_result.py rules)."""
    rows = list(rows)
    out = {"model_1": rows[0]["model_1"] if rows else None, "model_2": rows[0]["model_2"] if rows else None,
           "languages": {}, "unparseable": 0}
    for lang in sorted({r["lang"] for r in rows}):
        win = loss = tie = err = 0
        for r in (r for r in rows if r["lang"] == lang):
            g1, g2 = r["g1_winner"], r["g2_winner"]
            if g1 == "error" or g2 == "error":
                err += 1
            elif g1 == "tie" or g1 != g2:  # a tie, or a verdict that flipped with the positions
                tie += 1
            elif g1 == "model_1":
                win += 1
            else:
                loss += 1
        n = win + loss + tie
        out["languages"][lang] = {
            "win": win, "loss": loss, "tie": tie, "unparseable": err,
            "win_rate": win / n if n else None, "loss_rate": loss / n if n else None,
            "win_rate_adjusted": (win + 0.5 * tie) / n if n else None}
        out["unparseable"] += err
    return out


def pairwise_table(summaries: Sequence[dict]) -> str:
    lines = ["Model | Opponent | Lang | Win | Loss | Tie | Win rate | Win rate (adj.) | Unparseable |",
             "---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        for lang, d in s["languages"].items():
            wr = "–" if d["win_rate"] is None else f"{100 * d['win_rate']:.1f}"
            wa = "–" if d["win_rate_adjusted"] is None else f"{100 * d['win_rate_adjusted']:.1f}"
            lines.append(f"{s['model_1']} | {s['model_2']} | {lang} | {d['win']} | {d['loss']} | {d['tie']} | "
                         f"{wr} | {wa} | {d['unparseable']} |")
    return "\n".join(lines) + "\n"
