"""`dhad demo OUT_DIR`: train the tiny bilingual demo chat model (seconds on CPU; dhad.serve.demo), to try
`dhad serve --model OUT_DIR` or `dhad chat --model OUT_DIR` without downloading anything."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="where to write the model (replaced if it exists)")
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from dhad.cli import CLIError
    from dhad.serve.demo import build_demo_model

    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    print(build_demo_model(args.out_dir, steps=args.steps, seed=args.seed))
    return 0
