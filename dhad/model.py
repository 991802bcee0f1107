"""The one Transformer for Jais-family, Jais-adapted and ALLaM.

Design choices (all switched by `Config` flags, never by model name):
- Pre-norm blocks: LayerNorm with bias (Jais) or RMSNorm computed in fp32 (Llama).
- Positions: ALiBi (Jais-family; slopes for any head count, optional `alibi_scaling`), RoPE (Llama,
  rotate-half convention, optional linear scaling) or learned `wpe` (GPT-2 style).
- Attention through `F.scaled_dot_product_attention` (`attend`; CPU half-precision training at up to
  512 tokens holds the probabilities instead: `_MaterializedAttention`); q, k, v come from one fused
  projection (`attn.qkv`, the layout of Jais' `c_attn`); grouped-query attention via `enable_gqa`.
  Scores are scaled by 1/head_dim**p (p = 1 under muP, 0.5 otherwise).
- MLP: `proj(silu(gate) * up)` for both Jais SwiGLU (gate = c_fc2, up = c_fc) and Llama (gate_proj,
  up_proj), with gate and up fused in one matmul (`mlp.fc`); or GELU (tanh approximation, `gelu_new`).
- muP scalars: embeddings times `embedding_scale`, logits times `logits_scale`.
- A `KVCache` with per-row lengths so a batch can hold sequences of different lengths
  (continuous batching); padding is remembered per slot and never attended.
- Packed sequences: `segment_ids` confine attention to equal ids and restart positions.

The model is a pure nn.Module: no optimizer, sampling, parallelism or checkpoint format here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dhad.config import Config


# ---------------------------------------------------------------------------------------------
# Positions

def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.; the Jais/Bloom construction for non-powers of two)."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        s = pow2(n_head)
    else:
        c = 2 ** math.floor(math.log2(n_head))
        s = pow2(c) + pow2(2 * c)[0::2][: n_head - c]
    return torch.tensor(s, dtype=torch.float32)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, scaling: dict | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, head_dim] for the rotate-half convention (computed in fp32, like transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    pos = position_ids.float()
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        pos = pos / float(scaling["factor"])
    freqs = pos[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _eager_training(x: torch.Tensor) -> bool:
    """A gradient is wanted and torch.compile is not tracing: where the hand-written backward
    Functions (_Rope, _SwiGLU) pay; compiled graphs fuse the plain formulas themselves."""
    return torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]."""
    if _eager_training(x):
        return _Rope.apply(x, cos, sin)
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 transposed: bool) -> torch.Tensor:
    """out = x * cos + rotate_half(x) * sin, or with the transposed rotation (the gradient's:
    [x2 * sin2, -x1 * sin1]), in three passes, none of them a concatenation."""
    h = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    if transposed:
        out[..., :h].addcmul_(x[..., h:], sin[..., h:])
        out[..., h:].addcmul_(x[..., :h], sin[..., :h], value=-1)
    else:
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


