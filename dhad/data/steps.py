"""`dhad data prepare` as datatrove pipeline steps: the same readers, Arabic-aware cleaning, quality filters,
tokenizer and exact + near dedup, run by any datatrove executor (local processes, a Slurm job array, Ray),
resumable task by task, reading and writing through datatrove DataFolders (any fsspec path).

Four stages (dhad.data.prepare builds and runs them):

    1 process  N tasks   ReadDocuments -> CleanText -> QualityFilter -> Tokenize -> StageShards -> MinhashSignature
    2 buckets  B tasks   DedupBuckets: datatrove's MinhashDedupBuckets (one bucket per LSH band + the exact key)
    3 dedup    1 task    FirstOccurrenceDedup: first occurrence wins, as in dhad's sequential dedup
    4 merge    1 task    MergeShards: held-out split, mixture, dhad shards (train/validation), report.json

Task r of stage 1 reads the inputs ``files[bounds[r]:bounds[r + 1]]`` — a contiguous run of files, in
order — so "(task, position in the task)" is the input order for any number of tasks. Dedup decisions
(the earliest kept document wins), the split (a hash of the text) and the mixture (a seeded shuffle of
the documents in input order) therefore do not depend on the number of tasks: 1 task and N tasks write
the same bytes (tests/test_data_pipeline.py).

Work folder (``work``), one set of files per task, overwritten when a task is rerun::

    counts/{rank:05d}.{read,clean,filter}.json   dhad's counters: read problems with their locations,
                                                 per-rule and per-source documents and characters, cleaning
    staged/{rank:05d}.tokens                     ids of the documents that passed the filters, EOS after each
    staged/{rank:05d}.docs                       one DOC record per staged document
    sigs/bucket_{b:03d}/{rank:05d}.minhash.sig   datatrove MinHash stage 1 (sorted bucket values)
    dups/{bucket:05d}_{worker:02d}.dups          datatrove MinHash stage 2 (pairs sharing a bucket value)
    dedup/{rank:05d}.remove, .reason             documents to drop (datatrove's .remove format) and why

Every step also updates datatrove's per-step stats (``dropped_<rule>`` for the filters, as datatrove's
filters do); the merge step adds the merged stats of the stages to the report (``report["datatrove"]``).
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupSignature)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.batching import batched
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.stats import PipelineStats, Stats
from datatrove.utils.word_tokenizers import WordTokenizer

from dhad.data.clean import CleanConfig, clean_text
from dhad.data.dedup import DedupConfig, bucket_layout, bucket_values, exact_key, first_occurrence, is_validation
from dhad.data.filters import FilterConfig, check
from dhad.data.mixture import mixture_plan, select_docs
from dhad.data.readers import NoInput, ReadStats, read_documents, split_long
from dhad.data.shards import ShardWriter, _write_json_atomic, token_dtype

# One record per staged document (stage 1 -> merge).
DOC = np.dtype([("tokens", "<i8"), ("source", "<u4"), ("val", "u1"), ("raw_chars", "<i8"), ("clean_chars", "<i8")])
REASONS = {1: "exact_duplicate", 2: "near_duplicate"}
COUNTED_STEPS = ("read", "clean", "filter")


def minhash_config(dedup: DedupConfig) -> MinhashConfig | None:
    """datatrove's MinhashConfig with dhad's parameters: datasketch's LSH bands for ``dedup.threshold`` and
    ``num_perm`` (0.8, 128: 9 bands of 13 hashes), plus the exact-key bucket; 32-bit values (datasketch's
    hash values are 32-bit)."""
    n, width, _ = bucket_layout(dedup)
    if not n:
        return None
    return MinhashConfig(n_grams=dedup.ngram, num_buckets=n, hashes_per_bucket=width, seed=dedup.seed,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


_ENCODERS: dict = {}


def _encoder(path: str):
    """The tokenizer as the pipeline uses it (dhad.data.encoder.Encoder), loaded once per process."""
    if path not in _ENCODERS:
        from dhad.data.encoder import Encoder
        _ENCODERS[path] = Encoder(path)
    return _ENCODERS[path]


def _begin(step: PipelineStep, quiet: bool) -> None:
    """Start a task: fresh datatrove stats (an executor may run several tasks with the same step object —
    Slurm's ``tasks_per_job`` — and must not add one task's counts to the next) and, when quiet, no
    datatrove log lines on the console (they still go to the task's log file unless quiet)."""
    step.stats = Stats(str(step))
    if quiet:
        from loguru import logger
        logger.disable("datatrove")


def _add_nested(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict):
            _add_nested(dst.setdefault(k, {}), v)
        else:
            dst[k] = dst.get(k, 0) + v
    return dst


def write_counts(work, rank: int, step: str, counts: dict) -> None:
    with work.open(f"counts/{rank:05d}.{step}.json", "w") as f:
        json.dump(counts, f, ensure_ascii=False)


def read_counts(work, n_ranks: int) -> tuple[ReadStats, dict]:
    """Every task's counters, merged in task order: (read problems, the other counters summed)."""
    read, total = ReadStats(), {}
    for rank in range(n_ranks):
        for step in COUNTED_STEPS:
            name = f"counts/{rank:05d}.{step}.json"
            if not work.exists(name):
                raise RuntimeError(f"{work.resolve_paths(name)} is missing: stage 1 (process) did not finish task {rank}")
            with work.open(name, "r") as f:
                c = json.load(f)
            if "read" in c:
                read.merge(ReadStats.from_dict(c.pop("read")))
            _add_nested(total, c)
    return read, total


# ---------------------------------------------------------------------------------------------
# Stage 1: read -> clean -> filter -> tokenize -> stage (+ MinHash signatures)

class ReadDocuments(PipelineStep):
    """dhad's readers over this task's files (``files[bounds[rank]:bounds[rank + 1]]``): jsonl/json/txt/
    csv/tsv/parquet, compressed or not, local or fsspec URLs, or hf:NAME. Bad rows are counted under
    their reason with where they were, never fatal. Long documents are cut at paragraph breaks."""

    type = "📖 - READER"
    name = "📖 dhad readers"

    def __init__(self, files: list[tuple[str, str]], bounds: list[int], work: DataFolderLike,
                 text_fields: tuple[str, ...] = ("text",), txt_mode: str = "paragraph",
                 max_doc_chars: int = 50_000, allow_hub: bool = False, max_docs: int | None = None,
                 quiet: bool = False):
        super().__init__()
        self.files, self.bounds = [tuple(f) for f in files], list(bounds)
        self.work = get_datafolder(work)
        self.text_fields, self.txt_mode, self.max_doc_chars = tuple(text_fields), txt_mode, max_doc_chars
        self.allow_hub, self.max_docs, self.quiet = allow_hub, max_docs, quiet

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _begin(self, self.quiet)
        if world_size != len(self.bounds) - 1:
            raise ValueError(f"{world_size} tasks, but the inputs were planned for {len(self.bounds) - 1}")
        stats, by_source, n = ReadStats(), defaultdict(Counter), 0
        docs = read_documents(self.files[self.bounds[rank]:self.bounds[rank + 1]], stats,
                              text_fields=self.text_fields, txt_mode=self.txt_mode,
                              max_chars=self.max_doc_chars, allow_hub=self.allow_hub)
        if self.max_docs is not None:  # the reader reads no record past the last one used
            docs = islice(docs, self.max_docs)
        for d in docs:
            for k, piece in enumerate(split_long(d.text, self.max_doc_chars)):
                n += 1
                by_source[d.source]["docs_read"] += 1
                by_source[d.source]["chars_read"] += len(piece)
                self.stat_update("documents")
                yield Document(text=piece, id=d.origin if not k else f"{d.origin}#{k}",
                               metadata={"source": d.source, "raw_chars": len(piece)})
        for label, value in (("files", stats.files), ("records", stats.records),
                             *((f"skipped_{k}", v) for k, v in stats.skipped.items())):
            if value:
                self.stat_update(label, value=value, unit="task")
        write_counts(self.work, rank, "read", {"read": stats.to_dict(), "documents": n, "by_source": by_source})


class CleanText(PipelineStep):
    """dhad's Arabic-aware cleaning (dhad.data.clean: normalization keeping harakat order, controls,
    broken lines, boilerplate) and removal of special-token strings (a page holding ``<|endoftext|>``
    must not inject an EOS)."""

    type = "✂️ - FORMAT"
    name = "🧹 dhad clean"

    def __init__(self, clean: CleanConfig, tokenizer: str, work: DataFolderLike, quiet: bool = False):
        super().__init__()
        self.clean, self.tokenizer, self.work, self.quiet = clean, str(tokenizer), get_datafolder(work), quiet

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _begin(self, self.quiet)
        enc, cleaning = _encoder(self.tokenizer), Counter()
        for doc in data:
            with self.track_time():
                text, info = clean_text(doc.text, self.clean)
                text, n_special = enc.strip_specials(text)
                if n_special:
                    info["special_strings"] = n_special
                cleaning.update(info)
                doc.text = text
            yield doc
        for k, v in cleaning.items():
            if v:
                self.stat_update(k, value=v, unit="task")
        write_counts(self.work, rank, "clean", {"cleaning": cleaning})


class QualityFilter(BaseFilter):
    """dhad's Gopher/Jais-style quality rules (dhad.data.filters.check) as a datatrove filter: a dropped
    document is counted as ``dropped_<rule>`` (its first failing rule) in datatrove's stats, and with its
    characters and source in dhad's report."""

    name = "🚦 dhad quality filters"

    def __init__(self, filters: FilterConfig, work: DataFolderLike, quiet: bool = False):
        super().__init__()
        self.filters, self.work, self.quiet = filters, get_datafolder(work), quiet
        self._rules, self._by_source = defaultdict(Counter), defaultdict(Counter)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        reason = check(text, self.filters, doc.metadata["source"]) if text.strip() else "empty_after_cleaning"
        if reason is None:
            return True
        self._rules[reason]["docs"] += 1
        self._rules[reason]["chars"] += doc.metadata["raw_chars"]
        self._by_source[doc.metadata["source"]][f"dropped:{reason}"] += 1
        return False, reason

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _begin(self, self.quiet)
        self._rules, self._by_source = defaultdict(Counter), defaultdict(Counter)
        yield from super().run(data, rank, world_size)
        write_counts(self.work, rank, "filter", {"rules": self._rules, "by_source": self._by_source})


class Tokenize(PipelineStep):
    """Text -> ids with the tokenizer's one encode rule, exactly as the sequential pipeline calls it
    (``Encoder.encode_batch``: ``Tokenizer.encode`` without special tokens, in batches); also the
    document's exact key and from it the held-out split."""

    type = "🔢 - TOKENIZER"
    name = "🔢 dhad tokenize"

    def __init__(self, tokenizer: str, batch_size: int = 128, seed: int = 0, val_fraction: float = 0.01,
                 single_thread: bool = False, quiet: bool = False):
        super().__init__()
        self.tokenizer, self.batch_size, self.seed, self.val_fraction = str(tokenizer), batch_size, seed, val_fraction
        self.single_thread, self.quiet = single_thread, quiet

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _begin(self, self.quiet)
        if self.single_thread:  # one process per core: no Rust thread pool on top (set before the first encode)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            os.environ["RAYON_NUM_THREADS"] = "1"
        enc = _encoder(self.tokenizer)
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                ids = enc.encode_batch([d.text for d in batch])
            for d, x in zip(batch, ids):
                d.metadata["ids"] = x
                d.metadata["val"] = is_validation(exact_key(d.text), self.seed, self.val_fraction)
                self.stat_update("tokens", value=len(x) + 1)
                yield d


class StageShards(PipelineStep):
    """This task's surviving documents: ids (+ EOS, as dhad's ShardWriter adds it) in the shards' dtype,
    and one ``DOC`` record each (tokens, source, split, characters). Passes the documents on."""

    type = "💾 - WRITER"
    name = "💾 dhad staged tokens"

    def __init__(self, work: DataFolderLike, sources: list[str], vocab_size: int, eos_token_id: int,
                 quiet: bool = False):
        super().__init__()
        self.work, self.sources, self.quiet = get_datafolder(work), list(sources), quiet
        self.vocab_size, self.eos = int(vocab_size), int(eos_token_id)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _begin(self, self.quiet)
        dtype, index = token_dtype(self.vocab_size), {s: i for i, s in enumerate(self.sources)}
        recs: list[tuple] = []
        with self.work.open(f"staged/{rank:05d}.tokens", "wb") as tok_f, \
                self.work.open(f"staged/{rank:05d}.docs", "wb") as doc_f:
            for doc in data:
                ids = np.asarray(doc.metadata.pop("ids"), dtype=np.int64)
                if ids.size == 0 or ids[-1] != self.eos:
                    ids = np.append(ids, self.eos)
                if ids.min() < 0 or ids.max() >= self.vocab_size:
                    raise ValueError(f"{doc.id}: token id out of range [0, {self.vocab_size})")
                tok_f.write(ids.astype(dtype).tobytes())
                recs.append((ids.size, index[doc.metadata["source"]], doc.metadata.pop("val"),
                             doc.metadata["raw_chars"], len(doc.text)))
                if len(recs) >= 65536:
                    doc_f.write(np.array(recs, dtype=DOC).tobytes())
                    recs = []
                self.stat_update("staged")
                yield doc
            doc_f.write(np.array(recs, dtype=DOC).tobytes())


class _Words(WordTokenizer):
    """dhad's shingles come from dhad.data.dedup.signature, so datatrove's word tokenizer is never used;
    this one stands in for it (datatrove would otherwise load a language model's tokenizer)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class MinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 (per task and bucket: the bucket values of every document, sorted, in
    datatrove's signature-file format) with dhad's signature: datasketch's MinHash of word 5-grams
    (dhad.data.dedup.signature — the permutations dhad always used) cut into the LSH bands datasketch
    picks for the threshold, plus a bucket holding the exact key (dhad.data.dedup.bucket_values)."""

    name = "🎯 MinHash stage 1 (dhad signature + exact key)"

    def __init__(self, output_folder: DataFolderLike, dedup: DedupConfig, quiet: bool = False):
        self.dedup, self.quiet = dedup, quiet
        super().__init__(output_folder, config=minhash_config(dedup), language=_Words())

    def get_shingles(self, text: str) -> np.ndarray:
        return bucket_values(text, self.dedup)

    def get_signature(self, values: np.ndarray) -> list[list[int]]:
        return [x.tolist() for x in np.split(values, self.config.num_buckets)]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        _begin(self, self.quiet)
        return super().run(data, rank, world_size)


# ---------------------------------------------------------------------------------------------
# Stage 2: documents sharing a bucket value

class DedupBuckets(MinhashDedupBuckets):
    """datatrove's MinHash stage 2 unchanged (per bucket, a sorted merge of every task's signature files
    writing the pairs that share a value), and runnable with fewer tasks than buckets: then task r does
    buckets r, r + tasks, ... one after another (small runs need not start a task per bucket). With
    ``tasks = buckets x k`` datatrove splits each bucket's hash range over k tasks."""

    name = "🎯 MinHash stage 2"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, dedup: DedupConfig,
                 quiet: bool = False):
        super().__init__(input_folder, output_folder, config=minhash_config(dedup), lines_to_buffer=4096)
        self.quiet = quiet

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        _begin(self, self.quiet)
        n = self.config.num_buckets
        if world_size >= n:
            return super().run(data, rank, world_size)
        for bucket in range(rank, n, world_size):
            super().run(data, bucket, n)


