"""`dhad eval`'s library function: tasks -> requests -> one scoring pass -> results and per-example logs.

    results = evaluate(model, tokenizer, ["arabicmmlu", "exams_ar", "acva"], shots=5, data_dir="data")

Every task's requests go through one `Scorer` call, so batches mix tasks and stay full. Aggregation
follows the harness: a task's score is the mean over all its evaluated rows (its groups use
`weight_by_size: true`), so subtasks (MMLU subjects, ACVA topics) weigh by their size. Per language
and overall we report the plain mean of the tasks' primary metric, like the cards' "Avg" columns.
"""
from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dhad.evaluate import tasks as T
from dhad.evaluate.scoring import Scorer, score_example


def primary_metric(task: T.Task) -> str:
    """The number a card's table shows: the task's `primary`, else acc_norm where the harness reports
    it, else acc (TruthfulQA mc2: its score)."""
    if task.primary:
        return task.primary
    return "acc_norm" if "acc_norm" in task.metrics else "acc"


@dataclass
class Record:
    """One evaluated row, as written to the per-example JSONL log."""
    task: str
    subtask: str | None
    doc_index: int
    gold: int
    choices: list[str]
    requests: list[tuple[str, str]]
    lls: list[float]
    greedy: list[bool]
    metrics: dict

    def to_json(self, full_context: bool = True) -> dict:
        ctxs = list(dict.fromkeys(c for c, _ in self.requests))
        return {"task": self.task, "subtask": self.subtask, "doc_index": self.doc_index,
                "context": ctxs[0] if len(ctxs) == 1 else None,
                "contexts": ctxs if len(ctxs) > 1 else None,
                "continuations": [x for _, x in self.requests], "choices": self.choices, "gold": self.gold,
                "loglikelihoods": self.lls, "is_greedy": self.greedy, **self.metrics}


def evaluate(model, tokenizer, tasks: Sequence[str | T.Task] | str, shots: int = 0, limit: int | None = None,
             data_dir=None, hub: bool = False, batch_tokens: int = 16384, max_rows: int = 64,
             model_path: str | None = None, progress: bool = True, records: list | None = None,
             task_files: dict | None = None) -> dict:
    """Evaluate `model` on `tasks`; returns the results dict (`report.write_results` saves it).

    Pass a list as `records` to receive the per-example `Record`s (for the JSONL log). `task_files`
    maps task names to a user's own data file (tasks whose data is not public: `--task-file`).
    A task none of whose rows can be evaluated (every row skipped, or no rows) is an error
    (`TaskError`, before any scoring), never an empty result.
    """
    task_list = T.resolve_tasks(tasks) if isinstance(tasks, str) else [
        t if isinstance(t, T.Task) else T.get_task(t) for t in tasks]
    if shots < 0:
        raise T.TaskError(f"--shots must be >= 0, got {shots}")
    if limit is not None and limit <= 0:
        raise T.TaskError(f"--limit must be positive, got {limit}")
    task_files = dict(task_files or {})
    unknown = sorted(set(task_files) - {t.name for t in task_list})
    if unknown:
        raise T.TaskError(f"--task-file given for {', '.join(unknown)}, which is not among the evaluated tasks")
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    examples: list[T.Example] = []
    per_task: dict[str, dict] = {}
    for task in task_list:
        k = shots if task.max_shots is None else min(shots, task.max_shots)
        splits = task.load(data_dir, hub=hub, file=task_files.get(task.name))
        ex, skips = T.build_examples(task, splits, shots=k, limit=limit)
        examples += ex
        per_task[task.name] = {"task": task, "shots": k, "skips": skips, "n_requested": shots}
    _check_nonempty(per_task, examples, shots)
    t_build = time.perf_counter() - t0

    scorer = Scorer(model, tokenizer, batch_tokens=batch_tokens, max_rows=max_rows)
    by_name = {t.name: t for t in task_list}
    n_req = sum(len(e.requests) for e in examples)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_req, desc="scoring", unit="req", disable=None)
    t1 = time.perf_counter()
    out = scorer.loglikelihood_tokens(encode_examples(scorer, tokenizer, examples, by_name), progress=bar)
    t_score = time.perf_counter() - t1
    if bar is not None:
        bar.close()

    recs: list[Record] = []
    for e, res in zip(examples, out):
        lls = [r[0] for r in res]
        task = by_name[e.task]
        m = task.process_results(lls, e) if task.process_results else score_example(lls, e.choices, e.gold, e.mc2_labels)
        recs.append(Record(e.task, e.subtask, e.doc_index, e.gold, e.choices, e.requests, lls,
                           [r[1] for r in res], m))
    if records is not None:
        records.extend(recs)

    seconds = time.perf_counter() - t0
    results = {
        "model": _model_info(model, model_path),
        "config": {"tasks": [t.name for t in task_list], "shots": shots, "limit": limit,
                   "task_files": {k: str(v) for k, v in task_files.items()} or None,
                   "data_dir": str(data_dir) if data_dir is not None else None, "hub": hub,
                   "fewshot_seed": T.FEWSHOT_SEED, "batch_tokens": batch_tokens, "max_rows": max_rows,
                   "max_length": scorer.max_length, "dhad_version": _version(), "python": platform.python_version()},
        "time": {"started": started.isoformat(timespec="seconds"), "seconds": round(seconds, 3),
                 "build_seconds": round(t_build, 3), "score_seconds": round(t_score, 3),
                 "examples": len(recs), "requests": n_req,
                 "examples_per_s": round(len(recs) / seconds, 3) if seconds > 0 else None},
        "tasks": {},
    }
    for name, info in per_task.items():
        task: T.Task = info["task"]
        rs = [r for r in recs if r.task == name]
        entry = {"lang": task.lang, "title": task.title, "harness": task.harness, "shots": info["shots"],
                 "n": len(rs), "skipped": len(info["skips"]), "primary": primary_metric(task),
                 "encoding": task.encoding}
        if info["shots"] != info["n_requested"]:
            entry["note"] = f"evaluated {info['shots']}-shot: the harness fixes this task's prompt"
        if info["skips"]:
            entry["skip_reasons"] = _count_reasons(info["skips"])
        entry.update(_aggregate(rs, task.metrics))
        subs = sorted({r.subtask for r in rs if r.subtask is not None})
        if subs:
            entry["subtasks"] = {s: {"n": sum(1 for r in rs if r.subtask == s),
                                     **_aggregate([r for r in rs if r.subtask == s], task.metrics, stderr=False)}
                                 for s in subs}
        results["tasks"][name] = entry
    results["languages"], results["average"] = _averages(results["tasks"])
    return results


