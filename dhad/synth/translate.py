"""`dhad data translate`: machine-translate a corpus English -> Arabic (or back) with a teacher model.

The Jais-family card grows its Arabic share by translating *high-quality* English sources (Wikipedia,
books) into Arabic; this module is that step, for any dhad model (in process, through the batching
engine) or any OpenAI-compatible endpoint (see `dhad.synth.backends`).

    report = translate_corpus(TranslateConfig(inputs=["english"], data_root=..., out="ar.jsonl",
                                              source_quality={"english": "high"}), backend)

Pipeline, per document (documents run concurrently; requests are bounded by the backend's limit):

    read (dhad.data.readers) -> select by quality tag -> split into chunks -> translate chunks
    -> reassemble in order -> quality rules (-> round trip + chrF) -> append one JSONL line

Design choices:
- **Selection by quality tag.** A row's ``quality_field`` (default ``quality``) or, when the row has
  none, its source's tag from ``source_quality`` (``--source-quality english=high``) must be one of
  ``quality`` (default ``high``). Untagged documents are not translated: the card restricts
  translation to sources someone has vouched for, so the safe default is to ask.
- **Resumable by document id, written as it goes.** Each finished document is one JSONL line,
  written with a single ``write`` then ``flush`` + ``fsync``: after a crash the file holds whole
  lines plus at most one torn last line. On restart `recover_jsonl` cuts the torn tail (and a last
  line that does not parse), reads the ids already done from the kept *and* rejected files, and
  the run continues with the rest — nothing lost, nothing twice. Documents whose requests failed
  are written nowhere (counted in the report), so a rerun retries exactly them. Ids come from the
  row's ``id_field`` or else ``file:line``; a repeated id in the input is counted and skipped. A run
  stopped by an error (a dead endpoint, Ctrl-C) still writes its report: ``"status": "stopped"``,
  the error, and the counts so far.
- **Long documents** are cut at paragraph breaks, then sentence ends (Latin ``.!?`` and Arabic
  ``؟`` ``۔``, with closing quotes), then line breaks, then spaces, then (a single word longer
  than the limit) characters; adjacent pieces are packed back together up to ``max_chunk_chars``.
  Every chunk keeps the exact whitespace that followed it, so ``"".join(c.text + c.sep)`` is the
  document, and the translation is reassembled with the same separators, in order (paragraph
  breaks survive translation).
- **Quality rules**, all evaluated on every translated document (the report counts each rule's
  failures; a rejected document is attributed to the first rule it fails, in `RULES` order):
  ``empty_output``; ``script_ratio`` (target-script letters / Arabic+Latin letters — Arabic output
  keeps some Latin names and acronyms, hence 0.7 not 1); ``length_ratio`` (non-space characters,
  target / source; Arabic runs ~0.8-1.0x English); ``repetition`` (share of word characters inside
  repeated word 3-grams — the looping failure of small models — only when it exceeds the source's own
  by a margin, so a poem's refrain is not held against its translation); ``round_trip_chrf``
  (optional: translate back, chrF against the source with `sacrebleu` itself — only for documents
  that passed the other rules, since a back-translation of garbage is wasted work).
- Kept documents go to ``out``; rejected ones, with their rule, to ``<out stem>.rejected.jsonl``
  (inspectable, and part of the resume set); the report to ``<out stem>.report.json`` (atomic).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from dhad.synth.backends import BackendUnavailable, GenParams, RequestFailed, run_bounded
from dhad.data.filters import script_counts
from dhad.data.readers import SUFFIXES, Doc, ReadStats, expand_inputs, read_documents
from dhad.utils import atomic_write_json as write_json_atomic
from dhad.utils import jsonable as _jsonable

__all__ = ["TranslateError", "Chunk", "split_text", "reassemble", "QualityConfig", "RULES", "check_translation",
           "script_ratio", "repetition", "chrf", "corpus_chrf", "recover_jsonl", "JsonlAppender", "TranslateConfig",
           "translate_corpus", "translation_messages", "format_report"]

LANGS = {"en": "English", "ar": "Modern Standard Arabic"}
SCRIPT_OF = {"en": "latin", "ar": "arabic"}


class TranslateError(ValueError):
    """A user error (unknown source, no documents, bad option): the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------------
# Splitting long documents

@dataclass(frozen=True)
class Chunk:
    text: str      # non-empty, no leading/trailing whitespace
    sep: str = ""  # the whitespace that followed it in the document ("" for the last chunk)


