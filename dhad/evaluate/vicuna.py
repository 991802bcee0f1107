"""Vicuna-80 pairwise: the Jais card's open-ended evaluation (GPT-4 as the judge, Arabic and English).

    summary = run_vicuna(Side("jais-13b-chat", chat=...), Side("baseline", answers="runs/b"),
                         ChatClient(url, "gpt-4"), "runs/vicuna", langs=("ar", "en"))

Two models answer the 80 Vicuna prompts in each language (or one side is a saved answer file); any
OpenAI-compatible judge compares every pair **twice, with the answers' positions swapped**, and
the two verdicts are combined so that position bias cancels. Answers and judgments come from
`dhad.evaluate.mtbench` (its `ChatClient`, `local_chat_fn` / `endpoint_chat_fn`, `generate_answers`,
`pair_prompt`, `parse_verdict`): this module adds the Vicuna questions, the Jais team's judge prompts,
resumability and the win/tie/loss summary.

Judge protocols (`judge_prompts`):
- ``jais`` (default): the Jais team's harness (`gpt4_eval/compare_models.py`): `gpt4_prompts.json`
  [lang]["generic"] -- the Arabic prompt for Arabic questions -- the judge scores both answers 0-10
  in ``<score1>`` / ``<score2>`` tags, at temperature 0.2 (its GPT-4 setting). A game's winner has
  the higher score. Both orders combine by the harness's "consistent" rule
  (`gpt4_eval_scores.py`): the same winner twice wins; a win and a tie is a win; opposite winners
  are a tie.
- ``pair-v2``: FastChat's pairwise prompt (``pair-math-v1`` with the GPT-4 reference answer for the
  coding and math questions), verdicts [[A]] / [[B]] / [[C]], temperature 0; FastChat's rule: a tie
  or a verdict that flips with the positions is a tie.

Questions (`questions`): ``jais`` (default) is the Jais team's bilingual file (its English and its
human Arabic translation, q1 garbled in the source); ``acegpt`` is FastChat's English with the AceGPT
Arabic translation. Both come aligned by FastChat id from `vicuna_bench_ar/vicuna80_en_ar_aligned.jsonl`.
Answer generation follows FastChat (`mtbench.generation_params`: writing/roleplay 0.7, coding/math
greedy, the other Vicuna categories 0.7).

Robustness:
- **resumable**: each answer and each judgment is one JSONL line, appended and fsynced as it arrives
  (`answers_<lang>_<name>.jsonl`, `judgments.jsonl`); a rerun with the same `out_dir` loads them,
  cuts a torn last line, and asks only what is missing -- nothing already judged is asked again;
- **judge failures** (HTTP errors, timeouts, refused connections) are retried `retries` times with
  backoff, then written as ``status: "error"`` rows and counted per language (a rerun retries
  exactly those); judgments without a readable verdict are ``unparseable``: counted, never guessed.
  A question with an error or unparseable game, or without an answer from a side, is excluded from
  win/tie/loss and counted under its reason -- nothing is dropped silently.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dhad.evaluate import mtbench
from dhad.evaluate.mtbench import MTBenchError, Question

LANGS = ("ar", "en")
JUDGE_PROMPTS = ("jais", "pair-v2")
QUESTION_SETS = ("jais", "acegpt")
JUDGE_TEMPERATURE = {"jais": 0.2, "pair-v2": 0.0}
SCORE = {i: re.compile(rf"<score{i}>\D*(\d+(?:\.\d+)?)\D*</score{i}>") for i in (1, 2)}


# ---------------------------------------------------------------------------------------------
# Data

def vicuna_dir(data_dir) -> Path:
    from dhad.evaluate.tasks import resolve_data_dir
    return resolve_data_dir(data_dir)


def load_questions(data_dir, lang: str, questions: str = "jais") -> list[Question]:
    """The 80 questions in `lang` (FastChat ids and categories), with GPT-4 reference answers where
    FastChat has them (coding/math: ids 61-70; the Arabic ones are keyed by AceGPT's ids 71-80)."""
    if lang not in LANGS:
        raise MTBenchError(f"unknown Vicuna language {lang!r} (have: {', '.join(LANGS)})")
    if questions not in QUESTION_SETS:
        raise MTBenchError(f"unknown Vicuna question set {questions!r} (have: {', '.join(QUESTION_SETS)})")
    root = vicuna_dir(data_dir)
    rows = mtbench._read_jsonl(root / "vicuna_bench_ar" / "vicuna80_en_ar_aligned.jsonl")
    field = {("jais", "en"): "en_jais", ("jais", "ar"): "ar_jais", ("acegpt", "en"): "en",
             ("acegpt", "ar"): "ar_acegpt"}[(questions, lang)]
    ref_file = (root / "vicuna_bench_en" / "reference_answer_gpt-4.jsonl" if lang == "en" else
                root / "vicuna_bench_ar" / "fastchat_vicuna_ar_bench" / "reference_answer_gpt-4.jsonl")
    refs = {}
    if ref_file.is_file():
        refs = {int(r["question_id"]): r["choices"][0]["turns"] for r in mtbench._read_jsonl(ref_file)}
    out = []
    for i, r in enumerate(rows, 1):
        try:
            qid, cat, text = int(r["question_id"]), str(r["category"]), str(r[field])
            ref = refs.get(int(r["acegpt_id"]) if lang == "ar" else qid)
        except (KeyError, TypeError, ValueError) as e:
            raise MTBenchError(f"vicuna80_en_ar_aligned.jsonl:{i}: malformed row ({e})") from None
        out.append(Question(qid, cat, [text], lang, ref))
    return out


def load_judge_prompts(data_dir, kind: str = "jais") -> dict:
    """jais: {lang: {system_prompt, prompt_template, prompt_end}}; pair-v2: FastChat's prompts by name."""
    if kind == "jais":
        path = vicuna_dir(data_dir) / "vicuna_bench_ar" / "jais" / "gpt4_prompts.json"
        if not path.is_file():
            raise MTBenchError(f"file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return {lang: dict(data[lang]["generic"]) for lang in LANGS}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MTBenchError(f"{path}: not the Jais team's gpt4_prompts.json ({type(e).__name__}: {e})") from None
    if kind == "pair-v2":
        return mtbench.load_judge_prompts(data_dir)
    raise MTBenchError(f"unknown judge prompts {kind!r} (have: {', '.join(JUDGE_PROMPTS)})")


# ---------------------------------------------------------------------------------------------
# Append-only JSONL with resume

class JsonlLog:
    """Appends one JSON object per line (write, flush, fsync), thread-safe. On open, a torn last line
    (a kill mid-write) is cut off, so the file is whole lines again."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows = _recover(self.path)
        self.lock = threading.Lock()

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.rows.append(row)


def _recover(path: Path) -> list[dict]:
    """Rows of an append-only log. Only the last line can be torn (no newline after it): it is cut
    off, or completed with its newline when it parses. A bad line before it is not ours to fix."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    *complete, tail = data.split(b"\n")
    rows = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MTBenchError(f"{path}:{i}: not valid JSON ({e}); fix or remove that line to resume") from None
    if tail.strip():
        try:
            rows.append(json.loads(tail))
            with open(path, "ab") as f:
                f.write(b"\n")
        except (json.JSONDecodeError, UnicodeDecodeError):
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
    return rows


# ---------------------------------------------------------------------------------------------
# Answers

@dataclass
class Side:
    """One contestant: a name and either a chat function (answers generated here) or saved answers
    (a FastChat model_answer JSONL, or a directory holding answers_<lang>.jsonl)."""
    name: str
    chat: Callable[[list[dict], str], str] | None = None
    answers: str | os.PathLike | None = None
    system: str | None = None


def side_answers(side: Side, questions: Sequence[Question], out_dir: Path, progress: bool = True) -> dict[int, str]:
    """{question_id: answer}; generated answers are appended one by one and reused on a rerun."""
    lang = questions[0].lang if questions else "en"
    if side.chat is None:
        return {qid: turns[0] for qid, turns in mtbench.load_answers(answer_file(side.answers, lang)).items() if turns}
    log = JsonlLog(out_dir / f"answers_{lang}_{_safe_name(side.name)}.jsonl")
    have = {int(r["question_id"]): r["choices"][0]["turns"][0] for r in log.rows}
    todo = [q for q in questions if q.question_id not in have]
    from tqdm import tqdm
    for q in tqdm(todo, desc=f"vicuna answers {side.name} ({lang})", disable=not progress or not todo):
        row = mtbench.generate_answers([q], side.chat, side.name, system=side.system, progress=False)[0]
        log.append(row)
        have[q.question_id] = row["choices"][0]["turns"][0]
    return have


def answer_file(path: str | os.PathLike, lang: str) -> Path:
    """A saved-answers argument for `lang`: the file itself, or in a directory answers_<lang>.jsonl,
    else the one answers_<lang>_<name>.jsonl a `dhad eval vicuna` run wrote there."""
    p = Path(path)
    if not p.is_dir():
        return p
    if (p / f"answers_{lang}.jsonl").is_file():
        return p / f"answers_{lang}.jsonl"
    found = sorted(p.glob(f"answers_{lang}_*.jsonl"))
    if len(found) == 1:
        return found[0]
    raise MTBenchError(f"{p}: no answers_{lang}.jsonl" + (f" and {len(found)} answers_{lang}_*.jsonl files: "
                                                          "name the file" if found else ""))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


# ---------------------------------------------------------------------------------------------
# Judging

def parse_scores(judgment: str) -> tuple[float, float] | None:
    """The Jais harness's `parse_score_double`: the first number inside <score1>..</score1> and
    <score2>..</score2>; None (unparseable) unless both are there."""
    m1, m2 = SCORE[1].search(judgment), SCORE[2].search(judgment)
    if not (m1 and m2):
        return None
    return float(m1.group(1)), float(m2.group(1))


def judge_messages(kind: str, prompts: dict, q: Question, answer_1: str, answer_2: str) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) for one game: answer_1 is shown first / as Assistant A."""
    if kind == "jais":
        p = prompts[q.lang]
        user = p["prompt_template"].format(question=q.turns[0], answer_1=answer_1, answer_2=answer_2,
                                           prompt_end=p["prompt_end"])
        return f"jais-{q.lang}-generic", mtbench._messages(p["system_prompt"], user)
    name, system, user = mtbench.pair_prompt(prompts, q, [answer_1], [answer_2], 1)
    return name, mtbench._messages(system, user)


def _position_winner(kind: str, judgment: str) -> tuple[str | None, dict]:
    """Winner by position ("1", "2", "tie") or None when unparseable, plus what was parsed."""
    if kind == "jais":
        s = parse_scores(judgment)
        if s is None:
            return None, {}
        return ("1" if s[0] > s[1] else "2" if s[1] > s[0] else "tie"), {"score_1": s[0], "score_2": s[1]}
    v = mtbench.parse_verdict(judgment)
    return {"A": "1", "B": "2", "tie": "tie"}.get(v), {"verdict": v}


def judge_game(judge, kind: str, prompts: dict, q: Question, answer_a: str, answer_b: str, order: str,
               temperature: float, max_tokens: int, retries: int = 3, backoff: float = 1.0) -> dict:
    """One judgment; order "ab" shows model A's answer first, "ba" model B's. Failures are retried
    `retries` times (backoff, doubling) and then returned as status "error" -- never raised."""
    first, second = (answer_a, answer_b) if order == "ab" else (answer_b, answer_a)
    name, messages = judge_messages(kind, prompts, q, first, second)
    row = {"question_id": q.question_id, "lang": q.lang, "category": q.category, "order": order,
           "judge_prompt": name, "judge": getattr(judge, "model", None)}
    err = None
    for attempt in range(retries + 1):
        try:
            text = judge.chat(messages, temperature=temperature, max_tokens=max_tokens)
        except MTBenchError as e:
            err = str(e)
            if attempt < retries:
                time.sleep(min(backoff * 2 ** attempt, 60.0))
            continue
        pos, parsed = _position_winner(kind, text)
        winner = None if pos is None else "tie" if pos == "tie" else (
            "model_a" if (pos == "1") == (order == "ab") else "model_b")
        return {**row, "status": "ok" if pos else "unparseable", "judgment": text, **parsed, "winner": winner,
                "attempts": attempt + 1}
    return {**row, "status": "error", "error": err, "winner": None, "attempts": retries + 1}


def combine(kind: str, w_ab: str, w_ba: str) -> str:
    """One question's result from its two games (winners "model_a" / "model_b" / "tie")."""
    if kind == "jais":  # the Jais harness's "consistent" rule
        if w_ab == w_ba:
            return w_ab
        if w_ab == "tie":
            return w_ba
        if w_ba == "tie":
            return w_ab
        return "tie"
    return "tie" if w_ab == "tie" or w_ab != w_ba else w_ab  # FastChat show_result.py


# ---------------------------------------------------------------------------------------------
# The run

def run_vicuna(side_a: Side, side_b: Side, judge, out_dir: str | os.PathLike, *, data_dir=None,
               langs: Sequence[str] = LANGS, judge_prompts: str = "jais", questions: str = "jais",
               limit: int | None = None, parallel: int = 4, retries: int = 3, backoff: float = 1.0,
               judge_temperature: float | None = None, judge_max_tokens: int = mtbench.JUDGE_MAX_TOKENS,
               progress: bool = True) -> dict:
    """Answer (where needed), judge both orders, summarize; resumable in `out_dir`. `judge` has
    `.chat(messages, temperature, max_tokens)` and `.model` (an `mtbench.ChatClient`)."""
    if judge_prompts not in JUDGE_PROMPTS:
        raise MTBenchError(f"unknown judge prompts {judge_prompts!r} (have: {', '.join(JUDGE_PROMPTS)})")
    if side_a.name == side_b.name:
        side_a, side_b = Side(side_a.name + "-a", side_a.chat, side_a.answers, side_a.system), \
            Side(side_b.name + "-b", side_b.chat, side_b.answers, side_b.system)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_judge_prompts(data_dir, judge_prompts)
    temperature = JUDGE_TEMPERATURE[judge_prompts] if judge_temperature is None else judge_temperature
    qs = {lang: load_questions(data_dir, lang, questions)[:limit] for lang in langs}
    answers = {lang: (side_answers(side_a, qs[lang], out, progress), side_answers(side_b, qs[lang], out, progress))
               for lang in langs}

    log = JsonlLog(out / "judgments.jsonl")
    setup = {"model_a": side_a.name, "model_b": side_b.name, "judge_prompts": judge_prompts}
    done = {_key(r) for r in log.rows if r.get("status") in ("ok", "unparseable") and _same(r, setup)}
    jobs = []
    for lang in langs:
        a, b = answers[lang]
        for q in qs[lang]:
            if q.question_id in a and q.question_id in b:
                jobs += [(q, order) for order in ("ab", "ba") if (lang, q.question_id, order) not in done]

    def run(job):
        q, order = job
        a, b = answers[q.lang]
        row = judge_game(judge, judge_prompts, prompts, q, a[q.question_id], b[q.question_id], order,
                         temperature, judge_max_tokens, retries, backoff)
        log.append({**setup, **row})
        return row

    from tqdm import tqdm
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as ex:
        list(tqdm(ex.map(run, jobs), total=len(jobs), desc="vicuna judging", disable=not progress or not jobs))

    summary = summarize(log.rows, qs, answers, setup)
    summary.update(judge=getattr(judge, "model", None), questions=questions, judge_temperature=temperature,
                   asked_this_run=len(jobs))
    from dhad.evaluate.report import atomic_write_text
    atomic_write_text(out / "vicuna.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "vicuna.md", vicuna_table([summary]))
    plot_vicuna(summary, out / "vicuna.png")
    return summary


def _key(r: dict) -> tuple:
    return (r["lang"], int(r["question_id"]), r["order"])


def _same(r: dict, setup: dict) -> bool:
    return all(r.get(k) == v for k, v in setup.items())


def summarize(rows: Iterable[dict], questions: dict[str, list[Question]], answers: dict, setup: dict) -> dict:
    """Win / tie / loss of model A against model B per language and category (the last judgment of
    each game counts: a rerun's retry replaces an error)."""
    last: dict[tuple, dict] = {}
    for r in rows:
        if _same(r, setup):
            last[_key(r)] = r
    kind = setup["judge_prompts"]
    out = {**setup, "languages": {}}
    for lang, qs in questions.items():
        a, b = answers[lang]
        tally = _Tally()
        cats: dict[str, _Tally] = {}
        for q in qs:
            t = cats.setdefault(q.category, _Tally())
            if q.question_id not in a or q.question_id not in b:
                result = "no_answer"
            else:
                g = [last.get((lang, q.question_id, o)) for o in ("ab", "ba")]
                if any(x is None or x["status"] == "error" for x in g):
                    result = "error"
                elif any(x["status"] == "unparseable" for x in g):
                    result = "unparseable"
                else:
                    result = {"model_a": "win", "model_b": "loss", "tie": "tie"}[combine(kind, g[0]["winner"],
                                                                                         g[1]["winner"])]
            tally.add(result)
            t.add(result)
        out["languages"][lang] = {**tally.as_dict(), "categories": {c: t.as_dict() for c, t in sorted(cats.items())}}
    return out


class _Tally:
    def __init__(self):
        self.n = {"win": 0, "tie": 0, "loss": 0, "error": 0, "unparseable": 0, "no_answer": 0}

    def add(self, result: str):
        self.n[result] += 1

    def as_dict(self) -> dict:
        judged = self.n["win"] + self.n["tie"] + self.n["loss"]
        rate = (lambda x: x / judged if judged else None)
        return {**self.n, "questions": sum(self.n.values()), "judged": judged,
                "win_rate": rate(self.n["win"]), "tie_rate": rate(self.n["tie"]), "loss_rate": rate(self.n["loss"]),
                "win_rate_adjusted": rate(self.n["win"] + 0.5 * self.n["tie"])}


# ---------------------------------------------------------------------------------------------
# Report

def vicuna_table(summaries: Sequence[dict]) -> str:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["Model | Opponent | Lang | Win | Tie | Loss | Win rate | Tie rate | Loss rate | Not judged (error / unparseable / no answer) |",
             "---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        for lang, d in s["languages"].items():
            lines.append(f"{s['model_a']} | {s['model_b']} | {lang} | {d['win']} | {d['tie']} | {d['loss']} | "
                         f"{pct(d['win_rate'])} | {pct(d['tie_rate'])} | {pct(d['loss_rate'])} | "
                         f"{d['error']} / {d['unparseable']} / {d['no_answer']} |")
    cats = ["", "Per category (win / tie / loss):", ""]
    for s in summaries:
        for lang, d in s["languages"].items():
            cats.append(f"- {s['model_a']} vs {s['model_b']} ({lang}): " + "; ".join(
                f"{c} {t['win']}/{t['tie']}/{t['loss']}" for c, t in d["categories"].items()))
    rule = {"jais": "the Jais harness's consistent rule (a win and a tie is a win; opposite winners tie)",
            "pair-v2": "FastChat's rule (a tie or a verdict that flips with the positions is a tie)"}
    kinds = sorted({s["judge_prompts"] for s in summaries})
    foot = (f"\nEach question judged twice, answers' positions swapped; combined by "
            f"{'; '.join(rule[k] for k in kinds)}. Rates over judged questions.\n")
    return "\n".join(lines) + "\n" + "\n".join(cats) + "\n" + foot


def plot_vicuna(summary: dict, path: str | os.PathLike) -> Path:
    """Stacked win / tie / loss bars per language (the Jais paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(summary["languages"])
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * max(1, len(langs))))
    left = [0.0] * len(langs)
    for key, color, label in (("win", "#00a884", summary["model_a"]), ("tie", "#e8e3a0", "tie"),
                              ("loss", "#2f8fdd", summary["model_b"])):
        vals = [summary["languages"][lang][key] for lang in langs]
        ax.barh(langs, vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("questions")
    ax.legend(ncol=3, loc="lower left", bbox_to_anchor=(0, 1), fontsize="small")
    fig.tight_layout()
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, p)
    return p
