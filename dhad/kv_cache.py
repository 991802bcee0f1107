"""The KV cache `Transformer.forward` writes: per-layer keys/values with per-row fill levels
(continuous batching), padding and positions per slot (ALiBi measures distances between positions).

`KVCache.extend` takes the slots of one forward and returns a `KVWrite`, whose `update(layer, k, v)`
each attention layer calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from dhad.config import Config



class KVWrite(NamedTuple):
    """Where one forward's new tokens go in a `KVCache` (what `KVCache.extend` returns): every
    attention layer writes its keys/values through `update`. Passed down, not stored on the cache,
    so a compiled decode step mutates no Python state."""
    cache: KVCache
    positions: torch.Tensor    # [B, T] the new tokens' positions
    slots: torch.Tensor        # [B, T] their slots
    rows: torch.Tensor | None  # [B, 1] row index (for scattered writes)
    n_keys: int                # slots attended: max_len (static) or the fullest row's fill level
    start: int | None          # the common first slot when every row is equally full: a slice write
    uniform: bool              # one token per row, equal fill levels, no padding anywhere: no mask needed

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values [B, Hk, T, D]; return the keys and values attention
        reads: [B, Hk, n_keys, D]."""
        k_all, v_all = self.cache.k[layer], self.cache.v[layer]
        if self.start is not None:  # every row writes at the same slot: a plain slice copy
            k_all[:, :, self.start:self.start + k.shape[2]] = k
            v_all[:, :, self.start:self.start + v.shape[2]] = v
        else:
            k_all[self.rows, :, self.slots] = k.transpose(1, 2).to(k_all.dtype)
            v_all[self.rows, :, self.slots] = v.transpose(1, 2).to(v_all.dtype)
        return k_all[:, :, :self.n_keys], v_all[:, :, :self.n_keys]


def _row_state(batch_size: int, max_len: int, device) -> list[torch.Tensor]:
    """lengths, valid, pos, n_real of an empty cache."""
    return [torch.zeros(size, dtype=dt, device=device) for size, dt in
            (((batch_size,), torch.long), ((batch_size, max_len), torch.bool), ((batch_size, max_len), torch.long),
             ((batch_size,), torch.long))]


@dataclass
class KVCache:
    """Per-layer keys/values [B, n_kv_head, max_len, head_dim] with per-row fill levels.

    `lengths[b]`: slots used in row b (padding included); new tokens go to slots lengths[b]...
    `valid[b, j]`: slot j of row b holds a real (non-padding) token.
    `pos[b, j]`: the position of the token in slot j (ALiBi measures distances between positions).
    `n_real[b]`: real tokens so far in row b (the next position).
    `static`: attention always covers all max_len slots, unfilled ones masked out, and keys/values are
    scattered in without host syncs -- shapes that do not depend on the fill level, so
    `torch.compile` makes one graph for every decode step. The caller guarantees room.
    """
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor
    n_real: torch.Tensor
    static: bool = False

    @classmethod
    def empty(cls, config: Config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu",
              static: bool = False) -> KVCache:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * config.n_layer)]
        return cls(kv[0::2], kv[1::2], *_row_state(batch_size, max_len, device), static)

    @classmethod
    def from_prefix(cls, prefix: KVCache, batch_size: int, max_len: int) -> KVCache:
        """``batch_size`` rows of ``max_len`` slots, each starting with row 0 of ``prefix`` (a shared
        prompt or few-shot block computed once; k/v past it are not zeroed: fill every row)."""
        B, H, _, D = prefix.k[0].shape
        kv = [torch.empty(batch_size, H, max_len, D, dtype=t.dtype, device=t.device) for t in prefix.k + prefix.v]
        cache = cls(kv[:len(prefix.k)], kv[len(prefix.k):], *_row_state(batch_size, max_len, prefix.valid.device))
        cache.copy_row(prefix, 0, slice(None))
        return cache

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def rows(self, lo: int, hi: int) -> KVCache:
        """Rows lo..hi-1 as a cache sharing this one's storage (what runs, what is written, is theirs)."""
        return KVCache([t[lo:hi] for t in self.k], [t[lo:hi] for t in self.v], self.lengths[lo:hi],
                       self.valid[lo:hi], self.pos[lo:hi], self.n_real[lo:hi], self.static)

    def reset_rows(self, rows) -> None:
        """Free rows for new sequences (continuous batching). Stale k/v are masked by `valid`."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths[rows] = 0
        self.n_real[rows] = 0
        self.valid[rows] = False

    def copy_row(self, src: KVCache, src_row: int, dst_row: int | slice) -> None:
        """Copy one sequence from another cache (e.g. a prefilled prompt) into row(s) `dst_row`."""
        n = int(src.lengths[src_row])
        if n > self.max_len:
            raise ValueError(f"sequence of {n} slots does not fit a cache of {self.max_len}")
        for dst, t in zip(self.k + self.v, src.k + src.v):
            dst[dst_row, :, :n] = t[src_row, :, :n]
        self.valid[dst_row] = False
        self.valid[dst_row, :n] = src.valid[src_row, :n]
        self.pos[dst_row, :n] = src.pos[src_row, :n]
        self.lengths[dst_row] = n
        self.n_real[dst_row] = src.n_real[src_row]

    def extend(self, T: int, real: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> KVWrite:
        """Take the next T slots of every row for a forward's new tokens: record which are real (``real``
        [B, T], default all) and their positions (default: continuing each row's count of real tokens).
        The layers then write their keys/values with the returned `KVWrite`'s `update`."""
        B, dev = self.valid.shape[0], self.lengths.device
        slots = self.lengths[:, None] + torch.arange(T, device=dev)  # [B, T]
        start = None
        if self.static:
            n_keys = self.max_len
        else:
            n_keys = int(slots.max()) + 1
            if n_keys > self.max_len:
                raise ValueError(f"KV cache overflow: need {n_keys} slots, cache holds {self.max_len}")
            if bool((self.lengths == self.lengths[0]).all()):
                start = int(self.lengths[0])
        rows = torch.arange(B, device=dev)[:, None] if start is None else None
        is_real = real if real is not None else True
        if start is not None:
            self.valid[:, start:start + T] = is_real
        else:
            self.valid[rows, slots] = is_real
        if positions is None:
            nv = real.long() if real is not None else torch.ones(B, T, dtype=torch.long, device=dev)
            positions = (self.n_real[:, None] + nv.cumsum(-1) - 1).clamp(min=0)
            self.n_real += nv.sum(-1)
        if start is not None:
            self.pos[:, start:start + T] = positions
        else:
            self.pos[rows, slots] = positions
        uniform = T == 1 and start is not None and bool(self.valid[:, :n_keys].all())
        self.lengths += T
        return KVWrite(self, positions, slots, rows, n_keys, start, uniform)
