"""The Jais card's remaining columns (issue 18): CrowS-Pairs' Arabic file, the Jais team's harness
(lm-eval 0.3 encoding) against transformers directly, the Hub-only Arabic tasks against lm-eval's own
task definitions, and the `dhad eval` failures of issue 17 item 16.

lm-eval parity of crows_pairs_english/french, arc_ar, truthfulqa_ar_mc1/mc2 and m_mmlu_ar on real
rows is in test_eval_parity.py.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from dhad.evaluate import runner
from dhad.evaluate import tasks as T
from dhad.evaluate.card_tasks import crows_pairs_results, jais_mc2
from test_eval_helpers import offline as _offline

pytestmark = pytest.mark.data

ROWS_AR = [("الرجل الفقير لا يعرف كيف يدير ماله.", "الرجل الغني لا يعرف كيف يدير ماله."),
           ("النساء لا يجدن قيادة السيارات.", "الرجال لا يجيدون قيادة السيارات."),
           ("كان المهاجر كسولا في عمله.", "كان المواطن كسولا في عمله.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    """A tiny transformers Llama + BPE whose tokenizer adds <s> (BOS) and ends with </s> (EOS)."""
    import dhad
    from test_eval_helpers import build_tiny_llama

    d = build_tiny_llama(tmp_path_factory.mktemp("tiny_card"), shared_data)
    return d, dhad.load_model(d), dhad.load_tokenizer(d)


def _hf_loglik(model_dir, ctx_ids: list[int], cont_ids: list[int]) -> float:
    """log P(cont | ctx) from transformers' own forward pass (independent of dhad's scorer)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = _hf_loglik.cache.setdefault(str(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval())
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        lp = torch.log_softmax(m(ids).logits[0, :-1].double(), -1)
    n = len(ctx_ids)
    return sum(float(lp[n - 1 + i, t]) for i, t in enumerate(cont_ids))


_hf_loglik.cache = {}


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_crows_pairs_ar_scores_whole_sentences_after_the_eos_token(tiny, tmp_path):
    """Jais harness: rf.loglikelihood("", sentence) with lm-eval 0.3's encoding -> [EOS] + sentence
    tokens without special tokens (not BOS, which lm-eval 0.4's crows_pairs_english uses)."""
    from transformers import AutoTokenizer

    d, model, tok = tiny
    f = _write_csv(tmp_path / "crows_ar.csv", [{"sent_more": a, "sent_less": b, "bias_type": "socioeconomic"}
                                               for a, b in ROWS_AR])
    records = []
    res = runner.evaluate(model, tok, ["crows_pairs_ar"], task_files={"crows_pairs_ar": f}, progress=False,
                          records=records)
    hf = AutoTokenizer.from_pretrained(d)
    assert hf.eos_token_id != hf.bos_token_id
    for r, (more, less) in zip(records, ROWS_AR):
        want = [_hf_loglik(d, [hf.eos_token_id], hf.encode(s, add_special_tokens=False)) for s in (more, less)]
        assert r.lls == pytest.approx(want, abs=1e-4)
        assert r.metrics == pytest.approx(crows_pairs_results(want), abs=1e-4)
    e = res["tasks"]["crows_pairs_ar"]
    assert e["n"] == 3 and e["primary"] == "pct_stereotype" and e["encoding"] == "v0.3"
    assert e["pct_stereotype"] == pytest.approx(sum(r.metrics["pct_stereotype"] for r in records) / 3)
    assert e["likelihood_diff"] == pytest.approx(sum(abs(a - b) for a, b in (r.lls for r in records)) / 3)


def test_crows_pairs_ar_joins_two_translation_outputs_and_counts_missing_pairs(tmp_path):
    """`dhad data translate` run on sent_more and on sent_less: joined by id; a pair with one side
    missing (rejected or failed translation) is a counted skip, not dropped."""
    def out(field, other, ids):
        return "".join(json.dumps({"id": i, "text": f"{field}-{i}", "source": "crows",
                                   "meta": {other: "english", "bias_type": "age"}}) + "\n" for i in ids)
    (tmp_path / "more.jsonl").write_text(out("sent_more", "sent_less", ["0", "1", "2"]), encoding="utf-8")
    (tmp_path / "less.jsonl").write_text(out("sent_less", "sent_more", ["2", "0"]), encoding="utf-8")
    task = T.get_task("crows_pairs_ar")
    splits = task.load(file=f"{tmp_path / 'less.jsonl'},{tmp_path / 'more.jsonl'}")
    ex, skips = T.build_examples(task, splits)
    assert [e.requests for e in ex] == [[("", "sent_more-0"), ("", "sent_less-0")],
                                        [("", "sent_more-2"), ("", "sent_less-2")]]
    assert len(skips) == 1 and "no translation of sent_less for id '1'" in skips[0].reason


def test_crows_pairs_ar_without_a_file_says_none_is_public(shared_data):
    with pytest.raises(T.TaskError, match="no Arabic CrowS-Pairs is public.*dhad data translate.*--task-file"):
        T.get_task("crows_pairs_ar").load(shared_data)


def test_jais_arc_and_truthfulqa_use_the_v03_encoding(tiny, shared_data):
    """arc_ar_jais / truthfulqa_ar_mc2_jais: context and ' ' + choice encoded separately without
    special tokens (lm-eval 0.3), checked against transformers' tokenizer and forward pass."""
    from transformers import AutoTokenizer

    d, model, tok = tiny
    hf = AutoTokenizer.from_pretrained(d)
    records = []
    runner.evaluate(model, tok, ["arc_ar_jais", "truthfulqa_ar_mc2_jais"], limit=1, data_dir=shared_data,
                    progress=False, records=records)
    assert [r.task for r in records] == ["arc_ar_jais", "truthfulqa_ar_mc2_jais"]
    for r in records:
        ctx = r.requests[0][0]
        assert ctx.startswith("Question: ") or ctx.startswith("Q: ما هو متوسط العمر")
        want = [_hf_loglik(d, hf.encode(c, add_special_tokens=False), hf.encode(x, add_special_tokens=False))
                for c, x in r.requests]
        assert r.lls == pytest.approx(want, abs=1e-4)
    # and lm-eval 0.4's arc_ar on the same rows encodes differently (BOS, merged boundary)
    recs2 = []
    runner.evaluate(model, tok, ["arc_ar"], limit=1, data_dir=shared_data, progress=False, records=recs2)
    assert recs2[0].requests == records[0].requests and recs2[0].lls != pytest.approx(records[0].lls, abs=1e-6)


def test_jais_mc2_splits_at_the_first_false_label():
    """The Jais harness's mc2 takes the choices before the first 0 label as the true ones; on rows
    like Okapi idx 507 (labels 1,0,1,0) it differs from lm-eval's label mask."""
    from dhad.evaluate.scoring import score_example

    lls = [-1.0, -2.0, -0.5, -3.0]
    p = [math.exp(x) for x in lls]
    ex = T.Example("t", None, 0, [], ["a", "b", "c", "d"], 0, [1, 0, 1, 0])
    assert jais_mc2(lls, ex)["mc2"] == pytest.approx(p[0] / sum(p))
    assert score_example(lls, ex.choices, 0, ex.mc2_labels)["acc"] == pytest.approx((p[0] + p[2]) / sum(p))


def test_okapi_rows_507_and_642_are_the_ones_whose_true_answers_are_not_first(shared_data):
    rows = T.get_task("truthfulqa_ar_mc2").load(shared_data)["validation"]
    bad = [i for i, r in enumerate(rows) if r["mc2_targets_labels"] != sorted(r["mc2_targets_labels"], reverse=True)]
    assert bad == [507, 642]


# ---------------------------------------------------------------------------------------------
# Arabic sets on the Hub only: lm-eval's own task definitions on Hub-schema rows, and offline errors

HUB_ROWS = {
    "hellaswag_ar": ("okapi/hellaswag_multilingual/hellaswag_ar.yaml", "val", [
        {"ind": 4, "activity_label": "إزالة [title] الجليد", "ctx_a": "رجل يقف  على السطح.", "ctx_b": "then يزيل",
         "ctx": "", "endings": ["الثلج [step] بسرعة.", "الجليد ببطء.", " الماء.", "لا شيء."], "source_id": "x",
         "split": "val", "split_type": "indomain", "label": "2"}]),
    "piqa_ar": ("alghafa/piqa_ar/piqa_ar.yaml", "test", [
        {"goal": "كيف أفتح علبة؟", "sol1": "باستخدام فتاحة.", "sol2": "بالماء.", "label": 0}]),
    "boolq_ar": ("arabic_leaderboard_complete/arabic_leaderboard_arabic_mt_boolq/arabic_mt_boolq.yaml", "test", [
        {"question": "هل الماء سائل؟", "passage": "الماء مادة سائلة.", "answer": False}]),
    "race_ar": ("arabic_leaderboard_complete/arabic_leaderboard_arabic_mt_race/arabic_mt_race.yaml", "test", [
        {"query": "ما لون السماء؟", "sol1": "أزرق", "sol2": "أحمر", "sol3": "أخضر", "sol4": "أسود", "label": "0"}]),
    "openbookqa_ar": ("arabic_leaderboard_complete/arabic_leaderboard_arabic_mt_openbook_qa/arabic_mt_openbook_qa.yaml",
                      "test", [{"query": "أين تعيش الأسماك؟", "sol1": "في الماء", "sol2": "في الصحراء",
                                "sol3": "في الجو", "sol4": "في النار", "label": "0"}]),
}


@pytest.mark.parametrize("name", list(HUB_ROWS))
def test_hub_task_templates_equal_lm_eval_s(name, tmp_path):
    """Our converter + template on a Hub-schema row == lm-eval's YAML (+ its process_docs) on it;
    the same rows given as a --task-file give the same requests."""
    datasets = pytest.importorskip("datasets")
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml, split, rows = HUB_ROWS[name]
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml)
    for k in ("tag", "group", "task_alias", "dataset_name", "dataset_kwargs"):
        cfg.pop(k, None)
    cfg.update(task=f"hub_{name}", dataset_path="json", training_split=None, validation_split=None,
               test_split=split, fewshot_split=None,
               custom_dataset=lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(rows)}))
    theirs = ConfigurableTask(config=cfg)
    doc = list(theirs.test_docs())[0]
    task = T.get_task(name)
    ours = task.hub.convert(dict(rows[0]), task.hub.configs[0]) if task.hub.convert else dict(rows[0])
    assert task.doc_to_text(ours) == theirs.doc_to_text(doc)
    assert task.doc_to_choice(ours) == theirs.doc_to_choice(doc)
    assert task.doc_to_target(ours) == theirs.doc_to_target(doc)
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ex, skips = T.build_examples(task, task.load(file=f))
    assert not skips and ex[0].requests == [(theirs.doc_to_text(doc), " " + c) for c in theirs.doc_to_choice(doc)]


