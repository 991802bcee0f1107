"""`dhad <command>`: one dispatch table, each command a thin module over library functions.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported lazily so that `dhad --help` is instant and a command only pays for what it uses.
Commands with sub-commands (``tokenizer``, ``data``) register their own sub-parsers inside
``add_arguments``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dhad.commands.info", "show a model's config, parameter count, dtype and memory needed"),
    "generate": ("dhad.commands.generate", "generate text from a prompt (greedy or sampled, KV cache)"),
    "chat": ("dhad.chat", "interactive terminal chat with streaming output"),
    "serve": ("dhad.serve.cli", "HTTP server: card endpoint /score, OpenAI API, web chat"),
    "tokenizer": ("dhad.tokenizer_cli", "train / stats / extend tokenizers"),
    "adapt": ("dhad.adapt_cli", "vocabulary adaptation of a model (resize + projected init)"),
    "data": ("dhad.data.cli", "prepare pretraining shards, SFT and preference data, translate, synth"),
    "train": ("dhad.commands.train", "train from a YAML recipe (pretrain, adapt, sft, dpo)"),
    "plot": ("dhad.commands.plot", "plot a run's metrics (loss, lr, throughput) to PNG"),
    "eval": ("dhad.evaluate.cli", "log-likelihood benchmarks and MT-bench judging"),
    "speedrun": ("dhad.speedrun.cli", "build, evaluate and serve a small bilingual chat model end to end"),
}


class CLIError(Exception):
    """An error the user caused (bad path, bad argument): printed without a traceback, exit 2."""


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


if __name__ == "__main__":
    sys.exit(main())
