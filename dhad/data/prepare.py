"""`dhad data prepare`: raw text -> cleaned, filtered, deduplicated, tokenized pretraining shards.

Pipeline (one pass over the input, streaming):

    read (readers)  ->  clean (clean)  ->  quality filters (filters)  ->  tokenize      [worker processes]
                    ->  exact + near dedup (dedup, in input order)  ->  train/validation split
                    ->  per-source staging shards  ->  mixture  ->  <out>/train, <out>/validation

* Workers (``workers``, default 2) clean, filter, MinHash and tokenize chunks of documents; results come
  back in input order (``imap``), so the output is identical for any number of workers.
* Dedup runs in the main process because "first occurrence wins" needs one global order.
* The split is decided per document from a hash of its text (and ``seed``): a duplicate can never land
  on both sides, and adding files does not reshuffle earlier documents between splits.
* Mixture: ``mix={"english": 283, "arabic": 141, "code": 56}`` are relative token weights (the example
  is jais-family's English : Arabic : code token counts from its model card, ~2 : 1 : 0.4). Each source's
  share of the *train* split becomes weight / sum(weights). Without ``total_tokens`` the total is the
  largest one no source has to repeat for; with it, sources short of their quota are repeated
  (whole shuffled passes + a partial one; the report gives each source's epochs). Validation keeps
  the natural proportions (it measures, it does not train).
* Every document that does not make it is counted under exactly one reason: a read problem
  (readers.ReadStats), a filter rule (filters.RULES) or exact/near duplicate. ``report.json`` holds it
  all; ``format_report`` prints it as a table.
* Output is written through ShardWriter (atomic), and report.json last (atomic): a crash leaves either
  the previous complete output or the new one.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dhad.data.clean import CleanConfig, clean_text
from dhad.data.dedup import DedupConfig, Deduplicator, exact_key, signature
from dhad.data.filters import FilterConfig, check
from dhad.data.readers import NoInput, ReadStats, expand_inputs, read_documents, split_long
from dhad.data.shards import ShardSet, ShardWriter, _write_json_atomic, output_dir
from dhad.utils import jsonable as _jsonable

# Card mixtures (relative token counts: English, Arabic, code) — jais-family model card's table.
CARD_MIXES = {
    "jais-family": {"english": 283, "arabic": 141, "code": 56},   # 590m … 13b: 283B / 141B / 56B
    "jais-family-30b-16k": {"english": 980, "arabic": 490, "code": 196},
    "jais-adapted-7b": {"english": 18, "arabic": 19, "code": 2},
    "jais-adapted-13b": {"english": 127, "arabic": 140, "code": 13},
    "jais-adapted-70b": {"english": 33, "arabic": 334, "code": 4},
}


@dataclass
class PrepareConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    data_root: str | None = None
    text_fields: tuple[str, ...] = ("text",)
    txt_mode: str = "paragraph"
    max_doc_chars: int = 50_000   # longer documents (books) are cut at paragraph breaks, not dropped
    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    val_fraction: float = 0.01
    seed: int = 0
    mix: dict | None = None
    total_tokens: int | None = None
    workers: int = 2
    chunk_docs: int = 128
    allow_hub: bool = False
    shard_tokens: int = 1 << 27
    max_docs: int | None = None
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Worker side

_W: dict = {}


def _worker_init(tokenizer: str, clean_cfg: CleanConfig, filter_cfg: FilterConfig, dedup_cfg: DedupConfig):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from dhad.data.encoder import Encoder
    _W.update(enc=Encoder(tokenizer), clean=clean_cfg, filters=filter_cfg, dedup=dedup_cfg)


def _process_chunk(chunk: list[tuple[str, str]]) -> list[dict]:
    """Clean + filter + signature + tokenize a chunk of (text, source). One result dict per input doc."""
    enc, ccfg, fcfg, dcfg = _W["enc"], _W["clean"], _W["filters"], _W["dedup"]
    out, todo = [], []
    for text, source in chunk:
        raw_chars = len(text)
        t, info = clean_text(text, ccfg)
        t, n_special = enc.strip_specials(t)
        if n_special:
            info["special_strings"] = n_special
        reason = check(t, fcfg, source) if t.strip() else "empty_after_cleaning"
        r = {"source": source, "chars": raw_chars, "info": info, "reason": reason}
        if reason is None:
            r["clean_chars"] = len(t)
            r["key"] = exact_key(t)  # also decides the split
            r["sig"] = signature(t, dcfg) if dcfg.near else None
            todo.append((len(out), t))
        out.append(r)
    if todo:
        ids = enc.encode_batch([t for _, t in todo])
        for (k, _), x in zip(todo, ids):
            out[k]["ids"] = np.asarray(x, dtype=np.uint32)
    return out


def _chunks(docs, n: int, max_docs: int | None, max_chars: int):
    buf = []
    if max_docs is not None:  # islice asks the reader for no record past the last one used
        docs = itertools.islice(docs, max_docs)
    for d in docs:
        for piece in split_long(d.text, max_chars):
            buf.append((piece, d.source))
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def _is_val(key: bytes, seed: int, frac: float) -> bool:
    if frac <= 0:
        return False
    h = hashlib.sha1(key + seed.to_bytes(8, "little")).digest()
    return int.from_bytes(h[:8], "little") / 2.0 ** 64 < frac


# ---------------------------------------------------------------------------------------------
# Mixture

def mixture_plan(available: dict[str, int], weights: dict[str, float] | None,
                 total_tokens: int | None = None) -> dict[str, dict]:
    """Per-source token quotas for the train split. ``available``: tokens per source after cleaning.

    Returns {source: {"weight", "share", "available", "quota"}} for sources that get tokens. Sources
    with no weight get none (reported by the caller); weighted sources with no data are dropped and the
    remaining weights renormalized (reported as "missing").
    """
    if not weights:
        return {s: {"weight": None, "share": n / max(sum(available.values()), 1), "available": n, "quota": n}
                for s, n in available.items()}
    w = {s: float(x) for s, x in weights.items() if x > 0 and available.get(s, 0) > 0}
    if not w:
        raise ValueError(f"mixture {weights} names no source with data (sources: {sorted(available)})")
    tot = sum(w.values())
    share = {s: x / tot for s, x in w.items()}
    T = total_tokens if total_tokens else min(available[s] / share[s] for s in w)
    return {s: {"weight": w[s], "share": share[s], "available": available[s], "quota": int(round(share[s] * T))}
            for s in w}


def _select_docs(lengths: np.ndarray, quota: int, rng: np.random.Generator) -> list[int]:
    """Indices of documents (repeating whole shuffled passes as needed) until ``quota`` tokens are reached."""
    out, taken = [], 0
    n = len(lengths)
    if n == 0 or quota <= 0:
        return out
    total = int(lengths.sum())
    full = quota // total if total else 0
    for _ in range(full):
        out.extend(rng.permutation(n).tolist())
        taken += total
    for i in rng.permutation(n):
        if taken >= quota:
            break
        out.append(int(i))
        taken += int(lengths[i])
    return out


# ---------------------------------------------------------------------------------------------
# Driver

def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole pipeline; returns the report (also written to <out>/report.json). A run that fails
    leaves the previous output as it was, and no output folder when there was none."""
    with output_dir(cfg.out):
        return _prepare(cfg)