# ---------------------------------------------------------------------------------------------
# Stage 3: first occurrence wins

class FirstOccurrenceDedup(MinhashDedupCluster):
    """datatrove's MinHash stage 3, with dhad's rule instead of datatrove's clusters: reads the pairs of
    datatrove's bucket stage and keeps, in input order, every document that shares no bucket with an
    earlier *kept* one (dhad.data.dedup.first_occurrence) — the sequential pipeline's decisions (datatrove
    keeps one document per connected cluster, which can differ: a~b, b~c, a!~c keeps a and c here).
    Writes ``{rank:05d}.remove`` (sorted uint32 document indices, datatrove's format) and ``.reason``
    (uint8: 1 exact, 2 near) for every task with drops."""

    name = "🎯 MinHash stage 3 (first occurrence wins)"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, dedup: DedupConfig,
                 quiet: bool = False):
        super().__init__(input_folder, output_folder, config=minhash_config(dedup), lines_to_buffer=4096)
        self.dedup, self.quiet = dedup, quiet
        self.exact_bucket = bucket_layout(dedup)[2]

    def _pairs(self):
        for name in self.input_folder.list_files(glob_pattern="*.dups"):
            bucket = int(Path(name).name.split("_")[0])
            with self.input_folder.open(name, "rb") as f:
                for f1, d1, f2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=self.lines_to_buffer):
                    yield bucket, f1 << 32 | d1, f2 << 32 | d2   # (task, index): input order

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        _begin(self, self.quiet)
        if world_size != 1:
            raise ValueError("the dedup stage runs as one task")
        with self.track_time():
            drop = first_occurrence(self._pairs(), self.exact_bucket)
            for name in self.output_folder.list_files():   # a rerun replaces every file
                self.output_folder.rm(name)
            per_task = defaultdict(list)
            for node, why in drop.items():
                per_task[node >> 32].append((node & 0xFFFFFFFF, 1 if why == "exact_duplicate" else 2))
                self.stat_update(why)
            for task, items in sorted(per_task.items()):
                items.sort()
                with self.output_folder.open(f"{task:05d}.remove", "wb") as f:
                    f.write(np.asarray([d for d, _ in items], dtype="<u4").tobytes())
                with self.output_folder.open(f"{task:05d}.reason", "wb") as f:
                    f.write(np.asarray([r for _, r in items], dtype="u1").tobytes())