class _Rope(torch.autograd.Function):
    """RoPE for training in eager mode: the output is written contiguous in [B, H, T, D] (the layout
    the attention kernels read, so no copy follows), the gradient straight in x's own layout (the
    fused q|k|v projection's); about a third of autograd's passes through chunk / neg / cat."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos[:, None], sin[:, None]
        ctx.save_for_backward(cos, sin)
        return _rotate_into(torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device),
                            x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        B, H, T, D = grad.shape
        dx = torch.empty(B, T, H, D, dtype=grad.dtype, device=grad.device).transpose(1, 2)
        return _rotate_into(dx, grad, cos, sin, True), None, None


def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into a parameter, which may be an FSDP2 shard (a DTensor):
    each rank keeps its own slice of ``full`` (no communication), so a model built on the meta
    device and sharded first never holds more than one full tensor at a time."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    with torch.no_grad():
        param.copy_(full)


# ---------------------------------------------------------------------------------------------
# KV cache

@dataclass
class KVCache:
    """Per-layer keys/values [B, n_kv_head, max_len, head_dim] with per-row fill levels.

    `lengths[b]`: slots used in row b (padding included); new tokens go to slots lengths[b]...
    `valid[b, j]`: slot j of row b holds a real (non-padding) token.
    `n_real[b]`: real tokens so far in row b (the next position id for RoPE / learned positions).
    """
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: torch.Tensor
    valid: torch.Tensor
    n_real: torch.Tensor

    @classmethod
    def empty(cls, config: Config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu") -> "KVCache":
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)],
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            valid=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
            n_real=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @classmethod
    def from_prefix(cls, prefix: "KVCache", batch_size: int, max_len: int) -> "KVCache":
        """``batch_size`` rows of ``max_len`` slots, each starting with row 0 of ``prefix`` (a shared
        prompt or few-shot block computed once)."""
        n = int(prefix.lengths[0])
        if n > max_len:
            raise ValueError(f"prefix of {n} slots does not fit a cache of {max_len}")
        _, H, _, D = prefix.k[0].shape
        z = dict(dtype=prefix.k[0].dtype, device=prefix.k[0].device)
        k = [torch.empty(batch_size, H, max_len, D, **z) for _ in prefix.k]
        v = [torch.empty(batch_size, H, max_len, D, **z) for _ in prefix.v]
        for dst, src in zip(k + v, prefix.k + prefix.v):
            dst[:, :, :n] = src[:1, :, :n]
        valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=prefix.valid.device)
        valid[:, :n] = prefix.valid[:1, :n]
        return cls(k=k, v=v, lengths=prefix.lengths[:1].repeat(batch_size), valid=valid,
                   n_real=prefix.n_real[:1].repeat(batch_size))

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reset_rows(self, rows) -> None:
        """Free rows for new sequences (continuous batching). Stale k/v are masked by `valid`."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths[rows] = 0
        self.n_real[rows] = 0
        self.valid[rows] = False

    def copy_row(self, src: "KVCache", src_row: int, dst_row: int) -> None:
        """Copy one sequence from another cache (e.g. a prefilled prompt) into row `dst_row`."""
        n = int(src.lengths[src_row])
        if n > self.max_len:
            raise ValueError(f"sequence of {n} slots does not fit a cache of {self.max_len}")
        for layer in range(len(self.k)):
            self.k[layer][dst_row, :, :n] = src.k[layer][src_row, :, :n]
            self.v[layer][dst_row, :, :n] = src.v[layer][src_row, :, :n]
        self.valid[dst_row] = False
        self.valid[dst_row, :n] = src.valid[src_row, :n]
        self.lengths[dst_row] = n
        self.n_real[dst_row] = src.n_real[src_row]


# ---------------------------------------------------------------------------------------------
# Layers

class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward: the forward is RMSNorm.forward's arithmetic (bit-identical
    output), the backward 5 passes over [tokens, dim] where autograd's graph of the forward makes ~12.
    `out_dtype`: under autocast the output is written straight in the compute dtype (the next op, a
    Linear, would cast it anyway), and the incoming bf16 gradient is used without a cast back."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        xhat = xf * r  # fp32, kept for the backward
        y = torch.mul(weight, xhat.to(x.dtype), out=torch.empty(x.shape, dtype=out_dtype, device=x.device))
        ctx.save_for_backward(xhat, r, weight)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        xhat, r, weight = ctx.saved_tensors  # the backward runs in fp32 whatever g's dtype
        gw = (g * xhat).flatten(0, -2).sum(0).to(weight.dtype)
        gxhat = g * weight.float()
        # d/dx of x * r(x): r * (gxhat - xhat * mean(gxhat * xhat))
        gx = torch.addcmul(gxhat, xhat, (gxhat * xhat).mean(-1, keepdim=True), value=-1).mul_(r)
        return gx.to(ctx.x_dtype), gw, None, None


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, cast back, then scale (transformers' order of operations).
    When a gradient is needed: the same arithmetic through _RMSNormFn (fewer passes backward)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            dev = x.device.type
            out = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                   else torch.promote_types(self.weight.dtype, x.dtype))
            return _RMSNormFn.apply(x, self.weight, self.eps, out)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: Config) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, config.norm_eps)


# ---------------------------------------------------------------------------------------------
# Attention

