"""`dhad speedrun`: argument parsing over `dhad.speedrun.run_speedrun`."""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

from dhad.speedrun.common import RECIPES, SpeedrunConfig, SpeedrunError, SpeedrunInterrupted, process_start_time

CI_BUDGET = 1.5  # minutes, when --ci is given without --budget


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="data root with corpus/, eval/ (and preference/ for --dpo); "
                                                "default $DHAD_DATA_DIR")
    p.add_argument("--out", default="runs/speedrun", help="output directory (default runs/speedrun)")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="total wall-clock minutes, everything included (default 15; 1.5 with --ci): the plan "
                        "sizes the model from measured throughput, training stages run until their share is "
                        "spent, evaluation fills what is left before the report")
    p.add_argument("--recipe", choices=RECIPES, default="jais",
                   help="jais: bilingual model from scratch; adapted: English base + Arabic vocabulary extension")
    p.add_argument("--dpo", action="store_true", help="add a DPO stage after SFT (QA preference pairs)")
    p.add_argument("--ci", action="store_true", help="tiny CI-sized run (fixed small model and data)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage (run again to continue)")
    p.add_argument("--fresh", action="store_true", help="ignore what an earlier run left in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _started_at() -> float | None:
    """The clock's start that scripts/speedrun.sh passes ($DHAD_SPEEDRUN_START, seconds since the epoch):
    used when it is a moment of the last two minutes (a stale value left in a shell is ignored)."""
    try:
        v = float(os.environ.get("DHAD_SPEEDRUN_START", ""))
    except ValueError:
        return None
    return v if 0 <= time.time() - v <= 120 else None


def run(args) -> int:
    from dhad.cli import CLIError
    from dhad.data.sample import SampleError
    from dhad.speedrun.run import run_speedrun
    budget = args.budget if args.budget is not None else (CI_BUDGET if args.ci else 15.0)
    cfg = SpeedrunConfig(data=args.data, out=args.out, budget=budget, recipe=args.recipe, dpo=args.dpo,
                         ci=args.ci, device=args.device, seed=args.seed, until=args.until, fresh=args.fresh,
                         progress=not args.no_progress,
                         started_at=_started_at() or process_start_time())
    try:
        res = run_speedrun(cfg)
    except SpeedrunInterrupted as e:
        print(f"dhad speedrun: interrupted: {e}", file=sys.stderr)
        return 130
    except (SpeedrunError, SampleError) as e:
        raise CLIError(str(e)) from None
    chk = res.get("check")
    if chk is not None and not chk.get("passed"):
        print("warning: the script check failed (see the report)", file=sys.stderr)
    # The process ends here: the interpreter's teardown of torch and the ~2,000 modules a run loads spends
    # its time in garbage collection (measured on the loaded 2-core machine: 5.5 s, 1.1 s after freezing
    # what exists); everything the run wrote is closed and renamed into place already.
    gc.freeze()
    return 0
