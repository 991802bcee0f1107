"""`dhad chat --model DIR`: an interactive terminal chat with streaming output (the session: dhad.chat).

Ctrl-C during an answer stops it (the partial answer is kept); Ctrl-D or /quit leaves. /help lists the
/commands (/system, /reset, /params).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from dhad.cli import CLIError, add_quantize_arguments, quantize_kwargs
from dhad.generate import SAMPLING_PRESETS, SamplingParams


def _stdin_lines(interactive: bool) -> Callable[[str], str | None]:
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass

        def next_line(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None
        return next_line

    def next_line(prompt: str) -> str | None:
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n").rstrip("\r")
    return next_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (Hugging Face layout) or a GGUF file")
    p.add_argument("--download", action="store_true", help="treat --model as a Hugging Face repo id and download it")
    p.add_argument("--format", default=None, help="chat format: jais, jais-legacy, llama2, chatml "
                                                  "(default: the checkpoint's chat_template)")
    p.add_argument("--system", default=None, help="system prompt (English or Arabic)")
    p.add_argument("--preset", choices=sorted(SAMPLING_PRESETS), default=None,
                   help="the cards' sampling settings: jais (top_p 0.9, temperature 0.3, repetition_penalty 1.2), "
                        "allam (temperature 0.6, top_p 0.9), greedy")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--min-new-tokens", type=int, default=None)
    p.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    add_quantize_arguments(p)


def run(args) -> int:
    from dhad.chat import ChatSession, repl
    from dhad.checkpoint import CheckpointError
    from dhad.serve.backend import load_backend

    quant = quantize_kwargs(args)
    try:
        backend = load_backend(args.model, dtype=args.dtype, device=args.device, fmt=args.format, max_batch_size=1,
                               max_queue=2, download=args.download, **quant)
    except (OSError, ValueError, RuntimeError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    given = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                                          "min_new_tokens", "do_sample", "seed") if getattr(args, k) is not None}
    base = SAMPLING_PRESETS[args.preset] if args.preset else backend.defaults
    try:
        params = SamplingParams.from_kwargs(base, **given)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if sys.stdout.encoding and sys.stdout.encoding.lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")  # Arabic must not crash a C-locale terminal
    session = ChatSession(backend, system=args.system, params=params)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"dhad chat: {backend.model_name} ({backend.fmt.name} format, context {backend.context} tokens). "
              "/help for commands, Ctrl-D to quit.", file=sys.stderr)
    backend.engine.start()
    try:
        return repl(session, _stdin_lines(interactive))
    finally:
        backend.engine.shutdown(wait=False)