MATERIALIZE_MAX_LEN = 512  # CPU training in bf16/fp16: scores held in memory up to this length...
MATERIALIZE_MAX_SCORES = 1 << 28  # ...and up to this many [B, H, T, T] values per layer (512 MiB in bf16)


class _MaterializedAttention(torch.autograd.Function):
    """softmax(scale * q k^T + mask) v with the probabilities held for backward, as batched matmuls.

    For half-precision training on CPU at short sequences: PyTorch's CPU flash-attention backward
    costs ~7x its forward, while here backward is four batched matmuls and one softmax-backward pass
    (measured 2x faster forward + backward at T 256, 1.4x at 512; slower from 1024, where the
    [B, H, T, T] probabilities also get big). Grouped-query heads need no repeated keys: the G query
    heads that share a key head are stacked along the rows of one matmul. Scores and probabilities
    are rounded to the compute dtype (as transformers' eager attention does); the softmax itself
    accumulates in fp32 inside the kernel.
    q [B, H, T, D], k / v [B, Hk, T, D], mask None (causal) or additive [B | 1, 1 | H, T, T]."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        B, H, T, D = q.shape
        Hk = k.shape[1]
        qg = q.reshape(B * Hk, H // Hk * T, D)  # head h = kv * G + g: rows (g, t) of group kv
        kg, vg = k.reshape(B * Hk, T, D), v.reshape(B * Hk, T, D)
        s = torch.baddbmm(q.new_empty(B * Hk, qg.shape[1], T), qg, kg.transpose(1, 2), beta=0, alpha=scale)
        sv = s.view(B, H, T, T)
        if mask is None:
            sv.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        else:  # finite minimum: a row with no visible key gets uniform weights, as with the fp32 mask
            sv.add_(mask.clamp(min=torch.finfo(s.dtype).min) if mask.dtype != s.dtype else mask)
        p = torch.softmax(s, -1)
        ctx.save_for_backward(qg, kg, vg, p)
        ctx.scale = scale
        return torch.bmm(p, vg).view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad):
        qg, kg, vg, p = ctx.saved_tensors
        B, H, T, D = grad.shape
        Hk = kg.shape[0] // B
        g = grad.reshape(qg.shape)
        dv = torch.bmm(p.transpose(1, 2), g)  # sums the G query heads of each key head
        ds = torch._softmax_backward_data(torch.bmm(g, vg.transpose(1, 2)), p, -1, p.dtype)
        dq = torch.baddbmm(torch.empty_like(qg), ds, kg, beta=0, alpha=ctx.scale)
        dk = torch.baddbmm(torch.empty_like(kg), ds.transpose(1, 2), qg, beta=0, alpha=ctx.scale)
        return dq.view(B, H, T, D), dk.view(B, Hk, T, D), dv.view(B, Hk, T, D), None, None


def attend(q, k, v, attn_mask, is_causal, scale):
    """Scaled dot-product attention, q [B, H, Tq, D], k / v [B, Hk, S, D] (Hk divides H): PyTorch's
    fused kernels, or `_MaterializedAttention` for CPU half-precision training at short lengths."""
    T = q.shape[2]
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and q.requires_grad and T == k.shape[2] and T <= MATERIALIZE_MAX_LEN
            and q.shape[0] * q.shape[1] * T * T <= MATERIALIZE_MAX_SCORES
            and k.dtype == v.dtype == q.dtype and (attn_mask is not None or is_causal)
            and (attn_mask is None or (attn_mask.is_floating_point() and not attn_mask.requires_grad))):
        return _MaterializedAttention.apply(q, k, v, attn_mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv = config.n_kv_head * config.head_dim
        self.qkv = nn.Linear(config.n_embd, config.n_embd + 2 * kv, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, rope, attn_mask, is_causal, layer_cache, out=None):
        """out [B, n] (optional): queries only at these positions of x -- every token's keys and
        values are still computed and attended to -- and the output is [B, n, E]."""
        B, T, _ = x.shape
        nq, nkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if out is None:
            q, k, v = self.qkv(x).split([nq, nkv, nkv], dim=-1)
            rope_q = rope
        else:
            w, b = self.qkv.weight, self.qkv.bias
            k, v = F.linear(x, w[nq:], b[nq:] if b is not None else None).split([nkv, nkv], dim=-1)
            q = F.linear(take(x, out), w[:nq], b[:nq] if b is not None else None)
            rope_q = tuple(take(t, out) for t in rope) if rope is not None else None
            if attn_mask is None and is_causal:  # causal over these tokens, for the kept queries
                attn_mask = (torch.arange(T, device=x.device) <= out[:, :, None])[:, None]  # [B, 1, n, T]
            elif attn_mask is not None:
                attn_mask = attn_mask.expand(B, -1, -1, -1).gather(
                    2, out[:, None, :, None].expand(B, attn_mask.shape[1], out.shape[1], attn_mask.shape[-1]))
        Tq = q.shape[1]
        q = q.view(B, Tq, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope_q), apply_rope(k, *rope)
        if layer_cache is not None:
            k_all, v_all, bidx, slots, S, s0 = layer_cache
            if s0 is not None:  # every row writes at the same slot: a plain slice copy
                k_all[:, :, s0:s0 + T] = k
                v_all[:, :, s0:s0 + T] = v
            else:
                k_all[bidx, :, slots] = k.transpose(1, 2).to(k_all.dtype)
                v_all[bidx, :, slots] = v.transpose(1, 2).to(v_all.dtype)
            k, v = k_all[:, :, :S], v_all[:, :, :S]
        if Tq == 0:
            return x.new_zeros(B, 0, self.proj.out_features)
        y = attend(q, k, v, attn_mask, is_causal, self.config.attn_scale)
        return self.proj(y.transpose(1, 2).reshape(B, Tq, -1))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the fused [gate | up] projection h [..., 2F], whose gradient is written
    straight into one [..., 2F] tensor (autograd through `chunk` would make the two halves and then
    concatenate them: one more read and write of the widest activation per layer)."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        s = F.silu(gate)
        ctx.save_for_backward(h, s)
        return s * up

    @staticmethod
    def backward(ctx, grad):
        h, s = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty(h.shape, dtype=torch.promote_types(grad.dtype, h.dtype), device=h.device)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        torch.mul(grad, s, out=d_up)
        return dh


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.kind = config.mlp
        n_out = config.n_inner * (1 if config.mlp == "gelu" else 2)  # gated: [gate | up] fused
        self.fc = nn.Linear(config.n_embd, n_out, bias=config.bias)
        self.proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif _eager_training(h):
            h = _SwiGLU.apply(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = Attention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, attn_mask, is_causal, layer_cache=None, out=None):
        """out [B, n]: compute the block's output only at these positions (see Attention)."""
        h = self.attn(self.ln_1(x), rope, attn_mask, is_causal, layer_cache, out)
        x = (x if out is None else take(x, out)) + h
        return x + self.mlp(self.ln_2(x))


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] at positions idx [B, n] of each row -> [B, n, ...]."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


