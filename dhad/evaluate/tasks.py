"""The benchmark registry: each task is one declarative `Task` entry, faithful to lm-evaluation-harness.

A `Task` says where its rows live (a reader over the data directory, or a Hugging Face dataset behind
an explicit option), how a row becomes a prompt (`doc_to_text`), its answer options (`doc_to_choice`)
and its gold index (`doc_to_target`), and how few-shot examples are chosen. One generic function,
`build_examples`, turns any task into log-likelihood requests; there is no per-task code path.

Facts the templates follow (lm-evaluation-harness 0.4, `api/task.py` and the task YAMLs):
- the request is log P(target_delimiter + choice | context), target_delimiter " ";
- context = description + few-shot examples (text + " " + gold choice, each followed by "\\n\\n") + text;
- `sampler: first_n` takes the first k rows of the few-shot split (MMLU, ArabicMMLU, aexams, the OALL
  ports); otherwise rows are drawn with `random.Random(1234)` — one generator per (sub)task, advanced
  doc by doc in order — and when the few-shot pool is the evaluated split itself the harness draws
  k + 1 rows and drops the evaluated row (`ContextSampler.sample`). The local data has no train
  splits, so tasks whose harness pool is `train` draw from the evaluated split with that exclusion;
- `acc` is the argmax of log-likelihoods, `acc_norm` the argmax of log-likelihood / len(choice) in
  characters (the choice without the delimiter);
- Winogrande is scored by partial evaluation: the options are contexts, the continuation is shared.

Docs are kept in the Hub schema the harness reads (e.g. ARC `choices: {text, label}`), so the same
templates serve the local files and `--hub`. Local readers convert the shipped formats to it (see
`data/eval/MANIFEST.md`): ACVA answers نعم/لا become صح/خطأ, EXAMS subjects come from the row ids,
ArabicMMLU subtasks are the harness's configs "<Subject> (<Level>)".
"""
from __future__ import annotations

import ast
import csv
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


class TaskError(Exception):
    """A task cannot run: unknown name, missing data file, unreadable row (message names it)."""


Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The declarative entry

@dataclass(frozen=True)
class HubSpec:
    """Where the harness reads the task on the Hugging Face Hub (used only with `hub=True`)."""
    path: str
    configs: tuple[str | None, ...] = (None,)      # one dataset config per subtask, or (None,)
    splits: dict[str, str] = field(default_factory=dict)   # our split name -> hub split name
    convert: Callable[[Doc, str | None], Doc] | None = None  # hub row (+ config) -> our doc schema


@dataclass(frozen=True)
class Task:
    name: str
    lang: str                                   # "ar" | "en"
    title: str                                  # column title in the report table
    reader: Callable[[Path], dict[str, list[Doc]]]   # eval data root -> {split: docs}
    doc_to_text: Callable[[Doc], str]
    doc_to_choice: Callable[[Doc], list[str]]
    doc_to_target: Callable[[Doc], int]         # gold index into doc_to_choice
    eval_split: str = "test"
    fewshot_split: str | None = None            # None: the evaluated split (the doc itself excluded)
    sampler: str = "random"                     # "first_n" | "random"
    subtask: Callable[[Doc], str] | None = None  # rows -> subtask key (MMLU subject, ACVA topic, ...)
    description: Callable[[str], str] | None = None  # subtask key -> text before the shots
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    partial: Callable[[Doc], str] | None = None  # Winogrande: choices are contexts, this is the continuation
    mc2_labels: Callable[[Doc], list[int]] | None = None  # TruthfulQA mc2: mass on the label-1 choices
    max_shots: int | None = None                # 0 for tasks whose harness config fixes 0-shot
    harness: str = ""                           # the lm-eval (or LightEval) task it reproduces
    hub: HubSpec | None = None
    note: str = ""
    # per-row metrics from the choices' log-likelihoods, when not acc/acc_norm (CrowS-Pairs, Jais mc2)
    process_results: Callable[[list[float], Example], dict] | None = None
    primary: str | None = None                  # the metric a card's table shows (default: acc_norm, else acc)
    # "lm-eval": the harness 0.4 encoding (`_encode_pair`, special tokens, empty context -> BOS/EOS);
    # "v0.3": the Jais team's harness (lm-eval 0.3): context and continuation encoded separately
    # without special tokens, an empty context is the EOS token
    encoding: str = "lm-eval"
    file_reader: Callable[[Path], dict[str, list[Doc]]] | None = None  # `--task-file NAME=PATH`

    def load(self, data_dir: str | os.PathLike | None = None, hub: bool = False,
             file: str | os.PathLike | None = None) -> dict[str, list[Doc]]:
        """Rows per split: from `file` (a user's own copy), the Hub (explicit) or the data directory."""
        if file is not None:
            if self.file_reader is None:
                raise TaskError(f"{self.name}: this task reads its own data files; --task-file is not supported")
            return self.file_reader(Path(file))
        if hub:
            return _load_hub(self)
        return self.reader(resolve_data_dir(data_dir))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """`--data DIR` (default $DHAD_DATA_DIR): accept the data root (with eval/ inside) or eval/ itself."""
    d = data_dir if data_dir is not None else os.environ.get("DHAD_DATA_DIR")
    if not d:
        raise TaskError("no data directory: pass --data DIR or set $DHAD_DATA_DIR "
                        "(or use --hub to download the datasets from the Hugging Face Hub)")
    d = Path(d).expanduser()
    if (d / "eval").is_dir():
        d = d / "eval"
    if not d.is_dir():
        raise TaskError(f"data directory not found: {d}")
    return d