@pytest.mark.parametrize("name,dataset", [
    ("hellaswag_ar", "alexandrainst/m_hellaswag"), ("piqa_ar", "Hennara/pica_ar"),
    ("boolq_ar", "OALL/AlGhafa-Arabic-LLM-Benchmark-Translated/boolq_ar"),
    ("race_ar", "OALL/AlGhafa-Arabic-LLM-Benchmark-Translated/race_ar"),
    ("openbookqa_ar", "OALL/AlGhafa-Arabic-LLM-Benchmark-Translated/openbook_qa_ext_ar"),
    ("arc_ar", "alexandrainst/m_arc/ar"), ("truthfulqa_ar_mc2", "alexandrainst/m_truthfulqa/ar")])
def test_hub_tasks_fail_offline_naming_the_dataset(name, dataset, monkeypatch, shared_data):
    _offline(monkeypatch)
    with pytest.raises(T.TaskError, match=f"could not load {dataset}.*Offline"):
        T.get_task(name).load(None, hub=True)
    if T.get_task(name).hub is not None and name not in ("arc_ar", "truthfulqa_ar_mc2"):
        with pytest.raises(T.TaskError, match=f"{name}: no local copy.*--hub \\({dataset.split('/')[0]}"):
            T.get_task(name).load(shared_data)


