"""Evaluation: the cards' benchmarks (lm-evaluation-harness parity), an lm-eval adapter, MT-bench.

    tasks.py            the task registry (one declarative `Task` per benchmark) and few-shot selection
    card_tasks.py       CrowS-Pairs, the Arabic-translated benchmarks and the Jais team's harness formats
    scoring.py          log-likelihood scoring (a question's choices as one token tree), lm-eval's metrics
    runner.py           evaluate(model, tokenizer, tasks, shots, limit) -> results dict
    report.py           results.json / samples.jsonl / the cards' tables (Markdown + PNG)
    bpb.py              held-out bits per byte of a model (tokenizer independent: UTF-8 bytes)
    ngram.py            an interpolated modified Kneser-Ney n-gram baseline over token ids, scored the same way
    mtbench.py          MT-bench answers and GPT-4-style judging over OpenAI-compatible endpoints
    vicuna.py           Vicuna-80 pairwise win rates (both orders, resumable)
    lm_eval_adapter.py  `--model dhad` for lm-evaluation-harness
    cli.py              `dhad eval`

Submodules are imported on use (this package pulls in neither torch nor lm-eval by itself).
"""