# ---------------------------------------------------------------------------------------------
# Readers: the shipped file formats -> harness (Hub) schema

def _need(path: Path) -> Path:
    if not path.is_file():
        raise TaskError(f"data file not found: {path} (see data/eval/MANIFEST.md; --data DIR points at the data root)")
    return path


def json_error(where: str, line: str, e: json.JSONDecodeError) -> str:
    """`file:line: not valid JSON (<reason> at column c: <the text there>)`: the whole reason, where, and
    an excerpt of the line around it (`JSONDecodeError.msg` alone stops at "... at")."""
    at = e.colno - 1
    excerpt = line if len(line) <= 120 else line[max(0, at - 50):at + 50]
    reason = e.msg.removesuffix(" at")  # "Invalid control character at": the position follows
    return f"{where}: not valid JSON ({reason} at column {e.colno}: {excerpt!r})"


def read_jsonl(path: Path) -> list[Doc]:
    rows = []
    with open(_need(path), encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskError(json_error(f"{path}:{i}", line.rstrip("\n"), e)) from None
    return rows


def read_json_list(path: Path) -> list[Doc]:
    text = _need(path).read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        lines = text.splitlines()
        raise TaskError(json_error(f"{path}:{e.lineno}", lines[e.lineno - 1] if e.lineno <= len(lines) else "", e)) from None
    if not isinstance(rows, list):
        raise TaskError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def read_csv(path: Path, header: list[str] | None = None) -> list[Doc]:
    with open(_need(path), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, fieldnames=header))


