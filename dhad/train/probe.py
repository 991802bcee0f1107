"""How fast can this machine train a given model? A probe to size a run, not a trainer.

    tps = measure_train_tps(cfg, seq_len=512, batch=8, precision="bf16", device=torch.device("cpu"))

One forward + backward + AdamW step on random tokens, timed after a warm-up step: training tokens per
second for that configuration, precision and the process's current thread count. Used by the speedrun
to pick the thread count, the precision and the largest model its time budget can train.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_train_tps(cfg, seq_len: int, batch: int, precision: str, device, steps: int = 2, warmup: int = 1,
                      seed: int = 0) -> float:
    """Training tokens/s of `batch` x `seq_len` tokens per step for a fresh model of `cfg` (dhad.config.Config);
    `precision`: "fp32" or "bf16" (autocast over fp32 weights). The step is the trainer's: the model's
    fused LM head + cross-entropy (`model(ids, targets=...)`, no [tokens, vocab] logits), the fused AdamW,
    glibc's malloc tuned for training on CPU; a probe that skipped those would underestimate small
    models (whose time goes to the LM head) about twofold."""
    import torch

    from dhad.model import Transformer
    from dhad.utils import tune_malloc
    if device.type == "cpu":
        tune_malloc()
    model = Transformer(cfg).init_weights(seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    ac = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    times = []
    for _ in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with ac():
            loss = model(x[:, :-1], targets=x[:, 1:])
        (loss / (batch * seq_len)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return batch * seq_len / (sum(timed) / len(timed))


def cpu_has_bf16() -> bool:
    """bf16 autocast is worth measuring on CPUs with native bf16 dot products (AVX-512 BF16 / AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags
