"""Training's kernels (dhad.train.kernels) equal the plain model functions they replace. The LM head +
cross-entropy fused in chunks (`Transformer.forward(ids, targets=...)` after `apply_training_kernels`, used
by the pretrain / adapt / SFT objectives) against full logits
then `F.cross_entropy`, in value and in every parameter's gradient: tight in fp32, and under bf16 autocast as
close to the fp32 truth as the plain bf16 path. Jais (tied head, muP logits scale) and Llama (untied)
configs; ignored targets; several chunks and groups. RMSNorm's hand-written backward against autograd
through transformers' RMSNorm arithmetic. CPU half-precision training attention (scores held, batched
matmuls) against `F.scaled_dot_product_attention`: causal, grouped-query, additive masks, in a whole model,
and under torch.compile. SwiGLU's backward into one [gate | up] gradient, bit for bit autograd's; RoPE's training path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dhad.config import Config
from dhad.model import Transformer, segments
from dhad.train import kernels as K
from dhad.train.kernels import apply_training_kernels, linear_cross_entropy


def _plain(model, ids, targets):
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def _fused(model, ids, targets):
    return model(ids, targets=targets)


def test_apply_training_kernels_swaps_by_flags_and_keeps_inference_bit_identical():
    """The kernels go in by flag, the state dict is untouched, and without a gradient the model's
    forward is the plain one's bit for bit (RoPE + RMSNorm + SwiGLU and ALiBi + LayerNorm)."""
    for preset in ("tiny-llama", "tiny-jais"):
        plain = Transformer(Config.from_name(preset)).init_weights(0)
        fast = apply_training_kernels(Transformer(Config.from_name(preset)).init_weights(0), attention=False)
        assert fast.loss is linear_cross_entropy and plain.loss is not linear_cross_entropy
        assert all(b.attn.attend is plain.h[0].attn.attend and b.attn.rotate is K.rope_train for b in fast.h)
        assert list(fast.state_dict()) == list(plain.state_dict())
        ids = torch.randint(0, 512, (2, 33))
        with torch.no_grad():
            assert torch.equal(fast(ids), plain(ids))
            torch.testing.assert_close(fast(ids, targets=ids), plain(ids, targets=ids))  # summation order
        # training forward: through the hand-written Functions (RoPE's rounds once per multiply-add)
        out = fast(ids)
        torch.testing.assert_close(out, plain(ids), rtol=1e-5, atol=1e-5)
        names = {type(f).__name__ for f in _graph(out.grad_fn)}
        assert {"_RMSNormFnBackward", "_RopeBackward", "_SwiGLUBackward"} <= names if preset == "tiny-llama" \
            else "_RopeBackward" not in names and "_SwiGLUBackward" in names


def _graph(fn, seen=None):
    """Every node of an autograd graph."""
    seen = set() if seen is None else seen
    if fn is not None and fn not in seen:
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            _graph(nxt, seen)
    return seen


def _loss_and_grads(model, fn, ids, targets, bf16):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(model, ids, targets)
    (loss / targets.numel()).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["tiny-jais", "tiny-llama"])
def test_fused_loss_equals_the_plain_path(preset):
    torch.manual_seed(0)
    model = apply_training_kernels(Transformer(Config.from_name(preset)).init_weights(0))
    ids = torch.randint(0, model.config.vocab_size, (3, 200))
    targets = torch.randint(0, model.config.vocab_size, (3, 200))
    targets[0, :50] = -100  # e.g. SFT prompt tokens
    targets[2, 7] = -100
    # fp32: the same numbers up to summation order
    ref, g_ref = _loss_and_grads(model, _plain, ids, targets, bf16=False)
    got, g = _loss_and_grads(model, _fused, ids, targets, bf16=False)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert set(g) == set(g_ref)
    for name in g:
        scale = g_ref[name].abs().max().clamp(min=1e-12)
        torch.testing.assert_close(g[name] / scale, g_ref[name] / scale, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # bf16 autocast: both paths round differently; the fused one must be as close to the fp32 truth as the
    # plain bf16 path is (measured: within 1.8x of the plain path's error on every parameter)
    _, g_plain = _loss_and_grads(model, _plain, ids, targets, bf16=True)
    got, g = _loss_and_grads(model, _fused, ids, targets, bf16=True)
    assert abs(float(got - ref)) / float(ref) < 1e-3
    for name in g:
        err, err_plain = (g[name] - g_ref[name]).norm(), (g_plain[name] - g_ref[name]).norm()
        assert err <= 3 * err_plain + 1e-6 * g_ref[name].norm(), name
        assert err <= 2e-2 * g_ref[name].norm(), name


def test_linear_cross_entropy_chunking_no_grad_and_frozen_head():
    torch.manual_seed(0)
    x = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(40, 16)  # a frozen head: only x gets a gradient
    t = torch.randint(0, 40, (50,))
    t[::5] = -100
    ref = F.cross_entropy((x @ w.t()) * 0.5, t, ignore_index=-100, reduction="sum")
    (gx_ref,) = torch.autograd.grad(ref, x)
    for chunk, group in ((1, 1), (7, 7), (7, 21), (50, 50), (64, 64), (7, None)):
        got = linear_cross_entropy(x, w, t, scale=0.5, chunk=chunk, group=group)
        (gx,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(gx, gx_ref)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, scale=0.5, chunk=7), ref.detach())
    assert float(linear_cross_entropy(x, w, torch.full_like(t, -100)).detach()) == 0.0


