"""dhad eval == lm-evaluation-harness, example by example, on the same tiny model and data.

One session-scoped lm-eval run (`lm_eval.simple_evaluate`, `model="hf"`, i.e. transformers on the
same weights) covers every case below. Each harness task is built from the harness's *own* YAML
(templates, `!function` helpers, few-shot sampler) with only the dataset swapped for the rows dhad's
readers produced from ../shared/data, so what is compared is prompts, few-shot selection,
tokenization, scoring and metrics. For every evaluated row we check: the (context, continuation)
requests are the same strings, the log-likelihoods agree, the argmax choice (acc and acc_norm) is
the same, and so are the task accuracies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.data, pytest.mark.slow]

from test_eval_helpers import build_tiny_llama

LIMIT = 5


@dataclass
class Case:
    task: str                      # dhad task
    yaml: str                      # harness YAML, relative to lm_eval/tasks
    subtask: str | None            # dhad subtask key (subject / topic / config)
    splits: dict[str, str]         # harness split -> dhad split
    test_split: str = "test"
    fewshot_split: str | None = None
    shots: tuple[int, ...] = (0, 5)
    drop: tuple[str, ...] = ()     # YAML keys not applicable to the local rows
    to_hub: object = None          # dhad doc -> the harness's Hub schema, where they differ
    name: str = field(default="")
    atol: float = 2e-3             # log-likelihood tolerance (issue 18's tasks: 1e-4)
    harness_rows: str | None = None  # give the harness this dhad task's rows (it filters them itself)


def _race_hub(d):
    return {**d, "problems": str(d["problems"])}  # EleutherAI/race stores a Python-literal string


AL = "arabic_leaderboard_complete/"
CASES = [
    # Arabic (0- and 5-shot): aexams per subject (first_n from dev), OALL ports (first_n from validation)
    Case("exams_ar", "aexams/aexams_IslamicStudies.yaml", "Islamic Studies", {"test": "test", "dev": "dev"}, fewshot_split="dev"),
    Case("exams_ar", "aexams/aexams_Biology.yaml", "Biology", {"test": "test", "dev": "dev"}, fewshot_split="dev"),
    Case("acva", AL + "arabic_leaderboard_avca/arabic_leaderboard_acva_Algeria.yaml", "Algeria",
         {"test": "test", "validation": "dev"}, fewshot_split="validation"),
    Case("mmlu_ar", AL + "arabic_leaderboard_arabic_mmlu/arabic_leaderboard_arabic_mmlu_anatomy.yaml", "anatomy",
         {"test": "test", "dev": "dev"}, fewshot_split="dev"),
    Case("exams_ar_oall", AL + "arabic_leaderboard_arabic_exams/arabic_exams.yaml", None,
         {"test": "test", "validation": "dev"}, fewshot_split="validation"),
    Case("arabicmmlu", "arabicmmlu/arabicmmlu_accounting_university.yaml", "Accounting (University)",
         {"test": "test", "dev": "dev"}, fewshot_split="dev", shots=(0, 2)),  # dev holds 3 rows here
    # English: MMLU (first_n from dev); ARC / PIQA / Winogrande draw shots at random from the
    # evaluated split (the local data has no train split), the harness's exclusion path
    Case("mmlu", "mmlu/default/mmlu_anatomy.yaml", "anatomy", {"test": "test", "dev": "dev"}, fewshot_split="dev"),
    Case("arc_easy", "arc/arc_easy.yaml", None, {"test": "test"}, fewshot_split="test"),
    Case("piqa", "piqa/piqa.yaml", None, {"test": "validation"}, fewshot_split="test"),
    Case("winogrande", "winogrande/default.yaml", None, {"test": "validation"}, fewshot_split="test"),
    Case("truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml", None, {"test": "validation"}, shots=(0,)),
    Case("truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", None, {"test": "validation"}, shots=(0,)),
    Case("boolq", "super_glue/boolq/default.yaml", None, {"test": "validation"}, shots=(0,)),
    Case("siqa", "siqa/siqa.yaml", None, {"test": "validation"}, shots=(0,)),
    Case("openbookqa", "openbookqa/openbookqa.yaml", None, {"test": "test"}, shots=(0,)),
    Case("race", "race/race.yaml", None, {"test": "test"}, shots=(0,), to_hub=_race_hub),
    # local HellaSwag rows are already preprocessed: the harness's process_docs needs ctx_a/ctx_b
    Case("hellaswag", "hellaswag/hellaswag.yaml", None, {"test": "validation"}, shots=(0,), drop=("process_docs",)),
    # CrowS-Pairs (empty context, whole sentences; likelihood_diff and pct_stereotype) and the Okapi
    # Arabic translations read from Okapi's own files (the alexandrainst/m_* rows), lm-eval's okapi YAMLs
    Case("crows_pairs_english", "crows_pairs/crows_pairs_english.yaml", None, {"test": "test"}, shots=(0,), atol=1e-4),
    Case("crows_pairs_french", "crows_pairs/crows_pairs_french.yaml", None, {"test": "test"}, shots=(0,), atol=1e-4),
    Case("crows_pairs_english_gender", "crows_pairs/crows_pairs_english_gender.yaml", None, {"test": "test"},
         shots=(0,), atol=1e-4, harness_rows="crows_pairs_english"),  # the harness filters all 1,677 rows
    Case("arc_ar", "okapi/arc_multilingual/arc_ar.yaml", None, {"test": "test", "train": "train"},
         fewshot_split="train", atol=1e-4),
    Case("truthfulqa_ar_mc1", "okapi/truthfulqa_multilingual/truthfulqa_ar_mc1.yaml", None, {"test": "validation"},
         shots=(0,), atol=1e-4),
    Case("truthfulqa_ar_mc2", "okapi/truthfulqa_multilingual/truthfulqa_ar_mc2.yaml", None, {"test": "validation"},
         shots=(0,), atol=1e-4),
    Case("m_mmlu_ar", "okapi/mmlu_multilingual/m_mmlu_ar.yaml", None, {"test": "val", "train": "dev"},
         fewshot_split="train", atol=1e-4),
]
RUNS = [(c, k) for c in CASES for k in c.shots]


def _run_id(case: Case, shots: int) -> str:
    return f"parity_{case.task}_{(case.subtask or 'all').replace(' ', '_').replace('(', '').replace(')', '')}_{shots}"


def _dhad_splits(case: Case, data: Path) -> dict[str, list[dict]]:
    from dhad.evaluate import tasks as T

    task = T.get_task(case.task)
    splits = task.load(data)
    if case.subtask is not None:
        splits = {k: [d for d in v if task.subtask(d) == case.subtask] for k, v in splits.items()}
    return splits


def _harness_task(case: Case, shots: int, splits: dict[str, list[dict]]):
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / case.yaml)
    for k in ("tag", "group", "task_alias", "dataset_name", "dataset_kwargs") + case.drop:
        cfg.pop(k, None)
    conv = case.to_hub or (lambda d: d)
    data = {hs: [conv(d) for d in splits[ds]] for hs, ds in case.splits.items()}
    cfg.update(task=_run_id(case, shots), dataset_path="json",
               custom_dataset=lambda **_: datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in data.items()}),
               training_split=None, validation_split=None, test_split=case.test_split,
               fewshot_split=case.fewshot_split, num_fewshot=shots)
    return ConfigurableTask(config=cfg)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, shared_data):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), shared_data)


@pytest.fixture(scope="module")
def harness_run(tiny_model, shared_data):
    """One lm-eval run (hf backend) over every case; returns {run id: samples}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [_harness_task(c, k, _dhad_splits(replace(c, task=c.harness_rows) if c.harness_rows else c, shared_data))
             for c, k in RUNS]
    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_model), "dtype": "float32"},
                                  tasks=tasks, limit=LIMIT, batch_size=16, device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)
    return {name: sorted(s, key=lambda x: int(x["doc_id"])) for name, s in out["samples"].items()}, out["results"]


