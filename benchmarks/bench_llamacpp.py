"""Batch-1 decode tokens/s: llama.cpp vs dhad on the same GGUF files, measured in one run.

A Llama-layout model (random weights, dhad-built) is exported by dhad to q8_0 and q4_0 GGUF. For each file:
- llama.cpp (llama-cpp-python built by scripts/test-llamacpp.sh; its venv's python runs
  scripts/llamacpp_run.py): a prompt, then N single-token decode steps through its KV cache;
- dhad fp32: the same file loaded with `dhad.load_model(file)` (weights dequantised to float32 by
  `gguf.quants`), `generate_ids` with EOS off; decode rate = (N - 1) / (time(N) - time(1)), so prefill
  cancels out;
- dhad int8 / int4 (weight-only, `dhad.load_model(file, quantize=...)`) when this dhad has them.
Same thread count for both (--threads, default 2). Best of --repeats rounds, each round running every
contestant once, so load from other tenants of a shared machine hits all alike. Printed: tokens/s and the ratio dhad / llama.cpp (goal >= 1.0x).

    DHAD_LLAMACPP_PYTHON=.venv-llamacpp/bin/python .venv/bin/python benchmarks/bench_llamacpp.py \\
        [--hidden 1024 --layers 8 --vocab 8192] [--new-tokens 64] [--threads 2] [--json results.jsonl]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import dhad
from dhad.config import Config
from dhad.gguf import export_gguf
from dhad.generate import SamplingParams, generate_ids
from dhad.model import Transformer
from dhad.tokenizer import train_bpe

RUNNER = Path(__file__).resolve().parents[1] / "scripts" / "llamacpp_run.py"


def llamacpp_rate(py, path, prompt, n, threads, repeats) -> float:
    args = dict(mode="bench", model=str(path), prompt=prompt, n=n, threads=threads, repeats=repeats,
                n_ctx=len(prompt) + n + 8)
    r = subprocess.run([py, str(RUNNER), json.dumps(args)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp runner failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["tokens_per_s"]


def dhad_rate(model, prompt, n, repeats) -> float:
    ids = torch.tensor([prompt])

    def run(k):
        t = time.perf_counter()
        generate_ids(model, ids, SamplingParams(max_new_tokens=k, eos_token_id=()))
        return time.perf_counter() - t

    run(2)  # warm up
    t1 = min(run(1) for _ in range(repeats))
    tn = min(run(n) for _ in range(repeats))
    return (n - 1) / max(tn - t1, 1e-9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--llamacpp-python", default=os.environ.get("DHAD_LLAMACPP_PYTHON"),
                    help="python of the venv with llama-cpp-python (scripts/test-llamacpp.sh builds .venv-llamacpp)")
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    a = ap.parse_args()
    if not a.llamacpp_python:
        raise SystemExit("set DHAD_LLAMACPP_PYTHON (or --llamacpp-python): run scripts/test-llamacpp.sh to build it")
    torch.set_num_threads(a.threads)
    tok = train_bpe(["hello world, a tiny corpus for a benchmark tokenizer. " * 20], 300)
    cfg = Config(vocab_size=a.vocab, n_layer=a.layers, n_embd=a.hidden, n_head=max(1, a.hidden // 64),
                 n_inner=int(a.hidden * 2.6875) // 32 * 32, block_size=2048, norm="rmsnorm", position="rope",
                 mlp="gated", bias=False, tie_embeddings=False, embedding_scale=1.0, logits_scale=1.0,
                 attn_scale_power=0.5, bos_token_id=0, eos_token_id=0)
    model = Transformer(cfg).init_weights(seed=0).eval()
    n_params = model.num_params()
    quantize = "quantize" in inspect.signature(dhad.load_model).parameters
    print(f"model: Llama {n_params / 1e6:.1f}M params ({a.hidden} hidden, {a.layers} layers, vocab {a.vocab}); "
          f"threads {a.threads} for both; batch 1, {a.new_tokens} new tokens after a {a.prompt_len}-token prompt; "
          f"torch {torch.__version__}; dhad weight-only int8/int4: {'yes' if quantize else 'not in this dhad'}")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, a.vocab, (a.prompt_len,), generator=g).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for t in a.types.split(","):
            path = export_gguf(model, tok, Path(d) / f"m-{t}.gguf", t)
            contestants = {"dhad fp32": dhad.load_model(path)}
            if quantize:
                for q in ("int8", "int4"):
                    try:
                        contestants[f"dhad {q}"] = dhad.load_model(path, quantize=q)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"  ({t}: dhad {q} not available on a GGUF: {e})")
            # interleaved rounds, best of each: load from the other tenants of a shared machine hits all alike
            lc, rates = 0.0, {name: 0.0 for name in contestants}
            for _ in range(a.repeats):
                lc = max(lc, llamacpp_rate(a.llamacpp_python, path, prompt, a.new_tokens, a.threads, 1))
                for name, m in contestants.items():
                    rates[name] = max(rates[name], dhad_rate(m, prompt, a.new_tokens, 1))
            mb = path.stat().st_size / 1e6
            print(f"[{t}] {mb:.0f} MB file | llama.cpp {lc:8.1f} tok/s")
            for name, r in rates.items():
                print(f"[{t}]   {name:10s} {r:8.1f} tok/s | ratio {name}/llama.cpp {r / lc:.2f}x (goal >= 1.0x)")
                rows.append({"type": t, "contestant": name, "tokens_per_s": r, "llamacpp_tokens_per_s": lc,
                             "ratio": r / lc})
            del contestants
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"bench": "llamacpp", "params": n_params, "threads": a.threads, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