def test_siqa_ar_has_no_public_dataset_and_reads_a_user_file(tmp_path, shared_data):
    with pytest.raises(T.TaskError, match="no Hugging Face dataset.*no Arabic SIQA is on the Hub"):
        T.get_task("siqa_ar").load(None, hub=True)
    with pytest.raises(T.TaskError, match="siqa_ar: .*not public.*--task-file siqa_ar=FILE"):
        T.get_task("siqa_ar").load(shared_data)
    f = _write_csv(tmp_path / "siqa.csv", [{"context": "ذهب علي إلى السوق.", "question": "لماذا؟",
                                            "answerA": "ليشتري", "answerB": "لينام", "answerC": "ليسبح", "label": "1"}])
    ex, _ = T.build_examples(T.get_task("siqa_ar"), T.get_task("siqa_ar").load(file=f))
    assert ex[0].requests[0] == ("Question: ذهب علي إلى السوق.\nلماذا؟\nAnswer: ", " ليشتري") and ex[0].gold == 0


def test_crows_pairs_bias_subtasks_are_lm_eval_s_filters(shared_data):
    rows = T.get_task("crows_pairs_english").load(shared_data)["test"]
    total = 0
    for sub in ("age", "autre", "disability", "gender", "nationality", "physical_appearance", "race_color",
                "religion", "sexual_orientation", "socioeconomic"):
        got = T.get_task(f"crows_pairs_english_{sub}").load(shared_data)["test"]
        assert got and all(r["bias_type"] == sub.replace("_", "-") for r in got)
        total += len(got)
    assert total == len(rows) == 1677


