"""`dhad data prepare`: raw text -> cleaned, filtered, deduplicated, tokenized pretraining shards, as
datatrove pipeline stages (dhad.data.steps) on datatrove's local, Slurm or Ray executor. There is one
pipeline: a single machine runs it with the local executor (``--tasks N --workers W``).

    read (readers) -> clean -> quality filters -> tokenize -> [exact + near dedup] -> train/validation split
    -> mixture -> <out>/train, <out>/validation, <out>/report.json

    stage     tasks                     steps (dhad.data.steps)
    process   N (``tasks``)             ReadDocuments, CleanText, QualityFilter, Tokenize, StageShards, MinhashSignature
    buckets   bands + 1 (x bucket_workers)  datatrove's MinhashDedupBuckets
    dedup     1                         FirstOccurrenceDedup
    merge     1                         MergeShards

* Inputs are planned once, here: expanded (dhad.data.readers.expand_inputs; local paths or fsspec URLs),
  large uncompressed JSON-lines files cut into byte ranges, and the resulting units given to the N tasks
  as contiguous, byte-balanced runs. Task order is input order, so the output (kept documents, splits,
  mixture, shard bytes) is the same for any N and any number of workers (tests/test_data_pipeline.py).
* Dedup: "first occurrence wins" over datatrove's MinHash buckets (dhad.data.dedup.first_occurrence) —
  the decisions of the sequential ``Deduplicator``.
* The split is decided per document from a hash of its text (and ``seed``): a duplicate can never land
  on both sides, and adding files does not reshuffle earlier documents between splits.
* Mixture (dhad.data.mixture): ``mix={"english": 283, "arabic": 141, "code": 56}`` are relative token
  weights for the train split; without ``total_tokens`` the total is the largest no source has to repeat
  for; with it, short sources repeat. Validation keeps the natural proportions.
* Every document that does not make it is counted under exactly one reason (a read problem, a filter
  rule, exact/near duplicate); ``report.json`` holds it all with datatrove's merged stats; ``format_report``
  prints it.
* Resuming: with ``logging_dir`` (datatrove's logging folder: completions, stats, logs, and ``work/`` for
  the intermediate files) a rerun after a crash or ``kill -9`` skips the finished tasks and writes the
  same output. Without it the run works in ``<out>/.prepare-<pid>`` and removes it when done. Output is
  written atomically (ShardWriter), report.json last: a crash leaves the previous output as it was.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dhad.data.clean import CleanConfig
from dhad.data.dedup import DedupConfig, bucket_layout
from dhad.data.dedup import is_validation as _is_val  # noqa: F401  (sft and prefs split the same way)
from dhad.data.filters import FilterConfig
from dhad.data.mixture import CARD_MIXES, mixture_plan, parse_mix  # noqa: F401  (public names of this module)
from dhad.data.readers import HubDisabled, NoInput, _is_hf_dataset, expand_inputs, is_url, splittable
from dhad.data.shards import output_dir
from dhad.utils import jsonable as _jsonable

EXECUTORS = ("local", "slurm", "ray")
MIN_UNIT_BYTES = 1 << 20   # a JSON-lines file is cut into byte ranges of at least this much
STAGES = ("process", "buckets", "dedup", "merge")


class ExecutorError(ValueError):
    """The chosen executor cannot run as configured (an unknown or missing option, a missing package)."""


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
    workers: int = 2              # tasks run at once (local: processes; slurm/ray: -1 = no limit)
    chunk_docs: int = 128         # documents per tokenizer batch
    allow_hub: bool = False
    shard_tokens: int = 1 << 27
    max_docs: int | None = None   # read only the first N records (input order: one task)
    progress: bool = True         # datatrove's log lines on the console
    executor: str = "local"       # local | slurm | ray
    tasks: int | None = None      # tasks of the per-document stage (default: see default_tasks)
    logging_dir: str | None = None  # datatrove logging folder (+ work/): keep it to resume; needed off-machine
    executor_options: dict = field(default_factory=dict)  # {slurm|ray|local: {...}, stages: {stage: {...}}}
    bucket_workers: int = 1       # datatrove tasks per MinHash bucket (hash ranges)


def default_tasks(cfg: PrepareConfig, n_inputs: int, n_bytes: int) -> int:
    """One task when ``max_docs`` is set (the first N records in input order); locally 4 per worker (small
    tasks balance the workers' load) but no more than one per MiB of input; elsewhere one per input."""
    if cfg.max_docs is not None:
        return 1
    if cfg.executor == "local":
        return max(1, min(4 * max(1, cfg.workers), -(-n_bytes // MIN_UNIT_BYTES)))
    return max(1, n_inputs)


def bucket_tasks(cfg: PrepareConfig, n_buckets: int, tasks: int) -> int:
    """Tasks of the bucket stage: locally one per worker, at most one per first-stage task (each does
    several buckets; a small run does not start a pool for them); elsewhere one per bucket, times
    ``bucket_workers`` (datatrove's hash-range split of a bucket)."""
    if cfg.executor == "local" and cfg.bucket_workers <= 1:
        return max(1, min(n_buckets, tasks, cfg.workers if cfg.workers > 0 else n_buckets))
    return n_buckets * max(1, cfg.bucket_workers)


# ---------------------------------------------------------------------------------------------
# Planning: inputs -> units -> tasks

def _size(spec: str) -> int:
    try:
        if is_url(spec):
            import fsspec
            fs, path = fsspec.core.url_to_fs(spec)
            return int(fs.size(path) or 0)
        return os.path.getsize(spec) if not _is_hf_dataset(spec) else 0
    except (OSError, ValueError):
        return 0


def plan_units(files: list[tuple[str, str]], tasks: int, sizes: list[int] | None = None) -> tuple[list[tuple], list[int]]:
    """(units, bounds): the inputs as read units — a file, or a byte range of a large uncompressed JSON-lines
    file (so one big file still spreads over the tasks) — and task r's units ``units[bounds[r]:bounds[r+1]]``,
    contiguous and balanced by bytes."""
    sizes = sizes if sizes is not None else [_size(spec) for spec, _ in files]
    target = max(sum(sizes) / max(tasks, 1), MIN_UNIT_BYTES)
    units, weights = [], []
    for (spec, source), size in zip(files, sizes):
        parts = min(tasks, int(size // target) + (size % target > 0)) if size > target and splittable(spec) else 1
        for k in range(parts):
            units.append((spec, source, (k * size // parts, (k + 1) * size // parts)) if parts > 1 else (spec, source))
            weights.append(size / parts + 1)
    total, acc, bounds = sum(weights), 0.0, [0]
    for i, w in enumerate(weights):
        acc += w
        while len(bounds) < tasks and acc >= total * len(bounds) / tasks - 1e-9:
            bounds.append(i + 1)
    bounds += [len(units)] * (tasks + 1 - len(bounds))
    return units, bounds


@dataclass
class Plan:
    units: list[tuple]
    bounds: list[int]
    sources: list[str]
    tokenizer: dict
    tasks: int


def plan(cfg: PrepareConfig) -> Plan:
    """Check the configuration and plan the inputs (raises ValueError / HubDisabled before anything runs)."""
    from dhad.data.steps import _encoder
    if cfg.executor not in EXECUTORS:
        raise ExecutorError(f"executor must be one of {', '.join(EXECUTORS)}, got {cfg.executor!r}")
    if is_url(cfg.out):
        raise ValueError(f"--out {cfg.out}: the shards must be written to a local folder (trainers memory-map "
                         "them); inputs and --logging-dir may be fsspec URLs")
    if cfg.max_docs is not None and cfg.tasks not in (None, 1):
        raise ValueError("--max-rows reads the first N records in input order: it runs as one task (--tasks 1)")
    if cfg.tasks is not None and cfg.tasks < 1:
        raise ValueError(f"--tasks must be >= 1, got {cfg.tasks}")
    files = expand_inputs(cfg.inputs, cfg.data_root)
    for spec, _ in files:
        if _is_hf_dataset(spec) and not cfg.allow_hub:
            raise HubDisabled(f"{spec}: Hugging Face datasets are downloaded only with --hf (allow_hub=True)")
    sources = sorted({s for _, s in files})
    if cfg.mix and not any(w > 0 and s in sources for s, w in cfg.mix.items()):
        raise ValueError(f"mixture {cfg.mix} names no source with data (sources: {sources})")
    enc = _encoder(str(cfg.tokenizer))
    tok = {"path": str(cfg.tokenizer), "hash": enc.hash, "vocab_size": enc.vocab_size,
           "eos_token_id": enc.eos_token_id, "pad_token_id": enc.pad_token_id, "bos_token_id": enc.bos_token_id}
    sizes = [_size(spec) for spec, _ in files]
    tasks = cfg.tasks or default_tasks(cfg, len(files), sum(sizes))
    units, bounds = plan_units(files, tasks, sizes)
    return Plan(units, bounds, sources, tok, tasks)


def _fingerprint(cfg: PrepareConfig, p: Plan) -> dict:
    """What the files of a logging folder depend on: a rerun must agree on all of it to reuse them."""
    keep = ("text_fields", "txt_mode", "max_doc_chars", "clean", "filters", "dedup", "val_fraction", "seed",
            "mix", "total_tokens", "shard_tokens", "max_docs", "bucket_workers")
    d = {k: v for k, v in asdict(cfg).items() if k in keep}
    return _jsonable({**d, "out": os.path.abspath(cfg.out), "tasks": p.tasks, "units": p.units, "bounds": p.bounds,
                      "tokenizer_hash": p.tokenizer["hash"]})


def _claim_logging_dir(logging_dir: str, fp: dict) -> None:
    from datatrove.io import get_datafolder
    folder = get_datafolder(logging_dir)
    name = "dhad-prepare.json"
    if folder.exists(name):
        with folder.open(name, "r") as f:
            old = json.load(f)
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise ValueError(f"logging dir {logging_dir} holds a run of another configuration (differs in: "
                             f"{', '.join(diff)}); use a new --logging-dir to start over")
        return
    with folder.open(name, "w") as f:
        json.dump(fp, f, ensure_ascii=False, indent=1)


# ---------------------------------------------------------------------------------------------
# Stages and executors

@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


def build_stages(cfg: PrepareConfig, p: Plan, logging_dir: str) -> list[Stage]:
    """The pipeline of every stage (dhad.data.steps), reading and writing ``<logging_dir>/work``."""
    from dhad.data import steps

    quiet = not cfg.progress
    work = f"{logging_dir}/work"
    n_buckets = bucket_layout(cfg.dedup)[0]
    single_thread = cfg.executor != "local" or min(cfg.workers if cfg.workers > 0 else p.tasks, p.tasks) > 1
    process = [
        steps.ReadDocuments(p.units, p.bounds, work, text_fields=cfg.text_fields, txt_mode=cfg.txt_mode,
                            max_doc_chars=cfg.max_doc_chars, allow_hub=cfg.allow_hub, max_docs=cfg.max_docs,
                            quiet=quiet),
        steps.CleanText(cfg.clean, cfg.tokenizer, work, quiet=quiet),
        steps.QualityFilter(cfg.filters, work, quiet=quiet),
        steps.Tokenize(cfg.tokenizer, batch_size=cfg.chunk_docs, seed=cfg.seed, val_fraction=cfg.val_fraction,
                       single_thread=single_thread, quiet=quiet),
        steps.StageShards(work, p.sources, p.tokenizer["vocab_size"], p.tokenizer["eos_token_id"], quiet=quiet),
    ]
    stages = []
    if n_buckets:
        process.append(steps.MinhashSignature(f"{work}/sigs", cfg.dedup, quiet=quiet))
        stages = [
            Stage("buckets", [steps.DedupBuckets(f"{work}/sigs", f"{work}/dups", cfg.dedup, quiet=quiet)],
                  bucket_tasks(cfg, n_buckets, p.tasks)),
            Stage("dedup", [steps.FirstOccurrenceDedup(f"{work}/dups", f"{work}/dedup", cfg.dedup, quiet=quiet)], 1),
        ]
    stats_dirs = {s: f"{logging_dir}/{s}/stats" for s in ("process", *(st.name for st in stages))}
    merge = steps.MergeShards(work, os.path.abspath(cfg.out), p.tasks, p.sources, p.tokenizer, cfg.mix,
                              cfg.total_tokens, cfg.seed, cfg.shard_tokens, _jsonable(asdict(cfg)), stats_dirs,
                              dedup=bool(n_buckets), quiet=quiet)
    return [Stage("process", process, p.tasks), *stages, Stage("merge", [merge], 1)]


def _executor_class(name: str):
    if name == "local":
        from datatrove.executor import LocalPipelineExecutor
        return LocalPipelineExecutor
    if name == "slurm":
        from datatrove.executor import SlurmPipelineExecutor
        return SlurmPipelineExecutor
    from datatrove.executor.ray import RayPipelineExecutor
    return RayPipelineExecutor


RESERVED = ("pipeline", "tasks", "logging_dir", "depends")
DRIVER_OPTIONS = {"ray": ("address", "runtime_env")}   # ray.init's, not the executor's


def executor_kwargs(cfg: PrepareConfig, stage: str) -> dict:
    """The executor's keyword arguments for a stage: ``executor_options[<executor>]`` overridden by
    ``executor_options["stages"][<stage>]`` (see docs/examples/prepare-*.yaml); checked against the
    datatrove executor's signature."""
    opts = cfg.executor_options or {}
    unknown = set(opts) - {*EXECUTORS, "stages"}
    if unknown:
        raise ExecutorError(f"executor options: unknown section(s) {sorted(unknown)} (expected {', '.join(EXECUTORS)}, stages)")
    per_stage = opts.get("stages") or {}
    if set(per_stage) - set(STAGES):
        raise ExecutorError(f"executor options: unknown stage(s) {sorted(set(per_stage) - set(STAGES))} (stages: {', '.join(STAGES)})")
    kw = {**(opts.get(cfg.executor) or {}), **(per_stage.get(stage) or {})}
    for k in DRIVER_OPTIONS.get(cfg.executor, ()):
        kw.pop(k, None)
    cls = _executor_class(cfg.executor)
    params = inspect.signature(cls.__init__).parameters
    bad = sorted(k for k in kw if k in RESERVED or k not in params)
    if bad:
        allowed = sorted(k for k in params if k not in (*RESERVED, "self"))
        raise ExecutorError(f"{cfg.executor} executor: unknown option(s) {bad} ({cls.__name__} takes: {', '.join(allowed)})")
    if cfg.executor == "slurm":
        missing = [k for k in ("partition", "time") if not kw.get(k)]
        if missing:
            raise ExecutorError(f"the slurm executor needs {' and '.join(missing)} (slurm: {{partition: ..., time: ...}} "
                                "in --executor-config; see docs/examples/prepare-slurm.yaml)")
        kw.setdefault("job_name", f"dhad-prepare-{stage}")
    return kw


def build_executors(cfg: PrepareConfig, logging_dir: str | None = None, p: Plan | None = None) -> list:
    """datatrove executors for the stages, each depending on the one before (datatrove's ``depends``:
    for Slurm, job dependencies; locally and on Ray, run in order). Nothing runs yet."""
    logging_dir = logging_dir or cfg.logging_dir
    if not logging_dir:
        raise ExecutorError(f"the {cfg.executor} executor needs --logging-dir (a folder all its machines can reach)")
    p = p or plan(cfg)
    cls = _executor_class(cfg.executor)
    executors, prev = [], None
    for st in build_stages(cfg, p, logging_dir):
        kw = executor_kwargs(cfg, st.name)
        workers = kw.pop("workers", cfg.workers)
        if cfg.executor == "local":
            workers = max(1, min(workers if workers > 0 else st.tasks, st.tasks))
        ex = cls(st.pipeline, tasks=st.tasks, workers=workers, logging_dir=f"{logging_dir}/{st.name}", depends=prev, **kw)
        ex.stage = st.name
        executors.append(ex)
        prev = ex
    return executors


# ---------------------------------------------------------------------------------------------
# Driver

def prepare(cfg: PrepareConfig) -> dict | None:
    """Run the pipeline; returns the report (also written to <out>/report.json). A run that fails leaves
    the previous output as it was, and no output folder when there was none. With the Slurm executor the
    stages are submitted as dependent job arrays and this returns None (the last job writes the report)."""
    if cfg.executor != "local" and not cfg.logging_dir:
        raise ExecutorError(f"the {cfg.executor} executor needs --logging-dir (a folder all its machines can reach)")
    p = plan(cfg)
    if cfg.executor == "slurm":
        executors = build_executors(cfg, p=p)
        _claim_logging_dir(cfg.logging_dir, _fingerprint(cfg, p))
        executors[-1].run()   # datatrove submits the dependencies first
        return None
    with output_dir(cfg.out) as out:
        _remove_dead_work_dirs(out)
        temporary = cfg.logging_dir is None
        logging_dir = str(out / f".prepare-{os.getpid()}") if temporary else cfg.logging_dir
        done = False
        try:
            executors = build_executors(cfg, logging_dir, p)
            _claim_logging_dir(logging_dir, _fingerprint(cfg, p))
            if cfg.executor == "ray":
                _ray_init(cfg)
            quiet = not cfg.progress
            if quiet:
                from loguru import logger
                logger.disable("datatrove")
            try:
                if executors[-1].get_incomplete_ranks():   # else a finished run: its report is the answer
                    for ex in executors:
                        ex.run()
                        if ex.stage == "process":
                            _check_read(logging_dir, p)
            finally:
                if quiet:
                    from loguru import logger
                    logger.enable("datatrove")
            if not (out / "report.json").exists():
                raise ValueError(f"{logging_dir} records a finished run, but {out} has no report.json "
                                 "(was the output removed?); use a new --logging-dir")
            report = load_report(out)
            done = True
            return report
        finally:
            if temporary:
                shutil.rmtree(logging_dir, ignore_errors=True)
            elif done:
                _remove_work(logging_dir)


def _check_read(logging_dir: str, p: Plan) -> None:
    """After the first stage: not a single record read is a user error, said before the later stages."""
    from datatrove.io import get_datafolder

    from dhad.data.steps import read_counts
    read, _ = read_counts(get_datafolder(f"{logging_dir}/work"), p.tasks)
    if read.records == 0:
        raise NoInput(read)


def _remove_work(logging_dir: str) -> None:
    """A finished run's intermediate files (staged tokens, signatures); logs, stats and completions stay."""
    from datatrove.io import get_datafolder
    folder = get_datafolder(logging_dir)
    if folder.exists("work"):
        folder.rm("work", recursive=True)


def _remove_dead_work_dirs(out: Path) -> None:
    """``<out>/.prepare-<pid>`` folders of runs that were killed (their process is gone)."""
    for d in out.glob(".prepare-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


def _ray_init(cfg: PrepareConfig) -> None:
    try:
        import ray
    except ImportError:
        raise ExecutorError("the ray executor needs Ray: pip install 'dhad[ray]'") from None
    if not ray.is_initialized():
        opts = (cfg.executor_options or {}).get("ray") or {}
        ray.init(**{k: opts[k] for k in DRIVER_OPTIONS["ray"] if k in opts})


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
    if report.get("pipeline"):
        pl = report["pipeline"]
        lines.append(f"datatrove {pl['executor']} executor: {pl['tasks']} tasks reading the inputs; stages "
                     + " -> ".join(pl["stages"]))
    return "\n".join(lines)


def load_report(out_dir) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text(encoding="utf-8"))
