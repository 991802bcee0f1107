"""Multi-LoRA serving: requests of several adapters in one batch (dhad.multi_lora) vs the alternatives,
measured in one run on the same model, adapters and requests.

Workload: S concurrent greedy requests (EOS off, so each makes exactly --new-tokens tokens) spread
evenly over K adapters of rank r on all seven projections (q k v o gate up down).

1. base       : the engine without adapters, the same S requests on the base model (the cost floor).
2. mixed      : one engine holding all K adapters (stacked A/B, per-row index); the S requests share
                one batch.
3. one-by-one : what serving without batched LoRA does: per adapter, a model with that adapter merged
                (W + scale * B @ A) and an engine over it; the requests of each adapter form their own
                batch, adapters served one after another (merge time not counted).

Printed: aggregate tokens/s of each and the ratios mixed / base (the adapters' overhead) and
mixed / one-by-one (what batching different adapters together buys).

    .venv/bin/python benchmarks/bench_multi_lora.py [--streams 8] [--adapters 4] [--rank 16] [--new-tokens 32]
        [--hidden 512 --layers 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from dhad.config import Config
from dhad.engine import Engine
from dhad.model import Transformer
from dhad.multi_lora import MultiLoRA, target_slot

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def random_adapter(cfg, r, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(cfg.n_layer):
        for t in TARGETS:
            mod, lo, hi = target_slot(cfg, t)
            fin = cfg.n_inner if mod == "mlp.proj" else cfg.n_embd
            out[layer, t] = (torch.randn(r, fin, generator=g) / fin ** 0.5, torch.randn(hi - lo, r, generator=g) * 0.01,
                             2.0)
    return out


def merged(model, weights):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, t), (A, B, s) in weights.items():
            mod, lo, hi = target_slot(m.config, t)
            part, name = mod.split(".")
            getattr(getattr(m.h[layer], part), name).weight[lo:hi] += s * B @ A
    return m


def run(engine, requests, n_new):
    """Submit all requests at once, wait for all; tokens/s over the wall time."""
    t = time.perf_counter()
    hs = [engine.submit(p, max_new_tokens=n_new, eos_token_id=(), adapter=a) if a is not None
          else engine.submit(p, max_new_tokens=n_new, eos_token_id=()) for p, a in requests]
    n = sum(len(h.result(600).token_ids) for h in hs)
    return n, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)  # one: OpenMP spin-waits of tiny decode ops on a shared CPU
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config.from_name("tiny-llama", n_embd=args.hidden, n_head=args.hidden // 64, n_kv_head=args.hidden // 64,
                           n_inner=int(args.hidden * 2.6875), n_layer=args.layers, vocab_size=args.vocab,
                           block_size=max(512, args.prompt_len + args.new_tokens + 1))
    model = Transformer(cfg).init_weights(seed=0).eval()
    names = [f"ad{i}" for i in range(args.adapters)]
    weights = {n: random_adapter(cfg, args.rank, i + 1) for i, n in enumerate(names)}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.streams)]
    owners = [names[i % len(names)] for i in range(args.streams)]

    base_engine = Engine(model, None, max_batch_size=args.streams).start()
    lora_model = copy.deepcopy(model)
    mixed_engine = Engine(lora_model, None, max_batch_size=args.streams,
                          adapters=MultiLoRA(lora_model, weights)).start()
    per_adapter = {n: Engine(merged(model, weights[n]), None, max_batch_size=args.streams).start() for n in names}

    def one_by_one():
        n_tok, secs = 0, 0.0
        for n in names:
            k, s = run(per_adapter[n], [(p, None) for p, o in zip(prompts, owners) if o == n], args.new_tokens)
            n_tok, secs = n_tok + k, secs + s
        return n_tok, secs

    cases = {"base": lambda: run(base_engine, [(p, None) for p in prompts], args.new_tokens),
             "mixed": lambda: run(mixed_engine, list(zip(prompts, owners)), args.new_tokens),
             "one-by-one": one_by_one}
    for f in cases.values():  # warm up
        f()
    best = {k: 0.0 for k in cases}
    for _ in range(args.repeats):  # interleaved, best of repeats: a noisy shared machine hits all alike
        for k, f in cases.items():
            n, s = f()
            best[k] = max(best[k], n / s)
    for e in [base_engine, mixed_engine, *per_adapter.values()]:
        e.shutdown()
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, {args.threads} threads; "
          f"{args.streams} streams over {args.adapters} adapters of rank {args.rank} on {','.join(TARGETS)}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens each")
    for k, v in best.items():
        print(f"  {k:11s} {v:8.1f} tokens/s")
    print(f"mixed / base       = {best['mixed'] / best['base']:.2f}x  (the adapters' overhead)")
    print(f"mixed / one-by-one = {best['mixed'] / best['one-by-one']:.2f}x  (batching different adapters together)")


if __name__ == "__main__":
    main()
