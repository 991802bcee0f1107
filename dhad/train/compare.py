"""Aligned model vs its SFT parent: MT-bench pairwise judging and held-out preference accuracy.

After DPO the question is whether the aligned model is *better* than the model it started from, not just
whether its loss fell. Two measurements, reported side by side (`compare_models`):

1. **MT-bench pairwise** (dhad.evaluate.mtbench, FastChat's protocol): both models answer the same
   two-turn questions (English and/or Arabic, the category temperatures, the same seed), then any
   OpenAI-compatible judge (GPT-4 as in the cards, or a dhad server) compares them with the answers'
   positions swapped; a verdict that flips with the positions is a tie. Reported per language: wins,
   losses, ties, win rate and the tie-adjusted win rate of the aligned model over the parent.
2. **Held-out preference accuracy** on prefs shards the aligned model did not train on: the share of
   pairs whose implicit DPO reward β·log π_aligned(y|x)/π_parent(y|x) ranks the chosen answer higher
   (ties count half — two identical models score exactly 50%), plus how often each model alone
   prefers the chosen answer by likelihood (log π(chosen) > log π(rejected)).

Everything is written atomically to `out_dir` (answers, judgments, `comparison.json`, `comparison.md`).
The command is `dhad eval compare` (dhad/cli/eval.py).

Why this lives in train/ and not in evaluate/: the second measurement is DPO's own implicit reward, computed
with DPO's pair validation and log-probabilities (dhad.train.dpo / dhad.train.preference). evaluate/ sits
below train/ (docs/architecture.md), so a comparison that needs the DPO objective is a training concern
that uses the evaluation layer (MT-bench), not the other way round.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dhad.evaluate import mtbench
from dhad.utils import atomic_write_text


class CompareError(ValueError):
    """A comparison that cannot run as asked (missing model, data or judge): the message says which."""


def preference_accuracy(aligned, parent, prefs_dir, split: str = "validation", beta: float = 0.1,
                        limit: int | None = None, batch_size: int = 16, share_prompt: bool = True) -> dict:
    """Held-out preference accuracy of `aligned` against `parent` as the reference (both dhad models)."""

    from dhad.data.shards import PrefsSet, ShardError
    from dhad.train.dpo import compute_logps, pair_correct, validate_prefs

    try:
        ps = PrefsSet.open(prefs_dir, split)
    except (ShardError, FileNotFoundError, OSError) as e:
        raise CompareError(f"held-out pairs: cannot open {prefs_dir}/{split} ({e})") from None
    block = min(aligned.config.block_size, parent.config.block_size)
    view, report = validate_prefs(ps, aligned.config.vocab_size, Path(prefs_dir).name, split, max_length=block)
    pairs = [view[j] for j in range(len(view) if limit is None else min(limit, len(view)))]
    if not pairs:
        raise CompareError(f"held-out pairs: no usable pair in {prefs_dir}/{split} ({report.summary()})")
    a = compute_logps(aligned, pairs, batch_size, share_prompt)
    p = compute_logps(parent, pairs, batch_size, share_prompt)
    cr, rr = beta * (a[:, 0] - p[:, 0]), beta * (a[:, 1] - p[:, 1])
    return {"pairs": len(pairs), "skipped": dict(report.skipped), "beta": beta,
            "reward_accuracy": float(pair_correct(cr, rr, beta).mean()),
            "reward_margin": float((cr - rr).mean()),
            "likelihood_accuracy_aligned": float((a[:, 0] > a[:, 1]).double().mean()),
            "likelihood_accuracy_parent": float((p[:, 0] > p[:, 1]).double().mean()),
            "logps_chosen_aligned": float(a[:, 0].mean()), "logps_chosen_parent": float(p[:, 0].mean())}


def compare_models(aligned_dir, parent_dir, out_dir, *, data_dir=None, langs: Sequence[str] = ("en", "ar"),
                   judge: Any = None, judge_url: str | None = None, judge_model: str = "gpt-4",
                   api_key: str | None = None, limit: int | None = None, max_new_tokens: int = mtbench.MAX_NEW_TOKENS,
                   prefs_dir=None, prefs_split: str = "validation", prefs_limit: int | None = None,
                   beta: float = 0.1, parallel: int = 1, seed: int = 0, progress: bool = True,
                   aligned_name: str | None = None, parent_name: str | None = None) -> dict:
    """Judge `aligned_dir` against `parent_dir` on MT-bench (when a judge is given) and measure held-out
    preference accuracy (when `prefs_dir` is given). `judge`: an object with `.chat(messages, temperature,
    max_tokens)` and `.model` (an mtbench.ChatClient), or pass `judge_url` (+ judge_model, api_key)."""
    import dhad

    out = Path(out_dir)
    names = {"aligned": aligned_name or Path(aligned_dir).name, "parent": parent_name or Path(parent_dir).name}
    if names["aligned"] == names["parent"]:
        names = {"aligned": names["aligned"] + "-aligned", "parent": names["parent"] + "-parent"}
    for d in (aligned_dir, parent_dir):
        if not Path(d).is_dir():
            raise CompareError(f"model directory not found: {d}")
    if judge is None and judge_url:
        judge = mtbench.ChatClient(judge_url, judge_model, api_key=api_key)
    if judge is None and prefs_dir is None:
        raise CompareError("nothing to compare: give a judge (--judge-url) and/or held-out pairs (--prefs)")
    aligned, parent = dhad.load_model(aligned_dir), dhad.load_model(parent_dir)
    result: dict = {"aligned": {"name": names["aligned"], "path": str(aligned_dir)},
                    "parent": {"name": names["parent"], "path": str(parent_dir)}}

    if judge is not None:
        tok_a, tok_p = dhad.load_tokenizer(aligned_dir), dhad.load_tokenizer(parent_dir)
        prompts = mtbench.load_judge_prompts(data_dir)
        rows, per_lang = [], {}
        for lang in langs:
            qs = mtbench.load_questions(data_dir, lang)[:limit]
            answers = {}
            for who, model, tok in (("aligned", aligned, tok_a), ("parent", parent, tok_p)):
                chat = mtbench.local_chat_fn(model, tok, max_new_tokens=max_new_tokens, seed=seed)
                gen = mtbench.generate_answers(qs, chat, names[who], out / f"answers-{lang}-{who}.jsonl",
                                               progress=progress)
                answers[who] = {r["question_id"]: r["choices"][0]["turns"] for r in gen}
            judged = mtbench.judge_pairwise(qs, answers["aligned"], answers["parent"], judge, prompts,
                                            names["aligned"], names["parent"], parallel=parallel, progress=progress)
            rows += judged
            per_lang[lang] = len(qs)
        atomic_write_text(out / "judgments-pairwise.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary = mtbench.summarize_pairwise(rows)
        summary["questions"] = per_lang
        summary["judge"] = getattr(judge, "model", None)
        result["mt_bench_pairwise"] = summary

    if prefs_dir is not None:
        result["heldout_preferences"] = preference_accuracy(aligned, parent, prefs_dir, prefs_split, beta,
                                                            prefs_limit)
    atomic_write_text(out / "comparison.json", json.dumps(result, indent=2, ensure_ascii=False))
    atomic_write_text(out / "comparison.md", format_comparison(result))
    return result


def format_comparison(r: dict) -> str:
    lines = [f"# {r['aligned']['name']} vs {r['parent']['name']}", ""]
    if "mt_bench_pairwise" in r:
        lines += ["## MT-bench pairwise (positions swapped; a flipped verdict is a tie)", "",
                  mtbench.pairwise_table([r["mt_bench_pairwise"]])]
    if "heldout_preferences" in r:
        h = r["heldout_preferences"]
        lines += ["## Held-out preference accuracy", "",
                  "Pairs | Reward accuracy (aligned / parent) | Margin | Likelihood acc. aligned | parent |",
                  "---|---|---|---|---|",
                  (f"{h['pairs']} | {100 * h['reward_accuracy']:.1f}% | {h['reward_margin']:.4f} | "
                   f"{100 * h['likelihood_accuracy_aligned']:.1f}% | {100 * h['likelihood_accuracy_parent']:.1f}% |"),
                  ""]
    return "\n".join(lines)
