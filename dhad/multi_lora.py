"""Many LoRA adapters over one frozen model, mixed in one batch (punica / S-LoRA / vLLM style).

    lora = MultiLoRA(model, {"ar-chat": weights_a, "en-code": weights_b})   # stacks A/B, installs hooks
    with lora.batch([0, -1, 1]):        # row 0: adapter 0, row 1: the base model, row 2: adapter 1
        logits = model(ids, ...)
    model(ids)                          # outside `batch`: the plain base model, bit for bit

An adapter's weights are ``{(layer, target): (A [r, in], B [out_slice, r], scale)}`` with ``target`` one
of ``q k v o gate up down`` (a sub-projection of dhad's fused ``attn.qkv`` / ``mlp.fc``, each with its
own A/B, as PEFT holds them for Llama) or ``qkv`` / ``gate_up`` (the whole fused matrix, as a PEFT
adapter over Jais' ``c_attn`` has it). `MultiLoRA.from_dirs` reads adapter directories in PEFT's format
with `dhad.lora.read_adapter`.

Design choices:
- Applied from outside: forward hooks on the four linear modules of each block (``attn.qkv``,
  ``attn.proj``, ``mlp.fc``, ``mlp.proj``). The model file knows nothing of adapters.
- Stacked buffers: per linear module, the shrink matrices of the S sub-projections any adapter targets
  are concatenated along the rank axis and stacked over adapters, ``A [N, S * r, in]``; the expand
  matrices likewise, ``B [N, out, S * r]``, each sub-projection's B (scale folded in) in its own output
  rows and rank columns, zeros elsewhere. Ranks are padded to the largest with zeros and a target an
  adapter lacks is all zeros: both add exactly 0. Two batched matmuls per linear module (the block
  form spends S times the expand FLOPs of per-slice matmuls -- r * out per token, small beside the
  base's in * out -- for 2 matmuls instead of 2 + S).
- Per-row adapter index (punica's BGMV): each row gathers its adapter's A/B and one batched matmul
  does all rows, ``y[b] += B[i_b] (A[i_b] x[b])``. Rows with index -1 run the base model: they are
  not touched at all, so their numbers are exactly those of the model without adapters; a batch of
  base rows only costs nothing. (Segments instead -- per adapter present, its rows through two plain
  matmuls, S-LoRA's SGMV -- measured slower on CPU: one decode step of 8 rows over 4 rank-16
  adapters, 512 hidden, 8 layers, 1 thread, shared machine: base 73 ms, this 86 ms, segments 90 ms.)
- The state (which rows use which adapter) is set for one forward by `batch`, for the calling thread
  only, and cleared after it: the model is shared, and anything else that calls it (another thread
  too) sees the base model.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["MultiLoRA", "TARGETS", "target_slot", "adapter_weights"]

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up")
_MODULES = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def target_slot(config, target: str) -> tuple[str, int, int]:
    """Where a target lives in dhad's model: (linear module, first output column, end column)."""
    nq, nkv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    gated = config.mlp != "gelu"
    F_ = config.n_inner
    slots = {"q": ("attn.qkv", 0, nq), "k": ("attn.qkv", nq, nq + nkv), "v": ("attn.qkv", nq + nkv, nq + 2 * nkv),
             "qkv": ("attn.qkv", 0, nq + 2 * nkv), "o": ("attn.proj", 0, config.n_embd),
             "down": ("mlp.proj", 0, config.n_embd)}
    if gated:  # fused [gate | up]
        slots.update(gate=("mlp.fc", 0, F_), up=("mlp.fc", F_, 2 * F_), gate_up=("mlp.fc", 0, 2 * F_))
    else:
        slots.update(up=("mlp.fc", 0, F_))
    if target not in slots:
        raise ValueError(f"LoRA target {target!r} is not a projection of this model "
                         f"(expected one of {', '.join(sorted(slots))})")
    return slots[target]


def _module(model, layer: int, path: str) -> nn.Module:
    m = model.h[layer]
    for part in path.split("."):
        m = getattr(m, part)
    return m


def _in_features(model, layer: int, path: str) -> int:
    m = _module(model, layer, path)
    return int(getattr(m, "in_features", None) or m.weight.shape[1])


@dataclass
class _Rows:
    """Who uses an adapter in the current forward: the rows (None = all) and their adapter indices."""
    rows: torch.Tensor | None
    ids: torch.Tensor


