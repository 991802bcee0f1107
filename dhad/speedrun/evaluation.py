"""Stages 5: the n-gram baseline, the script check through the server, held-out bits per byte and benchmarks.

- baseline: an interpolated modified Kneser–Ney model (dhad.evaluate.ngram) counted on exactly the token
  stream pretraining read (the trainer's data order, up to where it stopped; one pass when it read more),
  its order chosen on the sample's held-out documents, scored on the same held-out bytes as the models.
- check: the final model answers Arabic and English questions through `dhad serve`'s /score (greedy), and
  must answer in the script it was asked in; the model before SFT answers the same questions, for the
  report's before/after table.
- eval: held-out bits per byte of the untrained, pretrained and final models (dhad.evaluate.bpb), then the
  cards' benchmarks with a --limit scaled to the time the budget leaves (measured on a first small pass).
"""
from __future__ import annotations

import time
from pathlib import Path

from dhad.data.sample import read_texts
from dhad.speedrun.common import LANGS, SpeedrunError, write_json
from dhad.speedrun.plan import Size, model_overrides
from dhad.speedrun.prepare import card_system
from dhad.speedrun.training import pretrain_sources

MAX_NGRAM_ORDER = 5

# ---------------------------------------------------------------------------------------------
# The n-gram baseline


def pretraining_stream(run_dir: Path, tokens_by_source: dict[str, int]) -> tuple[list, dict]:
    """The token stream a finished trainer run read from each source, in its order: the first
    `tokens + 1` tokens of the source's document stream (its recipe's seed and shuffle), or one pass over
    the source when training read more than that (an n-gram model counts a corpus, not repeats of it)."""
    from dhad.data.shards import ShardSet
    from dhad.train.loader import DocStream
    from dhad.train.recipe import load_recipe
    recipe = load_recipe(run_dir / "recipe.yaml")
    parts, info = [], {}
    for name, path in recipe.data.sources.items():
        ss = ShardSet.open(Path(path), recipe.data.train_split)
        seen = int(tokens_by_source.get(name, 0))
        n = min(seen + 1, ss.n_tokens) if seen else 0
        if n:
            parts.append(DocStream(ss, name, recipe.seed, recipe.data.shuffle).read(n))
        info[name] = {"tokens_trained": seen, "tokens_counted": n, "source_tokens": ss.n_tokens,
                      "passes": seen / max(ss.n_tokens, 1)}
    return parts, info


def stage_baseline(run, markers: dict) -> dict:
    import numpy as np

    from dhad.evaluate.ngram import KneserNey, NgramCounts, choose_order, max_order_for, ngram_bits_per_byte
    from dhad.tokenizer import load_tokenizer
    adapted = run.cfg.recipe == "adapted"
    # the final model's tokenizer; the adapted base's English ids are the same in the extended tokenizer
    tok = load_tokenizer(run.p("tokenizer-ext" if adapted else "tokenizer"))
    parts, info = [], {}
    for stage in (("pretrain", "adapt") if adapted else ("pretrain",)):
        out = markers[stage]["outputs"]
        p, i = pretraining_stream(Path(out["run_dir"]), out["tokens_by_source"])
        parts += p
        info.update({f"{stage}/{k}": v for k, v in i.items()})
    ids = np.concatenate(parts)
    V = tok.vocab_size
    order_max = min(MAX_NGRAM_ORDER, max_order_for(V))
    t = time.perf_counter()
    counts = NgramCounts(ids, order_max, V)
    count_s = time.perf_counter() - t
    select = {lang: read_texts(run.p("data", "sample", lang, "heldout.jsonl")) for lang in LANGS}
    order, table = choose_order(counts, tok, select)
    lm = KneserNey(counts, order)
    held = {lang: read_texts(run.p("data", "heldout", f"{lang}.jsonl")) for lang in LANGS}
    bpb = {lang: ngram_bits_per_byte(lm, tok, held[lang]) for lang in LANGS}
    res = {"model": "interpolated modified Kneser-Ney", "order": order, "max_order": order_max,
           "tokens": int(len(ids)), "vocab_size": V, "count_seconds": count_s, "sources": info,
           "order_selection": {"split": "the sample's held-out documents (not the scored held-out text)",
                               "bpb_by_order": table},
           "discounts": [list(lev.d) + [lev.modified] for lev in lm.levels], "bpb": bpb}
    write_json(run.p("baseline", "ngram.json"), res)
    run.say(f"  {order}-gram Kneser-Ney on {len(ids):,} pretraining tokens (order chosen of 1-{order_max}): "
            + ", ".join(f"{lang} {v['bpb']:.3f} bpb" for lang, v in bpb.items()))
    return {"ngram": str(run.p("baseline", "ngram.json")), "order": order, "tokens": int(len(ids)),
            "bpb": {lang: v["bpb"] for lang, v in bpb.items()}}