@pytest.fixture(scope="module")
def dhad_run(tiny_model, shared_data):
    import dhad
    from dhad.evaluate import tasks as T
    from dhad.evaluate.scoring import Scorer, score_example

    model, tok = dhad.load_model(tiny_model), dhad.load_tokenizer(tiny_model)
    examples = {}
    for c, k in RUNS:
        ex, skips = T.build_examples(T.get_task(c.task), _dhad_splits(c, shared_data), shots=k, limit=LIMIT)
        assert not skips, skips
        examples[_run_id(c, k)] = ex
    flat = [e for ex in examples.values() for e in ex]
    lls = Scorer(model, tok, batch_tokens=8192, max_rows=32).loglikelihood([e.requests for e in flat])
    scored = iter(zip(flat, lls))
    out = {}
    for name, ex in examples.items():
        out[name] = []
        for _ in ex:
            e, res = next(scored)
            lls = [r[0] for r in res]
            task = T.get_task(e.task)
            out[name].append((e, lls, task.process_results(lls, e) if task.process_results else
                              score_example(lls, e.choices, e.gold, e.mc2_labels)))
    return out


def _harness_lls(sample) -> list[float]:
    return [float(r[0]) for r in sample["filtered_resps"]]


@pytest.mark.parametrize("case,shots", RUNS, ids=[_run_id(c, k) for c, k in RUNS])
def test_same_prompts_choices_and_accuracy_as_lm_eval(case, shots, harness_run, dhad_run):
    from dhad.evaluate import tasks as T

    samples, results = harness_run
    name = _run_id(case, shots)
    ours = dhad_run[name]
    theirs = samples[name]
    assert len(ours) == len(theirs) == LIMIT
    metrics = T.get_task(case.task).metrics
    for (e, lls, m), s in zip(ours, theirs):
        assert e.doc_index == int(s["doc_id"])
        assert [tuple(a) for a in s["arguments"]] == e.requests  # prompt strings incl. few-shot selection
        ref = _harness_lls(s)
        assert lls == pytest.approx(ref, abs=case.atol, rel=1e-5 if case.atol > 1e-4 else 0)
        if "pred" in m:
            assert m["pred"] == max(range(len(ref)), key=lambda i: (ref[i], -i))  # same choice (first max wins)
        for metric in metrics:
            assert metric in s, (metric, sorted(s))
            tol = case.atol if metric == "likelihood_diff" else 1e-6
            assert m[metric] == pytest.approx(float(s[metric]), abs=tol), (metric, e.doc_index)
    for metric in metrics:
        ours_mean = sum(m[metric] for _, _, m in ours) / len(ours)
        assert ours_mean == pytest.approx(results[name][f"{metric},none"], abs=case.atol)


