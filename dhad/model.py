"""The one Transformer for Jais-family, Jais-adapted and ALLaM.

Design choices (all switched by `Config` flags, never by model name):
- Pre-norm blocks: LayerNorm with bias (Jais) or RMSNorm computed in fp32 (Llama).
- Positions: ALiBi (Jais-family; slopes for any head count, optional `alibi_scaling`), RoPE (Llama,
  rotate-half convention, optional linear scaling) or learned `wpe` (GPT-2 style).
- Attention through `F.scaled_dot_product_attention`; q, k, v come from one fused projection
  (`attn.qkv`, the layout of Jais' `c_attn`); grouped-query attention via `enable_gqa`. Scores are
  scaled by 1/head_dim**p (p = 1 under muP, 0.5 otherwise).
- MLP: `proj(silu(gate) * up)` for both Jais SwiGLU (gate = c_fc2, up = c_fc) and Llama (gate_proj,
  up_proj), with gate and up fused in one matmul (`mlp.fc`); or GELU (tanh approximation, `gelu_new`).
- muP scalars: embeddings times `embedding_scale`, logits times `logits_scale`.
- One way to say who sees whom: `positions` [B, T], a boolean "may attend" `mask` [B, T, S] (default:
  causal) and padding (`attention_mask`, 1 = real token). The model turns them into one additive bias,
  padding never attended, ALiBi's -slope * |distance| measured between positions. Packed sequences,
  token trees (a prompt shared by several continuations) and prefix caches are all such masks.
- A `KVCache` (dhad/kv_cache.py) with per-row fill levels (continuous batching): `KVCache.extend` takes
  the slots of one forward and returns a `KVWrite`, whose `update(layer, k, v)` each attention layer calls.
- The functions a block runs (`RMSNorm.norm`, `Attention.rotate` / `attend`, `MLP.act`) and the loss
  (`Transformer.loss`) are attributes: training swaps in fused kernels with the same numbers
  (`dhad.train.kernels.apply_training_kernels`).

The model is a pure nn.Module: no optimizer, sampling, parallelism or checkpoint format here.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dhad.config import Config
from dhad.kv_cache import KVCache

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


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """-slope_h * |q - k| [B, H, T, S] for query / key positions [B, T] / [B, S]; slopes [B | 1, H]
    (one per row), or [B, H, T] (one per query)."""
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()  # [B, T, S]
    s = slopes[..., None] if slopes.dim() == 3 else slopes[:, :, None, None]
    return -(s * dist[:, None])


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def segments(segment_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Packed sequences [B, T] (equal ids = one sequence): ``positions`` restarting at each sequence and
    the causal ``mask`` confined to it -- the keyword arguments `Transformer.forward` takes."""
    B, T = segment_ids.shape
    arange = torch.arange(T, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, arange[None, :].expand(B, T), torch.zeros_like(segment_ids)).cummax(-1).values
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return {"positions": arange[None, :] - first, "mask": same & (arange[None, :] <= arange[:, None])[None]}


# ---------------------------------------------------------------------------------------------
# Attention