def read_rows(path: Path) -> list[Doc]:
    """A user's data file by its suffix: .jsonl, .json (a list of rows) or .csv (a header row)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return read_json_list(path)
    if suffix in (".csv", ".tsv"):
        with open(_need(path), encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise TaskError(f"{path}: unknown data file type {suffix!r} (use .jsonl, .json or .csv)")


def _subject_files(folder: Path, split: str) -> list[tuple[str, Path]]:
    d = folder / split
    if not d.is_dir():
        raise TaskError(f"data folder not found: {d}")
    suffix = f"_{split}.csv"
    return sorted((p.name[: -len(suffix)], p) for p in d.glob(f"*{suffix}"))


def _mmlu_reader(root: Path) -> dict[str, list[Doc]]:
    # cais/mmlu schema: {question, subject, choices[4], answer:int}; local CSV answer is already 0-3.
    out = {}
    for split in ("dev", "test"):
        docs = []
        for subject, path in _subject_files(root / "mmlu", split):
            for r in read_csv(path):
                docs.append({"question": r["question"], "subject": subject,
                             "choices": [r[f"choice{i}"] for i in range(4)], "answer": _int(r["answer"])})
        out[split] = docs
    return out


def _mmlu_ar_reader(root: Path) -> dict[str, list[Doc]]:
    # OALL/Arabic_MMLU (= AceGPT MMLUArabic): {question, A, B, C, D, answer:"A".."D", subject}
    out = {}
    for split in ("dev", "test"):
        docs = []
        for subject, path in _subject_files(root / "mmlu_ar_translated", split):
            for r in read_csv(path, header=["question", "A", "B", "C", "D", "answer"]):
                docs.append({**r, "subject": subject})
        out[split] = docs
    return out


def _exams_reader(root: Path) -> dict[str, list[Doc]]:
    # AceGPT EXAMS split (= Hennara/aexams, OALL/Arabic_EXAMS); the subject is the id prefix.
    out = {}
    for split in ("dev", "test"):
        docs = read_jsonl(root / "exams_ar" / f"acegpt_exam_{split}.jsonl")
        out[split] = [{**d, "subject": d["id"].rsplit("-", 1)[0]} for d in docs]
    return out


ACVA_ANSWER = {"نعم": "صح", "لا": "خطأ"}  # AceGPT yes/no -> OALL true/false (MANIFEST)


def _acva_reader(root: Path) -> dict[str, list[Doc]]:
    out = {}
    for split, ours in (("dev", "dev"), ("test", "test")):
        docs = read_jsonl(root / "acva" / f"difficulty-easy-TF_{ours}.jsonl")
        out[split] = [{**d, "answer": ACVA_ANSWER.get(d.get("answer"), d.get("answer")),
                       "topic": d["id"].rsplit("-", 1)[0].replace(" ", "_")} for d in docs]
    return out


def _arabicmmlu_reader(root: Path) -> dict[str, list[Doc]]:
    # The ArabicMMLU CSV columns are the Hub schema; dev = the rows flagged is_few_shot.
    rows = read_csv(root / "arabicmmlu" / "ArabicMMLU_Egypt_subset.csv")
    return {"dev": [r for r in rows if r.get("is_few_shot") == "1"],
            "test": [r for r in rows if r.get("is_few_shot") != "1"]}


def _letters_or_digits(answer_key: str, n: int) -> list[str]:
    # ARC / OpenBookQA labels: "A".."E", or "1".."5" on the rows with numeric answer keys.
    return [str(i + 1) for i in range(n)] if answer_key.strip().isdigit() else [chr(65 + i) for i in range(n)]


def _with_labels(d: Doc) -> Doc:
    out = {k: v for k, v in d.items() if k not in ("choices", "gold")}
    out["choices"] = {"text": list(d["choices"]), "label": _letters_or_digits(str(d["answerKey"]), len(d["choices"]))}
    if out["choices"]["label"].index(str(d["answerKey"]).strip()) != d["gold"]:
        raise ValueError(f"answerKey {d['answerKey']!r} disagrees with gold {d['gold']}")
    return out


def _jsonl_reader(path: str, split: str, convert: Callable[[Doc], Doc] | None = None):
    def read(root: Path) -> dict[str, list[Doc]]:
        docs = read_jsonl(root / path)
        if convert is not None:
            docs = [_safe(convert, d) for d in docs]
        return {split: docs}
    return read


def _safe(fn, d: Doc) -> Doc:
    # Conversion problems become a counted skip later (the doc keeps the reason), never a crash.
    try:
        return fn(d)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        return {**d, "_malformed": f"{type(e).__name__}: {e}"}


def _race_reader(root: Path) -> dict[str, list[Doc]]:
    # EleutherAI/race stores `problems` as a Python-literal string; we keep the parsed list.
    return {"test": read_jsonl(root / "race" / "race_high_test.jsonl")}


def _int(x) -> int:
    return int(str(x).strip())


# ---------------------------------------------------------------------------------------------
# Templates (each mirrors the harness YAML / utils.py named in the task's `harness` field)

LETTERS = ["A", "B", "C", "D", "E"]
LETTERS_AR = ["أ", "ب", "ج", "د", "هـ"]  # OALL's LETTER_INDICES_AR[:5]


def _mmlu_text(d):
    return (f"{d['question'].strip()}\nA. {d['choices'][0]}\nB. {d['choices'][1]}\n"
            f"C. {d['choices'][2]}\nD. {d['choices'][3]}\nAnswer:")


def _mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


# lm-eval arabicmmlu/utils.py (the paper's English prompt, `prepare_data_en`)
_AMMLU_LEVEL = {"Primary": "primary school", "Middle": "middle school", "High": "high school",
                "Univ": "university", "Prof": "professional"}
_AMMLU_CONFIG_LEVEL = {"Primary": "Primary School", "Middle": "Middle School", "High": "High School",
                       "Univ": "University", "Prof": "Professional"}


def _ammlu_options(d) -> list[str]:
    return [d[f"Option {i}"] for i in range(1, 6) if d.get(f"Option {i}")]


def _ammlu_text(d):
    level = "" if not d.get("Level") else " for " + _AMMLU_LEVEL[d["Level"]]
    country = "" if not d.get("Country") else " in " + d["Country"]
    question = d["Question"] if not d.get("Context") else f"{d['Context']}\n\n{d['Question']}"
    options = []
    for i in range(5):  # the harness stops at the first empty option
        if not d.get(f"Option {i + 1}"):
            break
        options.append(f"{LETTERS[i]}. {d[f'Option {i + 1}']}")
    return (f"This is a {d['Subject']} question{level}{country}. Select the correct answer!\n\n"
            f"Question: {question}\n" + "\n".join(options) + "\n\nAnswer:")


def _ammlu_choices(d):
    return [LETTERS[i] for i in range(5) if d.get(f"Option {i + 1}")]


def _ammlu_target(d):
    return _ammlu_choices(d).index(d["Answer Key"].strip())


def _ammlu_config(d) -> str:
    # MBZUAI/ArabicMMLU config names: "Biology (High School)", "Driving Test", "Arabic Language (General)".
    lvl = d.get("Level")
    return f"{d['Subject']} ({_AMMLU_CONFIG_LEVEL[lvl]})" if lvl else d["Subject"]


def _ammlu_lighteval_text(d):
    # LightEval community_tasks/arabic_evals.py `arabic_mmlu_pfn` (OALL v2): no context, Arabic letters.
    keys = [LETTERS_AR[i] for i in range(5) if d.get(f"Option {i + 1}")]
    q = f"السؤال التالي هو سؤال متعدد الإختيارات. اختر الإجابة الصحيحة:\n\n{d['Question']}\n"
    return q + "".join(f"{k}. {c}\n" for k, c in zip(keys, _ammlu_options(d))) + "الإجابة:"


# aexams (lm-eval): the subject's Arabic description, then a full-width colon U+FF1A after الجواب.
AEXAMS_DESCRIPTION = {
    "Biology": "قم بالإجابة على مايلي في مجال العلوم الحيوية\n\n",
    "Islamic Studies": "قم بالإجابة على مايلي في مجال العلوم الإسلامية \n\n",
    "Physics": "قم بالإجابة على مايلي في مجال الفيزياء \n\n",
    "Science": "قم بالإجابة على مايلي في مجال العلوم \n\n",
    "Social": "قم بالإجابة على مايلي في مجال العلوم الإجتماعية \n\n",
}


def _abcd_text(d, colon="Answer:"):
    return f"{d['question'].strip()}\nA. {d['A']}\nB. {d['B']}\nC. {d['C']}\nD. {d['D']}\n{colon}"


def _letter_target(d):
    return LETTERS[:4].index(d["answer"].strip())


# OALL v1 ports in lm-eval (arabic_leaderboard_complete/*/utils.py)
def _oall_mmlu_text(d):
    q = (f"الأسئلة التالية هي أسئلة متعددة الإختيارات مع الجواب الصحيح حول {d['subject'].replace('_', ' ')}. \n\n"
         f"{d['question']}\n")
    return q + "".join(f"{k}. {c}\n" for k, c in zip(LETTERS_AR[:4], (d["A"], d["B"], d["C"], d["D"]))) + "الإجابة:"


def _lighteval_mmlu_mt_text(d):
    # LightEval `arabic_mmlu_mt_pfn`
    q = f"السؤال التالي هو سؤال متعدد الإختيارات. اختر الإجابة الصحيحة: أ، ب، ج، أو د... إلخ. \n\n{d['question']}\n"
    return q + "".join(f"{k}. {c}\n" for k, c in zip(LETTERS_AR[:4], (d["A"], d["B"], d["C"], d["D"]))) + "الإجابة:"


def _oall_exams_text(d):
    opts = [f" {LETTERS_AR[i]}) {c}\n" for i, c in enumerate((d["A"], d["B"], d["C"], d["D"]))]
    return (f"الأسئلة التالية هي أسئلة متعددة الإختيارات مع الجواب الصحيح حول {d['subject'].replace('_', ' ')}. \n\n"
            f"السؤال: {d['question']}\n" + "\n".join(opts) + "\nالإجابة:")


ACVA_CHOICES = ["صح", "خطأ"]

TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _race_problems(d) -> list[dict]:
    p = d["problems"]
    return ast.literal_eval(p) if isinstance(p, str) else p


def _race_answer(problem) -> str:
    return problem["options"]["ABCD".index(problem["answer"])]


def _race_text(d):
    # lm-eval race/preprocess_race.py: earlier problems answered inline, cloze questions filled in.
    problems = _race_problems(d)
    text = "Article: " + d["article"] + "\n\n"
    for p in problems[:-1]:
        if p["question"][-6:] == "  _  .":
            text += p["question"][:-5] + _race_answer(p) + "\n"
        else:
            text += "Question: " + p["question"] + "\n" + "Answer: " + _race_answer(p) + "\n"
    return text + problems[-1]["question"]


def _wino_idx(d) -> int:
    return d["sentence"].index("_")


# ---------------------------------------------------------------------------------------------
# Hub converters (Hub rows -> the schema above). Only used with `--hub`.

def _hub_hellaswag(d, _cfg):
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return {"query": hellaswag_preprocess(d["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in d["endings"]], "gold": int(d["label"])}


def hellaswag_preprocess(text: str) -> str:
    """lm-eval hellaswag/utils.py `preprocess` (the local file already had it applied)."""
    import re
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


# ---------------------------------------------------------------------------------------------
# The registry

_ACVA_TOPICS = (
    "Algeria", "Ancient_Egypt", "Arab_Empire", "Arabic_Architecture", "Arabic_Art", "Arabic_Astronomy",
    "Arabic_Calligraphy", "Arabic_Ceremony", "Arabic_Clothing", "Arabic_Culture", "Arabic_Food", "Arabic_Funeral",
    "Arabic_Geography", "Arabic_History", "Arabic_Language_Origin", "Arabic_Literature", "Arabic_Math",
    "Arabic_Medicine", "Arabic_Music", "Arabic_Ornament", "Arabic_Philosophy", "Arabic_Physics_and_Chemistry",
    "Arabic_Wedding", "Bahrain", "Comoros", "Egypt_modern", "InfluenceFromAncientEgypt", "InfluenceFromByzantium",
    "InfluenceFromChina", "InfluenceFromGreece", "InfluenceFromIslam", "InfluenceFromPersia", "InfluenceFromRome",
    "Iraq", "Islam_Education", "Islam_branches_and_schools", "Islamic_law_system", "Jordan", "Kuwait", "Lebanon",
    "Libya", "Mauritania", "Mesopotamia_civilization", "Morocco", "Oman", "Palestine", "Qatar", "Saudi_Arabia",
    "Somalia", "Sudan", "Syria", "Tunisia", "United_Arab_Emirates", "Yemen", "communication", "computer_and_phone",
    "daily_life", "entertainment"
)
_AEXAMS_CONFIGS = {"Biology": "Biology", "IslamicStudies": "Islamic Studies", "Physics": "Physics",
                   "Science": "Science", "Social": "Social"}

_MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions"
)

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


# -- Arabic ------------------------------------------------------------------------------------
register(Task(
    name="arabicmmlu", lang="ar", title="ArabicMMLU", reader=_arabicmmlu_reader,
    doc_to_text=_ammlu_text, doc_to_choice=_ammlu_choices, doc_to_target=_ammlu_target,
    fewshot_split="dev", sampler="first_n", subtask=_ammlu_config, metrics=("acc",),
    harness="arabicmmlu (lm-eval; MBZUAI/ArabicMMLU, English prompt of the paper)",
    hub=HubSpec("MBZUAI/ArabicMMLU", ("All",), {"test": "test", "dev": "dev"}),
    note="local file is the Egypt subset (2,506 of 14,575 rows)"))
register(replace(
    TASKS["arabicmmlu"], name="arabicmmlu_lighteval", title="ArabicMMLU (LightEval)",
    doc_to_text=_ammlu_lighteval_text, doc_to_choice=lambda d: [LETTERS_AR[i] for i in range(5) if d.get(f"Option {i + 1}")],
    target_delimiter="", metrics=("acc", "acc_norm"), max_shots=0,
    harness="community|arabic_mmlu (LightEval, OALL v2)"))

register(Task(
    name="mmlu_ar", lang="ar", title="MMLU (ar)", reader=_mmlu_ar_reader,
    doc_to_text=_oall_mmlu_text, doc_to_choice=lambda d: LETTERS_AR[:4], doc_to_target=_letter_target,
    fewshot_split="dev", sampler="first_n", subtask=lambda d: d["subject"],
    harness="arabic_leaderboard_arabic_mmlu (lm-eval port of OALL v1; OALL/Arabic_MMLU)",
    hub=HubSpec("OALL/Arabic_MMLU", _MMLU_SUBJECTS, {"test": "test", "dev": "dev"},
                convert=lambda d, cfg: {**d, "subject": d.get("subject") or cfg})))
register(replace(
    TASKS["mmlu_ar"], name="mmlu_ar_lighteval", title="MMLU (ar, LightEval)", doc_to_text=_lighteval_mmlu_mt_text,
    target_delimiter="", max_shots=0, harness="community|arabic_mmlu_mt (LightEval, OALL v1)"))
register(replace(
    TASKS["mmlu_ar"], name="mmlu_ar_mmlu_template", title="MMLU (ar, MMLU template)",
    doc_to_text=lambda d: _abcd_text(d), doc_to_choice=lambda d: LETTERS[:4],
    description=_mmlu_description, metrics=("acc",),
    harness="mmlu template (lm-eval) on the translated rows", hub=None))

register(Task(
    name="exams_ar", lang="ar", title="EXAMS (ar)", reader=_exams_reader,
    doc_to_text=lambda d: _abcd_text(d, "الجواب："), doc_to_choice=lambda d: LETTERS[:4],
    doc_to_target=_letter_target, fewshot_split="dev", sampler="first_n", subtask=lambda d: d["subject"],
    description=lambda s: AEXAMS_DESCRIPTION[s],
    harness="aexams (lm-eval; Hennara/aexams = AceGPT EXAMS split)",
    hub=HubSpec("Hennara/aexams", tuple(_AEXAMS_CONFIGS), {"test": "test", "dev": "dev"},
                convert=lambda d, cfg: {**d, "subject": _AEXAMS_CONFIGS[cfg]})))
register(replace(
    TASKS["exams_ar"], name="exams_ar_oall", title="EXAMS (ar, OALL)", doc_to_text=_oall_exams_text,
    doc_to_choice=lambda d: LETTERS_AR[:4], subtask=None, description=None,
    harness="arabic_leaderboard_arabic_exams (lm-eval port of OALL v1; OALL/Arabic_EXAMS)",
    hub=HubSpec("OALL/Arabic_EXAMS", ("default",), {"test": "test", "dev": "validation"})))
register(replace(
    TASKS["exams_ar_oall"], name="exams_ar_lighteval", title="EXAMS (ar, LightEval)", target_delimiter="",
    max_shots=0, harness="community|arabic_exams (LightEval)"))

register(Task(
    name="acva", lang="ar", title="ACVA", reader=_acva_reader,
    doc_to_text=lambda d: f"السؤال: {d['question']}\nالإجابة:", doc_to_choice=lambda d: ACVA_CHOICES,
    doc_to_target=lambda d: ACVA_CHOICES.index(d["answer"]), fewshot_split="dev", sampler="first_n",
    subtask=lambda d: d["topic"],
    harness="arabic_leaderboard_acva (lm-eval port of OALL v1; OALL/ACVA)",
    hub=HubSpec("OALL/ACVA", tuple(_ACVA_TOPICS), {"test": "test", "dev": "validation"},
                convert=lambda d, cfg: {**d, "topic": cfg}),
    note="AceGPT answers نعم/لا mapped to صح/خطأ"))
register(replace(TASKS["acva"], name="acva_lighteval", title="ACVA (LightEval)", target_delimiter="",
                 max_shots=0, harness="community|acva (LightEval)"))

# -- English -----------------------------------------------------------------------------------
register(Task(
    name="mmlu", lang="en", title="MMLU", reader=_mmlu_reader,
    doc_to_text=_mmlu_text, doc_to_choice=lambda d: LETTERS[:4], doc_to_target=lambda d: int(d["answer"]),
    fewshot_split="dev", sampler="first_n", subtask=lambda d: d["subject"], description=_mmlu_description,
    metrics=("acc",), harness="mmlu (lm-eval; cais/mmlu)",
    hub=HubSpec("cais/mmlu", ("all",), {"test": "test", "dev": "dev"})))

register(Task(
    name="hellaswag", lang="en", title="HellaSwag",
    reader=_jsonl_reader("hellaswag/hellaswag_validation.jsonl", "validation",
                         lambda d: {**d, "choices": list(d["endings"]), "gold": int(d["label"])}),
    doc_to_text=lambda d: d["query"], doc_to_choice=lambda d: d["choices"], doc_to_target=lambda d: d["gold"],
    eval_split="validation", harness="hellaswag (lm-eval; Rowan/hellaswag)",
    hub=HubSpec("Rowan/hellaswag", (None,), {"validation": "validation"}, convert=_hub_hellaswag),
    note="local rows lack ctx_a/ctx_b, so ctx_b is not capitalize()d as the harness does; --hub is exact"))

for _name, _title, _path in (("arc_easy", "ARC-Easy", "arc_easy/arc_easy_test.jsonl"),
                             ("arc_challenge", "ARC-Challenge", "arc_challenge/arc_challenge_test.jsonl")):
    register(Task(
        name=_name, lang="en", title=_title,
        reader=_jsonl_reader(_path, "test", _with_labels),
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:", doc_to_choice=lambda d: d["choices"]["text"],
        doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"]),
        harness=f"{_name} (lm-eval; allenai/ai2_arc)",
        hub=HubSpec("allenai/ai2_arc", ("ARC-Easy" if _name == "arc_easy" else "ARC-Challenge",), {"test": "test"})))

register(Task(
    name="piqa", lang="en", title="PIQA", reader=_jsonl_reader("piqa/piqa_validation.jsonl", "validation"),
    doc_to_text=lambda d: f"Question: {d['goal']}\nAnswer:", doc_to_choice=lambda d: [d["sol1"], d["sol2"]],
    doc_to_target=lambda d: int(d["label"]), eval_split="validation", harness="piqa (lm-eval; baber/piqa)",
    hub=HubSpec("baber/piqa", (None,), {"validation": "validation"})))

register(Task(
    name="boolq", lang="en", title="BoolQ", reader=_jsonl_reader("boolq/boolq_validation.jsonl", "validation"),
    doc_to_text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
    doc_to_choice=lambda d: ["no", "yes"], doc_to_target=lambda d: int(d["label"]), eval_split="validation",
    metrics=("acc",), harness="boolq (lm-eval super_glue; aps/super_glue boolq)",
    hub=HubSpec("aps/super_glue", ("boolq",), {"validation": "validation"})))

register(Task(
    name="siqa", lang="en", title="SIQA", reader=_jsonl_reader("siqa/siqa_validation.jsonl", "validation"),
    doc_to_text=lambda d: f"Q: {d['context']} {d['question']}\nA:",
    doc_to_choice=lambda d: [d["answerA"], d["answerB"], d["answerC"]],
    doc_to_target=lambda d: _int(d["label"]) - 1, eval_split="validation", metrics=("acc",),
    harness="social_iqa (lm-eval; lighteval/siqa)",
    hub=HubSpec("lighteval/siqa", (None,), {"validation": "validation"})))

register(Task(
    name="openbookqa", lang="en", title="OpenBookQA",
    reader=_jsonl_reader("openbookqa/openbookqa_main_test.jsonl", "test", _with_labels),
    doc_to_text=lambda d: d["question_stem"], doc_to_choice=lambda d: d["choices"]["text"],
    doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"].lstrip()),
    harness="openbookqa (lm-eval; allenai/openbookqa main)",
    hub=HubSpec("allenai/openbookqa", ("main",), {"test": "test"})))

register(Task(
    name="winogrande", lang="en", title="Winogrande",
    reader=_jsonl_reader("winogrande/winogrande_xl_validation.jsonl", "validation"),
    doc_to_text=lambda d: d["sentence"],
    doc_to_choice=lambda d: [d["sentence"][:_wino_idx(d)] + o for o in (d["option1"], d["option2"])],
    doc_to_target=lambda d: {"1": 0, "2": 1}[str(d["answer"]).strip()],
    partial=lambda d: d["sentence"][_wino_idx(d) + 1:].strip(),
    eval_split="validation", metrics=("acc",), harness="winogrande (lm-eval; winogrande_xl, partial scoring)",
    hub=HubSpec("allenai/winogrande", ("winogrande_xl",), {"validation": "validation"})))

register(Task(
    name="race", lang="en", title="RACE", reader=_race_reader,
    doc_to_text=_race_text, doc_to_choice=lambda d: list(_race_problems(d)[-1]["options"][:4]),
    doc_to_target=lambda d: "ABCD".index(_race_problems(d)[-1]["answer"]), metrics=("acc",), max_shots=0,
    harness="race (lm-eval; EleutherAI/race high)",
    hub=HubSpec("EleutherAI/race", ("high",), {"test": "test"})))

for _mc in ("mc1", "mc2"):
    register(Task(
        name=f"truthfulqa_{_mc}", lang="en", title=f"TruthfulQA {_mc}",
        reader=_jsonl_reader("truthfulqa/truthfulqa_mc_validation.jsonl", "validation"),
        doc_to_text=lambda d: TRUTHFULQA_PREAMBLE + "\n\nQ: " + d["question"] + "\nA:",
        doc_to_choice=(lambda d, k=f"{_mc}_targets": d[k]["choices"]), doc_to_target=lambda d: 0,
        mc2_labels=(lambda d: d["mc2_targets"]["labels"]) if _mc == "mc2" else None,
        eval_split="validation", metrics=("acc",), max_shots=0,
        harness=f"truthfulqa_{_mc} (lm-eval; truthful_qa multiple_choice, v0 file)",
        hub=HubSpec("truthfulqa/truthful_qa", ("multiple_choice",), {"validation": "validation"})))

# CrowS-Pairs and the Arabic-translated benchmarks (the Jais card's remaining columns)
from dhad.evaluate import card_tasks  # noqa: E402,F401  (registers its tasks)

# Name groups the CLI accepts in --tasks
GROUPS = {
    "arabic": ["arabicmmlu", "mmlu_ar", "exams_ar", "acva"],
    "english": ["mmlu", "hellaswag", "piqa", "boolq", "siqa", "arc_challenge", "arc_easy", "openbookqa",
                "winogrande", "race", "truthfulqa_mc1", "truthfulqa_mc2"],
}
GROUPS["crows_pairs"] = ["crows_pairs_english", "crows_pairs_french"]
GROUPS["arabic_mt"] = ["arc_ar", "arc_easy_ar", "truthfulqa_ar_mc1", "truthfulqa_ar_mc2", "m_mmlu_ar"]
GROUPS["all"] = GROUPS["arabic"] + GROUPS["english"]
# what the cards' tables can be filled with from public data (see report.CARD_TABLES)
GROUPS["jais_card"] = ["arabicmmlu", "mmlu_ar", "exams_ar", "arc_ar_jais", "truthfulqa_ar_mc2_jais",
                       *GROUPS["english"], "crows_pairs_english"]
GROUPS["allam_card"] = ["mmlu", "mmlu_ar", "arabicmmlu", "exams_ar", "acva"]


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        import difflib
        close = difflib.get_close_matches(name, list(TASKS) + list(GROUPS), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise TaskError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}") from None


def resolve_tasks(spec: str | list[str]) -> list[Task]:
    """'arabicmmlu,exams_ar' or a group name ('arabic', 'english', 'all') -> tasks, in order, no repeats."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise TaskError("no tasks given")
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, [n]):
            if m not in out:
                out.append(m)
    return [get_task(n) for n in out]


