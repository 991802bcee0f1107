"""Forward+backward training throughput: dhad Transformer vs transformers' LlamaForCausalLM.

Same ~20M-parameter Llama config, same weights, same batches, measured in the same run, fp32 and
bf16 (autocast). Prints tokens/s for each and the ratio dhad / transformers.

    .venv/bin/python benchmarks/bench_model.py [--steps 10] [--batch 8] [--seq 256]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

import dhad
from dhad.train.kernels import apply_training_kernels


def bench(model, ids, steps, dtype, hf):
    opt_params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(ids).logits if hf else model(ids)
            loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        for p in opt_params:
            p.grad = None
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return ids.numel() * steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each side is kept")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                                   num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024,
                                   tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = apply_training_kernels(dhad.load_model(d).train())  # what `dhad train` runs
    n = sum(p.numel() for p in ours.parameters())
    print(f"config: Llama {n / 1e6:.1f}M params, batch {a.batch} x seq {a.seq}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    ids = torch.randint(0, 8192, (a.batch, a.seq))
    for name, dt in (("fp32", torch.float32), ("bf16 autocast", torch.bfloat16)):
        # interleaved rounds, best of each: a busy machine slows both sides alike
        r_hf = r_dh = 0.0
        for _ in range(a.rounds):
            r_hf = max(r_hf, bench(ref, ids, a.steps, dt, hf=True))
            r_dh = max(r_dh, bench(ours, ids, a.steps, dt, hf=False))
        print(f"{name:14s} transformers {r_hf:9.0f} tok/s | dhad {r_dh:9.0f} tok/s | ratio dhad/transformers {r_dh / r_hf:.2f}x")


if __name__ == "__main__":
    main()
