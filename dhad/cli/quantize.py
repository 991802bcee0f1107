"""`dhad quantize --model DIR --out DIR --mode int8|int4 [--group-size 64]`: a weight-only quantised copy.

The copy is a model directory like any other (config.json with `quantization_config`, model.safetensors
holding the int8 / int4 codes and their bfloat16 scales, the tokenizer files): `dhad generate`, `chat`,
`serve`, `eval` and `dhad.load_model` load it quantised without a flag. See docs/quantization.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dhad.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="full-precision model directory (Hugging Face layout)")
    p.add_argument("--out", required=True, help="directory to write the quantised model to")
    p.add_argument("--mode", required=True, choices=("int8", "int4"),
                   help="int8: per output channel; int4: group-wise (--group-size)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 (default) or 128")
    p.add_argument("--dtype", default="float32",
                   help="dtype of what stays unquantised (embeddings, norms, biases): float32 | bfloat16 | float16")
    p.add_argument("--download", action="store_true", help="treat --model as a Hugging Face repo id and download it")


def run(args) -> int:
    from dhad.checkpoint import CheckpointError, load_model, resolve_model_dir, save_model
    from dhad.quant import QuantError, check_scheme

    try:
        group = check_scheme(args.mode, args.group_size)
    except QuantError as e:
        raise CLIError(str(e)) from None
    try:
        src = resolve_model_dir(args.model, download=args.download)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    if Path(args.out).resolve() == src.resolve():
        raise CLIError("--out must be another directory than --model (the full-precision weights would be replaced)")
    try:
        model = load_model(src, dtype=args.dtype, quantize=args.mode, group_size=group)
    except (CheckpointError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    has_tok = any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    out = save_model(model, args.out, tokenizer=src if has_tok else None)
    gen = src / "generation_config.json"
    if gen.is_file():  # the source's sampling defaults travel with the copy
        (out / "generation_config.json").write_text(gen.read_text(encoding="utf-8"), encoding="utf-8")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    was = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"wrote {out} ({args.mode}{f', group size {group}' if group else ''}): {size / 1e6:.1f} MB of weights, "
          f"{was / 1e6:.1f} MB before", file=sys.stderr)
    return 0
