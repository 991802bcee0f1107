"""Examples/s of `dhad eval` vs lm-evaluation-harness's `hf` backend, same model, tasks, rows, run.

    .venv/bin/python benchmarks/bench_eval.py [--limit 100] [--threads 1] [--shots 0] [--tasks piqa,...]
    .venv/bin/python benchmarks/bench_eval.py --tasks crows_pairs_english,crows_pairs_french,arc_ar,truthfulqa_ar_mc1,truthfulqa_ar_mc2,m_mmlu_ar

Builds a random Llama in transformers' format (the tokenizer a byte-level BPE trained on the eval
rows), then evaluates each task both ways: lm-eval through `simple_evaluate(model="hf")` with the
harness's own YAML (dataset swapped for the same local rows), and dhad through `runner.evaluate`.
The timed region of each side is everything after imports: model load, task building, scoring and
metrics; one untimed warm-up run of each side comes first, so one-time lazy imports count for
neither. Both sides run in this process, fp32, with the same torch thread count (`--threads`).
Accuracies must be identical (the script exits 1 otherwise). lm-eval runs with its default batch
size 1 and with the same batch size as dhad's row cap; the ratio is against the faster one.
Needs ../shared/data (or $DHAD_DATA_DIR).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (dhad task, harness YAML, subtask filter, harness split -> dhad split, test split, few-shot split, shots)
CASES = [
    ("hellaswag", "hellaswag/hellaswag.yaml", None, {"test": "validation"}, "test", "test", 0),
    ("arc_easy", "arc/arc_easy.yaml", None, {"test": "test"}, "test", "test", 5),
    ("piqa", "piqa/piqa.yaml", None, {"test": "validation"}, "test", "test", 5),
    ("exams_ar", "aexams/aexams_Social.yaml", "Social", {"test": "test", "dev": "dev"}, "test", "dev", 5),
    ("acva", "arabic_leaderboard_complete/arabic_leaderboard_avca/arabic_leaderboard_acva_Egypt_modern.yaml",
     "Egypt_modern", {"test": "test", "validation": "dev"}, "test", "validation", 5),
    # issue 18's log-likelihood tasks: CrowS-Pairs (empty context, whole sentences) and Okapi's Arabic sets
    ("crows_pairs_english", "crows_pairs/crows_pairs_english.yaml", None, {"test": "test"}, "test", None, 0),
    ("crows_pairs_french", "crows_pairs/crows_pairs_french.yaml", None, {"test": "test"}, "test", None, 0),
    ("arc_ar", "okapi/arc_multilingual/arc_ar.yaml", None, {"test": "test", "train": "train"}, "test", "train", 5),
    ("truthfulqa_ar_mc1", "okapi/truthfulqa_multilingual/truthfulqa_ar_mc1.yaml", None, {"test": "validation"},
     "test", None, 0),
    ("truthfulqa_ar_mc2", "okapi/truthfulqa_multilingual/truthfulqa_ar_mc2.yaml", None, {"test": "validation"},
     "test", None, 0),
    ("m_mmlu_ar", "okapi/mmlu_multilingual/m_mmlu_ar.yaml", None, {"test": "val", "train": "dev"}, "test", "train", 5),
]
DEFAULT_TASKS = ["hellaswag", "arc_easy", "piqa", "exams_ar", "acva"]


def data_root() -> Path:
    env = os.environ.get("DHAD_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def build_model(out: Path, data: Path, hidden: int, layers: int, vocab: int) -> Path:
    import itertools

    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from dhad.tokenizer import train_bpe

    texts = []
    for f in ["exams_ar/acegpt_exam_test.jsonl", "acva/difficulty-easy-TF_test.jsonl", "arc_easy/arc_easy_test.jsonl",
              "hellaswag/hellaswag_validation.jsonl", "piqa/piqa_validation.jsonl"]:
        with open(data / "eval" / f, encoding="utf-8") as fh:
            texts += list(itertools.islice(fh, 2000))
    tok = train_bpe(texts, vocab, special_tokens=["<|endoftext|>", "<s>", "</s>"], chat_template=None)
    tok.backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.config.update(bos_token="<s>", eos_token="</s>", pad_token="</s>", add_bos_token=True, model_max_length=4096)
    tok.save(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=int(2.6875 * hidden),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      initializer_range=0.1)
    LlamaForCausalLM(cfg).eval().save_pretrained(out, safe_serialization=True)
    return out


def harness_task(case, splits):
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    name, yaml, _, split_map, test_split, fs_split, shots = case
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml)
    for k in ("tag", "group", "task_alias", "dataset_name", "dataset_kwargs"):
        cfg.pop(k, None)
    if name == "hellaswag":  # the local rows are already preprocessed (no ctx_a / ctx_b)
        cfg.pop("process_docs", None)
    data = {hs: splits[ds] for hs, ds in split_map.items()}
    cfg.update(task=f"bench_{name}", dataset_path="json",
               custom_dataset=lambda **_: datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in data.items()}),
               training_split=None, validation_split=None, test_split=test_split, fewshot_split=fs_split,
               num_fewshot=shots)
    return ConfigurableTask(config=cfg)


def local_splits(case, data):
    from dhad.evaluate import tasks as T

    task = T.get_task(case[0])
    splits = task.load(data)
    if case[2] is not None:
        splits = {k: [d for d in v if task.subtask(d) == case[2]] for k, v in splits.items()}
    return splits


def run_lm_eval(model_dir, case, data, limit, batch_size):
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    task = harness_task(case, local_splits(case, data))
    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                                  tasks=[task], limit=limit, batch_size=batch_size, device="cpu", log_samples=False,
                                  task_manager=TaskManager(include_defaults=False), bootstrap_iters=0, verbosity="ERROR")
    dt = time.perf_counter() - t0
    r = out["results"][f"bench_{case[0]}"]
    return dt, {m: r.get(f"{m},none") for m in _metrics(case)}


def _metrics(case) -> tuple[str, ...]:
    from dhad.evaluate import tasks as T
    return T.get_task(case[0]).metrics


def run_dhad(model_dir, case, data, limit, max_rows, batch_tokens):
    import dhad
    from dhad.evaluate import runner
    from dhad.evaluate import tasks as T

    t0 = time.perf_counter()
    model, tok = dhad.load_model(model_dir), dhad.load_tokenizer(model_dir)
    task = T.get_task(case[0])
    if case[2] is not None:  # evaluate just that subtask, like the harness task above
        import dataclasses
        base = task
        task = dataclasses.replace(base, name=f"{base.name}:{case[2]}",
                                   reader=lambda root: {k: [d for d in v if base.subtask(d) == case[2]]
                                                        for k, v in base.reader(root).items()})
    res = runner.evaluate(model, tok, [task], shots=case[6], limit=limit, data_dir=data, progress=False,
                          max_rows=max_rows, batch_tokens=batch_tokens)
    dt = time.perf_counter() - t0
    e = res["tasks"][task.name]
    return dt, {m: e.get(m) for m in _metrics(case)}, e["n"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=32, help="dhad rows per pass = lm-eval batch size")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                    help=f"default {','.join(DEFAULT_TASKS)}; also: {', '.join(c[0] for c in CASES if c[0] not in DEFAULT_TASKS)}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shots", type=int, default=None, help="the same shot count for every task (default: per task)")
    args = ap.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    # imports outside the timed regions (both sides)
    import lm_eval
    import lm_eval.models.huggingface  # noqa: F401
    from lm_eval.tasks import TaskManager  # noqa: F401

    import dhad.checkpoint
    import dhad.evaluate.runner
    import dhad.tokenizer  # noqa: F401
    from dhad.evaluate import tasks as T
    data = data_root()
    if not (data / "eval").is_dir():
        print(f"needs the eval data at {data} (set DHAD_DATA_DIR)", file=sys.stderr)
        return 2
    wanted = args.tasks.split(",")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), data, args.hidden, args.layers, args.vocab)
        print(f"model: random Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}; "
              f"limit={args.limit}; torch threads={torch.get_num_threads()}")
        print(f"{'task':19s} {'shots':>5s} {'n':>4s} | {'lm-eval bs=1':>12s} {'lm-eval bs=' + str(args.rows):>13s} "
              f"{'dhad':>8s} (examples/s) | ratio | acc / acc_norm identical")
        # one untimed run of each side first (limit 2): lazy imports and first-call set-up
        # (torch._dynamo on the meta device, datasets / jinja / transformers modules) are then
        # timed on neither side, whichever task comes first
        warm = next(c for c in CASES if c[0] in wanted)
        run_dhad(model_dir, warm, data, 2, args.rows, args.batch_tokens)
        run_lm_eval(model_dir, warm, data, 2, 1)
        for case in (c for c in CASES if c[0] in wanted):
            if args.shots is not None and T.get_task(case[0]).max_shots is None:  # not the fixed 0-shot tasks
                case = (*case[:6], args.shots)
            d_t, d_acc, n = run_dhad(model_dir, case, data, args.limit, args.rows, args.batch_tokens)
            l1_t, l1_acc = run_lm_eval(model_dir, case, data, args.limit, 1)
            lb_t, lb_acc = run_lm_eval(model_dir, case, data, args.limit, args.rows)
            # accuracies identical; continuous metrics (CrowS-Pairs' likelihood_diff, TruthfulQA mc2's
            # probability mass) to 1e-4: they move with the log-likelihoods' float rounding (~1e-5)
            cont = {"likelihood_diff"} | ({"acc"} if T.get_task(case[0]).mc2_labels else set())
            same = all(abs((d_acc[m] or 0) - (x[m] or 0)) < (1e-4 if m in cont else 1e-9)
                       for x in (l1_acc, lb_acc) for m in d_acc if x[m] is not None)
            ok &= same
            best = min(l1_t, lb_t)
            shown = " / ".join(f"{d_acc[m]:.3f}" for m in d_acc if d_acc[m] is not None)
            print(f"{case[0]:19s} {case[6]:5d} {n:4d} | {n / l1_t:12.2f} {n / lb_t:13.2f} {n / d_t:8.2f}              "
                  f"| {best / d_t:5.2f}x | {same} ({shown}: {' / '.join(m for m in d_acc if d_acc[m] is not None)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