def _prepare(cfg: PrepareConfig) -> dict:
    from dhad.data.encoder import Encoder

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    out = Path(cfg.out)
    enc = Encoder(cfg.tokenizer)
    stats = ReadStats()
    inputs = expand_inputs(cfg.inputs, cfg.data_root)
    docs = read_documents(inputs, stats, text_fields=cfg.text_fields, txt_mode=cfg.txt_mode,
                          max_chars=cfg.max_doc_chars, allow_hub=cfg.allow_hub)
    dedup = Deduplicator(cfg.dedup)

    rules: dict[str, Counter] = defaultdict(Counter)      # rule -> {"docs", "chars"}
    by_source: dict[str, Counter] = defaultdict(Counter)
    cleaning = Counter()
    staging = out / f".staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    writers: dict[tuple[str, str], ShardWriter] = {}
    common = dict(vocab_size=enc.vocab_size, eos_token_id=enc.eos_token_id, pad_token_id=enc.pad_token_id,
                  bos_token_id=enc.bos_token_id, tokenizer_hash=enc.hash, shard_tokens=cfg.shard_tokens)

    def writer(source, split):
        k = (source, split)
        if k not in writers:
            writers[k] = ShardWriter(staging, f"{len(writers):04d}", "pretrain", **common,
                                     extra={"source": source, "split": split})
        return writers[k]

    pool = None
    chunks = _chunks(docs, cfg.chunk_docs, cfg.max_docs, cfg.max_doc_chars)
    initargs = (cfg.tokenizer, cfg.clean, cfg.filters, cfg.dedup)
    if cfg.workers > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")  # a forked Rust tokenizer thread pool can deadlock; spawn is safe
        pool = ctx.Pool(cfg.workers, initializer=_worker_init, initargs=initargs)
        results = pool.imap(_process_chunk, chunks)
    else:
        _worker_init(*initargs)
        results = map(_process_chunk, chunks)
    bar = tqdm(desc="prepare", unit="doc", disable=not cfg.progress, file=sys.stderr) if tqdm else None
    n_pieces = 0   # documents after cutting long ones (split_long): each gets exactly one entry in `rules`
    try:
        for res in results:
            for r in res:
                src = r["source"]
                n_pieces += 1
                by_source[src]["docs_read"] += 1
                by_source[src]["chars_read"] += r["chars"]
                for k, v in r["info"].items():
                    cleaning[k] += v
                reason = r["reason"]
                if reason is None:
                    reason = dedup.check(r["key"], r["sig"])
                if reason is not None:
                    rules[reason]["docs"] += 1
                    rules[reason]["chars"] += r["chars"]
                    by_source[src][f"dropped:{reason}"] += 1
                    continue
                split = "validation" if _is_val(r["key"], cfg.seed, cfg.val_fraction) else "train"
                ids = r["ids"]
                writer(src, split).add(ids, source=src)
                by_source[src]["docs_kept"] += 1
                by_source[src]["chars_kept"] += r["clean_chars"]
                by_source[src][f"tokens_{split}"] += int(ids.size) + 1  # + EOS
                rules["kept"]["docs"] += 1
                rules["kept"]["chars"] += r["chars"]
            if bar is not None:
                bar.update(len(res))
        if pool is not None:
            pool.close()
            pool.join()
        if stats.records == 0:
            raise NoInput(stats)
    except BaseException:
        if pool is not None:
            pool.terminate()
        for w in writers.values():
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    for w in writers.values():
        w.close()

    # --- mixture + final shards ------------------------------------------------------------
    staged: dict[str, dict[str, ShardSet]] = defaultdict(dict)
    plan: dict = {}
    avail: dict = {}
    mix_in = dict(cfg.mix) if cfg.mix else None
    finals: list[ShardWriter] = []
    try:
        for (src, split), w in writers.items():
            staged[split][src] = ShardSet.open(staging, w.split)
        avail = {s: ss.n_tokens for s, ss in staged["train"].items()}
        plan = mixture_plan(avail, mix_in, cfg.total_tokens) if avail else {}
        rng = np.random.default_rng(cfg.seed)
        extra = {"tokenizer": str(cfg.tokenizer), "report": "../report.json"}
        split_tokens = {}
        for split in ("train", "validation"):
            order: list[tuple[str, int]] = []
            srcs = sorted(staged[split])
            for s in srcs:
                ss = staged[split][s]
                lens = np.diff(np.append(ss.doc_starts, ss.n_tokens))
                if split == "train":
                    if s not in plan:
                        continue
                    idx = _select_docs(lens, plan[s]["quota"], rng)
                    plan[s]["tokens"] = int(lens[idx].sum()) if idx else 0
                    plan[s]["epochs"] = plan[s]["tokens"] / max(int(lens.sum()), 1)
                else:
                    idx = list(range(len(lens)))
                order += [(s, i) for i in idx]
            perm = rng.permutation(len(order)) if order else []
            w = ShardWriter(out, split, "pretrain", **common, extra={**extra, "mixture": plan if split == "train" else None})
            finals.append(w)
            for j in perm:
                s, i = order[j]
                w.add(staged[split][s].doc(i), source=s)
            split_tokens[split] = w.meta["n_tokens"]
        for w in finals:  # publish only once both splits are complete
            w.close()
    except BaseException:
        for w in finals:
            w.abort()
        raise
    finally:  # staging is scratch space: gone whether the mixture succeeded or not
        staged.clear()
        shutil.rmtree(staging, ignore_errors=True)

    excluded = sorted(set(avail) - set(plan))
    missing = sorted(set(mix_in or {}) - set(plan))
    report = {
        "inputs": stats.to_dict(),
        "documents": n_pieces,
        "rules": {k: dict(v) for k, v in sorted(rules.items(), key=lambda kv: -kv[1]["docs"])},
        "by_source": {s: dict(c) for s, c in sorted(by_source.items())},
        "cleaning": dict(cleaning),
        "mixture": plan, "mixture_excluded_sources": excluded, "mixture_missing_sources": missing,
        "splits": split_tokens,
        "tokenizer": {"path": str(cfg.tokenizer), "hash": enc.hash, "vocab_size": enc.vocab_size,
                      "eos_token_id": enc.eos_token_id},
        "config": _jsonable(asdict(cfg)),
    }
    _write_json_atomic(out / "report.json", report)
    return report


