"""Weight-only quantisation, applied to a built model from outside (the model file stays plain).

    from dhad.quant import quantize
    quantize(model, "int8")                  # per-output-channel symmetric int8
    quantize(model, "int4", group_size=64)   # group-wise asymmetric int4 (groups of 32 / 64 / 128 along K)

Every `nn.Linear` of the blocks (the fused q|k|v and gate|up projections included) is replaced by an
`Int8Linear` / `Int4Linear`; the LM head is always int8 (`HEAD_MODE`: in int4 it was most of a Jais model's
int4 perplexity loss, +0.99 % against +0.15 % with an int8 head, docs/quantization.md; the int8 kernel is
about as fast).
Embeddings, norms and biases keep the model's dtype; a tied head becomes its own int8 copy (the embedding
table stays: a lookup reads one row a token).

Kernels (chosen by measurement, docs/quantization.md): PyTorch's weight-only ops, which take bfloat16
activations -- on CPU `torch._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` (the kernel
torchao's CPU int4 layout calls), on CUDA `torch._weight_int8pack_mm` and `torch._weight_int4pack_mm`
(tinygemm). A float32 model keeps float32 everywhere else: the layer casts its input to bfloat16, the
kernel accumulates in float32 and returns bfloat16, and the output goes back to the input's dtype.

Numbers are exactly what the kernels compute: int8 weight = q * scale (q in [-127, 127], one bfloat16
scale per output row); int4 weight = (q - 8) * scale + zero (q in [0, 15], bfloat16 scale and zero per
row and group: tinygemm's convention). The scales are rounded to bfloat16 before the codes are chosen, so
`dequantize` gives the weights the kernel multiplies by, bit for bit.

Checkpoints (`state_dict`): `<name>.weight` int8 [N, K] + `<name>.scales` [N] (int8), or
`<name>.weight` uint8 [N, Kp/2] (two codes a byte, column 2j in the low nibble, 2j+1 in the high one)
+ `<name>.scales` / `<name>.zeros` [N, Kp / group] (int4; Kp: K padded to whole groups). The int4 kernel's packed layout depends on
the device and is made when the layer is built; `Int4Linear.codes()` reads the codes back through the
kernel itself, so no second copy of the weights is kept.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
HEAD_MODE = "int8"  # the LM head's mode, whatever the blocks' mode
COMPUTE_DTYPE = torch.bfloat16  # what the weight-only kernels take as activations, scales and output


class QuantError(ValueError):
    """A quantisation that cannot be done as asked (unknown mode, bad group size, bad checkpoint)."""


def check_scheme(mode: str, group_size: int | None = None) -> int | None:
    """Validate (mode, group_size); return the group size to use (None for int8)."""
    if mode is None and group_size is not None:
        raise QuantError("a group size needs quantize='int4'")
    if mode not in MODES:
        raise QuantError(f"unknown quantisation mode {mode!r}; use one of {list(MODES)}")
    if mode == "int8":
        if group_size is not None:
            raise QuantError("int8 quantisation is per output channel: it takes no group size (int4 does)")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise QuantError(f"int4 group size must be one of {list(GROUP_SIZES)}, got {group_size!r}")
    return group_size


# ---------------------------------------------------------------------------------------------
# Quantise / dequantise one weight matrix [N, K] (float) -- reference arithmetic, no kernels

@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (q int8 [N, K], scales bfloat16 [N]); w ~ q * scale."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(COMPUTE_DTYPE)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: (q uint8 [N, K] in 0..15, scales, zeros bfloat16 [N, K / group]);
    w ~ (q - 8) * scale + zero over each group of ``group_size`` consecutive input columns."""
    N, K = w.shape
    if K % group_size:
        raise QuantError(f"int4 group size {group_size} does not divide the layer's {K} input features")
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(COMPUTE_DTYPE)
    zeros = (lo + 8 * scales.float()).to(COMPUTE_DTYPE)
    q = torch.round((g - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.uint8).reshape(N, K), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    G = scales.shape[1]
    g = q.float().reshape(N, G, K // G)
    return ((g - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> [N, K/2]: column 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Layers

def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, through `torch._weight_int8pack_mm` (CPU and CUDA).

    The CPU kernel (torch 2.13) returns garbage, or crashes, when the input features are not a multiple
    of 16 (measured: 24, 40, 100, 172); such a layer keeps zero columns up to one and pads its input
    with zeros (exact). `state_dict` holds the unpadded [N, K] codes."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", F.pad(q.to(torch.int8), (0, -q.shape[1] % 16)))
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if self.weight.shape[1] != self.in_features:
            self._register_state_dict_hook(Int8Linear._unpadded_state)

    @staticmethod
    def _unpadded_state(module, state, prefix, local_metadata):
        state[prefix + "weight"] = state[prefix + "weight"][:, :module.in_features].contiguous()
        return state

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        q, s = quantize_int8(lin.weight.detach())
        return cls(q, s, lin.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight[:, :self.in_features], self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _flat(x)
        if self.weight.shape[1] != self.in_features:
            a = F.pad(a, (0, self.weight.shape[1] - self.in_features))
        y = torch._weight_int8pack_mm(a, self.weight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """y = x @ ((q - 8) * scale + zero)^T + bias, through tinygemm's int4 kernel: the CPU one
    (`aten._weight_int4pack_mm_for_cpu`) or the CUDA one (`aten._weight_int4pack_mm`), by the device the
    weights are on. Rows are padded to a multiple of 16 (the CPU packing's unit), the output sliced back.

    Not saved: `packed` (the kernel's device-specific layout) and `scales_and_zeros` ([K/g, N, 2]);
    `state_dict` gets the portable `weight` / `scales` / `zeros` described in the module docstring."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, in_features: int | None = None):
        super().__init__()
        N, K = q.shape  # K: the input features padded to a multiple of the group size
        self.out_features, self.in_features, self.group_size = N, in_features or K, group_size
        if K % group_size or not K - group_size < self.in_features <= K:
            raise QuantError(f"int4 codes of {K} columns do not hold {self.in_features} input features in "
                             f"groups of {group_size}")
        if scales.shape != (N, K // group_size) or zeros.shape != scales.shape:
            raise QuantError(f"int4 scales/zeros of shape {tuple(scales.shape)}/{tuple(zeros.shape)} do not fit a "
                             f"[{N}, {K}] weight in groups of {group_size} (expected {(N, K // group_size)})")
        pad = -N % 16
        if pad:
            q = F.pad(q, (0, 0, 0, pad), value=8)
            scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
        self.register_buffer("packed", _pack_for_kernel(q), persistent=False)
        sz = torch.stack([scales.to(COMPUTE_DTYPE), zeros.to(COMPUTE_DTYPE)], dim=-1)  # [N, G, 2]
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._register_state_dict_hook(Int4Linear._portable_state)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int) -> Int4Linear:
        """Input features that are not a multiple of the group size get zero columns up to one (exact:
        the layer pads its input with zeros) -- Jais' n_inner 6832, 10928, 19114 and 13653 are not."""
        w = lin.weight.detach()
        q, s, z = quantize_int4(F.pad(w, (0, -w.shape[1] % group_size)), group_size)
        return cls(q.to(w.device), s, z, group_size, lin.bias, in_features=w.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _flat(x)
        pad = self.scales_and_zeros.shape[0] * self.group_size - self.in_features
        if pad:
            a = F.pad(a, (0, pad))
        if a.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(a, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.packed, self.group_size, self.scales_and_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def codes(self, chunk: int = 1024) -> torch.Tensor:
        """The uint8 codes [N, K] in 0..15, read back through the kernel: x = the identity, scale 1 and
        zero 8 make the kernel return q exactly (small integers are exact in bfloat16)."""
        K, N = self.scales_and_zeros.shape[0] * self.group_size, self.packed.shape[0]
        sz = torch.zeros_like(self.scales_and_zeros)
        sz[..., 0], sz[..., 1] = 1, 8
        mm = torch.ops.aten._weight_int4pack_mm if self.packed.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        cols = []
        for k0 in range(0, K, chunk):
            eye = torch.zeros(min(chunk, K - k0), K, dtype=COMPUTE_DTYPE, device=self.packed.device)
            eye[torch.arange(eye.shape[0]), torch.arange(k0, k0 + eye.shape[0])] = 1
            cols.append(mm(eye, self.packed, self.group_size, sz))  # [k, N]
        return torch.cat(cols).t()[:self.out_features].round().to(torch.uint8)  # [N, K padded]

    def scales(self) -> torch.Tensor:
        return self.scales_and_zeros[..., 0].t()[:self.out_features]

    def zeros(self) -> torch.Tensor:
        return self.scales_and_zeros[..., 1].t()[:self.out_features]

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.codes(), self.scales(), self.zeros())[:, :self.in_features]

    @staticmethod
    def _portable_state(module, state, prefix, local_metadata):
        state[prefix + "weight"] = pack_nibbles(module.codes()).cpu()
        state[prefix + "scales"] = module.scales().contiguous().cpu()
        state[prefix + "zeros"] = module.zeros().contiguous().cpu()
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


def _pack_for_kernel(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> the int4 kernel's packed weight, on q's device."""
    if q.is_cuda:  # tinygemm (CUDA) packs uint8 [N, K/2] with the even column in the high nibble
        return torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)


# ---------------------------------------------------------------------------------------------
# Whole models

def linear_names(model: nn.Module) -> list[str]:
    """The linears that get quantised (or are): every linear of the blocks, and the LM head."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Int8Linear, Int4Linear)) and (n.startswith("h.") or n == "lm_head")]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize(model: nn.Module, mode: str, group_size: int | None = None) -> nn.Module:
    """Replace the model's linears (see `linear_names`) by quantised ones, in place; returns the model.
    Raises QuantError for an unknown mode or a group size outside 32/64/128. A layer whose input features
    the group size does not divide is padded to whole groups (see `Int4Linear.from_linear`)."""
    group_size = check_scheme(mode, group_size)
    if scheme_of(model) is not None:
        raise QuantError(f"the model is already quantised ({scheme_of(model)}); start from a full-precision one")
    for n in linear_names(model):
        lin = model.get_submodule(n)
        int8 = mode == "int8" or (n == "lm_head" and HEAD_MODE == "int8")
        _set(model, n, Int8Linear.from_linear(lin) if int8 else Int4Linear.from_linear(lin, group_size))
    model.quantization = {"mode": mode, "group_size": group_size}
    return model


def scheme_of(model: nn.Module) -> dict | None:
    """{"mode", "group_size"} of a quantised model, None for a plain one."""
    return getattr(model, "quantization", None)


@torch.no_grad()
def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor], mode: str, group_size: int | None,
                         device="cpu") -> nn.Module:
    """Put a quantised checkpoint's layers into ``model`` (its linears still plain, possibly on the meta
    device), popping their tensors from ``state``; the rest of ``state`` is left for load_state_dict."""
    group_size = check_scheme(mode, group_size)
    block_mode = mode
    for n in linear_names(model):
        lin = model.get_submodule(n)
        N, K = lin.out_features, lin.in_features
        mode = HEAD_MODE if n == "lm_head" else block_mode
        try:
            w, s = state.pop(n + ".weight"), state.pop(n + ".scales")
            z = state.pop(n + ".zeros") if mode == "int4" else None
        except KeyError as e:
            raise QuantError(f"quantised checkpoint lacks {e.args[0]!r} ({mode})") from None
        b = state.pop(n + ".bias", None) if lin.bias is not None else None
        Kp = K if mode == "int8" else K + (-K % group_size)  # int4: padded to whole groups
        want = (N, K) if mode == "int8" else (N, Kp // 2)
        wdt = torch.int8 if mode == "int8" else torch.uint8
        if tuple(w.shape) != want or w.dtype != wdt:
            raise QuantError(f"{n}.weight: expected {wdt} {want} for {mode}, got {w.dtype} {tuple(w.shape)}")
        if mode == "int8":
            if tuple(s.shape) != (N,):
                raise QuantError(f"{n}.scales: expected shape {(N,)}, got {tuple(s.shape)}")
            layer = Int8Linear(w.to(device), s.to(device), b.to(device) if b is not None else None)
        else:
            if tuple(s.shape) != (N, Kp // group_size) or tuple(z.shape) != tuple(s.shape):
                raise QuantError(f"{n}.scales/zeros: expected shape {(N, Kp // group_size)}, got "
                                 f"{tuple(s.shape)}/{tuple(z.shape)}")
            layer = Int4Linear(unpack_nibbles(w.to(device)), s.to(device), z.to(device), group_size,
                               b.to(device) if b is not None else None, in_features=K)
        _set(model, n, layer)
    model.quantization = {"mode": block_mode, "group_size": group_size}
    return model
