"""Decode throughput: dhad generate / Engine vs transformers `generate`, measured in one run.

Same Llama config and weights for both (built with transformers, saved, loaded by dhad), same dtype,
greedy decoding with EOS disabled so every run produces exactly the asked number of tokens.

1. batch-1 decode tokens/s: dhad `generate_ids` vs transformers `generate` (decode rate =
   (N - 1) / (time(N tokens) - time(1 token)), so prefill is excluded for both); goal >= 2x.
   Eager against eager, and (unless --no-compile) each side's compiled decoding: dhad
   `generate_ids(compile=True)` (static-shape step, inductor with the C++ wrapper on CPU) and
   transformers' `cache_implementation="static"` + `CompileConfig` (forced on for CPU, where
   transformers does not auto-compile; its default "reduce-overhead" mode is CUDA graphs, so the
   CPU run uses mode "default"). Compilation happens in the warm-up, outside the timings.
2. aggregate tokens/s of the Engine with S concurrent streams vs 1 stream; goal >= 5x.
3. time to first token p50 / p99 under that load.
4. with --vllm: the same S-stream load through `--engine vllm` (dhad's VLLMEngine over vLLM's
   LLMEngine), so the native engine is compared with vLLM on the same weights and dtype.
5. (unless --no-quant) batch-1 decode of the same weights quantised by dhad.quant, int8 per channel and
   int4 (--group-size), eager and compiled, against dhad at --dtype: goals int8 >= 1.8x, int4 >= 2.5x.

    .venv/bin/python benchmarks/bench_decode.py [--new-tokens 64] [--streams 32] [--dtype float32] [--device cpu]
        [--threads 1] [--hidden 256 --layers 4 --vocab 8192] [--no-quant] [--group-size 64] [--json results.jsonl]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import transformers

import dhad
from dhad.engine import Engine, make_engine
from dhad.generate import SamplingParams, generate_ids


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def decode_rates(gens: dict, n, repeats):
    """Tokens/s of the decode phase of each generator: (n - 1) extra tokens over the extra time they
    take (so prefill cancels out). Runs are interleaved and the best of ``repeats`` kept, so a
    noisy shared machine affects both sides alike."""
    for g in gens.values():
        g(2)  # warm up
    best = {k: [float("inf"), float("inf")] for k in gens}
    for _ in range(repeats):
        for k, g in gens.items():
            best[k][0] = min(best[k][0], timed(lambda: g(1), 1))
            best[k][1] = min(best[k][1], timed(lambda: g(n), 1))
    return {k: (n - 1) / max(tn - t1, 1e-9) for k, (t1, tn) in best.items()}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    # One intra-op thread by default: on a small shared CPU, OpenMP spin-waits of tiny decode ops make
    # multi-threaded timings meaningless (both sides run with the same setting either way).
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled contestants")
    ap.add_argument("--no-quant", action="store_true", help="skip the int8 / int4 contestants")
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64, 128)")
    ap.add_argument("--vllm", action="store_true",
                    help="also run the S-stream load through --engine vllm (needs vLLM, e.g. its CPU build: "
                         "see tests/test_vllm_real.py for the environment)")
    ap.add_argument("--vllm-memory", type=float, default=0.1,
                    help="vLLM gpu_memory_utilization (on its CPU build: the share of RAM for the KV cache)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875),
                                   num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                                   num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=2048,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    tmp = tempfile.TemporaryDirectory()
    d = tmp.name
    ref.save_pretrained(d)
    ours = dhad.load_model(d, dtype=a.dtype, device=a.device)
    ref = ref.to(device=a.device, dtype=dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model: Llama {n_params / 1e6:.1f}M params ({a.hidden} hidden, {a.layers} layers, vocab {a.vocab}), "
          f"{a.dtype} on {a.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")
    prompt = torch.randint(3, a.vocab, (1, a.prompt_len), device=a.device)
    no_eos = SamplingParams(max_new_tokens=1, eos_token_id=())

    # 1. batch-1 decode
    @torch.inference_mode()
    def hf_gen(n):
        return ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)

    def dhad_gen(n):
        return generate_ids(ours, prompt, SamplingParams(max_new_tokens=n, eos_token_id=()))

    @torch.inference_mode()
    def hf_gen_compiled(n):
        cc = transformers.CompileConfig(fullgraph=True, mode="default" if a.device == "cpu" else "reduce-overhead")
        cc._compile_all_devices = True  # transformers only auto-compiles on accelerators
        return ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0, cache_implementation="static", compile_config=cc)

    def dhad_gen_compiled(n):
        return generate_ids(ours, prompt, SamplingParams(max_new_tokens=n, eos_token_id=()), compile=True)

    gens = {"hf": hf_gen, "dhad": dhad_gen}
    if not a.no_compile:
        gens.update({"hf_compiled": hf_gen_compiled, "dhad_compiled": dhad_gen_compiled})
    quant = {}
    if not a.no_quant:  # 5. the same weights, weight-only quantised
        for mode in ("int8", "int4"):
            qm = quant[mode] = dhad.load_model(d, dtype=a.dtype, device=a.device, quantize=mode,
                                               group_size=a.group_size if mode == "int4" else None)
            gens[f"dhad_{mode}"] = (lambda m: lambda n: generate_ids(
                m, prompt, SamplingParams(max_new_tokens=n, eos_token_id=())))(qm)
            if not a.no_compile:
                gens[f"dhad_{mode}_compiled"] = (lambda m: lambda n: generate_ids(
                    m, prompt, SamplingParams(max_new_tokens=n, eos_token_id=()), compile=True))(qm)
    # same greedy tokens (sanity: all are decoding the same model)
    want = hf_gen(16)[0, a.prompt_len:].tolist()
    same = all((g(16)[0, a.prompt_len:].tolist() if k.startswith("hf") else g(16)[0]) == want for k, g in gens.items()
               if not k.startswith(("dhad_int8", "dhad_int4")))
    # quantised models decode other weights: how many of the first 16 greedy tokens match float's
    q_same = {k: sum(x == y for x, y in zip(g(16)[0], want)) for k, g in gens.items()
              if k.startswith(("dhad_int8", "dhad_int4"))}
    rates = decode_rates(gens, a.new_tokens, a.repeats)
    r_hf, r_dh = rates["hf"], rates["dhad"]
    print(f"[1] batch-1 decode: transformers generate {r_hf:8.1f} tok/s | dhad generate {r_dh:8.1f} tok/s | "
          f"ratio dhad/transformers {r_dh / r_hf:.2f}x (eager both; same greedy tokens: {same})")
    if not a.no_compile:
        r_hfc, r_dhc = rates["hf_compiled"], rates["dhad_compiled"]
        print(f"    compiled: transformers static cache + compile {r_hfc:8.1f} tok/s | dhad compile=True "
              f"{r_dhc:8.1f} tok/s\n"
              f"    ratios: dhad compiled / transformers eager {r_dhc / r_hf:.2f}x (goal >= 2x) | "
              f"dhad compiled / transformers compiled {r_dhc / r_hfc:.2f}x")

    for mode in quant:
        r_q = rates[f"dhad_{mode}"]
        line = (f"[5] {mode}{f' (group {a.group_size})' if mode == 'int4' else ''}: dhad eager {r_q:8.1f} tok/s, "
                f"{r_q / r_dh:.2f}x dhad {a.dtype} eager")
        if not a.no_compile:
            r_qc = rates[f"dhad_{mode}_compiled"]
            line += f" | compiled {r_qc:8.1f} tok/s, {r_qc / rates['dhad_compiled']:.2f}x dhad {a.dtype} compiled"
        goal = {"int8": 1.8, "int4": 2.5}[mode]
        print(line + f" (goal >= {goal}x; first 16 greedy tokens equal to {a.dtype}'s: "
              f"{q_same[f'dhad_{mode}']}/16)")

    # 2. engine: S concurrent streams vs 1
    prompts = [torch.randint(3, a.vocab, (a.prompt_len,)).tolist() for _ in range(a.streams)]
    params = SamplingParams(max_new_tokens=a.new_tokens, eos_token_id=())
    with Engine(ours, None, max_batch_size=a.streams, max_queue=a.streams) as eng:
        eng.generate(prompts[0], no_eos, timeout=600)  # warm up
        t = time.perf_counter()
        one = eng.generate(prompts[0], params, timeout=600)
        r_one = one.completion_tokens / (time.perf_counter() - t)
        t = time.perf_counter()
        hs = [eng.submit(p, params) for p in prompts]
        res = [h.result(600) for h in hs]
        wall = time.perf_counter() - t
    r_many = sum(r.completion_tokens for r in res) / wall
    ttft = [r.ttft_s * 1000 for r in res]
    print(f"[2] engine aggregate: 1 stream {r_one:8.1f} tok/s | {a.streams} streams {r_many:8.1f} tok/s | "
          f"ratio {r_many / r_one:.2f}x (goal >= 5x)")
    print(f"[3] TTFT under {a.streams} concurrent streams: p50 {statistics.median(ttft):.1f} ms | "
          f"p99 {pct(ttft, 99):.1f} ms | single-stream TTFT {one.ttft_s * 1000:.1f} ms")
    r_vllm = None
    if a.vllm:  # 4. the same load through vLLM (same weights, same dtype, greedy, no EOS)
        eng = make_engine(d, None, engine="vllm", max_batch_size=a.streams, max_queue=a.streams, dtype=a.dtype,
                          gpu_memory_utilization=a.vllm_memory)
        with eng:
            eng.generate(prompts[0], no_eos, timeout=600)  # warm up
            t = time.perf_counter()
            one_v = eng.generate(prompts[0], params, timeout=600)
            r_one_v = one_v.completion_tokens / (time.perf_counter() - t)
            t = time.perf_counter()
            res_v = [h.result(600) for h in [eng.submit(p, params) for p in prompts]]
            r_vllm = sum(r.completion_tokens for r in res_v) / (time.perf_counter() - t)
            same_v = [r.token_ids for r in res_v] == [r.token_ids for r in res]
        ttft_v = [r.ttft_s * 1000 for r in res_v]
        print(f"[4] vLLM {eng.stats()['vllm_version']} engine: 1 stream {r_one_v:8.1f} tok/s | {a.streams} streams "
              f"{r_vllm:8.1f} tok/s | TTFT p50 {statistics.median(ttft_v):.1f} ms | dhad engine / vLLM at "
              f"{a.streams} streams {r_many / r_vllm:.2f}x (same greedy tokens: {same_v})")
    tmp.cleanup()
    if a.json:
        with open(a.json, "a", encoding="utf-8") as f:
            f.write(json.dumps({"bench": "decode", "device": a.device, "dtype": a.dtype, "params_m": n_params / 1e6,
                                "hf_tok_s": r_hf, "dhad_tok_s": r_dh, "batch1_ratio": r_dh / r_hf,
                                **{f"{k}_tok_s": v for k, v in rates.items() if k.endswith("compiled")},
                                "engine_1_tok_s": r_one, "engine_many_tok_s": r_many, "streams": a.streams,
                                "aggregate_ratio": r_many / r_one, "ttft_p50_ms": statistics.median(ttft),
                                "ttft_p99_ms": pct(ttft, 99), "same_greedy": same, "vllm_many_tok_s": r_vllm,
                                **{f"{k}_tok_s": v for k, v in rates.items() if k.startswith(("dhad_int8", "dhad_int4"))},
                                "int4_group_size": a.group_size if quant else None}) + "\n")


if __name__ == "__main__":
    main()
