"""Loss, learning-rate and throughput curves of a run, as PNG files (the `dhad plot RUN_DIR` command:
dhad/commands/plot.py).

Reads RUN_DIR/metrics.jsonl (written by `dhad train`) and writes, next to it (or to --out):
    loss.png        training loss per step, validation loss (overall and per source) at evaluations
    lr.png          learning rate per step (warmup, cosine, floor), stage changes marked
    throughput.png  tokens/s and MFU per step
"""
from __future__ import annotations

import os
from pathlib import Path


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Render the three PNGs; returns their paths. Raises ValueError when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dhad.train.metrics import read_metrics

    run = Path(run_dir)
    mpath = run / "metrics.jsonl" if run.is_dir() else run
    if not mpath.is_file():
        raise ValueError(f"no metrics.jsonl in {run_dir} (is it a `dhad train` run directory?)")
    recs = read_metrics(mpath)
    steps = {}
    for r in recs:  # the last record of a step wins (a resumed run logs it again)
        if r.get("event") == "step":
            steps[r["step"]] = r
    evals = {}
    for r in recs:
        if r.get("event") == "eval":
            evals[r["step"]] = r
    stages = [r for r in recs if r.get("event") == "stage"]
    if not steps:
        raise ValueError(f"{mpath}: no training steps logged yet")
    out = Path(out_dir) if out_dir else mpath.parent
    out.mkdir(parents=True, exist_ok=True)
    xs = sorted(steps)
    written = []

    def mark_stages(ax):
        for s in stages:
            ax.axvline(s["step"], color="grey", ls=":", lw=1)
            ax.annotate(s.get("stage", ""), (s["step"], 1), xycoords=("data", "axes fraction"), fontsize=7,
                        rotation=90, va="top", ha="right", color="grey")

    def save(fig, name):
        p = out / name
        tmp = out / f".{name}.tmp-{os.getpid()}.png"
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, p)
        written.append(p)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [steps[s]["loss"] for s in xs], lw=1, label="train")
    if evals:
        es = sorted(evals)
        ax.plot(es, [evals[s]["val_loss"] for s in es], "o-", ms=3, label="validation")
        srcs = sorted({k for s in es for k in evals[s].get("val_loss_by_source", {})})
        if len(srcs) > 1:
            for src in srcs:
                ax.plot(es, [evals[s]["val_loss_by_source"].get(src, float("nan")) for s in es], "--", lw=1,
                        label=f"validation · {src}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    mark_stages(ax)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(xs, [steps[s]["lr"] for s in xs], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    mark_stages(ax)
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [steps[s].get("tokens_per_s") or 0 for s in xs], lw=1, color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s", color="C0")
    ax.grid(alpha=0.3)
    if any(steps[s].get("mfu") is not None for s in xs):
        ax2 = ax.twinx()
        ax2.plot(xs, [100 * (steps[s].get("mfu") or 0) for s in xs], lw=1, color="C1")
        ax2.set_ylabel("MFU (%)", color="C1")
    save(fig, "throughput.png")
    return written
