"""Evaluation: the cards' benchmarks (lm-evaluation-harness parity), an lm-eval adapter, MT-bench.

    tasks.py            the task registry (one declarative `Task` per benchmark) and few-shot selection
    card_tasks.py       CrowS-Pairs, the Arabic-translated benchmarks and the Jais team's harness formats
    scoring.py          log-likelihood scoring (a question's choices as one token tree), lm-eval's metrics
    runner.py           evaluate(model, tokenizer, tasks, shots, limit) -> results dict
    results.py          results.json / samples.jsonl / the cards' tables (Markdown + PNG)
    bpb.py              held-out bits per byte of a model (tokenizer independent: UTF-8 bytes)
    ngram.py            an interpolated modified Kneser-Ney n-gram baseline over token ids, scored the same way
    mtbench.py          MT-bench answers and GPT-4-style judging over OpenAI-compatible endpoints
    vicuna.py           Vicuna-80 pairwise win rates (both orders, resumable)
    lm_eval_adapter.py  `--model dhad` for lm-evaluation-harness

A new benchmark is one `register(Task(...))` in tasks.py (card_tasks.py for the cards' own formats): a
reader for its files, a prompt template and its metrics (docs/evaluation.md). The command is
dhad/cli/eval.py; the DPO-vs-parent comparison is dhad.train.compare (it needs the DPO objective).

Importing the package registers every task (tasks.py's and card_tasks.py's; no cycle: card_tasks imports
tasks, never the other way); other submodules are imported on use (neither torch nor lm-eval by itself).
"""
from dhad.evaluate import card_tasks  # noqa: F401 - registers the cards' remaining tasks in tasks.TASKS
