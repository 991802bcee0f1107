"""`dhad train --recipe FILE [--resume]`: run a training recipe (pretrain, adapt, sft, ...).

Several processes / GPUs: launch the same command under torchrun, e.g.
    torchrun --nproc-per-node 8 -m dhad train --recipe recipes/jais-adapted-70b-chat-sft.yaml --data /data
(multi-node: torchrun's --nnodes / --rdzv-endpoint). The recipe's `distributed:` picks DDP or FSDP2.
"""
from __future__ import annotations

import argparse
import sys

from dhad.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True,
                   help="a recipe YAML file, or the name of a shipped recipe (e.g. tiny-allam-2-pretrain)")
    p.add_argument("--data", default=None,
                   help="directory that relative paths in the recipe (shards, tokenizer, init_from) are "
                        "taken from (default: $DHAD_DATA_DIR, else the current directory)")
    p.add_argument("--out", default=None, help="run directory (default: the recipe's out_dir, else runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set schedule.total_steps=20 --set precision=fp32")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="checkpoint and stop after STEP optimizer updates (continue later with --resume)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="time budget for training steps: checkpoint and stop after S seconds (resume with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to JSONL)")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe and print its plan (steps, stages, tokens) without training")


def run(args) -> int:
    from dhad.data.shards import ShardError
    from dhad.train.loop import TrainError, train
    from dhad.train.recipe import RecipeError, find_recipe, load_recipe

    try:
        recipe = load_recipe(find_recipe(args.recipe), args.overrides)
        if args.check:
            return _check(recipe)
        result = train(recipe, resume=args.resume, run_dir=args.out, data_root=args.data, stop_at=args.stop_at,
                       max_seconds=args.max_seconds, progress=not args.no_progress)
    except (RecipeError, TrainError, ShardError) as e:
        raise CLIError(str(e)) from None
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}", file=sys.stderr)
        if result.signal is not None:
            return 128 + int(result.signal)
        return 0
    if result.adapter_dir is not None:
        print(f"done: {result.step} steps; LoRA adapter (PEFT format) in {result.adapter_dir}")
    else:
        print(f"done: {result.step} steps; model in {result.model_dir}")
    return 0


def _check(recipe) -> int:
    from dhad.train.recipe import format_tokens
    from dhad.train.schedule import build_plan
    # sft rows take their length from the shards; without them the plan is shown in rows (seq_len 1)
    plan = build_plan(recipe, 1, recipe.batch.seq_len or 1)
    rows = recipe.batch.seq_len is None and not recipe.context  # sft rows of the shards' length: count rows
    unit = "rows" if rows else "tokens"
    print(f"recipe {recipe.name or recipe.source_file}: type {recipe.type}, {plan.total_steps} steps, "
          f"{format_tokens(plan.total_tokens)} {unit} (1 process)")
    for s in plan.summary():
        seq = "from shards" if rows else s["seq_len"]
        print(f"  steps {s['steps'][0]:>9}-{s['steps'][1]:<9} stage {s['stage']:<16} seq_len {seq:>6}  "
              f"{s['global_seqs']:>5} seqs/step  {format_tokens(s['tokens'])} {unit}")
    return 0

