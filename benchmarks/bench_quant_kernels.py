"""Which weight-only kernels dhad.quant uses: batch-1 (decode) matmuls of the candidates, against float32
`F.linear`, measured in one run on the same weights.

Candidates: bfloat16 `F.linear`; int8 dequantise-then-matmul (the plain PyTorch way); PyTorch's
`torch._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` with float32 and with bfloat16
activations; torchao's `Int8WeightOnlyConfig` when torchao is installed (torchao 0.18's CPU int4 layout,
prototype `Int4OpaqueTensor`, calls the same `_weight_int4pack_mm_for_cpu`; its `Int4WeightOnlyConfig`
refuses that packing format); and dhad.quant's `Int8Linear` / `Int4Linear` as the model runs them
(float32 in and out, bfloat16 inside).

    .venv/bin/python benchmarks/bench_quant_kernels.py [--threads 1] [--shapes 768x256,4096x4096,4096x11008]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dhad.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8


def per_call_us(fn, min_time=0.3):
    for _ in range(3):
        fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_time:
        fn()
        n += 1
    return (time.perf_counter() - t) / n * 1e6


def torchao_int8(lin: torch.nn.Linear):
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    m = torch.nn.Sequential(torch.nn.Linear(lin.in_features, lin.out_features, bias=False)).to(torch.bfloat16)
    m[0].weight.data.copy_(lin.weight.data)
    quantize_(m, Int8WeightOnlyConfig())
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default="768x256,4096x4096,4096x11008", help="N x K (out x in) of each matmul")
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}; "
          f"x [1, K]; microseconds per call (ratio: float32 F.linear / candidate)")
    g = a.group_size
    for shape in a.shapes.split(","):
        N, K = map(int, shape.split("x"))
        lin = torch.nn.Linear(K, N, bias=False)
        x = torch.randn(1, K)
        xb = x.to(torch.bfloat16)
        w, wb = lin.weight.data, lin.weight.data.to(torch.bfloat16)
        q8, s8 = quantize_int8(w)
        q4, s4, z4 = quantize_int4(w, g)
        l8, l4 = Int8Linear(q8, s8), Int4Linear(q4, s4, z4, g)
        s8f = s8.float()
        sz = l4.scales_and_zeros
        cands = {
            "float32 F.linear (baseline)": lambda: F.linear(x, w),
            "bfloat16 F.linear": lambda: F.linear(xb, wb),
            "int8 dequantise then F.linear": lambda: F.linear(x, q8.float()) * s8f,
            "int8 _weight_int8pack_mm, bf16 x": lambda: torch._weight_int8pack_mm(xb, q8, s8),
            "int4 _weight_int4pack_mm_for_cpu, bf16 x": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, l4.packed, g, sz),
            "dhad.quant Int8Linear (fp32 in/out)": lambda: l8(x),
            f"dhad.quant Int4Linear g{g} (fp32 in/out)": lambda: l4(x),
        }
        # float32 activations: the same ops fall back to slow paths (they need bf16 scales anyway)
        s8_32, sz32 = s8.float(), sz.float()
        for name, fn in (("int8 _weight_int8pack_mm, fp32 x", lambda: torch._weight_int8pack_mm(x, q8, s8_32)),
                         ("int4 _weight_int4pack_mm_for_cpu, fp32 x",
                          lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, l4.packed, g, sz32))):
            try:
                fn()
                cands[name] = fn
            except RuntimeError as e:
                print(f"    {name}: not supported ({str(e)[:80]})")
        m = torchao_int8(lin)
        if m is not None:
            cands["torchao Int8WeightOnlyConfig (bf16)"] = lambda: m(xb)
        with torch.inference_mode():
            us = {k: per_call_us(fn) for k, fn in cands.items()}
        base = us["float32 F.linear (baseline)"]
        print(f"\n{N} x {K} ({N * K * 4 / 1e6:.1f} MB in float32):")
        for k, v in us.items():
            print(f"  {k:45s} {v:10.1f} us  {base / v:6.2f}x")


if __name__ == "__main__":
    main()