def format_report(report: dict) -> str:
    """The report as a plain-text table (kept/dropped per rule, read problems, per source, mixture)."""
    lines = []
    rules = report["rules"]
    total_docs = sum(v.get("docs", 0) for v in rules.values()) or 1
    lines.append(f"{'rule':<24}{'docs':>10}{'%':>8}{'chars':>14}")
    for k, v in rules.items():
        lines.append(f"{k:<24}{v.get('docs', 0):>10}{100 * v.get('docs', 0) / total_docs:>7.1f}%{v.get('chars', 0):>14}")
    inp = report["inputs"]
    cut = report.get("documents", inp["records"]) - inp["records"]
    lines.append(f"\nread: {inp['files']} files, {inp['records']} records"
                 + (f" ({report['documents']} documents after cutting long ones)" if cut else ""))
    for k, v in inp["skipped"].items():
        ex = ", ".join(inp["skipped_examples"].get(k, [])[:2])
        lines.append(f"  skipped {k:<18}{v:>8}   e.g. {ex}")
    lines.append(f"\n{'source':<28}{'read':>9}{'kept':>9}{'train tok':>12}{'val tok':>10}")
    for s, c in report["by_source"].items():
        lines.append(f"{s:<28}{c.get('docs_read', 0):>9}{c.get('docs_kept', 0):>9}"
                     f"{c.get('tokens_train', 0):>12}{c.get('tokens_validation', 0):>10}")
    if report.get("mixture"):
        lines.append(f"\n{'mixture':<28}{'share':>8}{'avail':>12}{'tokens':>12}{'epochs':>8}")
        for s, m in report["mixture"].items():
            lines.append(f"{s:<28}{m['share']:>8.3f}{m['available']:>12}{m.get('tokens', 0):>12}{m.get('epochs', 0):>8.2f}")
    if report.get("mixture_excluded_sources"):
        lines.append(f"sources without a mixture weight (not in train): {', '.join(report['mixture_excluded_sources'])}")
    if report.get("mixture_missing_sources"):
        lines.append(f"weighted sources with no data: {', '.join(report['mixture_missing_sources'])}")
    lines.append("\nsplits: " + ", ".join(f"{k} {v:,} tokens" for k, v in report["splits"].items()))
    return "\n".join(lines)


def parse_mix(spec: str | None) -> dict | None:
    """``"english=2,arabic=1,code=0.4"`` or a card preset name (CARD_MIXES) -> weights."""
    if not spec:
        return None
    if spec in CARD_MIXES:
        return dict(CARD_MIXES[spec])
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part and ":" not in part:
            raise ValueError(f"mixture item {part!r}: expected SOURCE=WEIGHT (or a preset: {', '.join(CARD_MIXES)})")
        k, v = part.replace(":", "=", 1).split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"mixture item {part!r}: weight {v!r} is not a number") from None
        if out[k.strip()] < 0:
            raise ValueError(f"mixture item {part!r}: negative weight")
    return out


def load_report(out_dir) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text(encoding="utf-8"))
