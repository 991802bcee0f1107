"""`dhad export gguf --model DIR --out FILE --type f16|q8_0|q4_0|q4_k_m`: a model as one GGUF file for
llama.cpp and Ollama (dhad.gguf; docs/quantization.md, "GGUF and llama.cpp / Ollama")."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", metavar="format", required=True)
    g = sub.add_parser("gguf", help="GGUF for llama.cpp / Ollama (llama and jais architectures)",
                       description="Write a model (Llama family: llama; Jais family: jais) with its tokenizer and "
                                   "chat template as one GGUF file.")
    g.add_argument("--model", required=True, help="model directory (HF layout) or a GGUF file")
    g.add_argument("--out", required=True, help="the GGUF file to write")
    # no `choices=`: an unknown type is reported by the library with the list of known ones
    g.add_argument("--type", default="f16", help="f16 (default), q8_0, q4_0 or q4_k_m (needs llama-cpp-python)")


def run(args) -> int:
    from pathlib import Path

    from dhad.checkpoint import CheckpointError, load_model
    from dhad.cli import CLIError
    from dhad.gguf import TYPES, arch_of, export_gguf
    from dhad.tokenizer import load_tokenizer

    if args.type not in TYPES:
        raise CLIError(f"unknown GGUF type {args.type!r}; use one of {list(TYPES)}")
    try:
        model = load_model(args.model, dtype="float32")
        arch_of(model.config)  # refuse an unsupported model before reading its tokenizer
        out = export_gguf(model, load_tokenizer(args.model), args.out, args.type, name=Path(args.model).stem)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise CLIError(str(e)) from None
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.type})")
    return 0
