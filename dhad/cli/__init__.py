"""`dhad <command>`: the command line. One dispatch table; one module per command in this package.

Every command module (dhad/cli/<command>.py) exposes ``add_arguments(parser)`` and ``run(args) -> int``:
it parses arguments, calls library functions, and turns their library errors (ValueError, CheckpointError,
TaskError, ...) into `CLIError`. This package is the top layer: nothing in dhad imports it, and it is the
only place that uses argparse or raises CLIError (tests/test_layers.py checks both; docs/architecture.md).

A new command: write dhad/cli/<name>.py with those two functions and add one line to COMMANDS.
Modules are imported lazily so that `dhad --help` is instant and a command only pays for what it uses.
Commands with sub-commands (``tokenizer``, ``data``, ``adapt``, ``eval``) register their own sub-parsers
inside ``add_arguments``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dhad.cli.info", "show a model's config, parameter count, dtype and memory needed"),
    "generate": ("dhad.cli.generate", "generate text from a prompt (greedy or sampled, KV cache)"),
    "chat": ("dhad.cli.chat", "interactive terminal chat with streaming output"),
    "serve": ("dhad.cli.serve", "HTTP server: card endpoint /score, OpenAI API, web chat"),
    "tokenizer": ("dhad.cli.tokenizer", "train / stats / extend tokenizers"),
    "adapt": ("dhad.cli.adapt", "vocabulary adaptation of a model (resize + projected init)"),
    "data": ("dhad.cli.data", "prepare pretraining shards, SFT and preference data, translate, synth"),
    "train": ("dhad.cli.train", "train from a YAML recipe (pretrain, adapt, sft, dpo)"),
    "plot": ("dhad.cli.plot", "plot a run's metrics (loss, lr, throughput) to PNG"),
    "eval": ("dhad.cli.eval", "log-likelihood benchmarks, MT-bench and Vicuna judging, DPO comparison"),
    "export": ("dhad.cli.export", "export a model for other runtimes: GGUF for llama.cpp / Ollama"),
    "quantize": ("dhad.cli.quantize", "write a weight-only int8 / int4 quantised copy of a model"),
    "demo": ("dhad.cli.demo", "train a tiny bilingual demo chat model in seconds, to try serve and chat"),
    "speedrun": ("dhad.cli.speedrun", "build, evaluate and serve a small bilingual chat model end to end"),
}


class CLIError(Exception):
    """An error the user caused (bad path, bad argument): printed without a traceback, exit 2."""


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """--quantize / --group-size for the commands that load a model to run it (see docs/quantization.md)."""
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantisation of the linears after loading: int8 (per channel) or int4 "
                        "(group-wise); a directory written by `dhad quantize` is quantised without it")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 (default) or 128")


def quantize_kwargs(args) -> dict:
    """{"quantize", "group_size"} for dhad.load_model from --quantize / --group-size (checked here)."""
    from dhad.quant import QuantError, check_scheme
    if args.quantize is None:
        if args.group_size is not None:
            raise CLIError("--group-size needs --quantize int4")
        return {}
    try:
        return {"quantize": args.quantize, "group_size": check_scheme(args.quantize, args.group_size)}
    except QuantError as e:
        raise CLIError(f"--quantize {args.quantize} --group-size {args.group_size}: {e}") from None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dhad", description="Bilingual Arabic-English LLM toolkit")
    sub = parser.add_subparsers(dest="command", metavar="command")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        # Only import the module whose arguments we need (lazy: `dhad --help` stays instant).
        if wanted == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        rc = args._module.run(args)
    except CLIError as e:
        print(f"dhad {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)

