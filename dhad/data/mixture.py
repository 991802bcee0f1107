"""Mixture weights: per-source token quotas for the train split (`dhad data prepare --mix`).

``mix={"english": 283, "arabic": 141, "code": 56}`` are relative token weights (the example is
jais-family's English : Arabic : code token counts from its model card, ~2 : 1 : 0.4). Each source's share
of the *train* split becomes weight / sum(weights). Without ``total_tokens`` the total is the largest one
no source has to repeat for; with it, sources short of their quota are repeated (whole shuffled passes +
a partial one; the report gives each source's epochs). Validation keeps the natural proportions.
"""
from __future__ import annotations

import numpy as np

# Card mixtures (relative token counts: English, Arabic, code) — jais-family model card's table.
CARD_MIXES = {
    "jais-family": {"english": 283, "arabic": 141, "code": 56},   # 590m … 13b: 283B / 141B / 56B
    "jais-family-30b-16k": {"english": 980, "arabic": 490, "code": 196},
    "jais-adapted-7b": {"english": 18, "arabic": 19, "code": 2},
    "jais-adapted-13b": {"english": 127, "arabic": 140, "code": 13},
    "jais-adapted-70b": {"english": 33, "arabic": 334, "code": 4},
}


def mixture_plan(available: dict[str, int], weights: dict[str, float] | None,
                 total_tokens: int | None = None) -> dict[str, dict]:
    """Per-source token quotas for the train split. ``available``: tokens per source after cleaning.

    Returns {source: {"weight", "share", "available", "quota"}} for sources that get tokens. Sources
    with no weight get none (reported by the caller); weighted sources with no data are dropped and the
    remaining weights renormalized (reported as "missing").
    """
    if not weights:
        return {s: {"weight": None, "share": n / max(sum(available.values()), 1), "available": n, "quota": n}
                for s, n in available.items()}
    w = {s: float(x) for s, x in weights.items() if x > 0 and available.get(s, 0) > 0}
    if not w:
        raise ValueError(f"mixture {weights} names no source with data (sources: {sorted(available)})")
    tot = sum(w.values())
    share = {s: x / tot for s, x in w.items()}
    T = total_tokens if total_tokens else min(available[s] / share[s] for s in w)
    return {s: {"weight": w[s], "share": share[s], "available": available[s], "quota": int(round(share[s] * T))}
            for s in w}


def select_docs(lengths: np.ndarray, quota: int, rng: np.random.Generator) -> list[int]:
    """Indices of documents (repeating whole shuffled passes as needed) until ``quota`` tokens are reached."""
    out, taken = [], 0
    n = len(lengths)
    if n == 0 or quota <= 0:
        return out
    total = int(lengths.sum())
    full = quota // total if total else 0
    for _ in range(full):
        out.extend(rng.permutation(n).tolist())
        taken += total
    for i in rng.permutation(n):
        if taken >= quota:
            break
        out.append(int(i))
        taken += int(lengths[i])
    return out


def parse_mix(spec: str | None) -> dict | None:
    """``"english=2,arabic=1,code=0.4"`` or a card preset name (CARD_MIXES) -> weights."""
    if not spec:
        return None
    if spec in CARD_MIXES:
        return dict(CARD_MIXES[spec])
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part and ":" not in part:
            raise ValueError(f"mixture item {part!r}: expected SOURCE=WEIGHT (or a preset: {', '.join(CARD_MIXES)})")
        k, v = part.replace(":", "=", 1).split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"mixture item {part!r}: weight {v!r} is not a number") from None
        if out[k.strip()] < 0:
            raise ValueError(f"mixture item {part!r}: negative weight")
    return out
