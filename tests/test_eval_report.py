"""`dhad eval table`: the cards' tables laid out as the cards print them (checked against the model
cards in ../shared/seeds), the average as the cards compute it, columns without data marked."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dhad.evaluate import report
from dhad.evaluate import tasks as T

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"


def _card_lines(name: str) -> list[str]:
    p = SEEDS / name
    if not p.is_file():
        pytest.skip(f"model card not found at {p}")
    return p.read_text(encoding="utf-8").splitlines()


def _jais_table(lang: str) -> tuple[list[str], list[tuple[str, float, list[float]]]]:
    """(column titles, [(model, Avg, values)]) of the Jais card's Arabic or English results: its
    Jais-family table and its Jais-adapted table (same columns)."""
    lines = _card_lines("jais-family-card.txt")
    heads = [i for i, ln in enumerate(lines) if "| 平均 |" in ln]
    assert len(heads) == 4, heads  # Arabic: family, adapted; English: family, adapted
    titles, rows = None, []
    for i in heads[:2] if lang == "ar" else heads[2:]:
        t = [c.strip() for c in lines[i].split("|")[2:] if c.strip()]
        assert titles is None or t == titles
        titles = t
        for ln in lines[i + 2:]:
            if not ln.startswith("jais-"):
                break
            cells = [c.strip() for c in ln.split("|") if c.strip()]
            rows.append((cells[0], float(cells[1]), [float(x) for x in cells[2:]]))
    return titles, rows


def _norm(title: str) -> str:
    return re.sub(r"\s+", "", title)


def _results(model: str, scores: dict[str, float], shots: int = 0) -> dict:
    """A results.json as `dhad eval` writes it, with the tasks' primary metrics set to `scores`."""
    tasks = {}
    for name, v in scores.items():
        from dhad.evaluate.runner import primary_metric
        t = T.get_task(name)
        p = primary_metric(t)
        tasks[name] = {"lang": t.lang, "title": t.title, "shots": shots, "n": 10, "primary": p, p: v}
    return {"model": {"name": model}, "config": {"shots": shots}, "tasks": tasks, "languages": {}}


def test_jais_tables_have_the_card_s_columns_in_order():
    for k, key in (("ar", "jais-ar"), ("en", "jais-en")):
        titles, _ = _jais_table(k)
        assert [_norm(c.title) for c in report.CARD_TABLES[key].columns] == [_norm(t) for t in titles]
    allam = next(ln for ln in _card_lines("allam-2-7b-instruct-card.txt") if ln.startswith("Model MMLU-en"))
    assert " ".join(c.title for c in report.CARD_TABLES["allam"].columns) == allam.removeprefix("Model ")


def test_the_card_s_average_is_the_plain_mean_of_all_its_columns():
    """On every row of both Jais tables (CrowS-Pairs' pct_stereotype included as printed)."""
    for k in ("ar", "en"):
        _, rows = _jais_table(k)
        assert len(rows) == 20
        for model, avg, vals in rows:
            assert sum(vals) / len(vals) == pytest.approx(avg, abs=0.051), model


def test_english_table_reproduces_the_card_s_rows_and_averages():
    titles, rows = _jais_table("en")
    table = report.CARD_TABLES["jais-en"]
    results = [_results(model, {col.tasks[0]: v / 100 for col, v in zip(table.columns, vals)})
               for model, _, vals in rows]
    md = report.card_markdown(table, results)
    for model, avg, vals in rows:
        line = next(ln for ln in md.splitlines() if ln.startswith(model + " |"))
        cells = [c.strip() for c in line.split("|")[1:] if c.strip()]
        assert float(cells[0]) == pytest.approx(avg, abs=0.051)
        assert [float(c) for c in cells[1:]] == pytest.approx(vals, abs=1e-9)


def test_missing_and_not_public_columns_are_marked_and_runs_merge_by_model():
    table = report.CARD_TABLES["jais-ar"]
    r0 = _results("m", {"arabicmmlu": 0.40, "exams_ar": 0.30, "arc_ar": 0.25, "crows_pairs_ar": 0.55})
    r1 = _results("m", {"arc_ar_jais": 0.35})  # the Jais-format task wins the column over lm-eval's
    md = report.card_markdown(table, [r0, r1])
    def cells(ln):
        return [c.strip() for c in ln.split("|") if c.strip()]

    cell = dict(zip(cells(md.splitlines()[2]), cells(next(ln for ln in md.splitlines() if ln.startswith("m |")))))
    assert cell["ArabicMMLU*"] == "40.0" and cell["ARC-C"] == "35.0" and cell["CrowS-Pairs"] == "55.0"
    assert cell["LitQA*"] == cell["agqa"] == cell["agrc"] == "n/p" and cell["PIQA"] == "–"
    assert cell["Avg"] == f"{(40 + 30 + 35 + 55) / 4:.1f} (4/14)"
    assert "ARC-C = arc_ar_jais" in md


def test_allam_table_prefers_the_card_s_shots_and_marks_others():
    table = report.CARD_TABLES["allam"]
    zero = _results("m", {"exams_ar": 0.31, "mmlu": 0.5}, shots=0)
    five = _results("m", {"exams_ar": 0.42}, shots=5)
    cells = {c.title: v for c, (v, _, _) in zip(table.columns, report.card_rows(table, [zero, five])[0]["cells"])}
    assert cells["Exams Ar (5-shot)"] == pytest.approx(42.0) and cells["MMLU-en (0-shot)"] == pytest.approx(50.0)
    md = report.card_markdown(table, [_results("m", {"acva": 0.7}, shots=0)])
    assert "70.0‡" in md and "shot count other than the card's" in md


@pytest.mark.data
def test_cli_table_writes_markdown_and_png(tmp_path, capsys):
    for i, r in enumerate([_results("a", {"mmlu": 0.3, "crows_pairs_english": 0.6}),
                           _results("b", {"mmlu": 0.4, "exams_ar": 0.35}, shots=5)]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r), encoding="utf-8")
    from dhad.cli import main

    assert main(["eval", "table", str(tmp_path / "r0"), str(tmp_path / "r1"), "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "**Jais-family card: Arabic**" in out and "**ALLaM card**" in out
    assert (tmp_path / "t/tables.md").read_text(encoding="utf-8") in out
    png = (tmp_path / "t/tables.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert main(["eval", "table", str(tmp_path / "r0"), "--card", "jais-xx"]) == 2
    assert "unknown card table jais-xx" in capsys.readouterr().err
