"""Today's single-process `dhad data prepare`, kept as a reference — not a user-facing path.

`dhad data prepare` runs as datatrove pipeline steps (dhad.data.steps, driven by dhad.data.prepare) on
the local, Slurm or Ray executor. This module is the sequential, in-process algorithm that preceded it
(commit 9e1769b's ``prepare`` with ``workers=1``, unchanged but for the worker pool): read -> clean ->
filter -> tokenize -> exact + MinHash-LSH dedup in input order (datasketch's ``MinHashLSH``) -> split ->
mixture -> shards. It is imported only by the equality tests (tests/test_data_pipeline.py: one datatrove
task, and N tasks, give byte-identical shards) and by benchmarks/bench_prepare.py (the baseline the
datatrove pipeline's docs/s are measured against). No CLI flag reaches it.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dhad.data.clean import clean_text
from dhad.data.dedup import Deduplicator, exact_key, signature
from dhad.data.filters import check
from dhad.data.mixture import mixture_plan, select_docs
from dhad.data.readers import NoInput, ReadStats, expand_inputs, read_documents, split_long
from dhad.data.shards import ShardSet, ShardWriter, _write_json_atomic, output_dir
from dhad.utils import jsonable as _jsonable

_W: dict = {}


def reference_prepare(cfg) -> dict:
    """Run the sequential reference on a ``PrepareConfig`` (``executor``/``tasks``/``workers`` are ignored);
    returns the report (also written to <out>/report.json)."""
    with output_dir(cfg.out):
        return _reference(cfg)


def _worker_init(tokenizer, clean_cfg, filter_cfg, dedup_cfg):
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


def _reference(cfg) -> dict:
    from dhad.data.encoder import Encoder

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

    chunks = _chunks(docs, cfg.chunk_docs, cfg.max_docs, cfg.max_doc_chars)
    _worker_init(cfg.tokenizer, cfg.clean, cfg.filters, cfg.dedup)
    results = map(_process_chunk, chunks)
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
        if stats.records == 0:
            raise NoInput(stats)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
                    idx = select_docs(lens, plan[s]["quota"], rng)
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
        "pipeline": "reference",
    }
    _write_json_atomic(out / "report.json", report)
    return report