# Boundary levels, coarsest first. The group "sep" is the separator; the piece ends where it starts.
_LEVELS = (
    re.compile(r"(?P<sep>[ \t]*\n[ \t]*\n\s*)"),                                  # paragraph break
    re.compile(r"[.!?؟۔…]+[\"'”’»)\]]*(?P<sep>\s+)"),                            # sentence end (Latin + Arabic)
    re.compile(r"(?P<sep>[ \t]*\n\s*)"),                                          # line break (verse, lists)
    re.compile(r"(?P<sep>\s+)"),                                                  # word
)


def _pieces(text: str, level: int, max_chars: int) -> list[tuple[str, str]]:
    """(piece, separator) pairs covering ``text`` exactly, each piece <= max_chars."""
    if len(text) <= max_chars:
        return [(text, "")]
    if level == len(_LEVELS):  # one "word" longer than the limit: cut it
        return [(text[i:i + max_chars], "") for i in range(0, len(text), max_chars)]
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _LEVELS[level].finditer(text):
        s, e = m.start("sep"), m.end("sep")
        if s <= pos or e >= len(text):  # empty piece, or trailing whitespace (text is stripped)
            continue
        out.append((text[pos:s], text[s:e]))
        pos = e
    out.append((text[pos:], ""))
    res: list[tuple[str, str]] = []
    for piece, sep in out:
        sub = _pieces(piece, level + 1, max_chars)
        sub[-1] = (sub[-1][0], sub[-1][1] + sep)
        res.extend(sub)
    return res


def split_text(text: str, max_chars: int = 1500) -> list[Chunk]:
    """Cut a document into chunks of at most ``max_chars`` at the coarsest boundaries that fit.

    Invariant (tested): ``"".join(c.text + c.sep for c in chunks) == text.strip()``.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text = text.strip()
    if not text:
        return []
    chunks: list[Chunk] = []
    cur, cur_sep = "", ""
    for piece, sep in _pieces(text, 0, max_chars):
        if cur and len(cur) + len(cur_sep) + len(piece) <= max_chars:
            cur, cur_sep = cur + cur_sep + piece, sep
        else:
            if cur:
                chunks.append(Chunk(cur, cur_sep))
            cur, cur_sep = piece, sep
    if cur:
        chunks.append(Chunk(cur, cur_sep))
    return chunks


def reassemble(chunks: list[Chunk], translations: list[str]) -> str:
    """Translated chunks joined, in order, by the separators of the source."""
    if len(chunks) != len(translations):
        raise ValueError(f"{len(chunks)} chunks but {len(translations)} translations")
    return "".join(t.strip() + c.sep for c, t in zip(chunks, translations)).strip()


# ---------------------------------------------------------------------------------------------
# Quality rules

RULES = ("empty_output", "script_ratio", "length_ratio", "repetition", "round_trip_chrf")
_WORD = re.compile(r"[^\W_]+")


@dataclass
class QualityConfig:
    min_script_ratio: float | None = 0.7
    min_length_ratio: float | None = 0.4
    max_length_ratio: float | None = 2.5
    max_repetition: float | None = 0.3
    repetition_margin: float = 0.1     # tolerated excess over the source's own repetition
    min_chrf: float | None = None      # round trip (needs round_trip=True)


def script_ratio(text: str, lang: str) -> float:
    """Share of ``lang``'s script among Arabic + Latin letters (0 when there are none)."""
    n_ar, n_lat = script_counts(text)
    total = n_ar + n_lat
    if not total:
        return 0.0
    return (n_ar if SCRIPT_OF[lang] == "arabic" else n_lat) / total