def encode_examples(scorer: Scorer, tok, examples: Sequence[T.Example], tasks: dict[str, T.Task]):
    """Token pairs for every example's requests, by its task's encoding: lm-eval 0.4's (the scorer's,
    each distinct string encoded once) or lm-eval 0.3's (the Jais team's harness: context and
    continuation encoded separately without special tokens; an empty context is the EOS token)."""
    v3 = [i for i, e in enumerate(examples) if tasks[e.task].encoding == "v0.3"]
    if not v3:
        return scorer.encode_groups([e.requests for e in examples])
    v3_set = set(v3)
    modern = [i for i in range(len(examples)) if i not in v3_set]
    out: list = [None] * len(examples)
    for i, g in zip(modern, scorer.encode_groups([examples[i].requests for i in modern])):
        out[i] = g
    texts = list(dict.fromkeys(s for i in v3 for req in examples[i].requests for s in req if s))
    if hasattr(tok, "encode_batch"):
        enc = dict(zip(texts, tok.encode_batch(texts, add_special_tokens=False)))
    else:
        enc = {t: tok.encode(t, add_special_tokens=False) for t in texts}
    for i in v3:
        out[i] = [([tok.eos_token_id] if ctx == "" else list(enc[ctx]), list(enc[cont]) if cont else [])
                  for ctx, cont in examples[i].requests]
    return out


def _check_nonempty(per_task: dict, examples: list[T.Example], shots: int) -> None:
    """Every requested task must have rows to score: a run that skipped them all fails, saying why."""
    have = {e.task for e in examples}
    problems = []
    for name, info in per_task.items():
        if name in have:
            continue
        skips = info["skips"]
        if not skips:
            problems.append(f"{name}: no rows to evaluate (the evaluated split is empty)")
            continue
        reasons = sorted(_count_reasons(skips).items(), key=lambda kv: -kv[1])
        shown = "; ".join(f"{r} ({n} rows)" for r, n in reasons[:3])
        more = f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
        hint = (f" Use fewer shots (--shots {shots} is more than the few-shot split holds)"
                if any("-shot needs" in s.reason for s in skips) else "")
        problems.append(f"{name}: all {len(skips)} rows were skipped: {shown}{more}.{hint}")
    if problems:
        raise T.TaskError("nothing to evaluate for " + " | ".join(problems))


def _aggregate(rs: list[Record], metrics: Iterable[str], stderr: bool = True) -> dict:
    out = {}
    for m in metrics:
        vals = [r.metrics[m] for r in rs]
        if not vals:
            out[m] = None
            continue
        mean = sum(vals) / len(vals)
        out[m] = mean
        if stderr:  # lm-eval's mean_stderr: sample standard deviation / sqrt(n)
            n = len(vals)
            out[m + "_stderr"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n) if n > 1 else None
    return out


def _averages(tasks: dict) -> tuple[dict, dict]:
    langs: dict[str, list[float]] = {}
    for entry in tasks.values():
        v = entry.get(entry["primary"])
        if v is not None:
            langs.setdefault(entry["lang"], []).append(v)
    per_lang = {lang: {"average": sum(v) / len(v), "tasks": len(v)} for lang, v in langs.items()}
    allv = [v for vs in langs.values() for v in vs]
    return per_lang, {"average": sum(allv) / len(allv) if allv else None, "tasks": len(allv)}


def _count_reasons(skips: list[T.Skip]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skips:
        key = (f"{s.subtask}: " if s.subtask else "") + s.reason
        out[key] = out.get(key, 0) + 1
    return out


def _model_info(model, path) -> dict:
    cfg = model.config
    info = {"path": str(path) if path else None, "name": Path(path).name if path else None,
            "params": model.num_params() if hasattr(model, "num_params") else None,
            "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
            "quantization": getattr(model, "quantization", None)}  # dhad.quant's scheme, None when plain
    for k in ("hf_layout", "position", "n_layer", "n_embd", "vocab_size", "block_size"):
        info[k] = getattr(cfg, k, None)
    return info


def _version() -> str:
    import dhad
    return dhad.__version__
