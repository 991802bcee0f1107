"""Results on disk and as the cards' tables.

    write_results(results, "out/", records)   # results.json, samples.jsonl, results.md (atomic writes)
    markdown_tables([results_a, results_b])   # one table per language: Model | Avg | ArabicMMLU | ...
    card_tables([results_a, results_b])       # the Jais card's Arabic / English tables and the ALLaM card's
    plot_card_tables([...], "tables.png")     # the same as bar charts
    mtbench_table(summaries)                  # Model | AR Average | AR Turn 1 | AR Turn 2 | EN Average | ...

Scores are printed x100 with one decimal, as the Jais-family card prints them; MT-bench scores
(1-10) with two decimals, as the ALLaM card prints them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dhad.utils import atomic_write_text

LANG_NAMES = {"ar": "Arabic", "en": "English"}


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_results(results: dict, out_dir: str | os.PathLike, records: Sequence | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"results": atomic_write_text(out / "results.json", json.dumps(results, ensure_ascii=False, indent=2) + "\n"),
             "markdown": atomic_write_text(out / "results.md", markdown_tables([results]))}
    if records is not None:
        paths["samples"] = atomic_write_jsonl(out / "samples.jsonl", (r.to_json() for r in records))
    return paths


def load_results(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown_tables(results_list: Sequence[dict]) -> str:
    """One table per language, models as rows, tasks as columns (the primary metric of each)."""
    langs: dict[str, list[tuple[str, str]]] = {}
    for res in results_list:
        for name, e in res["tasks"].items():
            cols = langs.setdefault(e["lang"], [])
            if (name, e["title"]) not in cols:
                cols.append((name, e["title"]))
    parts = []
    for lang in sorted(langs, key=lambda x: (x != "ar", x)):
        cols = langs[lang]
        head = ["Model", "Avg"] + [t for _, t in cols]
        lines = [f"**{LANG_NAMES.get(lang, lang)}**", "", " | ".join(head) + " |", "|".join("---" for _ in head) + "|"]
        for res in results_list:
            model = res.get("model", {}).get("name") or res.get("model", {}).get("path") or "model"
            cells = []
            for name, _ in cols:
                e = res["tasks"].get(name)
                cells.append(_pct(e.get(e["primary"])) if e else "–")
            avg = res.get("languages", {}).get(lang, {}).get("average")
            lines.append(" | ".join([model, _pct(avg)] + cells) + " |")
        parts.append("\n".join(lines))
    shots = sorted({res["config"]["shots"] for res in results_list})
    foot = (f"\nShots: {', '.join(map(str, shots))}. Metric per task: acc_norm where the harness reports it, "
            "else acc (TruthfulQA mc2: the mc2 score; CrowS-Pairs: pct_stereotype, 50 is unbiased). "
            "Avg: mean over the tasks shown.\n")
    return "\n\n".join(parts) + "\n" + foot


def mtbench_table(summaries: Sequence[dict]) -> str:
    """ALLaM-card layout: Model | AR Average | AR Turn 1 | AR Turn 2 | EN Average | EN Turn 1 | EN Turn 2."""
    langs = [lang for lang in ("ar", "en") if any(lang in s.get("languages", {}) for s in summaries)]
    langs += sorted({lang for s in summaries for lang in s.get("languages", {})} - set(langs))
    head = ["Model"] + [f"{lang.upper()} {c}" for lang in langs for c in ("Average", "Turn 1", "Turn 2")]
    lines = [" | ".join(head) + " |", "|".join("---" for _ in head) + "|"]

    def f(v):
        return "–" if v is None else f"{v:.2f}"

    for s in summaries:
        row = [s.get("model", "model")]
        for lang in langs:
            d = s.get("languages", {}).get(lang, {})
            row += [f(d.get("average")), f(d.get("turn_1")), f(d.get("turn_2"))]
        lines.append(" | ".join(row) + " |")
    unparsed = sum(s.get("unparseable", 0) for s in summaries)
    return "\n".join(lines) + f"\n\nUnparseable judge outputs (excluded, not guessed): {unparsed}\n"


# ---------------------------------------------------------------------------------------------
# The cards' tables: the Jais-family card's Arabic and English tables and the ALLaM card's table

@dataclass(frozen=True)
class Column:
    title: str                        # the card's column title
    tasks: tuple[str, ...] = ()       # dhad tasks that fill it, preferred first (the card's harness first)
    shots: int | None = None          # the card's shot count
    public: bool = True               # False: the card's data is not public (the column stays empty)


@dataclass(frozen=True)
class CardTable:
    title: str
    columns: tuple[Column, ...]
    average: bool                     # the card has an Avg column: the plain mean of all its columns


def _c(title, *tasks, shots=0, public=True):
    return Column(title, tuple(tasks), shots, public)


CARD_TABLES = {
    # Jais-family card, "Arabic evaluation" (0-shot, lm-harness; * = native Arabic). Avg = the mean of
    # the 14 columns, CrowS-Pairs' pct_stereotype included as printed (checked on the card's rows).
    "jais-ar": CardTable("Jais-family card: Arabic", (
        _c("ArabicMMLU*", "arabicmmlu"), _c("MMLU", "mmlu_ar", "m_mmlu_ar"), _c("EXAMS*", "exams_ar"),
        _c("LitQA*", public=False), _c("agqa", public=False), _c("agrc", public=False),
        _c("Hellaswag", "hellaswag_ar_jais", "hellaswag_ar"), _c("PIQA", "piqa_ar_jais", "piqa_ar"),
        _c("BoolQA", "boolq_ar_jais", "boolq_ar"), _c("Situated QA", "siqa_ar"),
        _c("ARC-C", "arc_ar_jais", "arc_ar"), _c("OpenBookQA", "openbookqa_ar_jais", "openbookqa_ar"),
        _c("TruthfulQA", "truthfulqa_ar_mc2_jais", "truthfulqa_ar_mc2"), _c("CrowS-Pairs", "crows_pairs_ar")),
        average=True),
    "jais-en": CardTable("Jais-family card: English", (
        _c("MMLU", "mmlu"), _c("RACE", "race"), _c("Hellaswag", "hellaswag"), _c("PIQA", "piqa"),
        _c("BoolQA", "boolq"), _c("SIQA", "siqa"), _c("ARC-Challenge", "arc_challenge"),
        _c("OpenBookQA", "openbookqa"), _c("Winogrande", "winogrande"), _c("TruthfulQA", "truthfulqa_mc2"),
        _c("CrowS-Pairs", "crows_pairs_english")), average=True),
    # ALLaM-2-7b-instruct card, "Automatic Benchmarks" (its own pipeline; no average column)
    "allam": CardTable("ALLaM card", (
        _c("MMLU-en (0-shot)", "mmlu"), _c("MMLU-ar-trans (0-shot)", "mmlu_ar", "m_mmlu_ar"),
        _c("Arabic MMLU (0-shot)", "arabicmmlu"), _c("Exams Ar (5-shot)", "exams_ar", shots=5),
        _c("araCA-ACVA (5-shot)", "acva", shots=5), _c("ETEC (0-shot)", public=False),
        _c("IEN-MCQ", public=False), _c("IEN-TF", public=False), _c("ARAMATH", public=False)), average=False),
}
NOT_PUBLIC = "n/p"


def model_name(res: dict) -> str:
    m = res.get("model", {})
    return m.get("name") or m.get("path") or "model"


def merge_by_model(results_list: Sequence[dict]) -> dict[str, dict[str, list[dict]]]:
    """{model: {task: [entries]}} over several results files (a 0-shot and a 5-shot run of one model
    fill one row); each entry is the task's results entry (with its shots)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for res in results_list:
        tasks = out.setdefault(model_name(res), {})
        for name, e in res.get("tasks", {}).items():
            tasks.setdefault(name, []).append(e)
    return out