def repetition(text: str, n: int = 3) -> float:
    """Characters of words inside a word n-gram seen earlier in the text / all word characters."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < n * 2:
        return 0.0
    seen, dup = set(), [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        if g in seen:
            dup[i:i + n] = [True] * n
        else:
            seen.add(g)
    total = sum(len(w) for w in words)
    return sum(len(w) for w, d in zip(words, dup) if d) / total


def _nonspace(text: str) -> int:
    return len(text) - sum(c.isspace() for c in text)


def check_translation(source: str, target: str, tgt_lang: str, cfg: QualityConfig) -> tuple[list[str], dict]:
    """(rules failed, in RULES order; scores) — ``round_trip_chrf`` is checked separately."""
    failed, scores = [], {}
    if not target.strip():
        failed.append("empty_output")
    scores["script_ratio"] = round(script_ratio(target, tgt_lang), 4)
    if cfg.min_script_ratio is not None and scores["script_ratio"] < cfg.min_script_ratio:
        failed.append("script_ratio")
    ratio = _nonspace(target) / max(_nonspace(source), 1)
    scores["length_ratio"] = round(ratio, 4)
    if (cfg.min_length_ratio is not None and ratio < cfg.min_length_ratio) or \
            (cfg.max_length_ratio is not None and ratio > cfg.max_length_ratio):
        failed.append("length_ratio")
    rep, rep_src = repetition(target), repetition(source)
    scores["repetition"] = round(rep, 4)
    if cfg.max_repetition is not None and rep > cfg.max_repetition and rep > rep_src + cfg.repetition_margin:
        failed.append("repetition")
    return failed, scores


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise TranslateError("round-trip chrF needs sacrebleu: pip install sacrebleu (or 'dhad[eval]')") from None
    return sacrebleu


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (sacrebleu's defaults: chrF2, char order 6, case-sensitive)."""
    return float(_sacrebleu().sentence_chrf(hypothesis, [reference]).score)


def corpus_chrf(hypotheses: list[str], references: list[str]) -> float:
    return float(_sacrebleu().corpus_chrf(hypotheses, [references]).score)


# ---------------------------------------------------------------------------------------------
# Append-only JSONL with crash recovery

