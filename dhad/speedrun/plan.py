"""The plan stage: model sizes, the throughput probe's verdict (threads, precision, size), the timetable.

The budget is wall-clock for everything. The plan measures training throughput on this machine (1 vs all
CPU threads, fp32 vs bf16 autocast, then sizes up a ladder) and keeps the largest size whose measured
throughput gives `TOKENS_PER_PARAM` tokens per non-embedding parameter in the planned pretraining time.
The training stages themselves are clock-driven (they train until their share of the budget is spent),
so the probe decides the model size, never how long anything runs.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from dhad.speedrun.common import BENCH_TASKS, write_json

# ---------------------------------------------------------------------------------------------
# Model sizes (Jais-family style: ALiBi, SwiGLU, muP; the adapted path's base is Llama style)


@dataclass(frozen=True)
class Size:
    name: str
    n_embd: int
    n_layer: int
    n_head: int
    vocab: int

    @property
    def n_inner(self) -> int:
        # Jais-family rule (dhad.config): 8/3 * n_embd rounded up to a multiple of 16
        return int(math.ceil(8 * self.n_embd / 3 / 16) * 16)


LADDER = (
    Size("xs", 64, 2, 2, 2048),
    Size("s1", 96, 3, 3, 4096),
    Size("s2", 128, 4, 4, 4096),
    Size("s3", 192, 4, 4, 8192),
    Size("s4", 256, 4, 4, 8192),
    Size("s5", 256, 6, 4, 8192),
    Size("s6", 384, 6, 6, 16384),
    Size("m1", 512, 8, 8, 16384),
    Size("m2", 768, 12, 12, 32768),
    Size("m3", 1024, 16, 16, 32768),
)
CI_SIZE = Size("ci", 64, 2, 2, 1024)
# Characters per token of a byte-level BPE of this vocabulary size on the bilingual corpus (measured
# here; used only to size the data sample before the tokenizer exists).
CHARS_PER_TOKEN = {1024: 2.0, 2048: 2.4, 4096: 2.8, 8192: 3.2, 16384: 3.5, 32768: 3.8}
# Tokens per non-embedding parameter a size must be able to see in the pretraining budget. Chinchilla's
# compute-optimal ratio is ~20 tokens per (total) parameter; we accept larger, less-trained models (5 per
# non-embedding parameter) because a chat model that must follow the script of a question needs width
# more than the last bit of held-out loss.
TOKENS_PER_PARAM = 5.0
JAIS_MUP_ALPHA = 1.09518349815769

# ---------------------------------------------------------------------------------------------
# The timetable. Training stages share what is left when each starts (by these weights) after the
# reserve for the stages behind them; the stages before training are estimated (not enforced).
TRAIN_WEIGHTS = {"jais": {"pretrain": 0.50, "sft": 0.16, "dpo": 0.06},
                 "adapted": {"donor": 0.08, "pretrain": 0.28, "adapt": 0.20, "sft": 0.12, "dpo": 0.05}}
# (share of the budget, seconds) planned for a stage: share * budget + seconds
ESTIMATED = {"plan": (0.02, 0.0), "tokenizer": (0.01, 0.0), "data": (0.025, 0.0), "baseline": (0.012, 1.0)}
# after training: the check (fixed work), evaluation (fills the time the report leaves it: the
# benchmarks' --limit is scaled to it) and the report
RESERVED = {"check": (0.015, 3.0), "eval": (0.04, 8.0), "report": (0.005, 4.0)}
EXIT_S = 2.0  # the interpreter's exit after the report (measured under load: ~1 s with the CLI's gc.freeze())
MIN_TRAIN_SHARE = 0.25  # a training stage never gets less than this part of its share of the whole budget


def stage_estimate(name: str, budget_s: float) -> float:
    share, secs = ESTIMATED.get(name) or RESERVED[name]
    return share * budget_s + secs


def model_overrides(size: Size, arch: str, block_size: int, vocab: int | None = None) -> tuple[str, dict]:
    """(preset, overrides) for the trainer's `model:` section."""
    v = int(vocab or size.vocab)
    common = dict(vocab_size=v, n_embd=size.n_embd, n_layer=size.n_layer, n_head=size.n_head,
                  n_inner=size.n_inner, block_size=block_size)
    if arch == "jais":
        width = 256 / size.n_embd  # Jais-family muP: width scale = 256 / n_embd (dhad.config)
        return "small-jais", dict(common, logits_scale=JAIS_MUP_ALPHA * width, mup_width_scale=width)
    # Llama layout (Jais-adapted's base); our byte-level BPE has <|endoftext|> = 0 as bos/eos/pad
    return "small-llama", dict(common, n_kv_head=size.n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def size_config(size: Size, arch: str = "jais", block_size: int = 512):
    from dhad.config import Config
    preset, ov = model_overrides(size, arch, block_size)
    return Config.from_name(preset, **ov)


def size_params(size: Size, arch: str = "jais") -> tuple[int, int]:
    """(non-embedding, total) parameters."""
    cfg = size_config(size, arch)
    return cfg.num_params(include_embeddings=False), cfg.num_params()


def flops_per_token(size: Size, seq_len: int, arch: str = "jais") -> float:
    return size_config(size, arch, max(seq_len, 512)).flops_per_token(seq_len)


def choose_size(tps_of, train_seconds: float, ladder=LADDER, ratio: float = TOKENS_PER_PARAM,
                max_size: str | None = None) -> tuple[Size, dict]:
    """Walk the ladder upwards while the measured throughput gives at least `ratio` tokens per
    non-embedding parameter in `train_seconds`; return the last size that does (at least the first)
    and what was measured. `tps_of(size) -> tokens/s` (the probe; a pure function in tests)."""
    chosen, seen = ladder[0], {}
    for s in ladder:
        tps = float(tps_of(s))
        n, _ = size_params(s)
        tokens = tps * train_seconds
        seen[s.name] = {"tokens_per_s": tps, "tokens": tokens, "nonemb_params": n, "tokens_per_param": tokens / n}
        if tokens >= ratio * n:
            chosen = s
        else:
            break
        if max_size is not None and s.name == max_size:
            break
    return chosen, seen


def apply_threads(plan: dict) -> None:
    if plan.get("threads") and str(plan.get("device", "cpu")).startswith("cpu"):
        import torch
        torch.set_num_threads(int(plan["threads"]))


def stage_plan(run, markers: dict) -> dict:
    import torch

    from dhad.train.metrics import measure_peak_flops
    from dhad.train.probe import cpu_has_bf16, measure_train_tps
    cfg = run.cfg
    dev = run.device
    arch = "jais" if cfg.recipe == "jais" else "llama"
    w = TRAIN_WEIGHTS[cfg.recipe]
    used_w = {k: v for k, v in w.items() if k in run.stages}
    # the time pretraining will get: the budget less the estimated and reserved stages, by weight
    fixed = sum(stage_estimate(s, run.budget_s) for s in run.stages if s not in w)
    train_s = max(run.budget_s - fixed, 1.0)
    t_pre = train_s * used_w["pretrain"] / sum(used_w.values())
    measured: dict = {}
    if cfg.ci:
        size, seq_pre, seq_sft, probe_batch = CI_SIZE, 128, 384, 4
    else:
        seq_pre, seq_sft, probe_batch = 512, 512, 8 if dev.type == "cpu" else 32
        size = None
    precisions = ("fp32", "bf16") if (dev.type == "cuda" or cpu_has_bf16()) else ("fp32",)
    steps = 1 if cfg.ci else 2

    def measure(s: Size, prec: str, n: int = steps) -> float:
        return measure_train_tps(size_config(s, arch, max(seq_pre, 512)), seq_pre, probe_batch, prec, dev,
                                 steps=n)

    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # Threads: on a machine shared with other jobs, OpenMP threads that wait for each other can be
        # slower than one thread; measure both on a small size (in the likelier precision: the ladder
        # compares precisions) and keep the faster for the whole run.
        probe_size = size or LADDER[0]
        by_threads = {}
        for n in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(n)
            by_threads[n] = measure(probe_size, precisions[-1], 1)  # one timed step: a slow count is slow
        threads = max(by_threads, key=by_threads.get)
        torch.set_num_threads(threads)
        measured["threads"] = {str(k): v for k, v in by_threads.items()}
        measured["probes"] = {probe_size.name: {precisions[-1]: by_threads[threads]}}
        run.say("  threads: " + ", ".join(f"{k}: {v:,.0f} tok/s" for k, v in by_threads.items())
                + f" ({probe_size.name}, {precisions[-1]}) -> {threads}")

    def probe(s: Size) -> float:
        res = measured.setdefault("probes", {}).setdefault(s.name, {})
        for prec in precisions:
            if prec not in res:
                res[prec] = measure(s, prec)
        run.say(f"  probe {s.name} (n_embd {s.n_embd}, {s.n_layer} layers, vocab {s.vocab}): "
                + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in res.items()))
        return max(res.values())

    if cfg.ci:
        probe(size)
        ladder_seen = {}
    else:
        size, ladder_seen = choose_size(probe, t_pre, max_size="s6" if dev.type == "cpu" else None)
    probes = measured["probes"][size.name]
    precision = max(probes, key=probes.get)
    tps = probes[precision]
    peak = measure_peak_flops(dev, torch.bfloat16 if precision == "bf16" else torch.float32,
                              n=512 if cfg.ci else 1024, seconds=0.1 if cfg.ci else 0.3)
    pre_tokens = tps * t_pre
    if cfg.ci:
        chars_per_lang, tok_chars, held_chars = 300_000, 150_000, 6_000
    else:
        # text for ~0.6 of the planned pretraining tokens (the model sees it ~1.7 times: repeating a small
        # sample costs a tiny model little, and preparing data is time the model does not train)
        cpt = CHARS_PER_TOKEN.get(size.vocab, 3.0)
        chars_per_lang = int(min(max(0.6 * pre_tokens / 2 * cpt, 300_000), 8_000_000))
        tok_chars = int(min(chars_per_lang, 2_000_000))
        held_chars = int(min(max(tps * run.budget_s * 0.003 * 3.5, 20_000), 80_000))
    sft_share = used_w["sft"] / sum(used_w.values())
    # SFT rows per language: what the SFT time can train on (rows are ~90% full), with 30% to spare
    sft_rows = 200 if cfg.ci else int(max(train_s * sft_share * tps / seq_sft / 2 * 1.3, 300))
    plan = {
        "device": str(dev), "arch": arch, "size": asdict(size), "n_inner": size.n_inner,
        "params": dict(zip(("nonemb", "total"), size_params(size, arch))),
        "precision": precision, "probe_tokens_per_s": probes, "ladder": ladder_seen,
        "tokens_per_s": tps, "peak_flops": peak, "threads": threads, "threads_probe": measured.get("threads"),
        "seq_len_pretrain": seq_pre, "seq_len_sft": seq_sft,
        "block_size": 2 * max(seq_pre, seq_sft), "pretrain_seconds_planned": t_pre,
        "pretrain_tokens_planned": pre_tokens, "sample_chars_per_lang": chars_per_lang,
        "tokenizer_chars_per_lang": tok_chars, "heldout_chars_per_lang": held_chars,
        "sft_rows_per_lang": sft_rows, "bench_tasks": list(BENCH_TASKS), "budget_s": run.budget_s, "ci": cfg.ci,
        "timetable": {s: (t_pre if s == "pretrain" else
                          train_s * used_w[s] / sum(used_w.values()) if s in used_w else
                          stage_estimate(s, run.budget_s)) for s in run.stages},
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    write_json(run.p("plan.json"), plan)
    run.plan = plan
    run.say(f"  plan: {size.name} ({plan['params']['total'] / 1e6:.2f}M params), {precision}, "
            f"{tps:,.0f} tok/s measured, ~{pre_tokens / 1e6:.2f}M pretraining tokens expected in {t_pre:.0f}s")
    return {"plan": str(run.p("plan.json"))}