# ---------------------------------------------------------------------------------------------
# From rows to requests

@dataclass
class Example:
    """One evaluated row: its requests (context, continuation) per choice and what scores them."""
    task: str
    subtask: str | None
    doc_index: int                  # row index in the evaluated split (within its subtask)
    requests: list[tuple[str, str]]
    choices: list[str]              # for acc_norm lengths (the harness's doc_to_choice)
    gold: int
    mc2_labels: list[int] | None = None


@dataclass
class Skip:
    task: str
    subtask: str | None
    doc_index: int
    reason: str


def _doc_fields(task: Task, doc: Doc) -> tuple[str, list[str], int, str | None]:
    if "_malformed" in doc:
        raise ValueError(doc["_malformed"])
    text = task.doc_to_text(doc)
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_target(doc)
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold!r} outside the {len(choices)} choices")
    if any(not isinstance(c, str) or c == "" for c in choices):
        raise ValueError("empty choice")
    cont = task.partial(doc) if task.partial else None
    return text, choices, gold, cont


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return f"{type(exc).__name__}: {exc}"


def _shot(task: Task, doc: Doc) -> str:
    text, choices, gold, cont = _doc_fields(task, doc)
    if task.partial:  # the harness renders the gold context, then the shared continuation
        return choices[gold] + task.target_delimiter + cont + task.fewshot_delimiter
    return text + task.target_delimiter + choices[gold] + task.fewshot_delimiter