def attend(q, k, v, mask, is_causal, scale):
    """Scaled dot-product attention, q [B, H, Tq, D], k / v [B, Hk, S, D] (Hk divides H); mask None or
    additive / boolean [B | 1, 1 | H, Tq, S]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] at positions idx [B, n] of each row -> [B, n, ...]."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


class Attention(nn.Module):
    def __init__(self, config: Config, layer: int = 0):
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv = config.n_kv_head * config.head_dim
        self.qkv = nn.Linear(config.n_embd, config.n_embd + 2 * kv, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.rotate, self.attend = apply_rope, attend

    def forward(self, x, rope, bias, kv=None, keep=None):
        """bias: additive [B, 1 | H, T, S], or None: causal without a cache, every key with one.
        kv: a `KVWrite` (this forward's slots in a KV cache) or None.
        keep [B, n] (optional): queries only at these positions of x -- every token's keys and values
        are still computed and attended to -- and the output is [B, n, E]."""
        B, T, _ = x.shape
        is_causal = kv is None
        nq, nkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if keep is None:
            q, k, v = self.qkv(x).split([nq, nkv, nkv], dim=-1)
            rope_q = rope
        else:
            q, k, v = self.qkv(x).split([nq, nkv, nkv], dim=-1)  # through the module (LoRA may wrap it)
            q = take(q, keep)
            rope_q = tuple(take(t, keep) for t in rope) if rope is not None else None
            if bias is None and is_causal:  # causal over these tokens, for the kept queries
                bias = (torch.arange(T, device=x.device) <= keep[:, :, None])[:, None]  # [B, 1, n, T]
            elif bias is not None:
                bias = bias.expand(B, -1, -1, -1).gather(
                    2, keep[:, None, :, None].expand(B, bias.shape[1], keep.shape[1], bias.shape[-1]))
        Tq = q.shape[1]
        q = q.view(B, Tq, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = self.rotate(q, *rope_q), self.rotate(k, *rope)
        if kv is not None:
            k, v = kv.update(self.layer, k, v)
        if Tq == 0:
            return x.new_zeros(B, 0, self.proj.out_features)
        y = self.attend(q, k, v, bias, is_causal, self.config.attn_scale)
        return self.proj(y.transpose(1, 2).reshape(B, Tq, -1))


# ---------------------------------------------------------------------------------------------
# MLP, norms, block

def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from the fused [gate | up] projection h [..., 2F]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        n_out = config.n_inner * (1 if config.mlp == "gelu" else 2)  # gated: [gate | up] fused
        self.fc = nn.Linear(config.n_embd, n_out, bias=config.bias)
        self.proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.act = gelu if config.mlp == "gelu" else swiglu

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, cast back, then scale (transformers' order of operations)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm = rms_norm

    def forward(self, x):
        return self.norm(x, self.weight, self.eps)


def make_norm(config: Config) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: Config, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, bias, kv=None, keep=None):
        """keep [B, n]: compute the block's output only at these positions (see Attention)."""
        h = self.attn(self.ln_1(x), rope, bias, kv, keep)
        x = (x if keep is None else take(x, keep)) + h
        return x + self.mlp(self.ln_2(x))


def cross_entropy_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Sum over targets != -100 of CE(scale * x @ weight^T, targets), in fp32, from the full logits."""
    logits = F.linear(x, weight)
    if scale != 1.0:
        logits = logits * scale
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


# ---------------------------------------------------------------------------------------------
# The model

class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.loss = cross_entropy_sum
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
    def reset_buffers(self) -> Transformer:
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

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, assign=None) -> Transformer:
        """Fresh weights. Under muP (mup_width_scale set) hidden matrices get std * sqrt(width_scale)
        (variance ~ 1/fan_in relative to the base width); residual output projections are further
        divided by sqrt(2 * n_layer) (GPT-2). Every tensor is drawn whole, in one order, and put in its
        parameter by ``assign(param, full)`` (default: copy; a sharded model keeps its own slices:
        `dhad.train.distributed.assign_full`), so the values never depend on how the model is split."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        c = self.config
        std = c.initializer_range
        hidden_std = std * math.sqrt(c.mup_width_scale) if c.mup_width_scale else std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                full = torch.zeros(p.shape) if name.endswith("bias") else torch.ones(p.shape)
            else:
                s = std if name.startswith(("wte", "wpe", "lm_head")) else hidden_std
                s = s / math.sqrt(2 * c.n_layer) if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else s
                full = torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(s)
            (assign or torch.Tensor.copy_)(p, full)
        return self.reset_buffers()

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def num_params(self, include_embeddings: bool = True) -> int:
        return sum(p.numel() for name, p in self.named_parameters()  # a tied lm_head is listed once, as wte
                   if include_embeddings or not name.startswith(("wte", "wpe", "lm_head")))

    def _slopes(self, key_len: torch.Tensor) -> torch.Tensor:
        """ALiBi slopes after `alibi_scaling`, for key lengths [B] (-> [B | 1, H]) or [B, T] (-> [B, H, T])."""
        s, sc = self.alibi_slopes[None, :], self.config.alibi_scaling or {}
        if sc.get("factor") is not None:
            s = s / float(sc["factor"])
        elif sc.get("train_seq_len") is not None:  # divided by key_len / n once the key length exceeds n
            s = s / torch.clamp(key_len.flatten().float() / float(sc["train_seq_len"]), min=1.0)[:, None]
        return s.expand(key_len.numel(), -1).unflatten(0, key_len.shape).transpose(1, 2) if key_len.dim() == 2 else s

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, keep: int | torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (see `hidden_states` for the other arguments).

        targets [B, T] (next-token ids, -100 = ignored; no shift inside): instead of logits, the summed
        cross-entropy (fp32 scalar) through `self.loss` -- inside forward, so that DDP / FSDP /
        torch.compile see one call (training swaps in a fused, chunked loss that never holds the
        [B, T, vocab] logits)."""
        x = self.hidden_states(input_ids, attention_mask, positions=positions, mask=mask, cache=cache, keep=keep)
        if targets is not None:
            return self.loss(x, self.lm_head.weight, targets, self.config.logits_scale)
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on final-norm hidden states."""
        logits = self.lm_head(x)
        return logits * self.config.logits_scale if self.config.logits_scale != 1.0 else logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      cache: KVCache | None = None, keep: int | torch.Tensor | None = None,
                      alibi_len: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states [B, T, E] that `forward` feeds the LM head.

        attention_mask [B, T]: the new tokens that are real (1) or padding (0); padding is never attended.
        positions [B, T]: each token's position. Default: counts of real tokens (left padding does not
            shift positions), continuing the cache's count in each row.
        mask [B, T, S] bool: which keys each token may attend (S = T, or the cache's slots after this
            step); default causal. E.g. `segments(segment_ids)` for packed sequences, or a token tree.
        cache: a `KVCache`; the new tokens' keys/values are added to it.
        keep: the positions whose outputs are wanted: an int k (the last k of each row, e.g. 1 when
            decoding) or [B, n] (the last block then runs its queries and MLP at those alone) -> [B, k | n, E].
        alibi_len [B] or [B, T]: the key length that ALiBi's `train_seq_len` scaling divides by, per row or
            per query (default: each row's slots).
        """
        c = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        real = attention_mask.bool() if attention_mask is not None else None
        arange = torch.arange(T, device=dev)
        if cache is None:
            if positions is None:
                positions = ((real.long().cumsum(-1) - 1).clamp(min=0) if real is not None
                             else arange[None, :].expand(B, T))
            q_slots, uniform, kv = arange[None, :].expand(B, T), real is None, None
        else:
            kv = cache.extend(T, real, positions)
            positions, q_slots, uniform = kv.positions, kv.slots, kv.uniform

        # One additive bias for everything a query may not see (and ALiBi). None when every key is
        # visible causally and nothing else applies: without a cache the fused causal kernel runs, and
        # one new token per row at one fill level, no padding (the usual decode step), sees all keys.
        bias = None
        if c.position == "alibi" or mask is not None or not uniform:
            if cache is None:
                k_slots, key_real, key_pos = q_slots, real, positions
            else:
                n = kv.n_keys
                k_slots = torch.arange(n, device=dev)[None, :].expand(B, n)
                key_real, key_pos = cache.valid[:, :n], cache.pos[:, :n]
            may = mask if mask is not None else k_slots[:, None, :] <= q_slots[:, :, None]  # [B, T, S]
            if key_real is not None:
                may = may & key_real[:, None, :]
            bias = torch.zeros(may.shape, dtype=torch.float32, device=dev).masked_fill_(
                ~may, torch.finfo(self.dtype).min)[:, None]  # [B, 1, T, S]
            if c.position == "alibi":
                slopes = self._slopes(alibi_len if alibi_len is not None else q_slots[:, -1] + 1)
                bias = bias + alibi_bias(slopes, positions, key_pos)
            bias = bias.to(self.dtype)

        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        if c.embedding_scale != 1.0:
            x = x * c.embedding_scale
        rope = None
        if c.position == "rope":  # tables looked up per position; in the compute dtype under autocast
            dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
            rope = self.rope_cos[positions].to(dt), self.rope_sin[positions].to(dt)

        out = keep if torch.is_tensor(keep) else None
        for i, block in enumerate(self.h):
            x = block(x, rope, bias, kv, out if i == len(self.h) - 1 else None)
        x = self.ln_f(x)
        return x[:, -keep:] if isinstance(keep, int) else x
