"""Seeing a run: JSONL metrics, a progress bar with tokens/s, loss, lr and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOPs / peak FLOPs, with model FLOPs
per token = `Config.flops_per_token(seq_len)` (6N + 12·L·d·T: forward + backward, attention
included, recomputation not counted). The peak is the recipe's `peak_flops` when given, else
*measured* at the start of the run: the best rate of large square matmuls in the run's compute dtype,
on the run's device, with the run's threads -- the honest denominator on machines without a
datasheet number. On the shared 2-core AMX CPU a quiet measurement gives ~2.2-2.3 TFLOP/s bf16 on
two threads (~1.4 on one); a neighbour's load lowers it (0.6-1.3 measured), which would inflate MFU:
pass `peak_flops` for runs whose MFU you will compare.

Records (one JSON object per line, `metrics.jsonl`):
    {"event": "step", "step": k, "loss": .., "lr": .., "grad_norm": .., "tokens": .., "seq_len": ..,
     "stage": "..", "tokens_per_s": .., "mfu": .., "elapsed_s": ..}
    {"event": "eval", "step": k, "val_loss": .., "val_loss_by_source": {..}}
    {"event": "start" | "resume" | "stage" | "end", ...}
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                       n: int | None = None, seconds: float = 0.5) -> float:
    """The best FLOP/s of square n x n x n matmuls in `dtype` on `device`, with the threads this process
    trains with: best of timed repeats (a repeat slowed by a neighbour on a shared machine is not the
    peak) and, unless `n` is given, best over several sizes -- which size is fastest depends on the
    machine (measured quiet on the 2-core AMX CPU, two threads: bf16 1.5 TFLOP/s at n=1024, 2.9 at 1536,
    2.6 at 2048, 2.0 at 4096), and a single fixed size can understate the peak and so overstate MFU."""
    device = torch.device(device)
    sizes = [n] if n else ([4096, 8192] if device.type == "cuda" else [1024, 1536, 2048, 3072, 4096])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best_rate = 0.0
    for m in sizes:
        a = torch.randn(m, m, device=device, dtype=dtype)
        b = torch.randn(m, m, device=device, dtype=dtype)
        a @ b  # warm up (threads, kernels)
        sync()
        inner = 4 if device.type == "cuda" else 1
        best, spent, reps = float("inf"), 0.0, 0
        while spent < seconds / len(sizes) or reps < 2:
            t0 = time.perf_counter()
            for _ in range(inner):
                a @ b
            sync()
            dt = (time.perf_counter() - t0) / inner
            best, spent, reps = min(best, dt), spent + dt * inner, reps + 1
            if reps >= 50:
                break
        best_rate = max(best_rate, 2 * m ** 3 / best)
        del a, b
    return best_rate


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    out = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_after(path: Path, step: int) -> None:
    """On resume: drop records logged after the checkpoint's step (they will be logged again)."""
    if not path.is_file():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step or r.get("event") in ("start",)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
    os.replace(tmp, path)


class MetricsLogger:
    """JSONL writer + tqdm bar on the main process; a no-op elsewhere."""

    def __init__(self, path: Path | None, total_steps: int, start_step: int = 0, progress: bool = True,
                 enabled: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.f = open(path, "a", encoding="utf-8") if (enabled and path is not None) else None
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.f.flush()

    def step(self, record: dict, n: int = 1) -> None:
        self.log({"event": "step", **record})
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
            if record.get("tokens_per_s"):
                post["tok/s"] = f"{record['tokens_per_s']:.0f}"
            if record.get("mfu") is not None:
                post["mfu"] = f"{100 * record['mfu']:.1f}%"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.f is not None:
            self.f.close()
            self.f = None