class MultiLoRA:
    """LoRA adapters stacked for batched serving over ``model`` (a dhad `Transformer`).

    ``adapters``: ``{name: {(layer, target): (A, B, scale)}}``; the order gives each its index."""

    def __init__(self, model, adapters: dict[str, dict]):
        if not adapters:
            raise ValueError("MultiLoRA needs at least one adapter")
        self.model = model
        self.names = list(adapters)
        self.index = {n: i for i, n in enumerate(self.names)}
        cfg, dev, dt = model.config, model.device, model.dtype
        # (layer, module) -> ordered sub-slots (lo, hi) targeted by any adapter
        slots: dict[tuple[int, str], list[tuple[int, int]]] = {}
        rank = 0
        for name, weights in adapters.items():
            for (layer, target), (A, B, scale) in weights.items():
                if not 0 <= layer < cfg.n_layer:
                    raise ValueError(f"adapter {name!r}: layer {layer} outside the model's {cfg.n_layer} layers")
                mod, lo, hi = target_slot(cfg, target)
                fin = _in_features(model, layer, mod)
                if A.dim() != 2 or B.dim() != 2 or A.shape[1] != fin or B.shape != (hi - lo, A.shape[0]):
                    raise ValueError(f"adapter {name!r}: layer {layer} {target}: A {tuple(A.shape)} / B "
                                     f"{tuple(B.shape)} do not fit this model "
                                     f"(expected A [r, {fin}], B [{hi - lo}, r])")
                sub = slots.setdefault((layer, mod), [])
                if (lo, hi) not in sub:  # "qkv" in one adapter and "q" in another: two slots, both added
                    sub.append((lo, hi))
                rank = max(rank, A.shape[0])
        self.rank = rank
        N = len(self.names)
        self._A: dict[tuple[int, str], torch.Tensor] = {}
        self._B: dict[tuple[int, str], torch.Tensor] = {}
        self._slots = slots
        for (layer, mod), sub in slots.items():
            fin = _in_features(model, layer, mod)
            self._A[layer, mod] = torch.zeros(N, len(sub) * rank, fin, dtype=dt, device=dev)
            m = _module(model, layer, mod)
            fout = int(getattr(m, "out_features", None) or m.weight.shape[0])
            self._B[layer, mod] = torch.zeros(N, fout, len(sub) * rank, dtype=dt, device=dev)
        for i, weights in enumerate(adapters.values()):
            for (layer, target), (A, B, scale) in weights.items():
                mod, lo, hi = target_slot(cfg, target)
                s = slots[layer, mod].index((lo, hi))
                r = A.shape[0]
                self._A[layer, mod][i, s * rank:s * rank + r] = A.to(dev, dt)
                self._B[layer, mod][i, lo:hi, s * rank:s * rank + r] = (B.float() * float(scale)).to(dev, dt)
        self._local = threading.local()  # .state: the rows of the current forward, per thread
        self._hooks = [_module(model, layer, mod).register_forward_hook(self._hook(layer, mod)) for layer, mod in slots]

    @classmethod
    def from_dirs(cls, model, dirs: dict) -> "MultiLoRA":
        """``{name: adapter directory}`` (PEFT's format, read by `dhad.lora.read_adapter`) over ``model``;
        a directory that does not fit the model raises ValueError naming the adapter."""
        from dhad.lora import read_adapter
        adapters = {}
        layout = model.config.hf_layout
        for name, d in dirs.items():
            try:
                adapters[name] = adapter_weights(*read_adapter(d))
            except ValueError as e:
                raise ValueError(f"adapter {name!r} ({d}): {e}") from None
            subs = {t for (_, t) in adapters[name]}
            if layout == "llama" and "qkv" in subs or layout == "jais" and subs & {"q", "k", "v"}:
                raise ValueError(f"adapter {name!r} ({d}): its module names are for the other model layout than "
                                 f"this model's ({layout})")
        try:
            return cls(model, adapters)
        except ValueError as e:
            raise ValueError(f"{e} (adapters from {', '.join(str(d) for d in dirs.values())})") from None

    # -- use ----------------------------------------------------------------------------------
    def indices(self, names) -> list[int]:
        """Adapter names (None = base) -> row indices (-1 = base); KeyError names an unknown adapter."""
        out = []
        for n in names:
            if n is None:
                out.append(-1)
            elif n in self.index:
                out.append(self.index[n])
            else:
                raise KeyError(f"unknown adapter {n!r} (loaded: {', '.join(self.names)})")
        return out

    @contextlib.contextmanager
    def batch(self, indices):
        """For the forwards inside: row b of the batch uses adapter ``indices[b]`` (-1: the base model)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.model.device)
        if bool((idx >= len(self.names)).any()) or bool((idx < -1).any()):
            raise ValueError(f"adapter indices must be -1..{len(self.names) - 1}, got {idx.tolist()}")
        used = idx >= 0
        if not bool(used.any()):
            state = None
        elif bool(used.all()):
            state = _Rows(None, idx)
        else:
            rows = used.nonzero().flatten()
            state = _Rows(rows, idx[rows])
        prev = getattr(self._local, "state", None)
        self._local.state = state
        try:
            yield
        finally:
            self._local.state = prev

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- the batched delta --------------------------------------------------------------------
    def _hook(self, layer: int, mod: str):
        A_all, B_all = self._A[layer, mod], self._B[layer, mod]

        def hook(module, args, out):
            st = getattr(self._local, "state", None)
            if st is None:
                return None
            x = args[0] if st.rows is None else args[0].index_select(0, st.rows)  # [b, T, in]
            A = A_all.index_select(0, st.ids).transpose(1, 2)                     # [b, in, S*r]
            B = B_all.index_select(0, st.ids).transpose(1, 2)                     # [b, S*r, out]
            u = torch.bmm(x.to(A.dtype), A)                                       # shrink: [b, T, S*r]
            if st.rows is None:
                return torch.baddbmm(out, u.to(out.dtype), B.to(out.dtype))       # expand, added to every row
            return out.index_add(0, st.rows, torch.bmm(u, B).to(out.dtype))
        return hook


def adapter_weights(lora_config, weights: dict) -> dict:
    """`dhad.lora.read_adapter`'s ``(config, {("h.N.<module>", sub): (A, B)})`` -> this module's
    ``{(N, target): (A, B, scale)}`` (sub-projection names are the targets; "qkv" is all of attn.qkv)."""
    out = {}
    for (module, sub), (A, B) in weights.items():
        parts = module.split(".")
        if len(parts) < 3 or parts[0] != "h" or not parts[1].isdigit():
            raise ValueError(f"unexpected adapter module {module!r}")
        out[int(parts[1]), sub] = (A, B, lora_config.scaling)
    return out