# ---------------------------------------------------------------------------------------------
# Script check through the server

QUESTIONS = (
    ("ar", "ما هي عاصمة الإمارات العربية المتحدة؟"),
    ("ar", "اكتب قصة قصيرة عن قطة صغيرة."),
    ("en", "What is the capital of the United Arab Emirates?"),
    ("en", "Write a short story about a small cat."),
)


def script_of(text: str) -> str:
    """"ar" when Arabic letters outnumber Latin ones, "en" for the reverse, "none" without letters."""
    from dhad.tokenizer import is_arabic_char
    ar = sum(1 for c in text if c.isalpha() and is_arabic_char(c))
    la = sum(1 for c in text if c.isalpha() and c.isascii())
    if ar == la == 0:
        return "none"
    return "ar" if ar > la else "en"


def check_scripts(model_dir: str | Path, questions=QUESTIONS, max_new_tokens: int = 48,
                  variants=("card", "default_system")) -> dict:
    """Ask the model through `dhad serve`'s /score endpoint (the ALLaM card's schema), greedy, and check
    that every answer is written in the script of its question.

    As the Jais card does (`prompt_ar` / `prompt_eng`), an Arabic question carries the card's Arabic
    instruction as the system message and an English one the default instruction ("card": the pass
    criterion). "default_system" asks the same questions with the English default for both. Decoding is
    greedy with a minimum of 4 new tokens (the card's `min_length=input_len + 4`). Not the card's
    repetition_penalty 1.2: transformers applies it to the prompt's tokens too, which pushes a small model
    off the commonest words of its own language (the Arabic instruction is full of "في")."""
    from fastapi.testclient import TestClient

    from dhad.serve.app import create_app
    params = {"do_sample": False, "max_new_tokens": max_new_tokens, "min_new_tokens": 4}
    app = create_app(str(model_dir), max_batch_size=len(questions))
    answers: dict[str, list] = {v: [] for v in variants}
    with TestClient(app) as client:
        for variant, rows in answers.items():
            for lang, q in questions:
                msgs = [{"role": "user", "content": q}]
                system = card_system("arabic" if lang == "ar" else "english") if variant == "card" else None
                if system:
                    msgs.insert(0, {"role": "system", "content": system})
                r = client.post("/score", json={"input_data": {"input_string": msgs, "parameters": params}})
                if r.status_code != 200:
                    raise SpeedrunError(f"/score answered {r.status_code}: {r.text[:300]}")
                out = r.json()["output"]
                got = script_of(out)
                rows.append({"lang": lang, "question": q, "system": system, "answer": out, "script": got,
                             "ok": got == lang})
    res = {"passed": all(r["ok"] for r in answers["card"]), "answers": answers["card"],
           "endpoint": "/score", "parameters": params}
    if "default_system" in answers:
        res["default_system"] = {"passed": all(r["ok"] for r in answers["default_system"]),
                                 "answers": answers["default_system"]}
    return res