def _split_by(task: Task, docs: list[Doc]) -> dict[str | None, list[Doc]]:
    if task.subtask is None:
        return {None: docs}
    out: dict[str | None, list[Doc]] = {}
    for d in docs:
        try:
            key = task.subtask(d)
        except (KeyError, ValueError, TypeError):
            key = None
        out.setdefault(key, []).append(d)
    return out


def build_examples(task: Task, splits: dict[str, list[Doc]], shots: int = 0, limit: int | None = None,
                   seed: int = FEWSHOT_SEED) -> tuple[list[Example], list[Skip]]:
    """Requests for every evaluated row (the first `limit` per subtask), with the harness's shots.

    Rows that cannot be rendered (a missing field, an answer key outside the options) are returned
    as `Skip`s with the reason; the caller counts and reports them.
    """
    if task.max_shots is not None and shots > task.max_shots:
        raise TaskError(f"{task.name}: the harness evaluates this task {task.max_shots}-shot only "
                        f"(its prompt is fixed); got --shots {shots}")
    if task.eval_split not in splits:
        raise TaskError(f"{task.name}: split {task.eval_split!r} not in the data (have {sorted(splits)})")
    fs_name = task.fewshot_split or task.eval_split
    if shots > 0 and fs_name not in splits:
        raise TaskError(f"{task.name}: few-shot split {fs_name!r} not in the data (have {sorted(splits)})")
    same_split = fs_name == task.eval_split
    eval_parts = _split_by(task, splits[task.eval_split])
    fs_parts = _split_by(task, splits.get(fs_name, [])) if shots > 0 else {}

    examples: list[Example] = []
    skips: list[Skip] = []
    for key, docs in eval_parts.items():
        if task.subtask is not None and key is None:
            skips.extend(Skip(task.name, None, i, "no subtask key (subject/topic) in the row") for i in range(len(docs)))
            continue
        docs = docs[:limit] if limit is not None else docs
        pool = fs_parts.get(key, []) if shots > 0 else []
        need = shots + (1 if same_split else 0)  # the evaluated row itself is never its own shot
        if shots > 0 and len(pool) < need:  # the harness would stop; we skip this subtask and say why
            why = f"{shots}-shot needs {need} rows in the few-shot split {fs_name!r}, which has {len(pool)}"
            skips.extend(Skip(task.name, key, i, why) for i in range(len(docs)))
            continue
        rnd = random.Random(seed)
        description = task.description(key) if task.description else ""
        for i, doc in enumerate(docs):
            try:
                text, choices, gold, cont = _doc_fields(task, doc)
                shots_docs = _sample(task, pool, shots, doc if same_split else None, rnd) if shots > 0 else []
                prefix = description + "".join(_shot(task, s) for s in shots_docs)
            except TaskError:
                raise
            except (KeyError, ValueError, TypeError, IndexError, AttributeError, SyntaxError) as e:
                skips.append(Skip(task.name, key, i, _describe(e)))
                continue
            if task.partial:
                reqs = [(prefix + c, task.target_delimiter + cont) for c in choices]
            else:
                reqs = [(prefix + text, task.target_delimiter + c) for c in choices]
            labels = list(task.mc2_labels(doc)) if task.mc2_labels else None
            examples.append(Example(task.name, key, i, reqs, list(choices), gold, labels))
    return examples, skips