def test_parity_covers_the_required_tasks():
    # >= 5 tasks 0- and 5-shot, >= 2 of them Arabic (the issue's must-show)
    from dhad.evaluate import tasks as T

    both = {c.task for c in CASES if 0 in c.shots and 5 in c.shots}
    assert len(both) >= 5 and sum(T.get_task(t).lang == "ar" for t in both) >= 2
    assert not math.isnan(LIMIT)


def test_lm_eval_with_the_dhad_adapter_matches_hf(tiny_model, harness_run, shared_data):
    """`simple_evaluate(model="dhad")` (our adapter) gives the hf backend's per-example numbers."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dhad.evaluate.lm_eval_adapter  # noqa: F401  (registers "dhad")

    samples, _ = harness_run
    picked = [(c, k) for c, k in RUNS if (c.task, k) in {("exams_ar", 5), ("arc_easy", 5), ("winogrande", 0),
                                                            ("truthfulqa_mc2", 0)}]
    tasks = [_harness_task(c, k, _dhad_splits(c, shared_data)) for c, k in picked]
    out = lm_eval.simple_evaluate(model="dhad", model_args={"pretrained": str(tiny_model)}, tasks=tasks, limit=LIMIT,
                                  log_samples=True, task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)
    for c, k in picked:
        name = _run_id(c, k)
        mine = sorted(out["samples"][name], key=lambda x: int(x["doc_id"]))
        for a, b in zip(mine, samples[name]):
            assert _harness_lls(a) == pytest.approx(_harness_lls(b), abs=2e-3, rel=1e-5)
            assert float(a["acc"]) == pytest.approx(float(b["acc"]), abs=1e-6)


def test_adapter_rolling_and_generation_match_hf(tiny_model):
    """loglikelihood_rolling and greedy generate_until of the dhad adapter vs lm-eval's hf backend."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from dhad.evaluate.lm_eval_adapter import DhadLM

    ours = DhadLM(pretrained=str(tiny_model), max_length=64)  # short window: several rolling windows
    hf = HFLM(pretrained=str(tiny_model), device="cpu", dtype="float32", max_length=64, batch_size=4)
    texts = ["الجزائر بلد عربي كبير، وعاصمته الجزائر. " * 3, "Question: which gas do plants take in?\nAnswer: carbon dioxide"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling, disable_tqdm=True),
                                                                abs=2e-3, rel=1e-5)
    gen = [Instance("generate_until", {}, (t, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
           for i, t in enumerate(texts)]
    assert ours.generate_until(gen) == hf.generate_until(gen, disable_tqdm=True)


# BOS through the tokenizer.json post-processor alone (Llama-3's layout: no add_bos_token key), 0 and 5 shots,
# three tasks, one Arabic: `dhad eval`'s scorer and the lm-eval adapter against the hf backend.
BOS_CASES = [c for c in CASES if (c.task, c.subtask) in {("exams_ar", "Biology"), ("arc_easy", None),
                                                          ("mmlu", "anatomy")}]
BOS_RUNS = [(c, k) for c in BOS_CASES for k in (0, 5)]


@pytest.fixture(scope="module")
def pp_bos_model(tmp_path_factory, shared_data):
    import json

    d = build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_pp_bos"), shared_data, add_bos_key=False, seed=3)
    assert "add_bos_token" not in json.loads((d / "tokenizer_config.json").read_text())
    return d


def test_bos_from_post_processor_parity_with_lm_eval(pp_bos_model, shared_data):
    import lm_eval
    import lm_eval.models.huggingface  # noqa: F401  (registers "hf")
    from lm_eval.tasks import TaskManager

    import dhad
    import dhad.evaluate.lm_eval_adapter  # noqa: F401  (registers "dhad")
    from dhad.evaluate import tasks as T
    from dhad.evaluate.scoring import Scorer

    assert len({c.task for c in BOS_CASES}) == 3 and any(T.get_task(c.task).lang == "ar" for c in BOS_CASES)
    tok = dhad.load_tokenizer(pp_bos_model)
    assert tok.encode("Question:", add_special_tokens=True)[0] == tok.bos_token_id == 1

    def harness(model, args):
        tasks = [_harness_task(c, k, _dhad_splits(c, shared_data)) for c, k in BOS_RUNS]
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, limit=LIMIT, log_samples=True,
                                      task_manager=TaskManager(include_defaults=False), bootstrap_iters=0,
                                      **({"batch_size": 16, "device": "cpu"} if model == "hf" else {}))
        return {n: sorted(s, key=lambda x: int(x["doc_id"])) for n, s in out["samples"].items()}

    ref = harness("hf", {"pretrained": str(pp_bos_model), "dtype": "float32"})
    adapter = harness("dhad", {"pretrained": str(pp_bos_model)})
    scorer = Scorer(dhad.load_model(pp_bos_model), tok, batch_tokens=8192, max_rows=32)
    for c, k in BOS_RUNS:
        name = _run_id(c, k)
        ex, _ = T.build_examples(T.get_task(c.task), _dhad_splits(c, shared_data), shots=k, limit=LIMIT)
        ours = [[r[0] for r in res] for res in scorer.loglikelihood([e.requests for e in ex])]
        for e, lls, a, s in zip(ex, ours, adapter[name], ref[name], strict=True):
            assert [tuple(x) for x in s["arguments"]] == e.requests
            want = _harness_lls(s)
            assert lls == pytest.approx(want, abs=2e-3, rel=1e-5), (name, e.doc_index)
            assert _harness_lls(a) == pytest.approx(want, abs=2e-3, rel=1e-5), (name, e.doc_index)
            assert float(a["acc"]) == float(s["acc"])
            assert max(range(len(lls)), key=lambda i: (lls[i], -i)) == max(range(len(want)), key=lambda i: (want[i], -i))
