"""Training kernels: the model's functions rewritten for speed, applied from outside, same numbers.

    apply_training_kernels(model)            # before compiling / wrapping (DDP, FSDP2) / building the optimizer

The model (dhad.model) runs plain PyTorch. Training swaps these in (each has the plain function's
signature and, where no gradient is being computed, calls the plain one, so inference is untouched;
the flags of `apply_training_kernels` name them: loss, rms_norm, rope, swiglu, attention):

- `linear_cross_entropy` (Transformer.loss): the LM head + cross-entropy fused in chunks of tokens
  (Liger-Kernel's fused linear cross-entropy): never the [tokens, vocab] fp32 logits; the gradient is made
  in the forward.
- `rms_norm_train` (RMSNorm.norm): a hand-written backward, 5 passes over [tokens, dim] instead of ~12.
- `rope_train` (Attention.rotate): output written in the layout attention reads, gradient in the projection's.
- `swiglu_train` (MLP.act): the [gate | up] gradient written into one tensor.
- `attend_train` (Attention.attend): CPU half-precision training at up to 512 tokens holds the probabilities
  (batched matmuls; PyTorch's CPU flash-attention backward costs ~7x its forward).

Without a gradient the model's logits stay bit-identical to the plain model's (the kernels call the plain
functions). With one, `rms_norm_train` and `swiglu_train` compute the plain forward bit for bit;
`rope_train` rounds once per multiply-add, `attend_train`'s materialised path and the fused loss (also in
evaluation) sum in another order; every gradient is checked against autograd's (tests/test_train_fused.py).
Compiled graphs (torch.compile) fuse the plain formulas themselves: `rope_train` and `swiglu_train` step
aside while tracing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dhad import model as M

MATERIALIZE_MAX_LEN = 512  # CPU training in bf16/fp16: scores held in memory up to this length...
MATERIALIZE_MAX_SCORES = 1 << 28  # ...and up to this many [B, H, T, T] values per layer (512 MiB in bf16)


def apply_training_kernels(model: nn.Module, *, loss: bool = True, rms_norm: bool = True, rope: bool = True,
                           swiglu: bool = True, attention: bool = True) -> nn.Module:
    """Swap the training kernels into a dhad Transformer in place (flags choose which); returns it.
    Parameters, buffers and the state dict are untouched."""
    if loss:
        model.loss = linear_cross_entropy
    for m in model.modules():
        if rms_norm and isinstance(m, M.RMSNorm):
            m.norm = rms_norm_train
        if isinstance(m, M.Attention):
            if rope:
                m.rotate = rope_train
            if attention:
                m.attend = attend_train
        if swiglu and isinstance(m, M.MLP) and m.act is M.swiglu:
            m.act = swiglu_train
    return model


def _eager_training(x: torch.Tensor) -> bool:
    """A gradient is wanted and torch.compile is not tracing: where the hand-written backward
    Functions (_Rope, _SwiGLU) pay; compiled graphs fuse the plain formulas themselves."""
    return torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------
# RoPE

def rope_train(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`dhad.model.apply_rope`; when training eagerly through `_Rope`."""
    return _Rope.apply(x, cos, sin) if _eager_training(x) else M.apply_rope(x, cos, sin)


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


# ---------------------------------------------------------------------------------------------
# RMSNorm

def rms_norm_train(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`dhad.model.rms_norm`; when a gradient is needed through `_RMSNormFn` (same arithmetic forward).
    Under autocast its output is written straight in the compute dtype (the next op, a Linear, would
    cast it anyway)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        dev = x.device.type
        out = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
               else torch.promote_types(weight.dtype, x.dtype))
        return _RMSNormFn.apply(x, weight, eps, out)
    return M.rms_norm(x, weight, eps)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward: the forward is `rms_norm`'s arithmetic (bit-identical
    output), the backward 5 passes over [tokens, dim] where autograd's graph of the forward makes ~12.
    `out_dtype`: the output's dtype; the incoming bf16 gradient is used without a cast back."""

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


# ---------------------------------------------------------------------------------------------
# SwiGLU

def swiglu_train(h: torch.Tensor) -> torch.Tensor:
    """`dhad.model.swiglu`; when training eagerly through `_SwiGLU`."""
    return _SwiGLU.apply(h) if _eager_training(h) else M.swiglu(h)


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


# ---------------------------------------------------------------------------------------------
# Attention

def attend_train(q, k, v, mask, is_causal, scale):
    """`dhad.model.attend`, or `_MaterializedAttention` for CPU half-precision training at short lengths."""
    T = q.shape[2]
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and q.requires_grad and T == k.shape[2] and T <= MATERIALIZE_MAX_LEN
            and q.shape[0] * q.shape[1] * T * T <= MATERIALIZE_MAX_SCORES
            and k.dtype == v.dtype == q.dtype and (mask is not None or is_causal)
            and (mask is None or (mask.is_floating_point() and not mask.requires_grad))):
        return _MaterializedAttention.apply(q, k, v, mask, scale)
    return M.attend(q, k, v, mask, is_causal, scale)


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


# ---------------------------------------------------------------------------------------------
# Loss: LM head + cross-entropy fused, in chunks of tokens

def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
                         chunk: int | None = None, group: int | None = None) -> torch.Tensor:
    """Sum over positions with targets != -100 of CE(scale * x @ weight^T, targets), fp32 scalar;
    x [..., E], targets [...] (`dhad.model.cross_entropy_sum` without the logits). Computes in the
    autocast dtype when autocast is on (as nn.Linear would), else in x's dtype. chunk: tokens per
    log-softmax (default ~2^22 logits, >= 256); group: tokens per gradient matmul (default ~2^26
    logits, a multiple of chunk)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    V = weight.shape[0]
    chunk = int(chunk or max(256, (1 << 22) // V))
    group = int(group or max(1, (1 << 26) // V // chunk) * chunk)
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(x, weight, targets, float(scale), chunk, group, dtype,
                                     grad and x.requires_grad, grad and weight.requires_grad)


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