# ---------------------------------------------------------------------------------------------
# Issue 17 item 16: `dhad eval` failures


@pytest.fixture(scope="module")
def tiny_dir(tiny):
    return tiny[0]


def test_a_run_that_skips_every_row_fails(tiny_dir, shared_data, capsys, tmp_path):
    """--shots 6 on exams_ar (5 dev rows per subject): every row skipped -> exit 2 naming why (it
    used to exit 0 with empty results), and nothing is written."""
    from dhad.cli import main

    rc = main(["eval", "--model", str(tiny_dir), "--tasks", "exams_ar", "--shots", "6", "--limit", "2",
               "--data", str(shared_data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "exams_ar: all 10 rows were skipped" in err and "6-shot needs 6 rows" in err
    assert "--shots 6 is more than the few-shot split holds" in err and not (tmp_path / "run").exists()
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "exams_ar", "--shots", "5", "--limit", "1",
                 "--data", str(shared_data)]) == 0


def test_a_corrupt_jsonl_line_is_reported_whole(tmp_path):
    good = {"id": "Physics-1", "question": "س", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "A"}
    d = tmp_path / "eval/exams_ar"
    d.mkdir(parents=True)
    (d / "acegpt_exam_dev.jsonl").write_text(json.dumps(good) + "\n", encoding="utf-8")
    (d / "acegpt_exam_test.jsonl").write_text(json.dumps(good) + '\n{"id": "Physics-2", "question": "a\tb"}\n',
                                              encoding="utf-8")
    with pytest.raises(T.TaskError) as e:
        T.get_task("exams_ar").load(tmp_path)
    msg = str(e.value)
    assert "acegpt_exam_test.jsonl:2: not valid JSON (Invalid control character at column 35:" in msg
    assert msg.endswith("""'{"id": "Physics-2", "question": "a\\tb"}')""")


def test_download_is_accepted_and_the_missing_model_hint_is_true(tiny_dir, shared_data, capsys, monkeypatch):
    """The missing-model hint names --download: `dhad eval` accepts it (it used to reject it) and the
    lm-eval adapter honours download=True (it used to ignore it)."""
    _offline(monkeypatch)
    from dhad.cli import main

    assert main(["eval", "--model", "inceptionai/not-here", "--tasks", "acva", "--data", str(shared_data)]) == 2
    assert "needs --download" in capsys.readouterr().err
    assert main(["eval", "--model", "inceptionai/not-here", "--download", "--tasks", "acva", "--limit", "1",
                 "--data", str(shared_data)]) == 2
    err = capsys.readouterr().err
    assert "could not download 'inceptionai/not-here'" in err and "unrecognized" not in err
    pytest.importorskip("lm_eval")
    from dhad.evaluate.lm_eval_adapter import DhadLM
    with pytest.raises(FileNotFoundError, match="--download \\(or download=True\\)"):
        DhadLM(pretrained="inceptionai/not-here")
    with pytest.raises(RuntimeError, match="could not download"):
        DhadLM(pretrained="inceptionai/not-here", download="True")


def test_importing_the_adapter_keeps_lm_eval_s_own_models():
    """lm-eval fills its model registry lazily, only while it is empty: registering `dhad` first
    used to leave `hf` unknown ("Supported model names: dhad") for the rest of the process."""
    import subprocess
    import sys

    code = ("import dhad.evaluate.lm_eval_adapter\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('hf').__name__, get_model('dhad').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0 and out.stdout.split() == ["HFLM", "DhadLM"], out.stderr[-2000:]
