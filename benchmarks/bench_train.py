"""Training throughput: dhad's Transformer vs transformers' LlamaForCausalLM, same config, same data, same run.

Three contestants train on the same token batches from the same initial weights (dhad writes its model
as a Llama checkpoint, transformers loads it), in bf16 autocast over fp32 master weights, AdamW with the
same parameter groups, gradient clipping 1.0:

    dhad            dhad.Transformer driven by dhad.train.loop.train_step (the loop every recipe uses)
    hf-same-loop    LlamaForCausalLM driven by the very same train_step (through a logits adapter)
    hf-trainer      LlamaForCausalLM driven by transformers.Trainer (its own loop, dataloader, scheduler)

Reported: tokens/s from the median step time after warm-up steps (dhad and hf-same-loop are stepped
alternately, so a busy shared machine slows both alike; the Trainer runs after them; with --compile the
warm-up steps hold the compilation and are not timed), MFU = model FLOPs/token (6N + attention, PaLM) x
tokens/s / peak, with the peak *measured in the same run and process, with the same threads*: the best
bf16 matmul rate over sizes 1024-4096 and repeats (dhad.train.metrics.measure_peak_flops), probed at the
start and again between the steps, the largest kept -- on a shared machine a neighbour's load at one
moment must not shrink the denominator (and so inflate MFU) -- or given with --peak; and the ratios
dhad / hf-same-loop and dhad / hf-trainer. "best" columns use the fastest timed step instead of the
median: what the machine gives when no neighbour is busy. The first step's loss is printed for each to
show that they compute the same thing. Not a test: numbers depend on the machine and its load.

What differs (the point of the comparison): dhad fuses q|k|v and gate|up into one matmul each, keeps
RoPE in bf16 under autocast, and with its training kernels (dhad.train.kernels.apply_training_kernels,
as `dhad train` applies them) computes the LM head + cross-entropy fused in chunks
(`Transformer.forward(ids, targets=...)`, no [tokens, vocab] fp32 logits), and on CPU attends with the
probabilities held up to 512 tokens (batched matmuls instead of the CPU flash kernel's slow backward);
transformers computes the standard way (full logits, then cross-entropy -- its own loss does the same --,
SDPA). Shared by all (process-wide or in the shared train_step): the allocator settings of
dhad.utils.tune_malloc (off with --no-malloc-tuning) and clipping folded into the fused AdamW.

    .venv/bin/python benchmarks/bench_train.py                       # CPU, a ~50M-parameter Llama
    .venv/bin/python benchmarks/bench_train.py --compile both         # torch.compile for dhad and hf-same-loop
    .venv/bin/python benchmarks/bench_train.py --width 2048 --layers 4 --seq-len 512 --batch 8 --compile dhad  # MFU at width (~41%)
    .venv/bin/python benchmarks/bench_train.py --width 2048 --layers 16 --device cuda --batch 8 --seq-len 2048
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dhad.config import Config
from dhad.model import Transformer
from dhad.train.distributed import DistEnv
from dhad.train.kernels import apply_training_kernels
from dhad.train.loop import train_step
from dhad.train.metrics import measure_peak_flops
from dhad.train.objectives import _ce_sum, get_objective
from dhad.train.optim import build_optimizer
from dhad.train.recipe import OptimizerSpec
from dhad.utils import tune_malloc

# A Llama-architecture config big enough for the matmuls to dominate on a CPU (not from any card).
BENCH = dict(vocab_size=8192, n_embd=768, n_head=12, n_kv_head=4, n_inner=2048, n_layer=6, block_size=1024)


class LogitsOnly(nn.Module):
    """Makes a transformers causal LM look like dhad's model to the loop: input_ids -> logits, and with
    targets the summed cross-entropy -- computed the standard way, from the model's full logits
    (what transformers' own loss does too), where dhad fuses the LM head with the loss."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, targets=None, **_):
        logits = self.hf(input_ids=input_ids, use_cache=False).logits
        return logits if targets is None else _ce_sum(logits, targets)


def make_batches(vocab: int, n: int, batch: int, seq_len: int, seed: int = 0) -> list[list[np.ndarray]]:
    """n batches of (seq_len + 1)-token windows: real text (the shared corpus' Shakespeare as bytes) when
    it is there, else random ids. The speed does not depend on which; the losses are easier to read."""
    rng = np.random.default_rng(seed)
    data = None
    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "english" / "tinyshakespeare.txt"
    if corpus.is_file():
        data = np.frombuffer(corpus.read_bytes(), dtype=np.uint8).astype(np.int64) % vocab
    out = []
    for _ in range(n):
        if data is not None:
            starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
            out.append([data[s:s + seq_len + 1] for s in starts])
        else:
            out.append(list(rng.integers(0, vocab, size=(batch, seq_len + 1))))
    return out


class Contestant:
    """One model + its optimizer, stepped by dhad's train_step; per-step wall times recorded."""

    def __init__(self, name, model, cfg, device, compile_):
        self.name, self.model, self.device = name, model, device
        self.env = DistEnv(device=torch.device(device))
        self.obj = get_objective("pretrain")
        self.opt = build_optimizer(model, OptimizerSpec(lr=3e-4, weight_decay=0.1, mup=False), cfg, device)
        if compile_:
            model.compile()
        self.times, self.losses = [], []

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)

    def step(self, items):
        sync(self.device)
        t = time.perf_counter()
        loss, _ = train_step(self.model, self.obj, [self.obj.collate(items, self.device)], self.opt, self.env,
                             "none", self.autocast, 1.0)
        sync(self.device)
        self.times.append(time.perf_counter() - t)
        self.losses.append(loss)

    def result(self, warmup):
        return {"name": self.name, "step_seconds": self.times[warmup:], "first_loss": self.losses[0],
                "last_loss": self.losses[-1]}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_trainer(hf_dir, batches, warmup, device, tmp):
    import transformers
    from transformers import (
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    # HF shifts labels inside the model: T + 1 tokens give the same T predictions as dhad's x / y windows
    rows = [{"input_ids": torch.as_tensor(w), "labels": torch.as_tensor(w)} for items in batches for w in items]
    B = len(batches[0])
    times = {}

    class Clock(TrainerCallback):  # the time from one step's start to the next one's (data loading included)
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            times.setdefault("starts", []).append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            sync(device)
            times["starts"].append(time.perf_counter())

    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=B, max_steps=len(batches),
                             learning_rate=3e-4, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, bf16=True,
                             use_cpu=not device.startswith("cuda"), logging_strategy="no", save_strategy="no",
                             report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0)
    tr = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()],
                 data_collator=lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]})
    tr.train()
    st = times["starts"]
    return {"name": f"hf-trainer (transformers {transformers.__version__})",
            "step_seconds": [b - a for a, b in zip(st[warmup:-1], st[warmup + 1:])],
            "first_loss": float("nan"), "last_loss": float("nan")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a dhad Llama-layout preset (default: a ~50M Llama)")
    ap.add_argument("--width", type=int, default=None, help="override n_embd of the default config "
                    "(heads = width / 64, 4 KV heads, n_inner = 8/3 width rounded to 256)")
    ap.add_argument("--layers", type=int, default=None, help="override n_layer of the default config")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", choices=("none", "both", "dhad"), default="none",
                    help="torch.compile dhad and hf-same-loop (both), or dhad only (as its recipes can)")
    ap.add_argument("--no-trainer", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peak", type=float, default=None, help="bf16 peak in TFLOP/s for MFU (default: measured)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="keep glibc's default allocator settings (dhad.utils.tune_malloc is on by default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    over = dict(BENCH)
    if a.width:
        over.update(n_embd=a.width, n_head=a.width // 64, n_kv_head=4, n_inner=-(-8 * a.width // 3 // 256) * 256)
    if a.layers:
        over.update(n_layer=a.layers)
    cfg = Config.from_name(a.preset) if a.preset else Config.from_name("small-llama", **over)
    if cfg.hf_layout != "llama":
        raise SystemExit("the comparison needs a Llama-layout config (transformers' LlamaForCausalLM)")
    dev = a.device
    if dev == "cpu" and not a.no_malloc_tuning:
        tune_malloc()  # what `dhad train` does on CPU; process-wide, so every contestant runs with it
    peak = measure_peak_flops(dev, torch.bfloat16, seconds=1.5)
    peak32 = measure_peak_flops(dev, torch.float32, seconds=0.5)
    peak_before = peak
    n = a.warmup + a.steps
    batches = make_batches(cfg.vocab_size, n, a.batch, a.seq_len)
    tok_per_step = a.batch * a.seq_len
    fpt = cfg.flops_per_token(a.seq_len)
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"measured peak: bf16 {peak / 1e12:.3f} TFLOP/s, fp32 {peak32 / 1e12:.3f} TFLOP/s")
    print(f"model: {cfg.num_params() / 1e6:.1f}M params (d={cfg.n_embd}, L={cfg.n_layer}, heads {cfg.n_head}/"
          f"{cfg.n_kv_head}, vocab {cfg.vocab_size}); batch {a.batch} x {a.seq_len} tokens; "
          f"{fpt / 1e9:.3f} GFLOP/token; {a.warmup} warm-up + {a.steps} timed steps; bf16 autocast")

    results = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from dhad.checkpoint import save_model
        dh = apply_training_kernels(Transformer(cfg).init_weights(0).to(dev))
        save_model(dh, tmp / "hf")
        from transformers import LlamaForCausalLM
        hf = LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32, attn_implementation="sdpa").to(dev)
        comp = a.compile != "none"
        pair = [Contestant("dhad" + (" (compiled)" if comp else ""), dh, cfg, dev, comp),
                Contestant("hf-same-loop" + (" (compiled)" if a.compile == "both" else ""), LogitsOnly(hf), cfg, dev,
                           a.compile == "both")]
        # Interleaved, step by step, alternating who goes first: both see the same machine load.
        for i, items in enumerate(batches):
            for c in (pair if i % 2 == 0 else pair[::-1]):
                c.step(items)
            peak = max(peak, measure_peak_flops(dev, torch.bfloat16, seconds=0.05))
        results += [c.result(a.warmup) for c in pair]
        del pair, dh, hf
        if not a.no_trainer:
            results.append(run_trainer(tmp / "hf", batches, a.warmup, dev, tmp))

    peak = max(peak, measure_peak_flops(dev, torch.bfloat16, seconds=1.5))
    if a.peak:
        peak = a.peak * 1e12
    print(f"bf16 peak: {peak_before / 1e12:.3f} TFLOP/s at the start, {peak / 1e12:.3f} "
          f"{'given (--peak)' if a.peak else 'best of all probes'} (used for MFU); runs took "
          f"{time.perf_counter() - t_start:.0f} s")
    base = base_best = None
    print(f"\n{'':<36}{'tokens/s':>10}{'MFU':>8}{'first loss':>12}{'dhad / this':>13}"
          f"{'best tok/s':>12}{'best MFU':>10}{'best ratio':>12}")
    for r in results:
        r["tokens_per_s"] = tok_per_step / float(np.median(r["step_seconds"]))
        r["tokens_per_s_best"] = tok_per_step / float(np.min(r["step_seconds"]))
        r["mfu"] = fpt * r["tokens_per_s"] / peak
        r["mfu_best"] = fpt * r["tokens_per_s_best"] / peak
        base = base or r["tokens_per_s"]
        base_best = base_best or r["tokens_per_s_best"]
        r["dhad_ratio"] = base / r["tokens_per_s"]
        r["dhad_ratio_best"] = base_best / r["tokens_per_s_best"]
        print(f"{r['name']:<36}{r['tokens_per_s']:>10.0f}{100 * r['mfu']:>7.1f}%{r['first_loss']:>12.4f}"
              f"{r['dhad_ratio']:>12.2f}x{r['tokens_per_s_best']:>12.0f}{100 * r['mfu_best']:>9.1f}%"
              f"{r['dhad_ratio_best']:>11.2f}x")
    print("(tokens/s, MFU, ratio: from the median timed step; best: from the fastest timed step)")
    if a.json:
        Path(a.json).write_text(json.dumps({"peak_bf16": peak, "peak_bf16_before": peak_before, "peak_fp32": peak32,
                                            "threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
