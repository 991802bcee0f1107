"""`dhad data prepare` throughput: the datatrove pipeline on its local executor with 1 and 2 workers vs the
sequential single-process path it replaced (dhad.data.reference), on the same inputs, in the same run.

Prints documents per second (documents read, after long ones are cut, per wall-clock second) for each,
and the ratios: 2 workers / 1 worker (goal >= 1.7x on 2 cores) and 1 worker / reference (goal >= 1.0x).
It also checks that every run wrote the reference's bytes (train and validation shards), so the numbers
compare the same work. On a shared machine the 2-worker ratio is capped by what else runs: each round first
measures the machine's parallel capacity (how much more a pure-Python loop gets done in 2 processes than
in 1; 2.0 on two idle cores) and the summary gives the 2-worker ratio as a share of it, with the load
average before and after.

    .venv/bin/python benchmarks/bench_prepare.py                     # the shared corpus, all of it (minutes)
    .venv/bin/python benchmarks/bench_prepare.py --quick             # 4 files, ~13 MB
    .venv/bin/python benchmarks/bench_prepare.py --inputs a.jsonl b.txt --tasks 8 --repeat 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QUICK = ["arabic/saudinewsnet_2015-07-23_and_25.jsonl", "arabic/wikipedia_paragraphs_xquad_arcd.jsonl",
         "english/c4_demo_llamafactory.jsonl", "english/wikitext2_valid.txt"]


def _spin(seconds: float) -> int:
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        for i in range(10_000):
            n += i & 7
    return n


def parallel_capacity(seconds: float = 3.0) -> float:
    """How much more pure-Python work 2 processes get done than 1 on this machine right now (2.0 on two
    idle cores; less when other jobs share them): the ceiling of the 2-worker ratio."""
    from multiprocessing import get_context
    with get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [0.2, 0.2])
        one = pool.apply(_spin, (seconds,))
        two = sum(pool.map(_spin, [seconds, seconds]))
    return two / one


def output_bytes(out: Path) -> dict[str, bytes]:
    return {f"{split}/{p.name}": p.read_bytes() for split in ("train", "validation") for p in sorted((out / split).iterdir())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("DHAD_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--inputs", nargs="+", default=None, help="files/dirs to prepare (default: <data>/corpus)")
    ap.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} files of the corpus (~13 MB)")
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "fixtures" / "tokenizers" / "llama2-style"))
    ap.add_argument("--tasks", type=int, default=8, help="datatrove tasks (the same for 1 and 2 workers)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (reference, 1 worker, 2 workers); best kept")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()

    from dhad.data.prepare import PrepareConfig, prepare
    from dhad.data.reference import reference_prepare

    corpus = Path(args.data) / "corpus"
    inputs = args.inputs or ([f"{p.split('/')[0]}={corpus / p}" for p in QUICK] if args.quick else [str(corpus)])
    root = str(corpus) if not args.inputs and not args.quick else None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)

    def cfg(name: str, workers: int) -> PrepareConfig:
        return PrepareConfig(inputs=inputs, data_root=root, tokenizer=args.tokenizer, out=str(work / name),
                             workers=workers, tasks=args.tasks, progress=False)

    runs = {"reference (sequential, 1 process)": (reference_prepare, 1), "datatrove local, 1 worker": (prepare, 1),
            "datatrove local, 2 workers": (prepare, 2)}
    best: dict[str, float] = {}
    docs = None
    load0 = os.getloadavg()
    print(f"inputs: {' '.join(inputs)}\ntokenizer: {args.tokenizer}\ntasks: {args.tasks}, cpus: {os.cpu_count()}, "
          f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    expect = None
    capacity = []
    try:
        for r in range(args.repeat):
            capacity.append(parallel_capacity())
            print(f"  round {r + 1}  parallel capacity now: 2 processes do {capacity[-1]:.2f}x the work of 1")
            for name, (fn, workers) in runs.items():
                out = work / f"out-{workers}-{fn.__name__}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                report = fn(cfg(out.name, workers))
                dt = time.perf_counter() - t
                docs = report["documents"]
                got = output_bytes(out)
                if expect is None:
                    expect = got
                same = got == expect
                print(f"  round {r + 1}  {name:<36} {dt:8.1f} s  {docs / dt:8.1f} docs/s  output = reference: {same}")
                if not same:
                    print("ERROR: the outputs differ", file=sys.stderr)
                    return 1
                best[name] = min(best.get(name, float("inf")), dt)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    ref, one, two = (best[n] for n in runs)
    print(f"\n{docs} documents; best of {args.repeat}:")
    for name, dt in best.items():
        print(f"  {name:<36} {docs / dt:8.1f} docs/s")
    cap = sum(capacity) / len(capacity)
    print(f"2 workers vs 1 worker:        {one / two:5.2f}x   (goal >= 1.7x on 2 free cores; this machine's "
          f"capacity for 2 processes was {cap:.2f}x: {one / two / cap:.0%} of it)")
    print(f"1 worker vs sequential path:  {ref / one:5.2f}x   (goal >= 1.0x)")
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
          + ("  -- the machine was busy: the 2-worker ratio is depressed" if max(load0[0], load1[0]) > 0.5 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