def _sample(task: Task, pool: list[Doc], n: int, eval_doc: Doc | None, rnd: random.Random) -> list[Doc]:
    """lm-eval's samplers (api/samplers.py), reproduced draw for draw."""
    if task.sampler == "first_n":
        p = [x for x in pool if x != eval_doc] if eval_doc is not None else pool
        return p[:n]
    if eval_doc is None:
        return rnd.sample(pool, n)
    res = [x for x in rnd.sample(pool, n + 1) if x != eval_doc][:n]
    if len(res) < n:  # duplicates of the evaluated row were drawn: resample without any copy
        res = rnd.sample([x for x in pool if x != eval_doc], n)
    return res


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub (explicit opt-in)

def _load_hub(task: Task) -> dict[str, list[Doc]]:
    spec = task.hub
    if spec is None:
        why = f" ({task.note})" if task.note else ""
        raise TaskError(f"{task.name}: no Hugging Face dataset is known for this task{why}; "
                        "use the local files (--data) or --task-file")
    try:
        import datasets
    except ImportError:
        raise TaskError("--hub needs the `datasets` package: pip install 'dhad[hub]'") from None
    configs = spec.configs or (None,)
    out: dict[str, list[Doc]] = {}
    for ours, theirs in spec.splits.items():
        docs: list[Doc] = []
        for cfg in configs:
            try:
                ds = datasets.load_dataset(spec.path, cfg, split=theirs)
            except Exception as e:  # noqa: BLE001 - offline, missing, gated: `datasets` raises many types
                raise TaskError(f"{task.name}: could not load {spec.path}"
                                f"{'/' + cfg if cfg else ''} split {theirs!r} from the Hugging Face Hub "
                                f"({type(e).__name__}: {str(e)[:200]}). Offline? Use the local files (--data) where the task "
                                f"has them, or your own copy (--task-file {task.name}=FILE).") from None
            for row in ds:
                row = dict(row)
                if task.name == "race":
                    row["problems"] = _race_problems(row)
                docs.append(spec.convert(row, cfg) if spec.convert else row)
        out[ours] = docs
    return out
