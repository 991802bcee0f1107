"""Results on disk and as the cards' tables.

    write_results(results, "out/", records)   # results.json, samples.jsonl, results.md (atomic writes)
    markdown_tables([results_a, results_b])   # one table per language: Model | Avg | ArabicMMLU | ...
    mtbench_table(summaries)                  # Model | AR Average | AR Turn 1 | AR Turn 2 | EN Average | ...

Scores are printed x100 with one decimal, as the Jais-family card prints them; MT-bench scores
(1-10) with two decimals, as the ALLaM card prints them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
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
            "else acc (TruthfulQA mc2: the mc2 score). Avg: mean over the tasks shown.\n")
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