def stage_check(run, markers: dict) -> dict:
    n = 24 if run.cfg.ci else 48
    res = check_scripts(run.p("final"), max_new_tokens=n)
    before = markers["adapt" if run.cfg.recipe == "adapted" else "pretrain"]["outputs"]["model"]
    res["before_sft"] = check_scripts(before, max_new_tokens=n, variants=("card",))["answers"]
    for title, rows in (("card prompts", res["answers"]), ("default system prompt", res["default_system"]["answers"])):
        for r in rows:
            run.say(f"  {title} [{r['lang']}] {r['question']} -> {r['answer'][:80]!r} ({r['script']}, "
                    f"{'ok' if r['ok'] else 'WRONG SCRIPT'})")
    run.say(f"  script check {'passed' if res['passed'] else 'FAILED'} (with the default system prompt for both "
            f"languages: {'passed' if res['default_system']['passed'] else 'failed'})")
    write_json(run.p("check.json"), res)
    return {"passed": res["passed"], "default_system_passed": res["default_system"]["passed"],
            "check": str(run.p("check.json"))}


# ---------------------------------------------------------------------------------------------
# Held-out bits per byte and the cards' benchmarks


def _models_to_eval(run, markers: dict) -> list[tuple[str, str | None, dict | None]]:
    """(label, model dir or None, recipe model section for a fresh init)."""
    plan = run.plan
    size = Size(**plan["size"])
    dpo = [("dpo", markers["dpo"]["outputs"]["model"], None)] if "dpo" in markers else []
    if run.cfg.recipe == "jais":
        preset, ov = model_overrides(size, "jais", plan["block_size"])
        return [("untrained", None, {"preset": preset, "overrides": ov, "tok": "tokenizer"}),
                ("pretrained", markers["pretrain"]["outputs"]["model"], None),
                ("sft", markers["sft"]["outputs"]["model"], None)] + dpo
    preset, ov = model_overrides(size, "llama", plan["block_size"])
    return [("untrained (English base)", None, {"preset": preset, "overrides": ov, "tok": "tokenizer-en"}),
            ("English base", markers["pretrain"]["outputs"]["model"], None),
            ("extended + projected init", markers["adapt"]["outputs"]["init_model"], None),
            ("adapted", markers["adapt"]["outputs"]["model"], None),
            ("sft", markers["sft"]["outputs"]["model"], None)] + dpo


BENCHED = ("pretrained", "English base", "sft", "dpo")


def group_sizes(tasks: list[str], data_dir) -> list[int]:
    """Rows per (task, subtask) of the tasks' evaluation splits: --limit L evaluates sum(min(L, n))."""
    from collections import Counter

    from dhad.evaluate.tasks import get_task
    sizes = []
    for name in tasks:
        task = get_task(name)
        docs = task.load(data_dir)[task.eval_split]
        if task.subtask is None:
            sizes.append(len(docs))
            continue
        groups = Counter()
        for d in docs:
            try:
                groups[task.subtask(d)] += 1
            except (KeyError, ValueError, TypeError):
                continue  # a row without a subtask key: the task skips (and counts) it
        sizes += list(groups.values())
    return sizes


def bench_limit(sizes: list[int], n_models: int, seconds: float, per_example: float, fixed: float) -> int:
    """The largest --limit L with n_models * (fixed + per_example * sum(min(L, n))) <= seconds (0: none)."""
    def cost(L):
        return n_models * (fixed + per_example * sum(min(L, n) for n in sizes))
    lo, hi = 0, max(sizes, default=0)
    while lo < hi:  # cost is non-decreasing in L
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid - 1)
    return lo


