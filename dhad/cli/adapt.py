"""`dhad adapt init`: resize a model to an extended vocabulary and initialise the new embeddings.
`dhad adapt merge`: fold a LoRA adapter (PEFT's format) into its base, written as an HF checkpoint.

  dhad adapt init --base llama_dir --donor jais_dir --tokenizer extended_tok/ --out adapted/
  dhad adapt merge --model base_dir --adapter runs/allam-7b-chat-lora/adapter --out merged/

Projection init (the Jais-adapted card) when --donor is given, else mean init; `--method` overrides.
The fit (R² and cosine on held-out shared tokens) is printed and saved as adapt_report.json.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="adapt_command", metavar="{init,merge}")
    sub.required = True
    p = sub.add_parser("init", help="resize embeddings + LM head and initialise the new rows")
    p.add_argument("--base", required=True, help="base model directory (HF layout, with its tokenizer)")
    p.add_argument("--tokenizer", required=True, help="extended tokenizer (from `dhad tokenizer extend`)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--donor", default=None, help="donor model directory (with its tokenizer) for projection init")
    p.add_argument("--method", choices=["auto", "projection", "mean", "mean_cov"], default="auto",
                   help="auto: projection with a donor, mean without")
    p.add_argument("--ridge", type=float, default=0.0, help="ridge penalty of the least-squares map (default 0)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of shared tokens held out to report the fit")
    p.add_argument("--no-center-head", action="store_true",
                   help="do not re-centre the projected LM-head rows on the old rows' mean")
    p.add_argument("--base-tokenizer", default=None, help="base tokenizer, when not inside --base")
    p.add_argument("--pad-to-multiple-of", type=int, default=1, help="round the new vocabulary size up")
    p.add_argument("--dtype", default=None, help="dtype to save in (default: the base model's)")
    p.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model and write the merged HF checkpoint")
    m.add_argument("--model", required=True, help="base model directory (HF layout)")
    m.add_argument("--adapter", required=True, help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output model directory")
    m.add_argument("--dtype", default=None, help="dtype to save in (default: the base model's)")
    m.add_argument("--max-shard-size", default=None, help="split into shards of at most this size, e.g. 5GB")


def run(args) -> int:
    if args.adapt_command == "merge":
        return _merge(args)
    from dhad.adapt import AdaptError, adapt_init
    from dhad.checkpoint import CheckpointError
    from dhad.cli import CLIError

    try:
        rep = adapt_init(args.base, args.tokenizer, args.out, args.donor, method=args.method, ridge=args.ridge,
                         holdout=args.holdout, seed=args.seed, pad_to_multiple_of=args.pad_to_multiple_of,
                         base_tokenizer=args.base_tokenizer, dtype=args.dtype, center_head=not args.no_center_head)
    except (AdaptError, CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    print(rep.summary())
    print(f"wrote {args.out} (report: {args.out}/adapt_report.json)")
    return 0


def _merge(args) -> int:
    from dhad.checkpoint import CheckpointError, merge_adapter
    from dhad.cli import CLIError
    from dhad.config import ConfigError
    from dhad.lora import LoraError

    try:
        out = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (LoraError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    print(f"merged {args.adapter} into {args.model}: wrote {out}")
    return 0
