"""`dhad info --model DIR|PRESET`: config, parameter count, dtype and the memory a model needs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF layout), a GGUF file or a preset name (e.g. jais-family-590m)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def model_info(model: str) -> dict:
    """The facts `dhad info` prints. A directory must hold a valid config.json and safetensors weights:
    ConfigError / CheckpointError (ValueError for a name that is neither) otherwise."""
    from dhad.checkpoint import load_config, memory_needed, quantization_of, weight_files
    from dhad.config import PRESETS, Config

    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} has no config.json: not a model directory")
        cfg = load_config(path)
        stored = json.loads((path / "config.json").read_text(encoding="utf-8")).get("torch_dtype", "float32")
        quant = quantization_of(path)
        if quant:  # a `dhad quantize` copy: the weights are int8 / int4 codes
            stored = f"{quant['mode']}" + (f" (group size {quant['group_size']})" if quant["group_size"] else "")
        files = weight_files(path)
        disk = sum(f.stat().st_size for f in files)
        files = [f.relative_to(path).as_posix() for f in files]
    elif path.is_file():  # a GGUF file (llama.cpp / Ollama)
        from dhad.gguf import read_config
        cfg, types = read_config(path)
        stored = "gguf " + ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))
        files, disk = [path.name], path.stat().st_size
    elif model in PRESETS:
        cfg, stored, files, disk = Config.from_name(model), "float32", [], 0
    else:
        raise ValueError(f"{model!r} is neither a model directory nor a preset ({', '.join(sorted(PRESETS))})")
    n = cfg.num_params()
    return {
        "model": model, "layout": cfg.hf_layout, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "n_inner": cfg.n_inner,
        "context": cfg.block_size, "norm": cfg.norm, "position": cfg.position, "mlp": cfg.mlp,
        "tie_embeddings": cfg.tie_embeddings, "embedding_scale": cfg.embedding_scale,
        "logits_scale": cfg.logits_scale, "attn_scale": f"1/head_dim**{cfg.attn_scale_power}",
        "params": n, "params_non_embedding": cfg.num_params(include_embeddings=False), "stored_dtype": stored,
        "memory_fp32_GB": round(memory_needed(cfg, "float32") / 1e9, 3),
        "memory_bf16_GB": round(memory_needed(cfg, "bfloat16") / 1e9, 3),
        "kv_cache_per_token_bf16_KB": round(2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 2 / 1024, 2),
        "train_flops_per_token": cfg.flops_per_token(),
        "files": files, "disk_bytes": disk,
    }


def run(args) -> int:
    from dhad.checkpoint import CheckpointError
    from dhad.cli import CLIError
    try:
        info = model_info(args.model)
    except (ValueError, CheckpointError) as e:  # ConfigError is a ValueError
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "params" or k == "params_non_embedding":
            v = f"{v:,} ({v / 1e9:.3f} B)"
        print(f"{k:<{width}}  {v}")
    return 0