def recover_jsonl(path: str | os.PathLike, id_key: str = "id") -> tuple[list[str], dict]:
    """Ids of the complete records in ``path``, after cutting a torn tail left by a crash.

    A crash can leave the last line without its newline (a partial write) or — on file systems
    that do not order data writes — a last line that does not parse: both are removed. A bad
    line in the middle cannot come from our writer; it is reported, left in place, and skipped.
    Returns (ids in file order, {"dropped_bytes", "corrupt_lines"}).
    """
    p = Path(path)
    info = {"dropped_bytes": 0, "corrupt_lines": 0}
    if not p.exists():
        return [], info
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1           # everything after the last newline is a torn write
    lines = data[:end].split(b"\n")[:-1]
    ids, good_end, offset = [], 0, 0
    for i, raw in enumerate(lines):
        offset += len(raw) + 1
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or id_key not in rec:
                raise ValueError("no id")
        except (ValueError, UnicodeDecodeError):
            if i == len(lines) - 1:       # torn last line: drop it too
                break
            info["corrupt_lines"] += 1
            good_end = offset
            continue
        ids.append(str(rec[id_key]))
        good_end = offset
    if good_end < len(data):
        info["dropped_bytes"] = len(data) - good_end
        with open(p, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return ids, info


class JsonlAppender:
    """One JSON object per line; each ``append`` is one write + flush + fsync (durable when it returns)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")
        self.count = 0

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"   # default: parquet dates, bytes
        self._f.write(line.encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sidecar(out: str | os.PathLike, what: str) -> Path:
    """``x.jsonl`` -> ``x.<what>``: the rejected file and the report live beside the output."""
    p = Path(out)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.{what}")


# ---------------------------------------------------------------------------------------------
# Input: sources, ids, selection

def resolve_sources(inputs: list[str], data_root: str | os.PathLike | None,
                    sources: list[str] | tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """`expand_inputs`, but an input naming nothing is an error listing what ``data_root`` holds;
    ``sources`` keeps only those sources (an unknown name is an error listing the known ones)."""
    if not inputs:
        raise TranslateError("no inputs: name sources under --data (e.g. english) or files")
    root = Path(data_root) if data_root else None
    for raw in inputs:
        spec = raw.split("=", 1)[1] if ("=" in raw and not raw.startswith("hf:")) else raw
        if spec.startswith("hf:"):
            continue
        p = Path(spec)
        found = p.exists() or (root is not None and not p.is_absolute() and (root / p).exists())
        if not found and any(ch in spec for ch in "*?["):
            base = root if (root is not None and not p.is_absolute()) else Path("/" if p.is_absolute() else ".")
            found = any(base.glob(spec.lstrip("/") if p.is_absolute() else spec))
        if not found:
            avail = ""
            if root is not None and root.is_dir():
                names = sorted(x.name for x in root.iterdir() if not x.name.startswith(".")
                               and (x.is_dir() or x.suffix.lower() in SUFFIXES))
                avail = f"; {root} has: {', '.join(names) or '(nothing)'}"
            where = f" (looked in {root} and the current directory)" if root is not None else ""
            raise TranslateError(f"unknown source {spec!r}: no such file or directory{where}{avail}")
    files = expand_inputs(inputs, root)
    if not files:
        raise TranslateError(f"no readable files in {', '.join(inputs)} (supported: {', '.join(sorted(SUFFIXES))})")
    if sources:
        avail = sorted({src for _, src in files})
        for name in sources:
            if name not in avail:
                raise TranslateError(f"unknown source {name!r}: the inputs hold {', '.join(avail)}")
        files = [f for f in files if f[1] in set(sources)]
    return files


def doc_id(doc: Doc, id_field: str | None, root: Path | None) -> str:
    path, _, line = doc.origin.rpartition(":")
    try:
        rel = str(Path(path).resolve().relative_to(root.resolve())) if root is not None else Path(path).name
    except ValueError:
        rel = Path(path).name
    if id_field and doc.row is not None and doc.row.get(id_field) not in (None, ""):
        return f"{rel}#{doc.row[id_field]}"
    return f"{rel}:{line}"


# ---------------------------------------------------------------------------------------------
# The run

@dataclass
class TranslateConfig:
    inputs: list[str]
    out: str
    data_root: str | None = None
    sources: tuple[str, ...] | None = None   # only these sources (top-level folders under data_root, SOURCE=)
    src_lang: str = "en"
    tgt_lang: str = "ar"
    text_field: str = "text"
    id_field: str | None = "id"
    quality_field: str = "quality"
    quality: tuple[str, ...] = ("high",)     # accepted tags; () = translate everything
    source_quality: dict = field(default_factory=dict)
    max_chunk_chars: int = 1500
    max_doc_chars: int | None = None         # skip (count) longer documents; None = no limit
    limit: int | None = None                 # translate at most this many documents in this run
    round_trip: bool = False
    quality_rules: QualityConfig = field(default_factory=QualityConfig)
    gen: GenParams = field(default_factory=GenParams)
    max_inflight_docs: int | None = None     # default: 2 x the backend's concurrency
    overwrite: bool = False
    progress: bool = True
    txt_mode: str = "paragraph"


def translation_messages(text: str, src_lang: str, tgt_lang: str) -> list[dict]:
    """The request for one chunk: instructions in the system turn, the text alone as the user turn."""
    system = (f"You are a professional translator. Translate the {LANGS[src_lang]} text the user sends into "
              f"{LANGS[tgt_lang]}. Reply with the translation only: keep the meaning, names, numbers and "
              "paragraph breaks, and add no notes.")
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


async def _translate_text(backend, text: str, src: str, tgt: str, cfg: TranslateConfig) -> tuple[str, int]:
    chunks = split_text(text, cfg.max_chunk_chars)
    outs = await asyncio.gather(*(backend.chat(translation_messages(c.text, src, tgt), cfg.gen) for c in chunks),
                                return_exceptions=True)
    for o in outs:  # BackendUnavailable first (stop the run), then a failed chunk (skip the doc)
        if isinstance(o, BackendUnavailable):
            raise o
    for o in outs:
        if isinstance(o, BaseException):
            raise o
    return reassemble(chunks, outs), len(chunks)


def check_config(cfg: TranslateConfig) -> None:
    """Raise TranslateError for a configuration that cannot run (before any model is loaded)."""
    for lang in (cfg.src_lang, cfg.tgt_lang):
        if lang not in LANGS:
            raise TranslateError(f"unknown language {lang!r}: expected one of {', '.join(LANGS)}")
    if cfg.src_lang == cfg.tgt_lang:
        raise TranslateError(f"source and target language are both {cfg.src_lang!r}")
    if cfg.max_chunk_chars < 16:
        raise TranslateError(f"max_chunk_chars must be >= 16, got {cfg.max_chunk_chars}")
    if cfg.quality_rules.min_chrf is not None and not cfg.round_trip:
        raise TranslateError("min_chrf needs round_trip (--round-trip)")
    if cfg.round_trip:
        _sacrebleu()


def translate_corpus(cfg: TranslateConfig, backend) -> dict:
    """Translate ``cfg.inputs`` with ``backend``; returns (and writes) the report. Resumes by default."""
    check_config(cfg)
    files = resolve_sources(list(cfg.inputs), cfg.data_root, cfg.sources)
    return asyncio.run(_run(cfg, backend, files))


async def _run(cfg: TranslateConfig, backend, files) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    rej_path, rep_path = sidecar(out, "rejected.jsonl"), sidecar(out, "report.json")
    if cfg.overwrite:
        for p in (out, rej_path):
            p.unlink(missing_ok=True)
    ids_out, info_out = recover_jsonl(out)
    ids_rej, info_rej = recover_jsonl(rej_path)
    done = set(ids_out) | set(ids_rej)
    root = Path(cfg.data_root) if cfg.data_root else None
    stats = ReadStats()
    accepted = set(cfg.quality)
    c = Counter()
    tags = Counter()
    rules = {r: {"failed": 0, "rejected": 0} for r in RULES}
    failures: list[dict] = []
    pairs: list[tuple[str, str]] = []       # (back-translation, source) for corpus chrF
    seen: set[str] = set()
    fatal: list[BaseException] = []

    reading: list[ReadStats] = []          # the file being read (its counts, should the run stop mid-file)

    def read_all() -> Iterator[Doc]:
        for spec in files:  # per file, so that an empty file is reported as one
            fs = ReadStats()
            reading[:] = [fs]
            yield from read_documents([spec], fs, text_fields=(cfg.text_field,), txt_mode=cfg.txt_mode)
            if fs.files and fs.records == 0 and not fs.skipped:
                fs.skip("empty_file", spec[0])
            reading.clear()
            stats.merge(fs)

    def docs() -> Iterator[tuple[str, Doc]]:
        for doc in read_all():
            c["read"] += 1
            did = doc_id(doc, cfg.id_field, root)
            if did in seen:
                c["duplicate_id"] += 1
                continue
            seen.add(did)
            row = doc.row or {}
            tag = row.get(cfg.quality_field) if cfg.quality_field in row else cfg.source_quality.get(doc.source)
            tags[str(tag) if tag is not None else "(untagged)"] += 1
            if accepted and (tag is None or str(tag) not in accepted):
                c["not_selected"] += 1
                continue
            if did in done:
                c["already_done"] += 1
                continue
            if cfg.max_doc_chars is not None and len(doc.text) > cfg.max_doc_chars:
                c["too_long"] += 1
                continue
            yield did, doc

    progress = None
    if cfg.progress:
        from tqdm import tqdm
        progress = tqdm(desc=f"translate {cfg.src_lang}->{cfg.tgt_lang}", unit="doc", file=sys.stderr,
                        dynamic_ncols=True)

    async def one(did: str, doc: Doc, kept_w: JsonlAppender, rej_w: JsonlAppender):
        try:
            target, n_chunks = await _translate_text(backend, doc.text, cfg.src_lang, cfg.tgt_lang, cfg)
            failed, scores = check_translation(doc.text, target, cfg.tgt_lang, cfg.quality_rules)
            back = None
            if cfg.round_trip and not failed:
                back, _ = await _translate_text(backend, target, cfg.tgt_lang, cfg.src_lang, cfg)
                scores["chrf"] = round(chrf(back, doc.text), 4)
                pairs.append((back, doc.text))
                if cfg.quality_rules.min_chrf is not None and scores["chrf"] < cfg.quality_rules.min_chrf:
                    failed.append("round_trip_chrf")
        except BackendUnavailable as e:
            fatal.append(e)
            raise
        except RequestFailed as e:
            c["failed"] += 1
            if len(failures) < 20:
                failures.append({"id": did, "error": str(e)[:300]})
            return
        rec = {"id": did, "source": doc.source, "text": target, "source_text": doc.text,
               "direction": f"{cfg.src_lang}-{cfg.tgt_lang}", "lang": cfg.tgt_lang, "chunks": n_chunks,
               "scores": scores}
        if back is not None:
            rec["back_translation"] = back
        meta = {k: v for k, v in (doc.row or {}).items() if k != cfg.text_field}
        if meta:
            rec["meta"] = meta
        for r in failed:
            rules[r]["failed"] += 1
        c["translated"] += 1
        c["chunks"] += n_chunks
        c["chars_in"] += len(doc.text)
        c["chars_out"] += len(target)
        if failed:
            rules[failed[0]]["rejected"] += 1
            rec["rejected"] = failed[0]
            rec["failed_rules"] = failed
            rej_w.append(rec)
            c["rejected"] += 1
        else:
            kept_w.append(rec)
            c["kept"] += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(kept=c["kept"], rejected=c["rejected"], failed=c["failed"], refresh=False)

    def jobs(kept_w, rej_w):
        for n, (did, doc) in enumerate(docs()):
            if cfg.limit is not None and n >= cfg.limit:
                break
            yield did, doc, kept_w, rej_w

    def report(error: BaseException | None = None) -> dict:
        read = ReadStats()
        for st in (stats, *reading):
            read.merge(st)
        rep = {
            "direction": f"{cfg.src_lang}-{cfg.tgt_lang}", "out": str(out), "rejected_out": str(rej_path),
            "status": "complete" if error is None else "stopped",
            "read": read.to_dict(),
            "selection": {"quality_field": cfg.quality_field, "accepted": sorted(accepted) or "all",
                          "by_tag": dict(sorted(tags.items()))},
            "docs": {k: c[k] for k in ("translated", "kept", "rejected", "failed", "already_done", "not_selected",
                                       "duplicate_id", "too_long")},
            "rules": rules,
            "failed_examples": failures,
            "chunks": c["chunks"], "chars_in": c["chars_in"], "chars_out": c["chars_out"],
            "resume": {"done_before": len(done), "kept_file": info_out, "rejected_file": info_rej},
            "teacher": getattr(backend, "teacher", None),
            "backend": backend.stats.to_dict(),
            "elapsed_s": round(time.perf_counter() - t0, 3),
            "config": _jsonable(asdict(cfg)),
        }
        if error is not None:
            rep["error"] = f"{type(error).__name__}: {error}"
        if pairs:
            rep["round_trip"] = {"docs": len(pairs),
                                 "mean_chrf": round(sum(chrf(h, r) for h, r in pairs) / len(pairs), 4),
                                 "corpus_chrf": round(corpus_chrf([h for h, _ in pairs], [r for _, r in pairs]), 4)}
        return rep

    await run_jobs(out, rej_path, rep_path, jobs, one,
                   cfg.max_inflight_docs or max(4, 2 * getattr(backend, "concurrency", 2)), fatal, report, progress,
                   backend)
    if c["read"] == 0 and not (ids_out or ids_rej):
        empty = [str(p) for p, _ in files]
        raise TranslateError(f"no documents with a non-empty {cfg.text_field!r} field in {', '.join(empty)} "
                             f"(read report: {json.dumps(stats.to_dict(), ensure_ascii=False)})")
    rep = report()
    write_json_atomic(rep_path, rep)
    return rep


def format_report(r: dict) -> str:
    d = r["docs"]
    lines = [f"translated {d['translated']} documents ({r['direction']}): kept {d['kept']}, rejected {d['rejected']}, "
             f"failed {d['failed']} (retried on the next run); already done {d['already_done']}, "
             f"not selected {d['not_selected']}, duplicate ids {d['duplicate_id']}, too long {d['too_long']}"]
    lines.append(f"{'rule':<18}{'failed':>8}{'rejected':>10}")
    for rule, v in r["rules"].items():
        lines.append(f"{rule:<18}{v['failed']:>8}{v['rejected']:>10}")
    skipped = r["read"]["skipped"]
    if skipped:
        lines.append("read skips: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if "round_trip" in r:
        rt = r["round_trip"]
        lines.append(f"round trip: {rt['docs']} docs, mean chrF {rt['mean_chrf']:.2f}, corpus chrF {rt['corpus_chrf']:.2f}")
    b = r["backend"]
    lines.append(f"backend: {b['requests']} requests, {b['retries']} retries, errors {b['errors'] or 'none'}; "
                 f"{r['elapsed_s']:.1f}s")
    lines.append(f"teacher: {r.get('teacher')}; output: {r['out']} (+ {r['rejected_out']})")
    return "\n".join(lines)


async def run_jobs(out, rej_path, rep_path, jobs, one, max_inflight: int, fatal: list, report, progress,
                   backend) -> None:
    """Run ``one`` over ``jobs(kept_w, rej_w)`` (at most ``max_inflight`` at once) with the kept and
    rejected JSONL files open for appending. Whatever stops the run -- a dead endpoint, Ctrl-C, a full
    disk -- first writes ``report(error)`` to ``rep_path`` (the counts of what was done) and names it on
    the error as ``report_path``; the backend's loop is ended either way."""
    try:
        with JsonlAppender(out) as kept_w, JsonlAppender(rej_path) as rej_w:
            await run_bounded(jobs(kept_w, rej_w), one, max_inflight, fatal)
    except BaseException as e:
        try:
            write_json_atomic(rep_path, report(e))
            e.report_path = str(rep_path)
        except Exception:        # the report is a courtesy here: the error that stopped the run comes first
            pass
        raise
    finally:
        if progress is not None:
            progress.close()
        await backend.end_loop()