def _rmsnorm_reference(x, weight, eps):
    """transformers' LlamaRMSNorm.forward, differentiated by autograd."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@pytest.mark.parametrize("bf16", [False, True])
def test_rmsnorm_backward_equals_autograd(bf16):
    from dhad.model import RMSNorm
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    norm.norm = K.rms_norm_train
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(48))
    lin = torch.nn.Linear(48, 24)  # under autocast the norm's output feeds a Linear, as in the model
    x0 = 3 * torch.randn(2, 9, 48)

    def grads(f, autocast):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = lin(f(x))
        out.float().square().sum().backward()
        g = (out.detach().float(), x.grad, norm.weight.grad)
        norm.weight.grad = lin.weight.grad = lin.bias.grad = None
        return g

    ref = grads(lambda x: _rmsnorm_reference(x, norm.weight, norm.eps), bf16)
    got = grads(norm, bf16)
    assert got[0].dtype == ref[0].dtype
    for a, b in zip(got, ref):  # bf16 too: the same roundings forward, fp32 backward (summation order only)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    with torch.no_grad():  # inference keeps the plain path: bit-identical
        torch.testing.assert_close(norm(x0), _rmsnorm_reference(x0, norm.weight, norm.eps), rtol=0, atol=0)


def _attention_case(kind, B=2, H=6, Hk=2, T=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hk, Hk))
    go = torch.randn(B, H, T, D, generator=g)
    mask = None
    if kind != "causal":
        allowed = torch.ones(T, T, dtype=torch.bool).tril().repeat(B, 1, 1)
        if kind == "padding":  # left padding: row 1's first 5 queries see no key at all
            allowed[1, :, :5] = False
            go[1, :, :5] = 0  # as in training: those positions carry no loss
        if kind == "segments":  # two packed documents in row 0
            allowed[0, 20:, :20] = False
        mask = torch.zeros(B, 1, T, T).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        if kind == "alibi":
            dist = (torch.arange(T)[:, None] - torch.arange(T)[None]).abs().float()
            mask = mask + (-torch.rand(1, H, 1, 1, generator=g) * dist)
    return q, k, v, go, mask


def _attention_grads(fn, q, k, v, go, dtype):
    x = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
    out = fn(*x)
    out.backward(go.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in x]


@pytest.mark.parametrize("kind", ["causal", "alibi", "padding", "segments"])
def test_materialized_attention_equals_sdpa(kind):
    from dhad.train.kernels import _MaterializedAttention
    q, k, v, go, mask = _attention_case(kind)
    scale = 0.3

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=True)

    def mat(q, k, v):
        return _MaterializedAttention.apply(q, k, v, mask, scale)

    ref = _attention_grads(sdpa, q, k, v, go, torch.float32)
    for a, b in zip(_attention_grads(mat, q, k, v, go, torch.float32), ref):  # the same math in fp32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # bf16: no further from the fp32 truth than PyTorch's own bf16 kernel (measured: 0.5-1.3x its error)
    got, theirs = _attention_grads(mat, q, k, v, go, torch.bfloat16), _attention_grads(sdpa, q, k, v, go, torch.bfloat16)
    for a, b, r in zip(got, theirs, ref):
        assert (a - r).norm() <= 2 * (b - r).norm() + 1e-3 * r.norm()
        assert (a - r).norm() <= 2e-2 * r.norm()


def test_attend_chooses_the_materialized_path_only_for_cpu_half_precision_training(monkeypatch):
    q, k, v, _, mask = _attention_case("alibi")
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    assert type(K.attend_train(qb, kb, vb, None, True, 0.25).grad_fn).__name__ == "_MaterializedAttentionBackward"
    assert type(K.attend_train(qb, kb, vb, mask, True, 0.25).grad_fn).__name__ == "_MaterializedAttentionBackward"
    assert "Materialized" not in type(K.attend_train(*(t.float().requires_grad_() for t in (q, k, v)), None, True,
                                                     0.25).grad_fn).__name__  # fp32: the fused kernel is faster
    with torch.no_grad():  # inference (and the KV-cache paths) keep scaled_dot_product_attention
        torch.testing.assert_close(K.attend_train(qb, kb, vb, None, True, 0.25), F.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, scale=0.25, enable_gqa=True), rtol=0, atol=0)
    long = [torch.randn(1, 2, K.MATERIALIZE_MAX_LEN + 1, 8, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)]
    assert "Materialized" not in type(K.attend_train(*long, None, True, 1.0).grad_fn).__name__
    monkeypatch.setattr(K, "MATERIALIZE_MAX_SCORES", qb.shape[0] * qb.shape[1] * qb.shape[2] ** 2 - 1)
    assert "Materialized" not in type(K.attend_train(qb, kb, vb, None, True, 0.25).grad_fn).__name__  # too big


@pytest.mark.parametrize("preset", ["tiny-jais", "tiny-llama"])
def test_model_training_step_same_with_either_attention(preset, monkeypatch):
    """A whole model under bf16 autocast (ALiBi + muP / RoPE + GQA): loss and every gradient agree
    between the materialized attention and scaled_dot_product_attention, packed segments included."""
    torch.manual_seed(0)
    model = apply_training_kernels(Transformer(Config.from_name(preset)).init_weights(0))
    ids = torch.randint(0, model.config.vocab_size, (2, 96))
    targets = torch.randint(0, model.config.vocab_size, (2, 96))
    seg = torch.zeros(2, 96, dtype=torch.long)
    seg[0, 40:] = 1

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, targets=targets) + model(ids, **segments(seg), targets=targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = run()
    monkeypatch.setattr(K, "MATERIALIZE_MAX_LEN", 0)
    loss_ref, grads_ref = run()
    assert abs(float(loss - loss_ref)) <= 2e-3 * float(loss_ref)
    for name, g in grads.items():
        assert (g - grads_ref[name]).norm() <= 3e-2 * grads_ref[name].norm() + 1e-8, name


def test_materialized_attention_under_torch_compile():
    attend = K.attend_train
    q, k, v, go, _ = _attention_case("causal", T=24)
    eager = _attention_grads(lambda q, k, v: attend(q, k, v, None, True, 0.25), q, k, v, go, torch.bfloat16)
    compiled = torch.compile(lambda q, k, v: attend(q, k, v, None, True, 0.25), fullgraph=True)
    for a, b in zip(_attention_grads(compiled, q, k, v, go, torch.bfloat16), eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_is_autograds_bit_for_bit(dtype):
    from dhad.train.kernels import _SwiGLU
    torch.manual_seed(0)
    h0, grad = torch.randn(3, 5, 16, dtype=dtype), torch.randn(3, 5, 8, dtype=dtype)
    h = h0.clone().requires_grad_()
    out = _SwiGLU.apply(h)
    out.backward(grad)
    h_ref = h0.clone().requires_grad_()
    gate, up = h_ref.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=0, atol=0)


def test_rope_training_path_equals_autograd_through_rotate_half():
    """apply_rope's training path (`_Rope`: three passes each way, output contiguous in [B, H, T, D])
    against autograd through the rotate-half formula, with different cos / sin halves so that a
    swapped half in the transposed rotation would show."""
    from dhad.train.kernels import _Rope

    def reference(x, cos, sin):
        cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    torch.manual_seed(0)
    x0 = torch.randn(2, 7, 3, 8).transpose(1, 2)  # [B, H, T, D] as a view of [B, T, H, D], as in the model
    cos, sin, grad = torch.randn(2, 7, 8), torch.randn(2, 7, 8), torch.randn(2, 3, 7, 8)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 8e-2)):
        a, b = (x0.to(dtype).detach().clone().requires_grad_() for _ in range(2))
        out, ref = _Rope.apply(a, cos.to(dtype), sin.to(dtype)), reference(b, cos.to(dtype), sin.to(dtype))
        out.backward(grad.to(dtype))
        ref.backward(grad.to(dtype))
        assert out.is_contiguous() and a.grad.stride() == b.grad.stride()
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=tol)


def test_the_training_loop_runs_with_the_kernels(tmp_path):
    """`dhad train` (dhad.train.loop.train) applies every training kernel to the model it trains."""
    import numpy as np

    from dhad.data.shards import ShardWriter
    from dhad.train.loop import train
    from dhad.train.recipe import parse_recipe
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        with ShardWriter(tmp_path / "en", split, "pretrain", vocab_size=512, eos_token_id=0) as w:
            for _ in range(20):
                w.add(rng.integers(1, 512, 50).tolist(), source="en")
    recipe = parse_recipe({"type": "pretrain", "name": "k", "model": {"preset": "tiny-llama"},
                           "data": {"sources": {"en": str(tmp_path / "en")}},
                           "stages": [{"name": "main", "tokens": 2 * 2 * 32, "mix": {"en": 1}}],
                           "context": [{"seq_len": 32, "global_batch_size": 2}], "batch": {"micro_batch_size": 2},
                           "optimizer": {"lr": 1e-3}, "eval_every": 0, "checkpoint_every": 0, "peak_flops": 1e11},
                          source="test")
    res = train(recipe, run_dir=tmp_path / "run", progress=False)
    m = res.model
    assert res.step == 2 and m.loss is linear_cross_entropy
    assert all(b.attn.rotate is K.rope_train and b.attn.attend is K.attend_train and b.mlp.act is K.swiglu_train
               and b.ln_1.norm is K.rms_norm_train for b in m.h)
