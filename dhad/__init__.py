"""dhad: the bilingual Arabic-English LLM systems of the Jais family and ALLaM model cards, end to end.

Public API (stable names):
    load_model(path, dtype="float32", device="cpu", adapter=None, quantize=None) -> Transformer (eval mode;
        adapter: a LoRA adapter dir in PEFT's format, applied unmerged; quantize: "int8" / "int4" weight-only)
    save_model(model, out_dir, ...)                 -> HF-layout directory (safetensors)
    load_tokenizer(path)                            -> Tokenizer with encode/decode
    generate(model, tok, prompt_or_messages, **generation parameters) -> str
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Config", "Transformer", "load_model", "save_model", "load_tokenizer", "generate", "__version__"]


def __getattr__(name):  # lazy: importing dhad must not import torch for `dhad --help`
    if name == "Config":
        from dhad.config import Config
        return Config
    if name == "Transformer":
        from dhad.model import Transformer
        return Transformer
    if name in ("load_model", "save_model"):
        from dhad import checkpoint
        return getattr(checkpoint, name)
    if name == "load_tokenizer":
        from dhad.tokenizer import load_tokenizer
        return load_tokenizer
    if name == "generate":
        from dhad.generate import generate_text
        return generate_text
    raise AttributeError(f"module 'dhad' has no attribute {name!r}")
