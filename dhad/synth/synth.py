"""`dhad data synth`: instruction data by distillation and self-chat with a teacher model.

The Jais-family card supplements its instruction data with machine translation, distillation and
model self-chat. This module makes the last two from seed prompts (Arabic and English), through the
same backends as `dhad data translate` (a dhad model via the engine, or any OpenAI-compatible
endpoint), and writes the chat schema `dhad data sft` reads: ``{"messages": [{"role", "content"}...]}``.

    report = synth(SynthConfig(seeds=["instruct/cidar_human_eval_prompts.jsonl"], out="sft.jsonl",
                               mode="selfchat", turns=3), backend)

Modes:
- ``distill``: one user turn (the seed prompt) and the teacher's answer.
- ``selfchat``: the teacher also plays the user: after each answer it is shown the conversation as a
  transcript and asked for the user's next message (in the seed's language), which it then answers;
  ``turns`` user turns in all.

Design choices:
- **Seeds** are rows with ``instruction`` (+ ``input``), ``prompt``, ``question`` or ``messages`` (the
  first user turn; a leading system turn is kept), in jsonl/json/csv/parquet. A seed's language is its
  ``lang`` field when that says ``ar``/``en``, else the majority script of its prompt. The teacher is
  told (in that language) to answer in it: that is what makes the *language* rule meaningful.
- **Filters**, each a named rule; a conversation is rejected by the first it fails (`RULES` order),
  every generated turn checked: ``empty``; ``language`` (the expected script's share of letters,
  as translate's ``script_ratio``); ``too_short`` / ``too_long`` (characters); ``refusal`` (English and
  Arabic refusal / "as an AI" phrases near the start of an answer); ``repetition`` (repeated word
  3-grams, as translate); then ``exact_duplicate`` / ``near_duplicate`` against the existing data
  (``dedup_against``: any schema `dhad data sft` reads) and everything kept before, with
  `dhad.data.dedup` (MinHash-LSH over word 5-grams, Jaccard threshold 0.8 by default).
- **Resumable** exactly like translate (a stopped run writes its report too): one JSONL line per conversation (write + flush + fsync), ids
  ``<seed id>#<sample>``; a restart cuts a torn last line, skips ids already in the output or the
  rejected file, and rebuilds the dedup index from the existing data and the conversations already
  kept (in file order), so a resumed run rejects the same near-duplicates an uninterrupted one would
  — up to completion order, which with concurrent requests is not fixed.
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dhad.data.dedup import DedupConfig, Deduplicator, exact_key, signature
from dhad.data.readers import ReadStats, read_documents
from dhad.synth.backends import BackendUnavailable, GenParams, RequestFailed
from dhad.synth.translate import (TranslateError, _jsonable, doc_id, recover_jsonl, repetition, resolve_sources,
                                  run_jobs, script_ratio, sidecar, write_json_atomic)

__all__ = ["SynthError", "SynthConfig", "SynthFilterConfig", "Seed", "RULES", "load_seeds", "detect_lang",
           "is_refusal", "check_conversation", "synth", "format_report"]

RULES = ("empty", "language", "too_short", "too_long", "refusal", "repetition", "exact_duplicate", "near_duplicate")


class SynthError(TranslateError):
    """A user error (no seeds, bad option)."""


# ---------------------------------------------------------------------------------------------
# Seeds

@dataclass
class Seed:
    id: str
    prompt: str
    lang: str                 # "ar" | "en"
    source: str
    system: str | None = None


def detect_lang(text: str) -> str:
    return "ar" if script_ratio(text, "ar") >= 0.5 else "en"


def _seed_prompt(row: dict, fields: tuple[str, ...], input_field: str) -> tuple[str | None, str | None]:
    if isinstance(row.get("messages"), list):
        msgs = [m for m in row["messages"] if isinstance(m, dict)]
        system = next((m.get("content") for m in msgs[:1] if m.get("role") == "system"), None)
        user = next((m.get("content") for m in msgs if m.get("role") == "user"), None)
        return (user.strip() if isinstance(user, str) and user.strip() else None), system
    for f in fields:
        v = row.get(f)
        if isinstance(v, str) and v.strip():
            inp = row.get(input_field)
            extra = "\n\n" + inp.strip() if isinstance(inp, str) and inp.strip() else ""
            return v.strip() + extra, None
    return None, None


def load_seeds(files, stats: ReadStats, fields=("instruction", "prompt", "question"), input_field="input",
               id_field: str | None = "id", root: Path | None = None, lang: str | None = None,
               reasons: Counter | None = None) -> list[Seed]:
    """Seed prompts from ``expand_inputs`` output; unusable rows are counted in ``reasons``."""
    reasons = reasons if reasons is not None else Counter()
    seeds, seen = [], set()
    for spec in files:
        fs = ReadStats()
        for doc in read_documents([spec], fs, text_fields=None):
            prompt, system = _seed_prompt(doc.row, tuple(fields), input_field)
            if prompt is None:
                fs.skip("no_prompt", f"{doc.origin} (no non-empty {'/'.join(fields)} or messages)")
                continue
            sid = doc_id(doc, id_field, root)
            if sid in seen:
                reasons["duplicate_seed_id"] += 1
                continue
            seen.add(sid)
            tag = str(doc.row.get("lang", "")).lower()
            sl = tag if tag in ("ar", "en") else detect_lang(prompt)
            if lang is not None and sl != lang:
                reasons["other_language"] += 1
                continue
            seeds.append(Seed(sid, prompt, sl, doc.source, system))
        if fs.files and fs.records == 0 and not fs.skipped:
            fs.skip("empty_file", spec[0])
        stats.merge(fs)
    return seeds


# ---------------------------------------------------------------------------------------------
# Filters

_REFUSAL = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(i'?m|i am) (so )?(sorry|afraid)\b[^.!?\n]{0,80}\b(can'?t|cannot|unable|not able|won'?t)\b",
    r"\bas an ai\b|\bas an? (ai )?language model\b",
    r"\bi (can'?t|cannot|won'?t|am unable to|am not able to) (help|assist|provide|comply|answer|fulfil)",
    r"(عذرًا|عذراً|عذرا|آسف|اسف|أعتذر)[^.!؟\n]{0,80}(لا أستطيع|لا يمكنني|لا يمكن لي|غير قادر)",
    r"(بصفتي|باعتباري|كوني|ك)\s?(نموذج|نموذجًا|نموذجاً)\s(لغوي|ذكاء)",
    r"(لا أستطيع|لا يمكنني|لن أستطيع)\s(المساعدة|مساعدتك|تقديم|الإجابة|تلبية)",
)]


def is_refusal(text: str, head: int = 300) -> bool:
    """A refusal or an "as an AI model" disclaimer near the start of an answer (English or Arabic)."""
    t = text[:head]
    return any(p.search(t) for p in _REFUSAL)


@dataclass
class SynthFilterConfig:
    min_lang_ratio: float | None = 0.6
    min_chars: int | None = 2
    max_chars: int | None = 8000
    refusals: bool = True
    max_repetition: float | None = 0.3


def check_conversation(messages: list[dict], lang: str, cfg: SynthFilterConfig, generated_from: int = 1) -> str | None:
    """The first rule a conversation fails, looking at the generated turns (index >= generated_from)."""
    turns = [m for m in messages[generated_from:] if m["role"] != "system"]
    for m in turns:
        if not m["content"].strip():
            return "empty"
    for rule in RULES[1:6]:
        for m in turns:
            t = m["content"]
            if rule == "language" and cfg.min_lang_ratio is not None and script_ratio(t, lang) < cfg.min_lang_ratio:
                return rule
            if rule == "too_short" and cfg.min_chars is not None and len(t.strip()) < cfg.min_chars:
                return rule
            if rule == "too_long" and cfg.max_chars is not None and len(t) > cfg.max_chars:
                return rule
            if rule == "refusal" and cfg.refusals and m["role"] == "assistant" and is_refusal(t):
                return rule
            if rule == "repetition" and cfg.max_repetition is not None and repetition(t) > cfg.max_repetition:
                return rule
    return None


def conversation_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


# ---------------------------------------------------------------------------------------------
# Prompts the teacher sees

ANSWER_SYSTEM = {
    "en": "You are a helpful, honest assistant. Answer in English.",
    "ar": "أنت مساعد مفيد وصادق. أجب باللغة العربية الفصحى.",
}
USER_SIM_SYSTEM = {
    "en": ("You are playing the user in a conversation with an AI assistant. Read the conversation and write the "
           "user's next message: a natural follow-up question or request, in English. Reply with that message only."),
    "ar": ("أنت تؤدي دور المستخدم في محادثة مع مساعد ذكي. اقرأ المحادثة واكتب رسالة المستخدم التالية: "
           "سؤالاً أو طلباً متابعاً طبيعياً باللغة العربية. اكتب الرسالة فقط."),
}
SPEAKERS = {"en": ("User", "Assistant"), "ar": ("المستخدم", "المساعد")}


def transcript(messages: list[dict], lang: str) -> str:
    u, a = SPEAKERS[lang]
    return "\n\n".join(f"{u if m['role'] == 'user' else a}: {m['content']}" for m in messages if m["role"] != "system")


def _clean_user_turn(text: str, lang: str) -> str:
    t = text.strip()
    for label in SPEAKERS[lang] + SPEAKERS["en"]:
        if t.startswith(label + ":"):
            t = t[len(label) + 1:].strip()
    return t.strip().strip('"“”«»').strip()


# ---------------------------------------------------------------------------------------------
# The run

@dataclass
class SynthConfig:
    seeds: list[str]
    out: str
    data_root: str | None = None
    mode: str = "distill"                 # distill | selfchat
    turns: int = 3                        # user turns per conversation (selfchat)
    samples: int = 1                      # conversations per seed
    lang: str | None = None               # only seeds in this language
    prompt_fields: tuple[str, ...] = ("instruction", "prompt", "question")
    input_field: str = "input"
    id_field: str | None = "id"
    system: str | None = None             # teacher system prompt (default: ANSWER_SYSTEM[lang])
    keep_system: bool = False             # write the system turn into the conversations
    limit: int | None = None
    filters: SynthFilterConfig = field(default_factory=SynthFilterConfig)
    dedup: DedupConfig | None = field(default_factory=DedupConfig)
    dedup_against: list[str] = field(default_factory=list)
    gen: GenParams = field(default_factory=lambda: GenParams(temperature=0.7))
    teacher: str | None = None            # recorded in every row (default: the backend's model id)
    max_inflight: int | None = None
    overwrite: bool = False
    progress: bool = True


def _sample_seed(base: int | None, sid: str, k: int, turn: int) -> int | None:
    if base is None:
        return None
    h = int(hashlib.sha1(f"{sid}#{k}#{turn}".encode()).hexdigest()[:8], 16)
    return (base + h) % (2**31)


async def _converse(backend, seed: Seed, k: int, cfg: SynthConfig) -> list[dict]:
    system = cfg.system or seed.system or ANSWER_SYSTEM[seed.lang]
    conv = [{"role": "user", "content": seed.prompt}]

    def params(turn):
        return GenParams(**{**asdict(cfg.gen), "seed": _sample_seed(cfg.gen.seed, seed.id, k, turn)})

    n_turns = cfg.turns if cfg.mode == "selfchat" else 1
    for turn in range(n_turns):
        if turn:
            sim = [{"role": "system", "content": USER_SIM_SYSTEM[seed.lang]},
                   {"role": "user", "content": transcript(conv, seed.lang)}]
            nxt = _clean_user_turn(await backend.chat(sim, params(2 * turn - 1)), seed.lang)
            conv.append({"role": "user", "content": nxt})
            if not nxt:
                break   # rejected as "empty" below; no point answering nothing
        answer = await backend.chat([{"role": "system", "content": system}] + conv, params(2 * turn))
        conv.append({"role": "assistant", "content": answer.strip()})
    if cfg.keep_system:
        conv.insert(0, {"role": "system", "content": system})
    return conv


def _existing_texts(paths: list[str], root, stats: ReadStats) -> list[str]:
    """Conversation texts of existing SFT data (any schema `dhad data sft` reads, or a plain text field)."""
    from dhad.data.sft import RowError, row_to_messages
    out = []
    if not paths:
        return out
    for doc in read_documents(resolve_sources(paths, root), stats, text_fields=None):
        try:
            out.append(conversation_text(row_to_messages(doc.row)))
        except RowError:
            if isinstance(doc.row.get("text"), str):
                out.append(doc.row["text"])
            else:
                stats.skip("unknown_schema", doc.origin)
    return out


def synth(cfg: SynthConfig, backend) -> dict:
    """Generate, filter, dedup and append conversations; returns (and writes) the report."""
    if cfg.mode not in ("distill", "selfchat"):
        raise SynthError(f"unknown mode {cfg.mode!r}: expected distill or selfchat")
    if cfg.turns < 1 or cfg.samples < 1:
        raise SynthError("turns and samples must be >= 1")
    if cfg.lang not in (None, "ar", "en"):
        raise SynthError(f"unknown language {cfg.lang!r}: expected ar or en")
    root = Path(cfg.data_root) if cfg.data_root else None
    try:
        files = resolve_sources(list(cfg.seeds), cfg.data_root)
    except TranslateError as e:
        raise SynthError(str(e)) from None
    stats, reasons = ReadStats(), Counter()
    seeds = load_seeds(files, stats, cfg.prompt_fields, cfg.input_field, cfg.id_field, root, cfg.lang, reasons)
    if not seeds:
        raise SynthError(f"no seed prompts in {', '.join(p for p, _ in files)} (need a non-empty "
                         f"{'/'.join(cfg.prompt_fields)} or messages field; read report: {stats.to_dict()}"
                         f"{', filtered: ' + str(dict(reasons)) if reasons else ''})")
    return asyncio.run(_run(cfg, backend, seeds, stats, reasons, root))


async def _run(cfg: SynthConfig, backend, seeds: list[Seed], stats: ReadStats, reasons: Counter, root) -> dict:
    import json
    t0 = time.perf_counter()
    out = Path(cfg.out)
    rej_path, rep_path = sidecar(out, "rejected.jsonl"), sidecar(out, "report.json")
    if cfg.overwrite:
        for p in (out, rej_path):
            p.unlink(missing_ok=True)
    ids_out, info_out = recover_jsonl(out)
    ids_rej, info_rej = recover_jsonl(rej_path)
    done = set(ids_out) | set(ids_rej)

    dd = Deduplicator(cfg.dedup) if cfg.dedup is not None else None
    ex_stats = ReadStats()
    n_existing = 0
    if dd is not None:
        def feed(text):
            return dd.check(exact_key(text) if cfg.dedup.exact else None,
                            signature(text, cfg.dedup) if cfg.dedup.near else None)
        for text in _existing_texts(cfg.dedup_against, cfg.data_root, ex_stats):
            feed(text)
            n_existing += 1
        if out.exists():
            for line in out.read_text(encoding="utf-8").splitlines():
                try:
                    feed(conversation_text(json.loads(line)["messages"]))
                except (ValueError, KeyError, TypeError):
                    pass
    rules = {r: 0 for r in RULES}
    c = Counter()
    failures: list[dict] = []
    fatal: list[BaseException] = []
    langs = Counter()
    progress = None
    if cfg.progress:
        from tqdm import tqdm
        progress = tqdm(desc=f"synth {cfg.mode}", unit="conv", file=sys.stderr, dynamic_ncols=True)

    async def one(seed: Seed, k: int, cid: str, kept_w, rej_w):
        try:
            conv = await _converse(backend, seed, k, cfg)
        except BackendUnavailable as e:
            fatal.append(e)
            raise
        except RequestFailed as e:
            c["failed"] += 1
            if len(failures) < 20:
                failures.append({"id": cid, "error": str(e)[:300]})
            return
        gen_from = 2 if cfg.keep_system else 1
        rule = check_conversation(conv, seed.lang, cfg.filters, generated_from=gen_from)
        if rule is None and dd is not None:
            rule = feed(conversation_text(conv))
        rec = {"id": cid, "messages": conv, "lang": seed.lang, "mode": cfg.mode, "seed_id": seed.id,
               "source": seed.source}
        teacher = cfg.teacher or getattr(backend, "teacher", None)   # the model id the endpoint resolved
        if teacher:
            rec["teacher"] = teacher
        c["generated"] += 1
        if rule:
            rules[rule] += 1
            rec["rejected"] = rule
            rej_w.append(rec)
            c["rejected"] += 1
        else:
            kept_w.append(rec)
            c["kept"] += 1
            langs[seed.lang] += 1
            c["turns"] += sum(m["role"] == "assistant" for m in conv)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(kept=c["kept"], rejected=c["rejected"], refresh=False)

    def jobs(kept_w, rej_w):
        started = 0
        for seed in seeds:
            for k in range(cfg.samples):
                cid = f"{seed.id}#{k}"
                if cid in done:
                    c["already_done"] += 1
                    continue
                if cfg.limit is not None and started >= cfg.limit:
                    break
                started += 1
                yield seed, k, cid, kept_w, rej_w

    def report(error: BaseException | None = None) -> dict:
        rep = {
            "mode": cfg.mode, "out": str(out), "rejected_out": str(rej_path),
            "status": "complete" if error is None else "stopped",
            "seeds": {"read": stats.to_dict(), "used": len(seeds), "by_lang": dict(Counter(s.lang for s in seeds)),
                      "skipped": dict(reasons)},
            "conversations": {k: c[k] for k in ("generated", "kept", "rejected", "failed", "already_done")},
            "kept_by_lang": dict(langs), "assistant_turns": c["turns"],
            "rules": rules,
            "dedup": {"existing_examples": n_existing, "existing_read": ex_stats.to_dict()} if dd is not None else None,
            "failed_examples": failures,
            "resume": {"done_before": len(done), "kept_file": info_out, "rejected_file": info_rej},
            "teacher": cfg.teacher or getattr(backend, "teacher", None),
            "backend": backend.stats.to_dict(),
            "elapsed_s": round(time.perf_counter() - t0, 3),
            "config": _jsonable(asdict(cfg)),
        }
        if error is not None:
            rep["error"] = f"{type(error).__name__}: {error}"
        return rep

    await run_jobs(out, rej_path, rep_path, jobs, one,
                   cfg.max_inflight or max(4, 2 * getattr(backend, "concurrency", 2)), fatal, report, progress, backend)
    rep = report()
    write_json_atomic(rep_path, rep)
    return rep


def format_report(r: dict) -> str:
    cv = r["conversations"]
    lines = [f"{r['mode']}: generated {cv['generated']} conversations from {r['seeds']['used']} seeds "
             f"({r['seeds']['by_lang']}): kept {cv['kept']}, rejected {cv['rejected']}, failed {cv['failed']} "
             f"(retried on the next run), already done {cv['already_done']}"]
    lines.append(f"{'rule':<18}{'rejected':>10}")
    for rule, n in r["rules"].items():
        lines.append(f"{rule:<18}{n:>10}")
    b = r["backend"]
    lines.append(f"backend: {b['requests']} requests, {b['retries']} retries, errors {b['errors'] or 'none'}; "
                 f"{r['elapsed_s']:.1f}s")
    lines.append(f"teacher: {r.get('teacher')}; output: {r['out']} (+ {r['rejected_out']})")
    return "\n".join(lines)
