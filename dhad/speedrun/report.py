"""The speedrun's report card: `report.md`, `report.json` and PNGs (loss, throughput, evaluation, fertility).

Everything here reads what the stages wrote (stage markers, plan.json, the trainer's metrics.jsonl,
eval/eval.json, baseline/ngram.json, check.json, tokenizer/fertility.json), so a report can be rebuilt
from a finished run directory without recomputing anything. Files are written atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from dhad.speedrun.common import write_json
from dhad.speedrun.plan import EXIT_S, TOKENS_PER_PARAM
from dhad.utils import atomic_write_text

STAGE_LABELS = {
    "plan": "plan (throughput probe, sizes)", "tokenizer": "1. tokenizer", "data": "2. data (clean, dedup, shards)",
    "donor": "3a. donor model (bilingual)", "pretrain": "3. pretrain", "adapt": "3b. extend + adapt (2 stages)",
    "baseline": "3c. n-gram baseline", "sft": "4. SFT", "dpo": "4b. DPO", "check": "5a. script check (/score)",
    "eval": "5b. evaluate", "report": "6. report",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def _metrics(run_dir: Path) -> list[dict]:
    from dhad.train.metrics import read_metrics
    f = Path(run_dir) / "metrics.jsonl"
    return read_metrics(f) if f.is_file() else []


def plot_losses(runs: dict[str, list[dict]], path: Path) -> Path:
    """Training loss per step (and validation points) of every training stage, side by side."""
    plt = _plt()
    names = [n for n, m in runs.items() if any(r.get("event") == "step" for r in m)]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps = [r for r in runs[name] if r.get("event") == "step"]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train")
        evals = [r for r in runs[name] if r.get("event") == "eval"]
        for src in sorted({s for r in evals for s in r.get("val_loss_by_source", {})}):
            pts = [(r["step"], r["val_loss_by_source"][src]) for r in evals if src in r.get("val_loss_by_source", {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", ms=3, lw=1, label=f"val {src}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_throughput(runs: dict[str, list[dict]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name, m in runs.items():
        steps = [r for r in m if r.get("event") == "step" and r.get("tokens_per_s")]
        if steps:
            ax.plot([r["step"] for r in steps], [r["tokens_per_s"] for r in steps], lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training tokens / s")
    ax.set_title("throughput (shared machine: other load shows up here)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_eval(bpb: dict[str, dict], path: Path) -> Path:
    """Grouped bars: held-out bits per byte by model, Arabic and English."""
    plt = _plt()
    models = list(bpb)
    langs = ["arabic", "english"]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(models)), 3.6))
    w = 0.38
    for j, lang in enumerate(langs):
        xs = [i + (j - 0.5) * w for i in range(len(models))]
        vals = [bpb[m][lang]["bpb"] for m in models]
        bars = ax.bar(xs, vals, w, label=lang)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, fontsize=8, rotation=10)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _cell(text: str, n: int = 120) -> str:
    return text.replace("\n", " ").replace("|", "\\|")[:n]


def _time_rows(run, markers: dict, report_s: float) -> list[dict]:
    """Planned and used seconds of every stage (the report's own: so far, plus writing its files)."""
    rows = []
    for s in run.stages:
        if s == "report":
            rows.append({"stage": s, "planned_s": run.planned.get("report"), "used_s": report_s})
        elif s in markers:
            m = markers[s]
            rows.append({"stage": s, "planned_s": m.get("planned_seconds"), "used_s": m["seconds"]})
    return rows


def write_report(run, markers: dict) -> Path:
    """Write OUT/report.md, OUT/report.json and the PNGs; `run` is the speedrun's Run, `markers` the
    finished stages."""
    t_start = time.perf_counter()
    out = run.out
    plan = run.plan
    cfg = run.cfg
    train_stages = [s for s in ("donor", "pretrain", "adapt", "sft", "dpo") if s in markers]
    runs = {s: _metrics(Path(markers[s]["outputs"]["run_dir"])) for s in train_stages}
    plot_losses(runs, out / "loss.png")
    plot_throughput(runs, out / "throughput.png")
    ev = json.loads((out / "eval" / "eval.json").read_text(encoding="utf-8"))
    ngram = json.loads((out / "baseline" / "ngram.json").read_text(encoding="utf-8"))
    plot_eval({**ev["bpb"], f"{ngram['order']}-gram KN": ngram["bpb"]}, out / "eval.png")
    fert = json.loads((out / "tokenizer" / "fertility.json").read_text(encoding="utf-8"))
    check = json.loads((out / "check.json").read_text(encoding="utf-8"))

    L: list[str] = []
    size = plan["size"]
    L.append(f"# dhad speedrun report — recipe `{cfg.recipe}`{' (CI size)' if cfg.ci else ''}\n")
    # -- time (filled in last: the report's own seconds)
    time_at = len(L)
    # -- model
    L.append("## Model and plan\n")
    arch = ("Jais-family style: ALiBi, SwiGLU, LayerNorm, muP (embedding scale 9.17, width scale "
            f"256/{size['n_embd']}, 1/d attention)" if plan["arch"] == "jais" else
            "Llama style (Jais-adapted's base): RoPE, RMSNorm, gated SiLU MLP, untied embeddings")
    L.append(f"- size `{size['name']}`: n_embd {size['n_embd']}, {size['n_layer']} layers, {size['n_head']} heads, "
             f"n_inner {plan['n_inner']}, vocabulary {size['vocab']}: **{plan['params']['total'] / 1e6:.2f}M "
             f"parameters** ({plan['params']['nonemb'] / 1e6:.2f}M without embeddings); {arch}")
    L.append(f"- sequence length {plan['seq_len_pretrain']} (pretraining) / {plan['seq_len_sft']} (SFT), context "
             f"{plan['block_size']}")
    probes = plan["probe_tokens_per_s"]
    L.append("- precision, measured on this machine (training tokens/s of the chosen size): "
             + ", ".join(f"{k} {v:,.0f}" for k, v in probes.items()) + f" → **{plan['precision']}**"
             + (" (bf16 = autocast over fp32 weights)" if "bf16" in probes else ""))
    if plan.get("threads_probe"):
        L.append("- CPU threads, measured (training tokens/s of the smallest size; the faster is used for the whole "
                 "run — on a busy shared machine one thread can beat two by far): "
                 + ", ".join(f"{k}: {v:,.0f}" for k, v in plan["threads_probe"].items()) + f" → **{plan['threads']}**")
    if plan.get("ladder"):
        L.append("- size ladder (measured tokens/s → tokens in the planned pretraining time per non-embedding "
                 f"parameter; the largest size with ≥ {TOKENS_PER_PARAM:g} wins): "
                 + "; ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s → {v['tokens_per_param']:.1f}"
                             for k, v in plan["ladder"].items()))
    L.append("")
    L.append("Training is clock-driven: each stage trains until its share of the budget is spent, the learning "
             "rate warming up, holding, and decaying to a tenth over the last 20% of the stage's wall time "
             "(warmup–stable–decay), so the tokens trained are what this machine managed, not a prediction.\n")
    L.append("| training stage | steps | tokens seen | tokens the probe predicted | tokens/s (median) | first loss "
             "| last loss | training seconds (planned → used) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    training = {}
    for s in train_stages:
        o = markers[s]["outputs"]
        tps = f"{o['tokens_per_s']:,.0f}" if o.get("tokens_per_s") else "–"
        pred = (o["loop_seconds_planned"] or 0) * plan["tokens_per_s"] if o.get("loop_seconds_planned") else None
        loop = (f"{o['loop_seconds_planned']:.1f} → {o['loop_seconds']:.1f}" if o.get("loop_seconds_planned")
                else f"{o['train_seconds']:.1f}")
        note = " (resumed)" if o.get("resumed") else ""
        seen = o.get("tokens_seen")
        L.append(f"| {s}{note} | {o['steps']} | {f'{seen:,}' if seen is not None else '–'} | "
                 f"{f'{pred:,.0f}' if pred else '–'} | {tps} | {o['first_loss']:.3f} | {o['last_loss']:.3f} | {loop} |")
        training[s] = {k: o.get(k) for k in ("steps", "tokens_seen", "tokens_by_source", "tokens_per_s", "first_loss",
                                             "last_loss", "last_lr", "loop_seconds", "loop_seconds_planned",
                                             "train_seconds", "resumed")}
        training[s]["tokens_predicted_by_probe"] = pred
    L.append("\n![loss](loss.png)\n\n![throughput](throughput.png)\n")
    # -- tokenizer
    L.append("## Tokenizer\n")
    L.append("Fertility (tokens per whitespace word) on held-out text the tokenizers were not trained on; the "
             "English-only tokenizer is trained the same way (same vocabulary size and characters).\n")
    L.append("| tokenizer | language | vocabulary | tokens/word | chars/token |\n|---|---|---:|---:|---:|")
    for r in fert["rows"]:
        L.append(f"| {r['tokenizer']} | {r['lang']} | {r['vocab_size']} | {r['fertility']:.3f} | "
                 f"{r['chars_per_token']:.2f} |")
    if fert.get("extension"):
        x = fert["extension"]
        ar = {r["tokenizer"]: r["fertility"] for r in fert["rows"] if r["lang"] == "arabic"}
        before, after = ar.get("english-only"), ar.get("english+arabic (extended)")
        L.append(f"\nVocabulary extension (Jais-adapted): {x['added']} Arabic tokens of the bilingual tokenizer "
                 f"added to the English one ({x['base_vocab']} → {x['new_vocab']}). Arabic tokens per word: "
                 f"**{before:.3f} before → {after:.3f} after**.")
    L.append("\n![fertility](fertility.png)\n")
    # -- data
    d = markers["data"]["outputs"]
    L.append("## Data\n")
    L.append("Pretraining shards (dhad.data.prepare: cleaning, quality filters, exact + MinHash near dedup, "
             "held-out split by document hash):\n")
    L.append("| source | docs read | kept | exact dup | near dup | filtered | train tokens | held-out tokens |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rep in d["pretrain"].items():
        rules = rep["rules"]
        read = sum(v.get("docs", 0) for v in rules.values())
        kept = rules.get("kept", {}).get("docs", 0)
        ex = rules.get("exact_duplicate", rules.get("exact_dup", {})).get("docs", 0)
        near = rules.get("near_duplicate", rules.get("near_dup", {})).get("docs", 0)
        filt = read - kept - ex - near
        sp = rep["splits"]
        L.append(f"| {name} | {read} | {kept} | {ex} | {near} | {filt} | {sp.get('train', 0):,} | "
                 f"{sp.get('validation', 0):,} |")
    L.append("\nSFT shards (dhad.data.sft: packed rows, loss on answer tokens only, Jais chat format):\n")
    L.append("| language | examples | rows | tokens | loss tokens | fill | dropped |\n|---|---:|---:|---:|---:|---:|---|")
    for lang, rep in d["sft"].items():
        tr = rep["splits"]["train"]
        drop = ", ".join(f"{k} {v}" for k, v in {"answer starts with a digit": rep.get("digit_start_left_out", 0),
                                                   **rep["dropped"]}.items() if v) or "–"
        L.append(f"| {lang} | {tr['examples']} | {tr['rows']} | {tr['tokens']:,} | {tr['loss_tokens']:,} | "
                 f"{100 * tr['fill']:.0f}% | {drop} |")
    L.append("")
    # -- evaluation
    L.append("## Evaluation\n")
    order = ngram["order"]
    base_label = f"{order}-gram Kneser–Ney (baseline)"
    L.append("Held-out bits per byte (same texts for every model, UTF-8 bytes, special tokens excluded). The "
             f"baseline is an interpolated modified Kneser–Ney {order}-gram model counted on exactly the "
             f"{ngram['tokens']:,} tokens pretraining read (in the trainer's order; one pass where it read more), "
             "its order chosen among 1–" f"{ngram['max_order']} on the sample's held-out documents (not these): "
             "what word statistics alone reach on this data.\n")
    L.append("| model | Arabic bpb | English bpb |\n|---|---:|---:|")
    for m, v in ev["bpb"].items():
        L.append(f"| {m} | {v['arabic']['bpb']:.4f} | {v['english']['bpb']:.4f} |")
    L.append(f"| {base_label} | {ngram['bpb']['arabic']['bpb']:.4f} | {ngram['bpb']['english']['bpb']:.4f} |")
    best = "pretrained" if "pretrained" in ev["bpb"] else "adapted"
    if best in ev["bpb"]:
        gap = {lang: ev["bpb"][best][lang]["bpb"] - ngram["bpb"][lang]["bpb"] for lang in ("arabic", "english")}
        L.append(f"\nThe {best} transformer against the baseline: Arabic {gap['arabic']:+.3f}, English "
                 f"{gap['english']:+.3f} bits per byte (negative: it predicts better than the n-gram counts).")
    L.append("\n| order | " + " | ".join(k for k in ("arabic", "english")) + " | both (selection split) |\n|---:|---:|---:|---:|")
    for k, v in ngram["order_selection"]["bpb_by_order"].items():
        L.append(f"| {k}{' ←' if int(k) == order else ''} | {v['arabic']:.4f} | {v['english']:.4f} | {v['all']:.4f} |")
    L.append("\nSFT trains on chat-formatted answers only, so bits per byte on plain held-out text usually "
             "rises a little after it; the point of the comparison is trained vs untrained vs counted.\n")
    L.append("![eval](eval.png)\n")
    how = ev.get("bench_limit") or {}
    if ev.get("bench_table"):
        L.append(f"Benchmarks of the cards (0-shot, log-likelihood, `--limit {how.get('limit')}`: the first "
                 f"{how.get('limit')} examples of every task and subtask — {how.get('why', '')}; a model this small "
                 "is expected near chance, and first-rows samples can be one-sided):\n")
        L.append(ev["bench_table"])
    elif how:
        L.append(f"Benchmarks: not run ({how.get('why')}).\n")
    # -- script check
    L.append("## Does it answer in the language it is asked in?\n")
    p = check["parameters"]
    L.append(f"Asked through `dhad serve`'s `{check['endpoint']}` endpoint (the ALLaM card's schema), greedy "
             f"(`{json.dumps(p)}`: at least 4 new tokens, as the card's `min_length`). As in the "
             "Jais card's `prompt_ar`, an Arabic question carries the card's Arabic instruction as the system "
             "message; an English one the default instruction. "
             f"Result: **{'PASSED' if check['passed'] else 'FAILED'}**.\n")
    L.append("| asked in | question | answer (start) | answer script | ok |\n|---|---|---|---|---|")
    for r in check["answers"]:
        L.append(f"| {r['lang']} | {r['question']} | {_cell(r['answer'])} | {r['script']} | {'yes' if r['ok'] else 'no'} |")
    ds = check.get("default_system")
    if ds:
        L.append(f"\nThe same questions with the template's default (English) instruction for both languages: "
                 f"{'passed' if ds['passed'] else 'failed'} "
                 f"({sum(r['ok'] for r in ds['answers'])}/{len(ds['answers'])} in the question's script).\n")
        L.append("| asked in | question | answer (start) | answer script | ok |\n|---|---|---|---|---|")
        for r in ds["answers"]:
            L.append(f"| {r['lang']} | {r['question']} | {_cell(r['answer'])} | {r['script']} | "
                     f"{'yes' if r['ok'] else 'no'} |")
    answers = []
    if check.get("before_sft"):
        L.append("\nGreedy answers before SFT (the pretrained model, same prompts) and after:\n")
        L.append("| asked in | question | before SFT | after SFT |\n|---|---|---|---|")
        for b, a in zip(check["before_sft"], check["answers"]):
            L.append(f"| {a['lang']} | {a['question']} | {_cell(b['answer'], 90)} | {_cell(a['answer'], 90)} |")
            answers.append({"lang": a["lang"], "question": a["question"], "before_sft": b["answer"],
                            "after_sft": a["answer"]})
    L.append("")
    # -- use it
    final = out / "final"
    L.append("## Use the model\n")
    L.append(f"```\ndhad chat --model {final}\ndhad serve --model {final}\n```\n")
    L.append("`dhad serve` offers the card's `POST /score` ({\"input_data\": {\"input_string\": [...], "
             "\"parameters\": {...}}} → {\"output\": ...}), the OpenAI API under `/v1`, and a web chat at `/`.\n")

    # -- time, last: every stage's planned and used seconds, this one's included
    rows = _time_rows(run, markers, time.perf_counter() - t_start + 0.2)
    total = sum(r["used_s"] for r in rows)
    wall = run.spent() + 0.2 + EXIT_S
    T = ["## Time\n",
         f"Budget: {plan['budget_s'] / 60:.1f} min ({plan['budget_s']:.0f} s). Sum of stage times: **{total:.1f} s**; "
         f"the whole run, interpreter start and exit included: **~{wall:.0f} s ({wall / 60:.2f} min)** on "
         f"{plan['device']} ({plan['cpu_count']} CPUs, load average at start "
         f"{', '.join(f'{x:.1f}' for x in plan['load_avg']) if plan.get('load_avg') else 'n/a'}).\n"]
    reused = [r["stage"] for r in rows if markers.get(r["stage"], {}).get("finished", time.time()) < run.wall0]
    if reused:
        T.append(f"Stages reused from an earlier invocation (resumed run): {', '.join(reused)}.\n")
    T.append("Planned: the seconds a stage was given when it started (training stages and evaluation use exactly "
             "that: training stops on the clock, evaluation sizes its benchmarks to it; the others are "
             "estimates).\n")
    T.append("| stage | planned s | used s | used / planned | share |\n|---|---:|---:|---:|---:|")
    for r in rows:
        pl, used = r["planned_s"], r["used_s"]
        planned = f"{pl:.1f}" if pl is not None else "–"
        ratio = f"{100 * used / pl:.0f}%" if pl else "–"
        T.append(f"| {STAGE_LABELS.get(r['stage'], r['stage'])} | {planned} | {used:.1f} | {ratio} | "
                 f"{100 * used / total:.1f}% |")
    T.append("")
    L[time_at:time_at] = T
    atomic_write_text(out / "report.md", "\n".join(L) + "\n")
    write_json(out / "report.json", {
        "recipe": cfg.recipe, "ci": cfg.ci, "budget_s": plan["budget_s"], "wall_s": wall, "stages_s": total,
        "stages": {r["stage"]: {"planned_s": r["planned_s"], "used_s": r["used_s"]} for r in rows},
        "model": {"size": size, "params": plan["params"], "precision": plan["precision"], "threads": plan["threads"]},
        "training": training,
        "bpb": {m: {lang: v[lang]["bpb"] for lang in ("arabic", "english")} for m, v in ev["bpb"].items()},
        "ngram": {"order": order, "tokens": ngram["tokens"], "max_order": ngram["max_order"],
                  "bpb": {lang: ngram["bpb"][lang]["bpb"] for lang in ("arabic", "english")}},
        "check": {"passed": check["passed"], "default_system_passed": (ds or {}).get("passed")},
        "answers": answers, "bench_limit": how.get("limit"),
        "bench": {k: v["average"] for k, v in ev.get("bench", {}).items()},
    })
    return out / "report.md"


def stage_report(run, markers: dict) -> dict:
    path = write_report(run, markers)
    run.say(f"  wrote {path} and {run.p('report.json')}")
    return {"report": str(path), "report_json": str(run.p("report.json"))}
