"""`dhad generate --model DIR --prompt TEXT`: greedy or sampled generation with the KV cache.

With `--chat` the prompt is a user message rendered in the model's chat format (the checkpoint's
own chat_template when it ships one); `--preset jais|allam` applies a card's sampling settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from dhad.cli import add_quantize_arguments, quantize_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF layout: config.json, safetensors, tokenizer files) or a GGUF file")
    p.add_argument("--prompt", help="prompt text (or '-' to read stdin)")
    p.add_argument("--messages", help="a JSON file or string with a chat conversation [{role, content}, ...]")
    p.add_argument("--chat", action="store_true", help="treat --prompt as a user message in the model's chat format")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--format", help="chat format: jais, jais-legacy, llama2, chatml (default: the checkpoint's template)")
    p.add_argument("--preset", choices=["greedy", "jais", "allam"], help="a card's sampling settings")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--min-new-tokens", type=int, default=None)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--download", action="store_true", help="fetch --model from the Hugging Face Hub if it is not a directory")
    p.add_argument("--json", action="store_true", help="print a JSON record (text, ids, timing)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (seconds up front, faster tokens after)")
    add_quantize_arguments(p)


def run(args) -> int:
    from dhad.checkpoint import CheckpointError, load_model
    from dhad.cli import CLIError
    from dhad.generate import SamplingParams, generate_ids, generate_text
    from dhad.tokenizer import load_tokenizer

    if not args.prompt and not args.messages:
        raise CLIError("give --prompt TEXT or --messages JSON")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    quant = quantize_kwargs(args)
    try:
        model = load_model(args.model, dtype=args.dtype, download=args.download, **quant)
        tok = load_tokenizer(model_dir(args.model, args.download))
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise CLIError(str(e)) from None
    overrides = {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                        repetition_penalty=args.repetition_penalty, seed=args.seed).items()
                 if v is not None}
    if args.do_sample:
        overrides["do_sample"] = True
    try:
        base = SamplingParams.preset(args.preset) if args.preset else SamplingParams(max_new_tokens=64)
        params = SamplingParams.from_kwargs(base, **overrides)
    except ValueError as e:
        raise CLIError(str(e)) from None
    t0 = time.perf_counter()
    try:
        if args.messages or args.chat:
            if args.messages:
                src = args.messages
                messages = json.loads(open(src, encoding="utf-8").read() if not src.lstrip().startswith("[") else src)
            else:
                messages = [{"role": "user", "content": prompt}]
            if args.system:
                messages = [{"role": "system", "content": args.system}] + messages
            text = generate_text(model, tok, messages, fmt=args.format, params=params, compile=args.compile)
            n_new = None
        else:
            ids = tok.encode(prompt, add_special_tokens=True)  # a raw prompt: BOS where the tokenizer adds one
            new = generate_ids(model, [ids], params, tokenizer=tok, compile=args.compile)[0]
            text = tok.decode(new, skip_special_tokens=True)
            n_new = len(new)
    except (ValueError, json.JSONDecodeError) as e:
        raise CLIError(str(e)) from None
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"text": text, "new_tokens": n_new, "seconds": round(dt, 3)}, ensure_ascii=False))
    else:
        print(text)
        if n_new:
            note = " (including the decode step's compilation)" if args.compile else ""
            print(f"[{n_new} tokens in {dt:.2f}s, {n_new / dt:.1f} tok/s{note}]", file=sys.stderr)
    return 0


def model_dir(path, download):
    from dhad.checkpoint import resolve_model_dir
    return resolve_model_dir(path, download=download)
