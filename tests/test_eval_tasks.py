"""Task registry: prompt strings of real rows against golden strings, few-shot selection, bad input.

The golden strings below are written out by hand from the harness's templates (aexams YAML,
arabicmmlu/utils.py, the OALL ports, mmlu YAML) and the raw rows of ../shared/data/eval.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dhad.evaluate import tasks as T

FW_COLON = "\uff1a"  # FULLWIDTH COLON, after الجواب in the aexams template


def _ex(name, data, shots=0, limit=3, subtask=None):
    task = T.get_task(name)
    splits = task.load(data)
    if subtask is not None:
        splits = {k: [d for d in v if task.subtask(d) == subtask] for k, v in splits.items()}
    ex, skips = T.build_examples(task, splits, shots=shots, limit=limit)
    assert not skips
    return ex


# ---------------------------------------------------------------------------------------------
# Golden prompts on real rows

@pytest.mark.data
def test_exams_ar_golden_fullwidth_colon(shared_data):
    e = _ex("exams_ar", shared_data, subtask="Islamic Studies")[0]
    want = ("قم بالإجابة على مايلي في مجال العلوم الإسلامية \n\n"
            "قال تعالى ( فَلََدْعٌ نَادِيَهُ (17) سَنَدْع الدْبَانِيَةِ (18) ) معنى كلمة الزّبَاِيَةِ هو\n"
            "A. ملائكة الجبال\nB. ملائكة السحاب\nC. خزنة جهنم\nD. حملة العرش\n"
            "الجواب" + FW_COLON)
    assert e.requests == [(want, " A"), (want, " B"), (want, " C"), (want, " D")]
    assert e.gold == 2 and e.subtask == "Islamic Studies"
    assert want.endswith("\u0627\u0644\u062c\u0648\u0627\u0628\uff1a") and ":" not in want[-2:]


@pytest.mark.data
def test_exams_ar_five_shot_takes_the_first_dev_rows_of_the_subject(shared_data):
    e = _ex("exams_ar", shared_data, shots=5, subtask="Biology")[0]
    ctx = e.requests[0][0]
    # Biology's description has no space before the blank line (the harness YAML's own string)
    first_shot = ("تٌم الحصول على انسول نٌ نق الترك بٌ وخال من الشوائب باستخدام تقن ةٌ :\n"
                  "A. الهندسة الوراث ةٌ\nB. الأجسام المضادة أحاد ةٌ المنشا\nC. الأجسام المضادة متعددة المنشا\n"
                  "D. المستشعرات الب وٌلوج ةٌ\nالجواب" + FW_COLON + " B\n\n")
    assert ctx.startswith("قم بالإجابة على مايلي في مجال العلوم الحيوية\n\n" + first_shot)
    assert ctx.count("الجواب" + FW_COLON) == 6 and ctx.count("\n\n") == 6


@pytest.mark.data
def test_acva_golden_maps_yes_no_to_true_false(shared_data):
    e = _ex("acva", shared_data, subtask="Algeria")[0]
    want = "السؤال: ثورة الجزائر عام 1954 كانت ضد الاستعمار الفرنسي.\nالإجابة:"
    assert e.requests == [(want, " صح"), (want, " خطأ")]
    assert e.gold == 0  # the file says نعم


@pytest.mark.data
def test_arabicmmlu_golden(shared_data):
    ex = _ex("arabicmmlu", shared_data, subtask="Driving Test", limit=2)
    q1 = ("This is a Driving Test question in Egypt. Select the correct answer!\n\n"
          "Question: زيادة ضغط الهواء بالاطارات عن الحد خطر على سلامة السيارة وقد يسبب انفجار الاطارات.\n"
          "A. العبارة صحيحة\nB. العبارة خاطئة\n\nAnswer:")
    assert ex[0].requests == [(q1, " A"), (q1, " B")] and ex[0].gold == 0
    assert [c for _, c in ex[1].requests] == [" A", " B", " C"] and ex[1].gold == 2  # 3 options, key C
    with_context = next(e for e in _ex("arabicmmlu", shared_data, subtask="Arabic Language (High School)", limit=400)
                        if "يقول أحمد شوقي" in e.requests[0][0])
    assert with_context.requests[0][0].startswith(
        "This is a Arabic Language question for high school in Egypt. Select the correct answer!\n\n"
        "Question: يقول أحمد شوقي:\n")
    assert "\n\nاستنتج المظهر" in with_context.requests[0][0]


@pytest.mark.data
def test_mmlu_ar_golden_arabic_letters(shared_data):
    e = _ex("mmlu_ar", shared_data, subtask="anatomy")[0]
    want = ("الأسئلة التالية هي أسئلة متعددة الإختيارات مع الجواب الصحيح حول anatomy. \n\n"
            "ما هي الأعراض المتأتية عن ضغط الأعصاب الوجهية في فتحة الكعبرة الرأسية؟\n"
            "أ. شلل عضلات الوجه المتأرجحة في الجانب الأيمن\nب. شلل عضلات الوجه وفقدان الذوق.\n"
            "ج. شلل عضلات الوجه وفقدان الذوق ودمع.\nد. شلل عضلات الوجه وفقدان الذوق والدمع وانخفاض اللعاب.\n"
            "الإجابة:")
    assert e.requests == [(want, " أ"), (want, " ب"), (want, " ج"), (want, " د")] and e.gold == 0
    light = _ex("mmlu_ar_lighteval", shared_data, subtask="anatomy")[0]
    assert light.requests[0][1] == "أ"  # LightEval scores the letter right after the colon
    assert light.requests[0][0].startswith("السؤال التالي هو سؤال متعدد الإختيارات. اختر الإجابة الصحيحة: أ، ب، ج، أو د... إلخ. \n\n")


@pytest.mark.data
def test_mmlu_golden(shared_data):
    e = _ex("mmlu", shared_data, subtask="anatomy")[0]
    want = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
            "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
            "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
            "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
            "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:")
    assert e.requests[0] == (want, " A") and e.gold == 0


@pytest.mark.data
def test_english_templates(shared_data):
    arc = _ex("arc_challenge", shared_data)[0]
    assert arc.requests[0][0].startswith("Question: An astronomer observes that a planet rotates faster")
    assert arc.requests[0][0].endswith("\nAnswer:") and arc.gold == 2
    wino = _ex("winogrande", shared_data)[0]  # partial scoring: options are contexts
    assert wino.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wino.gold == 1
    tqa = _ex("truthfulqa_mc2", shared_data)[0]
    assert tqa.requests[0][0].startswith("Q: What is human life expectancy in the United States?\n")
    assert tqa.requests[0][0].endswith("Spain.\n\nQ: What is the smallest country in the world that is at least "
                                       "one square mile in area?\nA:")
    assert tqa.mc2_labels[0] == 1 and tqa.gold == 0
    siqa = _ex("siqa", shared_data)[0]
    assert siqa.requests[0][0] == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                                   "What does Tracy need to do before this?\nA:") and siqa.gold == 2
    boolq = _ex("boolq", shared_data)[0]
    assert boolq.requests[0][0].endswith("?\nAnswer:") and [c for _, c in boolq.requests] == [" no", " yes"]


@pytest.mark.data
def test_arc_rows_with_three_or_five_choices(shared_data):
    task = T.get_task("arc_challenge")
    docs = task.load(shared_data)["test"]
    odd = [d for d in docs if len(d["choices"]["text"]) != 4]
    assert len(odd) == 7  # 4 three-choice + 3 five-choice rows (MANIFEST)
    for d in odd:
        assert d["choices"]["label"] == list("ABCDE"[: len(d["choices"]["text"])])
        assert task.doc_to_target(d) == "ABCDE".index(d["answerKey"])


@pytest.mark.data
def test_race_fills_earlier_questions(shared_data):
    e = _ex("race", shared_data, limit=1)[0]
    ctx = e.requests[0][0]
    assert ctx.startswith("Article: The hardworking blacksmith")
    assert "\nAnswer: " in ctx or "_" not in ctx.split("\n\n", 1)[1]


# ---------------------------------------------------------------------------------------------
# Few-shot selection is lm-eval's sampler, draw for draw

def test_random_fewshot_draws_are_lm_eval_s():
    samplers = pytest.importorskip("lm_eval.api.samplers")
    pool = [{"q": i % 17, "i": i} for i in range(40)] + [{"q": 3, "i": 3}]  # a duplicate of row 3
    task = T.get_task("arc_easy")
    ours, theirs = random.Random(T.FEWSHOT_SEED), samplers.ContextSampler(pool, rnd=None)
    theirs.set_rnd(T.FEWSHOT_SEED)
    for doc in pool[:25]:
        assert T._sample(task, pool, 5, doc, ours) == list(theirs.sample(5, eval_doc=doc))
    first = T.get_task("mmlu")
    assert T._sample(first, pool, 3, None, ours) == list(samplers.FirstNSampler(pool).sample(3))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors or counted skips

def test_unknown_task_names_the_close_match():
    with pytest.raises(T.TaskError, match="unknown task 'acvaa'.*Did you mean: acva"):
        T.resolve_tasks("acvaa")
    assert [t.name for t in T.resolve_tasks("arabic")] == T.GROUPS["arabic"]


def test_missing_data_file_is_named(tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(T.TaskError, match=r"data file not found: .*acva/difficulty-easy-TF_dev\.jsonl"):
        T.get_task("acva").load(tmp_path)
    with pytest.raises(T.TaskError, match="data directory not found"):
        T.get_task("acva").load(tmp_path / "nope")


def test_no_data_dir(monkeypatch):
    monkeypatch.delenv("DHAD_DATA_DIR", raising=False)
    with pytest.raises(T.TaskError, match="--data DIR or set \\$DHAD_DATA_DIR"):
        T.get_task("piqa").load(None)


def test_hub_is_explicit_and_fails_clearly_offline(monkeypatch):
    from test_eval_helpers import offline
    offline(monkeypatch)
    with pytest.raises(T.TaskError, match="could not load baber/piqa .*Hugging Face Hub.*Offline"):
        T.get_task("piqa").load(None, hub=True)
    with pytest.raises(T.TaskError, match="no Hugging Face dataset"):
        T.get_task("mmlu_ar_mmlu_template").load(None, hub=True)


def _write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _bad_exams(root: Path) -> Path:
    ok = {"id": "Physics-1", "question": "س", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "A"}
    _write_jsonl(root / "eval/exams_ar/acegpt_exam_dev.jsonl", [dict(ok, id=f"Physics-{i}") for i in range(5)])
    _write_jsonl(root / "eval/exams_ar/acegpt_exam_test.jsonl", [
        ok, dict(ok, id="Physics-2", answer="Z"), {k: v for k, v in ok.items() if k != "D"}, dict(ok, id="Physics-4")])
    return root


def test_malformed_rows_are_counted_skips(tmp_path):
    task = T.get_task("exams_ar")
    ex, skips = T.build_examples(task, task.load(_bad_exams(tmp_path)), shots=5)
    assert [e.doc_index for e in ex] == [0, 3]
    assert [s.doc_index for s in skips] == [1, 2]
    assert "'Z'" in skips[0].reason and "missing field 'D'" in skips[1].reason
    _write_jsonl(tmp_path / "eval/acva/difficulty-easy-TF_dev.jsonl", [{"id": "Oman-1", "question": "q", "answer": "نعم"}])
    _write_jsonl(tmp_path / "eval/acva/difficulty-easy-TF_test.jsonl", [{"id": "Oman-2", "question": "q", "answer": "ربما"}])
    acva = T.get_task("acva")
    ex, skips = T.build_examples(acva, acva.load(tmp_path))
    assert not ex and len(skips) == 1
    ex, skips = T.build_examples(acva, acva.load(tmp_path), shots=5)  # 1 dev row for Oman: the subtask is skipped
    assert "5-shot needs 5 rows" in skips[0].reason
    with pytest.raises(T.TaskError, match="0-shot only"):
        T.build_examples(T.get_task("truthfulqa_mc2"), {"validation": []}, shots=5)


def test_arc_row_whose_key_disagrees_with_gold_is_skipped(tmp_path):
    _write_jsonl(tmp_path / "eval/arc_easy/arc_easy_test.jsonl", [
        {"idx": 0, "question": "q", "choices": ["a", "b"], "gold": 1, "answerKey": "B"},
        {"idx": 1, "question": "q", "choices": ["a", "b"], "gold": 0, "answerKey": "B"}])
    task = T.get_task("arc_easy")
    ex, skips = T.build_examples(task, task.load(tmp_path))
    assert len(ex) == 1 and "disagrees with gold" in skips[0].reason


def test_every_registered_task_is_declarative():
    for task in T.TASKS.values():
        assert task.lang in ("ar", "en", "fr") and task.harness and task.title
        assert task.sampler in ("first_n", "random") and task.encoding in ("lm-eval", "v0.3")
    assert {"arabicmmlu", "mmlu", "mmlu_ar", "exams_ar", "acva", "hellaswag", "piqa", "boolq", "siqa", "arc_challenge",
            "arc_easy", "openbookqa", "winogrande", "race", "truthfulqa_mc1", "truthfulqa_mc2"} <= set(T.TASKS)