# ---------------------------------------------------------------------------------------------
# Loss: LM head + cross-entropy fused, in chunks of tokens

class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(scale * x_i @ W^T, t_i) without the [tokens, vocab] fp32 logits (Liger-Kernel's fused
    linear cross-entropy, Hsu et al. 2024). Per chunk of tokens: logits in the compute dtype, the
    target's log-probability in fp32, and -- when training -- at once the logits' gradient
    softmax - onehot, rounded once to the compute dtype as autograd would; per group of chunks, one
    matmul each for the gradients of x and W. The backward only scales them by the incoming gradient.
    Why: the plain path writes and re-reads [tokens, vocab] fp32 logits, log-softmax and gradient
    about ten times; here they are made and used chunk by chunk, and peak memory holds one group of
    bf16 gradient rows (<= 2^26 values) instead of all the fp32 logits."""

    @staticmethod
    def forward(ctx, x, weight, targets, scale, chunk, group, dtype, need_x, need_w):
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            valid = targets != -100
            tgt = torch.where(valid, targets, 0)[:, None]
            xs = (x * scale if scale != 1.0 else x).to(dtype)  # muP output scale folded into x
            if need_w:
                xs = xs * valid[:, None].to(dtype)  # ignored positions give the weight no gradient
            n, grad = x.shape[0], need_x or need_w
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            gx = torch.empty(x.shape, dtype=dtype, device=x.device) if need_x else None
            gw = None
            rows = torch.empty(min(group, n), w.shape[0], dtype=dtype, device=x.device) if grad else None
            for s0 in range(0, n, group):
                e0 = min(s0 + group, n)
                for s in range(s0, e0, chunk):
                    e = min(s + chunk, e0)
                    z = xs[s:e] @ w.t()
                    lt = torch.log_softmax(z, -1, dtype=torch.float32).gather(1, tgt[s:e])  # log p(target)
                    total -= (lt[:, 0] * valid[s:e]).sum()
                    if grad:
                        g = rows[s - s0:e - s0]
                        torch.softmax(z, -1, out=g)  # fp32 inside, one rounding to the compute dtype
                        g.scatter_(1, tgt[s:e], torch.expm1(lt).to(dtype))  # p - 1 at the target, from fp32
                if need_x:
                    torch.mm(rows[:e0 - s0], w, out=gx[s0:e0])
                if need_w:
                    part = rows[:e0 - s0].t() @ xs[s0:e0]
                    gw = part.float() if gw is None else gw.add_(part)
            if need_x:
                gx *= (valid[:, None] * scale).to(dtype)
        ctx.save_for_backward(gx, gw)
        ctx.dtypes = (x.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors
        return (gx.to(ctx.dtypes[0]) * grad if gx is not None else None,
                (gw * grad).to(ctx.dtypes[1]) if gw is not None else None) + (None,) * 7


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
                         chunk: int | None = None, group: int | None = None) -> torch.Tensor:
    """Sum over positions with targets != -100 of CE(scale * x @ weight^T, targets), fp32 scalar;
    x [..., E], targets [...]. Computes in the autocast dtype when autocast is on (as nn.Linear
    would), else in x's dtype. chunk: tokens per log-softmax (default ~2^22 logits, >= 256);
    group: tokens per gradient matmul (default ~2^26 logits, a multiple of chunk)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    V = weight.shape[0]
    chunk = int(chunk or max(256, (1 << 22) // V))
    group = int(group or max(1, (1 << 26) // V // chunk) * chunk)
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(x, weight, targets, float(scale), chunk, group, dtype,
                                     grad and x.requires_grad, grad and weight.requires_grad)


# ---------------------------------------------------------------------------------------------
# The model

class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Non-persistent buffers (never in checkpoints): ALiBi slopes, and RoPE's cos/sin tables
        # [block_size, head_dim] in fp32 (as transformers computes them), looked up per position.
        values = self._buffer_values()
        for name in ("alibi_slopes", "rope_cos", "rope_sin"):
            self.register_buffer(name, values.get(name), persistent=False)  # None when unused

    def _buffer_values(self, device=None) -> dict[str, torch.Tensor]:
        c = self.config
        if c.position == "alibi":
            return {"alibi_slopes": alibi_slopes(c.n_head).to(device)}
        if c.position == "rope":
            pos = torch.arange(c.block_size, device=device)[None]
            cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, c.rope_scaling, torch.float32)
            return {"rope_cos": cos[0], "rope_sin": sin[0]}
        return {}

    @torch.no_grad()
    def reset_buffers(self) -> "Transformer":
        """Recompute the non-persistent buffers in place, on their current device -- after a model
        built on the meta device got storage (`to_empty`) or its weights were loaded with `assign`."""
        dev = self.wte.weight.device
        for name, t in self._buffer_values(None if dev.type == "meta" else dev).items():
            buf = getattr(self, name)
            if buf.is_meta:
                setattr(self, name, t)
            else:
                buf.copy_(t)
        return self

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Fresh weights. Under muP (mup_width_scale set) hidden matrices get std * sqrt(width_scale)
        (variance ~ 1/fan_in relative to the base width); residual output projections are further
        divided by sqrt(2 * n_layer) (GPT-2)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        c = self.config
        std = c.initializer_range
        hidden_std = std * math.sqrt(c.mup_width_scale) if c.mup_width_scale else std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)
                continue
            s = std if name.startswith(("wte", "wpe", "lm_head")) else hidden_std
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                s = s / math.sqrt(2 * c.n_layer)
            assign_full(p, torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(s))
        return self.reset_buffers()

    # -- helpers -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def num_params(self, include_embeddings: bool = True) -> int:
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not include_embeddings and name.startswith(("wte", "wpe", "lm_head")):
                continue
            n += p.numel()
        return n

    def _slopes(self, key_len: torch.Tensor) -> torch.Tensor:
        """[B or 1, H] ALiBi slopes after `alibi_scaling`."""
        s = self.alibi_slopes[None, :]
        sc = self.config.alibi_scaling
        if sc:
            if sc.get("factor") is not None:
                s = s / float(sc["factor"])
            elif sc.get("train_seq_len") is not None and key_len is not None:
                n = float(sc["train_seq_len"])
                f = torch.clamp(key_len.float() / n, min=1.0)  # only when the key length exceeds n
                s = s / f[:, None]
        return s

    def alibi_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, key_len: torch.Tensor | None) -> torch.Tensor:
        """ALiBi's additive bias -slope_h * |q - k| [B, H, T, S] for query / key positions [B, T] /
        [B, S]; key_len ([B] per row, or [B, T] per query) drives the train_seq_len scaling."""
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()  # [B, T, S]
        if key_len is not None and key_len.dim() == 2:  # per query: [B, H, T, 1]
            B, T = key_len.shape
            slopes = self._slopes(key_len.flatten()).expand(B * T, -1).reshape(B, T, -1).transpose(1, 2)[..., None]
        else:
            slopes = self._slopes(key_len)[:, :, None, None]  # [B|1, H, 1, 1]
        return -(slopes * dist[:, None])

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin [B, T, head_dim] for the given positions, looked up in the model's tables (the same
        fp32 values as computing them per step, then cast; no host sync, and nothing for
        torch.compile to guard on). Positions past the context are an indexing error."""
        return self.rope_cos[position_ids].to(dtype), self.rope_sin[position_ids].to(dtype)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, logits_to_keep: int = 0,
                static: bool = False, targets: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None,
                output_positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or [B, k, vocab] for the last k positions with
        logits_to_keep=k, as transformers names it; last_only is logits_to_keep=1).
        attn_bias, output_positions: see `hidden_states` (logits [B, n, vocab] at those positions).

        attention_mask [B, T] marks the new tokens that are real (1) or padding (0).
        position_ids default: real-token counts (so left padding does not shift positions);
        with segment_ids, positions restart at each segment. ALiBi always uses slot distances,
        as the reference Jais implementation does.

        static=True (with a cache): shapes that do not depend on how full the cache is -- attention
        covers all `cache.max_len` slots, unfilled ones masked out, new keys/values are scattered
        in, and there are no host syncs -- so `torch.compile` makes one graph for every decode step
        (`dhad.generate.decode_step`). The caller guarantees the cache has room (no overflow check).

        targets [B, T] (next-token ids, -100 = ignored; no shift inside): instead of logits, return the
        summed cross-entropy (fp32 scalar) through `linear_cross_entropy`, which never holds the
        [B, T, vocab] logits. The loss sits inside forward so DDP / FSDP / torch.compile see one call.
        """
        x = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids, cache, static, attn_bias,
                               output_positions)
        c = self.config
        if targets is not None:
            return linear_cross_entropy(x, self.lm_head.weight, targets, c.logits_scale)
        if last_only:
            logits_to_keep = 1
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        if c.logits_scale != 1.0:
            logits = logits * c.logits_scale
        return logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None, static: bool = False, attn_bias: torch.Tensor | None = None,
                      output_positions: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states [B, T, E] that `forward` feeds the LM head (same arguments).

        attn_bias [B, 1 | H, T, S] (float, additive; S = the cache slots attended, else T): an explicit
        attention pattern -- with ALiBi, its distance bias included (`alibi_bias`) -- used instead
        of the causal / padding / segment mask, e.g. a tree of sequences sharing a prefix, each
        token at its own position_ids (`dhad.evaluate.scoring`).
        output_positions [B, n]: only these positions' states are wanted, so the last block runs
        its queries, attention output and MLP at them alone (its keys/values still cover every
        token): returns [B, n, E].
        """
        c = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        arange = torch.arange(T, device=dev)
        new_valid = attention_mask.bool() if attention_mask is not None else None

        if cache is not None:
            start = cache.lengths  # [B]
            slots = start[:, None] + arange[None, :]  # [B, T] where the new tokens go
            bidx = torch.arange(B, device=dev)[:, None]
            if static:  # shapes independent of the fill level: attend over the whole cache, masked
                S, same_start, s0 = cache.max_len, False, None
            else:
                S = int(slots.max()) + 1
                if S > cache.max_len:
                    raise ValueError(f"KV cache overflow: need {S} slots, cache holds {cache.max_len}")
                same_start = bool((start == start[0]).all())
                s0 = int(start[0]) if same_start else None
            if s0 is not None:
                cache.valid[:, s0:s0 + T] = new_valid if new_valid is not None else True
            else:
                cache.valid[bidx, slots] = new_valid if new_valid is not None else True
            if position_ids is None:
                nv = new_valid.long() if new_valid is not None else torch.ones(B, T, dtype=torch.long, device=dev)
                position_ids = (cache.n_real[:, None] + nv.cumsum(-1) - 1).clamp(min=0)
                cache.n_real += nv.sum(-1)
            uniform = T == 1 and same_start and bool(cache.valid[:, :S].all())
            cache.lengths += T
            key_valid = cache.valid[:, :S]  # [B, S]
            q_slots, k_slots = slots, torch.arange(S, device=dev)[None, :].expand(B, S)
        else:
            if position_ids is None:
                if segment_ids is not None:
                    starts = torch.ones_like(segment_ids, dtype=torch.bool)
                    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
                    idx = torch.where(starts, arange[None, :].expand(B, T), torch.zeros_like(segment_ids))
                    position_ids = arange[None, :] - idx.cummax(-1).values
                elif new_valid is not None:
                    position_ids = (new_valid.long().cumsum(-1) - 1).clamp(min=0)
                else:
                    position_ids = arange[None, :].expand(B, T)
            key_valid = new_valid
            uniform = False
            S = T
            q_slots = k_slots = arange[None, :].expand(B, T)

        # Attention mask: causal by slot, padding never attended, segments confined.
        # One new token per row, all rows at the same fill level, no padding: every cached key is
        # visible, so no mask is needed (the common decode step of a single sequence).
        need_mask = c.position == "alibi" or segment_ids is not None or (
            cache is not None and not uniform) or (cache is None and key_valid is not None)
        attn_mask = None
        if attn_bias is not None:
            attn_mask = attn_bias.to(self.dtype)
        elif need_mask:
            allowed = k_slots[:, None, :] <= q_slots[:, :, None]  # [B, T, S]
            if key_valid is not None:
                allowed = allowed & key_valid[:, None, :]
            if segment_ids is not None:
                allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
            neg = torch.finfo(self.dtype).min
            attn_mask = torch.zeros(allowed.shape, dtype=torch.float32, device=dev).masked_fill_(~allowed, neg)
            attn_mask = attn_mask[:, None]  # [B, 1, T, S]
            if c.position == "alibi":
                attn_mask = attn_mask + self.alibi_bias(q_slots, k_slots, q_slots[:, -1] + 1)
            attn_mask = attn_mask.to(self.dtype)

        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        if c.embedding_scale != 1.0:
            x = x * c.embedding_scale
        # under autocast, cos/sin in the compute dtype: q, k stay bf16 into attention (no fp32 round trip)
        rope_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        rope = self._rope(position_ids, rope_dtype) if c.position == "rope" else None

        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            lc = (cache.k[i], cache.v[i], bidx, slots, S, s0) if cache is not None else None
            x = block(x, rope, attn_mask, cache is None, lc, output_positions if i == last else None)
        return self.ln_f(x)