def card_cell(tasks: dict[str, list[dict]], col: Column) -> tuple[float | None, str | None, bool]:
    """(score x100, the task used, whether its shot count is the card's) for one column: the first
    candidate task with a score, preferring a run with the card's shot count."""
    for name in col.tasks:
        entries = [e for e in tasks.get(name, []) if e.get(e.get("primary")) is not None]
        if entries:
            same = [e for e in entries if e.get("shots") == col.shots]
            e = (same or entries)[-1]
            return 100 * e[e["primary"]], name, bool(same)
    return None, None, True


def card_rows(table: CardTable, results_list: Sequence[dict]) -> list[dict]:
    """Per model: the cells, the task behind each, and the average as the card computes it (the plain
    mean of all columns; with columns missing, the mean of those present and how many they are)."""
    rows = []
    for model, tasks in merge_by_model(results_list).items():
        cells = [card_cell(tasks, col) for col in table.columns]
        vals = [v for v, _, _ in cells if v is not None]
        avg = sum(vals) / len(vals) if table.average and vals else None
        rows.append({"model": model, "cells": cells, "average": avg, "complete": len(vals) == len(table.columns)})
    return rows


def card_markdown(table: CardTable, results_list: Sequence[dict]) -> str:
    rows = card_rows(table, results_list)
    head = ["Model"] + (["Avg"] if table.average else []) + [c.title for c in table.columns]
    lines = [f"**{table.title}**", "", " | ".join(head) + " |", "|".join("---" for _ in head) + "|"]
    used: dict[str, set] = {}
    other_shots = False
    for r in rows:
        cells = []
        for col, (v, task, same) in zip(table.columns, r["cells"]):
            if v is None:
                cells.append(NOT_PUBLIC if not col.public else "–")
                continue
            used.setdefault(col.title, set()).add(task)
            other_shots |= not same
            cells.append(f"{v:.1f}" + ("" if same else "‡"))
        avg = []
        if table.average:
            n = sum(v is not None for v, _, _ in r["cells"])
            avg = ["–" if r["average"] is None else
                   f"{r['average']:.1f}" + ("" if r["complete"] else f" ({n}/{len(table.columns)})")]
        lines.append(" | ".join([r["model"]] + avg + cells) + " |")
    notes = [f"{NOT_PUBLIC}: the card's data is not public; –: not evaluated."]
    if table.average:
        notes.append("Avg: the mean of all the card's columns (as the card computes it, CrowS-Pairs included); "
                     "(k/n): the mean of the k columns evaluated, not comparable with the card's.")
    if other_shots:
        notes.append(f"‡: evaluated with a shot count other than the card's "
                     f"({', '.join(sorted({str(c.shots) for c in table.columns if c.tasks}))}-shot).")
    if used:
        notes.append("Tasks: " + "; ".join(f"{c} = {', '.join(sorted(t))}" for c, t in used.items()) + ".")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def card_tables(results_list: Sequence[dict], cards: Sequence[str] = tuple(CARD_TABLES)) -> str:
    """The cards' tables, then every evaluated task in the free layout (`markdown_tables`)."""
    unknown = [c for c in cards if c not in CARD_TABLES]
    if unknown:
        raise ValueError(f"unknown card table {', '.join(unknown)} (have: {', '.join(CARD_TABLES)})")
    parts = [card_markdown(CARD_TABLES[c], results_list) for c in cards]
    parts.append("**All evaluated tasks**\n\n" + markdown_tables(results_list))
    return "\n".join(parts)


def plot_card_tables(results_list: Sequence[dict], path: str | os.PathLike,
                     cards: Sequence[str] = tuple(CARD_TABLES)) -> Path:
    """A bar chart per card table (one bar per model and column); columns without data are labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [CARD_TABLES[c] for c in cards]
    fig, axes = plt.subplots(len(tables), 1, figsize=(12, 3.2 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables):
        rows = card_rows(table, results_list)
        cols = [c.title for c in table.columns] + (["Avg"] if table.average else [])
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            vals = [v for v, _, _ in r["cells"]] + ([r["average"]] if table.average else [])
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
            ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], width,
                   label=r["model"])
        labels = [c.title + ("\n(n/p)" if not c.public else "") for c in table.columns] + (["Avg"] if table.average else [])
        ax.set_xticks(range(len(cols)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("score")
        ax.set_title(table.title, fontsize=10)
        if rows:
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, p)
    return p
