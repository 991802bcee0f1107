"""`dhad plot RUN_DIR`: a run's loss, learning-rate and throughput curves as PNG files (dhad.train.plot)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a `dhad train` run directory (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: the run directory)")


def run(args) -> int:
    from dhad.cli import CLIError
    from dhad.train.plot import plot_run
    try:
        paths = plot_run(args.run_dir, args.out)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    for p in paths:
        print(p)
    return 0