# ---------------------------------------------------------------------------------------------
# Stage 4: split, mixture, dhad shards, report

def _load(folder, name: str, dtype) -> np.ndarray:
    """A raw little-endian array from a DataFolder: memory-mapped when local, read whole otherwise."""
    if not folder.exists(name):
        return np.zeros(0, dtype=dtype)
    if folder.is_local():
        path = folder.resolve_paths(name)
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")
    with folder.open(name, "rb") as f:
        return np.frombuffer(f.read(), dtype=dtype)


def _datatrove_stats(stats_dirs: dict[str, str]) -> dict:
    """The finished stages' datatrove stats, summed over their tasks (datatrove's own merge)."""
    out = {}
    for stage, d in stats_dirs.items():
        folder = get_datafolder(d)
        if not folder.exists(""):
            continue
        total = PipelineStats()
        for name in folder.list_files(glob_pattern="*.json"):
            with folder.open(name, "r") as f:
                total += PipelineStats.from_json(json.load(f))
        out[stage] = [s.to_dict() for s in total.stats]
    return out


class MergeShards(PipelineStep):
    """The last stage (one task): every staged document, in input order, either dropped as a duplicate or
    kept; kept ones go to train or validation by their hash, the train split gets the mixture (per-source
    quotas, repeats, a seeded shuffle), and both splits are written as dhad shards (``ShardWriter``: atomic,
    index.json) with ``report.json`` last. Byte for byte what the sequential pipeline writes."""

    type = "💾 - WRITER"
    name = "📦 dhad shards + report"

    def __init__(self, work: DataFolderLike, out: str, n_ranks: int, sources: list[str], tokenizer: dict,
                 mix: dict | None, total_tokens: int | None, seed: int, shard_tokens: int, config: dict,
                 stats_dirs: dict[str, str], dedup: bool, quiet: bool = False):
        super().__init__()
        self.work, self.out, self.n_ranks, self.sources = get_datafolder(work), str(out), int(n_ranks), list(sources)
        self.tokenizer, self.mix, self.total_tokens, self.seed = dict(tokenizer), mix, total_tokens, seed
        self.shard_tokens, self.config, self.stats_dirs = shard_tokens, config, dict(stats_dirs)
        self.dedup, self.quiet = dedup, quiet

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        _begin(self, self.quiet)
        if world_size != 1:
            raise ValueError("the merge stage runs as one task")
        with self.track_time():
            report = self.merge()
        self.stat_update("train_tokens", value=report["splits"]["train"], unit="task")
        self.stat_update("validation_tokens", value=report["splits"]["validation"], unit="task")

    def merge(self) -> dict:
        read, counts = read_counts(self.work, self.n_ranks)
        if read.records == 0:
            raise NoInput(read)
        tok = self.tokenizer
        dtype = token_dtype(tok["vocab_size"])
        # every staged document in input order: (task, offset in the task's tokens, length, ...)
        tokens, parts = [], []
        for r in range(self.n_ranks):
            tokens.append(_load(self.work, f"staged/{r:05d}.tokens", dtype))
            docs = np.array(_load(self.work, f"staged/{r:05d}.docs", DOC))
            reason = np.zeros(len(docs), dtype="u1")
            if self.dedup:
                drop = _load(self.work, f"dedup/{r:05d}.remove", "<u4").astype(np.int64)
                reason[drop] = _load(self.work, f"dedup/{r:05d}.reason", "u1")
            offsets = (np.cumsum(docs["tokens"]) - docs["tokens"]).astype(np.int64)
            parts.append((np.full(len(docs), r, dtype=np.int64), offsets, docs, reason))
        task = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        offset = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        docs = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, DOC)
        reason = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, "u1")

        rules = {k: dict(v) for k, v in counts.get("rules", {}).items()}
        by_source = {s: dict(c) for s, c in counts.get("by_source", {}).items()}
        kept = reason == 0
        for code, rule in REASONS.items():
            sel = reason == code
            if sel.any():
                rules[rule] = {"docs": int(sel.sum()), "chars": int(docs["raw_chars"][sel].sum())}
                for i, s in enumerate(self.sources):
                    n = int((sel & (docs["source"] == i)).sum())
                    if n:
                        by_source[s][f"dropped:{rule}"] = by_source[s].get(f"dropped:{rule}", 0) + n
        if kept.any():
            rules["kept"] = {"docs": int(kept.sum()), "chars": int(docs["raw_chars"][kept].sum())}
        split_of = np.where(docs["val"] == 1, 1, 0)   # 0 train, 1 validation
        for i, s in enumerate(self.sources):
            sel = kept & (docs["source"] == i)
            if not sel.any():
                continue
            c = by_source[s]
            c["docs_kept"] = int(sel.sum())
            c["chars_kept"] = int(docs["clean_chars"][sel].sum())
            for k, split in enumerate(("train", "validation")):
                t = int(docs["tokens"][sel & (split_of == k)].sum())
                if t:
                    c[f"tokens_{split}"] = t

        # the train sources in the order their first document arrives (the sequential pipeline's order)
        train_idx = np.flatnonzero(kept & (split_of == 0))
        first = {}
        for i in docs["source"][train_idx]:
            first.setdefault(int(i), None)
        staged = {"train": {}, "validation": {}}
        for k, split in enumerate(("train", "validation")):
            for i, s in enumerate(self.sources):
                idx = np.flatnonzero(kept & (split_of == k) & (docs["source"] == i))
                if idx.size:
                    staged[split][s] = idx
        avail = {self.sources[i]: int(docs["tokens"][staged["train"][self.sources[i]]].sum()) for i in first}
        mix_in = dict(self.mix) if self.mix else None
        plan = mixture_plan(avail, mix_in, self.total_tokens) if avail else {}

        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        for p in out.glob(".*.tmp-*"):   # a killed run's unfinished splits
            if p.name.startswith((".train.tmp-", ".validation.tmp-")):
                shutil.rmtree(p, ignore_errors=True)
        common = dict(vocab_size=tok["vocab_size"], eos_token_id=tok["eos_token_id"], pad_token_id=tok["pad_token_id"],
                      bos_token_id=tok["bos_token_id"], tokenizer_hash=tok["hash"], shard_tokens=self.shard_tokens)
        rng = np.random.default_rng(self.seed)
        extra = {"tokenizer": str(tok["path"]), "report": "../report.json"}
        split_tokens, finals = {}, []
        try:
            for split in ("train", "validation"):
                order: list[tuple[str, int]] = []
                for s in sorted(staged[split]):
                    lens = docs["tokens"][staged[split][s]]
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
                w = ShardWriter(out, split, "pretrain", **common,
                                extra={**extra, "mixture": plan if split == "train" else None})
                finals.append(w)
                for j in perm:
                    s, i = order[j]
                    g = staged[split][s][i]
                    w.add(tokens[task[g]][offset[g]:offset[g] + docs["tokens"][g]], source=s)
                split_tokens[split] = w.meta["n_tokens"]
            for w in finals:  # publish only once both splits are complete
                w.close()
        except BaseException:
            for w in finals:
                w.abort()
            raise

        excluded = sorted(set(avail) - set(plan))
        missing = sorted(set(mix_in or {}) - set(plan))
        report = {
            "inputs": read.to_dict(),
            "documents": counts.get("documents", 0),
            "rules": {k: v for k, v in sorted(rules.items(), key=lambda kv: (-kv[1]["docs"], kv[0]))},
            "by_source": {s: c for s, c in sorted(by_source.items())},
            "cleaning": counts.get("cleaning", {}),
            "mixture": plan, "mixture_excluded_sources": excluded, "mixture_missing_sources": missing,
            "splits": split_tokens,
            "tokenizer": {"path": str(tok["path"]), "hash": tok["hash"], "vocab_size": tok["vocab_size"],
                          "eos_token_id": tok["eos_token_id"]},
            "config": self.config,
            "pipeline": {"executor": self.config.get("executor"), "tasks": self.n_ranks,
                         "stages": [*self.stats_dirs, "merge"]},
            "datatrove": _datatrove_stats(self.stats_dirs),
        }
        _write_json_atomic(out / "report.json", report)
        return report
