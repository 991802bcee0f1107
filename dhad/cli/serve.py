"""`dhad serve --model DIR`: the card's /score endpoint, the OpenAI API and the web chat (uvicorn).

On SIGINT/SIGTERM uvicorn stops accepting connections and waits (up to --graceful-timeout
seconds) for in-flight requests, streams included, to finish; then the engine finishes whatever
it still holds and stops.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from dhad.cli import CLIError, add_quantize_arguments, quantize_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (Hugging Face layout) or a GGUF file")
    p.add_argument("--download", action="store_true",
                   help="treat --model as a Hugging Face repo id and download it (needs network)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $DHAD_API_KEY; none = open)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (PEFT's format: adapter_config.json + adapter_model.safetensors) "
                        "as model id NAME beside the base model; repeatable. Requests pick one with the OpenAI "
                        "'model' field (also on /score); requests of different adapters share a batch")
    p.add_argument("--format", default=None,
                   help="chat format: jais, jais-legacy, llama2, chatml (default: the checkpoint's chat_template)")
    p.add_argument("--engine", choices=("native", "vllm"), default="native")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra vllm.EngineArgs field, repeatable; VALUE is read as JSON when it parses "
                        "(e.g. tensor_parallel_size=8, gpu_memory_utilization=0.2 -- on vLLM's CPU build "
                        "the share of RAM for the KV cache)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: float32 natively, the checkpoint's on vLLM)")
    p.add_argument("--device", default="cpu")
    add_quantize_arguments(p)
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch (then 429)")
    p.add_argument("--max-new-tokens-limit", type=int, default=4096,
                   help="largest max_new_tokens a request may ask for (the ALLaM card: 4096)")
    p.add_argument("--content-filter", choices=("none", "blocklist"), default="none",
                   help="check requests and answers against a bilingual blocklist (default: none)")
    p.add_argument("--blocklist", default=None,
                   help="UTF-8 file, one word or phrase per line (# comments); default: a small built-in list")
    p.add_argument("--max-body-mb", type=float, default=8.0,
                   help="largest request body in MiB; a larger one gets 413 before it is read (default 8)")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt text in characters, checked before tokenising "
                        "(default: 32 per token of the context)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request headers (then 408 and the connection closes)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may stall between two pieces (then 408)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on shutdown")
    p.add_argument("--log-level", default="info")


def parse_engine_args(items: list[str]) -> dict:
    """``["tensor_parallel_size=8", "enforce_eager=true", "kv_cache_dtype=fp8"]`` -> a dict; values are JSON
    when they parse (numbers, true/false, lists), else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise CLIError(f"--vllm-arg {item!r}: expected KEY=VALUE with KEY an EngineArgs field name")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_adapters(items: list[str]) -> dict[str, str]:
    """``["ar-chat=out/ar", "code=out/code"]`` -> ``{"ar-chat": "out/ar", "code": "out/code"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise CLIError(f"--adapter {item!r}: expected NAME=DIR (a model id and a PEFT adapter directory)")
        if name.strip() in out:
            raise CLIError(f"--adapter {name.strip()!r} is given twice")
        out[name.strip()] = path.strip()
    return out


def build_filter(kind: str, blocklist: str | None):
    if kind == "none":
        if blocklist:
            raise CLIError("--blocklist needs --content-filter blocklist")
        return None
    from dhad.serve.filters import BlocklistFilter
    try:
        return BlocklistFilter.from_file(blocklist) if blocklist else BlocklistFilter()
    except ValueError as e:
        raise CLIError(str(e)) from None


def run(args) -> int:
    if args.max_batch_size < 1 or args.max_queue < 0 or args.max_new_tokens_limit < 1:
        raise CLIError("--max-batch-size and --max-new-tokens-limit must be >= 1, --max-queue >= 0")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be 1..65535, got {args.port}")
    from dhad.serve.limits import Limits
    try:
        limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), header_timeout=args.header_timeout,
                        body_timeout=args.body_timeout, max_prompt_chars=args.max_prompt_chars)
    except ValueError as e:
        raise CLIError(f"--max-body-mb, --max-prompt-chars, --header-timeout, --body-timeout: {e}") from None
    content_filter = build_filter(args.content_filter, args.blocklist)
    engine_args = parse_engine_args(args.vllm_arg)
    adapters = parse_adapters(args.adapter)
    if engine_args and args.engine != "vllm":
        raise CLIError("--vllm-arg needs --engine vllm")
    api_key = args.api_key if args.api_key is not None else (os.environ.get("DHAD_API_KEY") or None)
    quant = quantize_kwargs(args)
    if quant and args.engine != "native":
        raise CLIError("--quantize is for the native engine (vLLM has its own quantisation options: --vllm-arg)")

    import uvicorn

    from dhad.checkpoint import CheckpointError
    from dhad.serve.app import create_app, uvicorn_options
    from dhad.serve.backend import load_backend

    try:
        backend = load_backend(args.model, dtype=args.dtype, device=args.device, engine=args.engine, fmt=args.format,
                               model_name=args.served_model_name, max_batch_size=args.max_batch_size,
                               max_queue=args.max_queue, max_new_tokens_limit=args.max_new_tokens_limit,
                               download=args.download, engine_args=engine_args, adapters=adapters, **quant)
    # missing directory, bad checkpoint / tokenizer / format, vLLM not installed
    except (OSError, ValueError, RuntimeError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    app = create_app(backend, api_key=api_key, content_filter=content_filter, shutdown_engine=True, limits=limits)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key (set --api-key or DHAD_API_KEY)", file=sys.stderr)
    extra = f" + LoRA adapters {', '.join(backend.adapter_names)}" if backend.adapter_names else ""
    print(f"dhad serve: {backend.model_name}{extra} ({backend.fmt.name} format, context {backend.context}) on "
          f"http://{args.host}:{args.port}/  (web chat at /, OpenAI API at /v1, card endpoint at /score)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout, **uvicorn_options(limits))
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with this
    # handler in place that re-raise is a no-op and a SIGTERM'd server exits 0 (a clean stop).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0