def _benchmarks(run, models: dict, deadline: float) -> tuple[dict, dict]:
    """The cards' benchmarks on `models` ({label: (model, tokenizer)}), with the largest --limit whose
    estimated time fits before `deadline`: a first pass with --limit 1 on the last model measures the
    seconds per example and the fixed cost of a pass (loading the tasks, building requests); the rows per
    subtask give the examples of any limit; every model then runs with the limit that fits in 80% of
    what is left. Returns (results by label, how the limit was chosen)."""
    from dhad.evaluate.runner import evaluate
    tasks = list(run.plan["bench_tasks"])
    labels = list(models)

    def bench(label, limit):
        model, tok = models[label]
        res = evaluate(model, tok, tasks, shots=0, limit=limit, data_dir=run.data, progress=False)
        res["model"]["name"] = label
        return res

    if not labels or time.time() >= deadline - 2:
        return {}, {"limit": None, "why": "no time left"}
    t = time.time()
    first = bench(labels[-1], 1)
    per_model_1 = time.time() - t
    per_ex = first["time"]["score_seconds"] / max(first["time"]["examples"], 1)
    fixed = max(per_model_1 - first["time"]["score_seconds"], 0.0)  # loading tasks, building requests
    sizes = group_sizes(tasks, run.data)
    left = deadline - time.time()
    limit = bench_limit(sizes, len(labels), 0.8 * left, per_ex, fixed)
    info = {"calibration": {"limit": 1, "examples": first["time"]["examples"], "seconds": per_model_1,
                            "seconds_per_example": per_ex}, "seconds_left": left,
            "examples_per_model": sum(min(max(limit, 1), n) for n in sizes)}
    out = {}
    if limit >= 2:
        for label in labels:
            out[label] = bench(label, limit)
        full = limit >= max(sizes)
        info.update(limit=limit, why="every example" if full else "the largest limit that fits the time left")
        return out, info
    out[labels[-1]] = first
    for label in labels[:-1]:
        if deadline - time.time() > 1.2 * per_model_1:
            out[label] = bench(label, 1)
    info.update(limit=1, why="only the smallest limit fits the time left",
                skipped=[k for k in labels if k not in out])
    return out, info


def stage_eval(run, markers: dict) -> dict:
    import dhad
    from dhad.config import Config
    from dhad.evaluate.bpb import bits_per_byte
    from dhad.evaluate.report import markdown_tables, write_results
    from dhad.model import Transformer
    from dhad.tokenizer import load_tokenizer
    deadline = time.time() + run.allot("eval")
    plan = run.plan
    dev = run.device
    held = {lang: read_texts(run.p("data", "heldout", f"{lang}.jsonl")) for lang in LANGS}
    T = plan["seq_len_pretrain"]
    bpb, to_bench = {}, {}
    for label, mdir, fresh in _models_to_eval(run, markers):
        if mdir is None:
            model = Transformer(Config.from_name(fresh["preset"], **fresh["overrides"])).init_weights(run.cfg.seed)
            tok = load_tokenizer(run.p(fresh["tok"]))
        else:
            model = dhad.load_model(mdir, dtype="float32")
            tok = load_tokenizer(mdir)
        model = model.to(dev).eval()
        bpb[label] = {lang: bits_per_byte(model, tok, held[lang], T, device=dev) for lang in LANGS}
        run.say(f"  {label:<26} bpb: " + ", ".join(f"{lang} {v['bpb']:.3f}" for lang, v in bpb[label].items()))
        if label in BENCHED:
            to_bench[label] = (model, tok)
    bench_s = time.time()
    bench, how = _benchmarks(run, to_bench, deadline)
    for label, res in bench.items():
        write_results(res, run.p("eval", f"bench-{label.replace(' ', '-')}"))
    run.say(f"  benchmarks: --limit {how.get('limit')} ({how['why']}) in {time.time() - bench_s:.1f}s")
    ngram = markers["baseline"]["outputs"]
    table = markdown_tables(list(bench.values())) if bench else ""
    write_json(run.p("eval", "eval.json"), {
        "bpb": bpb, "ngram": {"order": ngram["order"], "tokens": ngram["tokens"], "bpb": ngram["bpb"]},
        "bench": {k: {"tasks": v["tasks"], "languages": v["languages"], "average": v["average"]}
                  for k, v in bench.items()},
        "bench_limit": how, "bench_table": table, "heldout": {lang: len(t) for lang, t in held.items()}})
    return {"eval": str(run.p("eval", "eval.json")), "bench_limit": how.get("limit"),
            "bpb": {k: {lang: v[lang]["bpb"] for lang in v} for k, v in bpb.items()}}
