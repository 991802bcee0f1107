"""Model core: logits parity with transformers' Llama and the golden Jais fixtures, KV cache, presets."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import dhad
from dhad.config import NOMINAL_SIZES, PRESETS, Config
from dhad.kv_cache import KVCache
from dhad.model import Transformer, alibi_bias, alibi_slopes, segments

import transformers  # noqa: E402  (the interop extra: missing is an error, not a skip)

JAIS_CASES = ["jais-family-mup", "jais-width-scale-6heads", "jais-learned-gelu"]


def hf_llama(tmp_path, seed=0, **kw):
    """A random tiny LlamaForCausalLM saved by transformers, and the same model loaded by dhad."""
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    return ref, dhad.load_model(tmp_path)


LLAMA_CASES = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, num_key_value_heads=2),
    "theta": dict(rope_theta=500000.0),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_logits_parity(tmp_path, case):
    ref, model = hf_llama(tmp_path, **LLAMA_CASES[case])
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def test_llama_padded_batch_parity(tmp_path):
    ref, model = hf_llama(tmp_path, num_key_value_heads=2)
    ids = torch.randint(1, 128, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask)  # dhad derives the same positions from the mask
    diff = (got - want).abs()[mask.bool()]
    assert diff.max().item() <= 1e-4
    # each padded row equals the same sequence run alone
    with torch.no_grad():
        alone = model(ids[2:, 7:])
    assert (got[2, 7:] - alone[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", JAIS_CASES)
def test_jais_fixture_parity(fixtures_dir, case):
    d = fixtures_dir / "parity" / case
    model = dhad.load_model(d)
    ids = torch.from_numpy(np.load(d / "input_ids.npy"))
    want = torch.from_numpy(np.load(d / "logits.npy"))
    with torch.no_grad():
        got = model(ids)
    assert (got - want).abs().max().item() <= 1e-4
    if (d / "padded_input_ids.npy").exists():
        pids = torch.from_numpy(np.load(d / "padded_input_ids.npy"))
        pmask = torch.from_numpy(np.load(d / "padded_attention_mask.npy"))
        pwant = torch.from_numpy(np.load(d / "padded_logits.npy"))
        with torch.no_grad():
            pgot = model(pids, attention_mask=pmask)
        assert (pgot - pwant)[pmask.bool()].abs().max().item() <= 1e-4


def greedy(model, prompt, n, use_cache):
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        if use_cache:
            cache = KVCache.empty(model.config, 1, len(prompt) + n)
            logits = model(ids, cache=cache)
            for _ in range(n):
                t = int(logits[0, -1].argmax())
                out.append(t)
                logits = model(torch.tensor([[t]]), cache=cache)
        else:
            for _ in range(n):
                t = int(model(ids)[0, -1].argmax())
                out.append(t)
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out


@pytest.mark.parametrize("case", JAIS_CASES)
def test_jais_fixture_greedy(fixtures_dir, case):
    d = fixtures_dir / "parity" / case
    g = json.loads((d / "greedy.json").read_text())
    model = dhad.load_model(d)
    assert greedy(model, g["prompt"], g["max_new_tokens"], use_cache=True) == g["new_tokens"]
    assert greedy(model, g["prompt"], g["max_new_tokens"], use_cache=False) == g["new_tokens"]


def test_cache_batched_rows_of_different_lengths(tmp_path):
    """Rows at different fill levels in one cache decode exactly like each row alone (continuous batching)."""
    for cfg in (Config.from_name("tiny-jais"), Config.from_name("tiny-llama")):
        torch.manual_seed(0)
        model = Transformer(cfg).init_weights(seed=0).eval()
        a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13]
        solo = [greedy(model, p, 5, use_cache=True) for p in (a, b)]
        cache = KVCache.empty(cfg, 2, 32)
        with torch.no_grad():
            one = KVCache.empty(cfg, 1, 32)
            la = model(torch.tensor([a]), cache=one)
            cache.copy_row(one, 0, 0)
            one = KVCache.empty(cfg, 1, 32)
            lb = model(torch.tensor([b]), cache=one)
            cache.copy_row(one, 0, 1)
            nxt = [int(la[0, -1].argmax()), int(lb[0, -1].argmax())]
            got = [[nxt[0]], [nxt[1]]]
            for _ in range(4):
                logits = model(torch.tensor([[nxt[0]], [nxt[1]]]), cache=cache)
                nxt = [int(logits[0, -1].argmax()), int(logits[1, -1].argmax())]
                got[0].append(nxt[0])
                got[1].append(nxt[1])
        assert got == solo


def test_segments_equal_separate_sequences():
    """Packed sequences with segment_ids give each example's logits as if it ran alone (ALiBi and RoPE)."""
    for name in ("tiny-jais", "tiny-llama"):
        cfg = Config.from_name(name)
        model = Transformer(cfg).init_weights(seed=1).eval()
        x, y = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 5))
        packed = torch.cat([x, y], 1)
        seg = torch.tensor([[0] * 7 + [1] * 5])
        with torch.no_grad():
            got = model(packed, **segments(seg))
            assert (got[:, :7] - model(x)).abs().max() < 1e-4
            assert (got[:, 7:] - model(y)).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["tiny-jais", "tiny-llama"])
def test_hidden_states_explicit_mask_keep_and_prefix_cache(name):
    """The scoring engine's model API, against plain forwards: an explicit "may attend" mask equal to
    the causal one, with positions continuing the prefix, changes nothing; keep returns exactly those
    rows of the full pass; a KVCache.from_prefix block seen by every row equals running prefix +
    row as one sequence; and a [1, 0] keep runs the block pass with no queries at all."""
    model = Transformer(Config.from_name(name)).init_weights(seed=2).eval()
    g = torch.Generator().manual_seed(0)
    R, S0, T = 3, 5, 6
    prefix = torch.randint(0, 512, (1, S0), generator=g)
    rows = torch.randint(0, 512, (R, T), generator=g)
    out = torch.tensor([[0, 5, 2], [1, 1, 4], [5, 3, 0]])
    with torch.no_grad():
        full = model.hidden_states(torch.cat([prefix.expand(R, S0), rows], 1))[:, S0:]  # reference
        block = KVCache.empty(model.config, 1, S0)
        assert model.hidden_states(prefix, cache=block, keep=torch.empty(1, 0, dtype=torch.long)).shape == (1, 0, model.config.n_embd)
        pos = torch.arange(S0, S0 + T).expand(R, T)
        allowed = torch.cat([torch.ones(R, T, S0, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril().expand(R, T, T)], -1)
        cache = KVCache.from_prefix(block, R, S0 + T)
        got = model.hidden_states(rows, positions=pos, mask=allowed, cache=cache, keep=out)
        want = full.gather(1, out[..., None].expand(R, 3, full.shape[-1]))
        assert (got - want).abs().max() < 1e-5
        assert cache.lengths.tolist() == [S0 + T] * R
        # no cache, causal by default: keep only selects
        plain = model.hidden_states(rows)
        sel = model.hidden_states(rows, keep=out)
        assert (sel - plain.gather(1, out[..., None].expand(R, 3, plain.shape[-1]))).abs().max() < 1e-5
        assert (model(rows) - model.lm_head(plain) * model.config.logits_scale).abs().max() < 1e-5
        assert (model(rows, keep=2) - model(rows)[:, -2:]).abs().max() < 1e-5


def test_alibi_bias_by_position_in_a_token_tree():
    """A tree row (a trunk, then two branches at the positions that follow it) gives each branch the
    outputs of its own sequence run alone: the branches' ALiBi distances are by position, not slot."""
    model = Transformer(Config.from_name("tiny-jais")).init_weights(seed=3).eval()
    g = torch.Generator().manual_seed(1)
    trunk, a, b = (torch.randint(0, 512, (1, n), generator=g) for n in (4, 3, 5))
    ids = torch.cat([trunk, a, b], 1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]])
    br = torch.tensor([[0] * 4 + [1] * 3 + [2] * 5])
    mask = (pos[:, None, :] <= pos[:, :, None]) & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None]))
    with torch.no_grad():
        got = model(ids, positions=pos, mask=mask)
        for seq, cols in ((torch.cat([trunk, a], 1), list(range(7))), (torch.cat([trunk, b], 1), [0, 1, 2, 3] + list(range(7, 12)))):
            assert (got[:, cols] - model(seq)).abs().max() < 1e-5
    # the bias itself: -slope * |q - k| per head, by the positions given
    s = alibi_slopes(4)[None]
    assert torch.allclose(alibi_bias(s, pos[:, 7:8], pos[:, 3:4])[0, :, 0, 0], -s[0] * 1)


def test_static_cache_and_rows_view():
    """A cache's rows view writes into the cache's own storage (the engine's batch of running rows),
    and a static cache (whole cache attended, scatter writes) decodes what a dynamic one does."""
    cfg = Config.from_name("tiny-jais")
    model = Transformer(cfg).init_weights(seed=4).eval()
    ids = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        whole = KVCache.empty(cfg, 3, 16)
        logits = model(ids, cache=whole.rows(1, 3), keep=1)
        assert whole.lengths.tolist() == [0, 5, 5] and whole.n_real.tolist() == [0, 5, 5]
        assert whole.valid[1:, :5].all() and not whole.valid[0].any()
        alone = KVCache.empty(cfg, 2, 16, static=True)
        assert torch.allclose(model(ids, cache=alone, keep=1), logits, atol=1e-5)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        assert torch.allclose(model(nxt, cache=alone)[:, -1], model(nxt, cache=whole.rows(1, 3))[:, -1], atol=1e-5)
        assert torch.equal(alone.pos[:, :6], whole.pos[1:, :6])


def test_alibi_slopes_match_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    for n in (4, 5, 6, 8, 12, 40, 56):
        mask = torch.ones(1, 3)
        bloom = build_alibi_tensor(mask, n, torch.float32)  # [n, 1, 3] = slope * position
        assert torch.allclose(bloom[:, 0, 1], alibi_slopes(n), atol=1e-7), n


def test_alibi_scaling():
    cfg = Config.from_name("tiny-jais", alibi_scaling={"type": "linear", "factor": 2.0})
    m = Transformer(cfg)
    assert torch.allclose(m._slopes(torch.tensor([10])), alibi_slopes(4)[None] / 2)
    cfg = Config.from_name("tiny-jais", alibi_scaling={"type": "linear", "train_seq_len": 8})
    m = Transformer(cfg)
    assert torch.allclose(m._slopes(torch.tensor([8])), alibi_slopes(4)[None])
    assert torch.allclose(m._slopes(torch.tensor([16])), alibi_slopes(4)[None] / 2)


def _published_count(c: Config) -> int:
    """Parameter count written out by hand from the published dimensions (independent of Config.num_params)."""
    E, L, I, V, H, KV = c.n_embd, c.n_layer, c.n_inner, c.vocab_size, c.n_head, c.n_kv_head
    if c.hf_layout == "jais":  # c_attn (E x 3E + 3E), c_proj, c_fc, c_fc2, c_proj, 2 LayerNorms; tied wte; ln_f
        per = (E * 3 * E + 3 * E) + (E * E + E) + 2 * (E * I + I) + (I * E + E) + 4 * E
        return L * per + V * E + 2 * E
    hd = E // H
    per = E * E + 2 * E * KV * hd + E * E + 3 * E * I + 2 * E
    return L * per + 2 * V * E + E


@pytest.mark.parametrize("name", sorted(NOMINAL_SIZES))
def test_preset_param_counts(name):
    cfg = Config.from_name(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    n = model.num_params()
    assert n == cfg.num_params() == _published_count(cfg)
    # Every preset is within 2% of the size the card states, except the two small Jais-family
    # names, which round loosely: the published 590m dims give 0.641B (tied 84,992 x 1536 embedding
    # included, +8.6%) and our derived 1p3b 1.384B (+6.5%). We report that rounding rather than bend
    # dimensions to fit a name (DESIGN.md). jais-adapted-13b is Llama-2-13B (13.0B) plus 32,000 new rows in
    # both untied embedding matrices: 13.34B (+2.6%).
    nominal = NOMINAL_SIZES[name] * 1e9
    tol = {"jais-family-590m": 0.09, "jais-family-1p3b": 0.07, "jais-adapted-13b": 0.03}.get(name, 0.02)
    assert abs(n - nominal) / nominal < tol, (name, n)


def test_presets_complete():
    for base in ("590m", "1p3b", "2p7b", "6p7b", "13b", "30b-8k", "30b-16k"):
        assert f"jais-family-{base}" in PRESETS and f"jais-family-{base}-chat" in PRESETS
    for name in ("jais-13b", "jais-30b-v3", "jais-adapted-7b", "jais-adapted-13b", "jais-adapted-70b", "allam-2-7b"):
        assert name in PRESETS
    c = Config.from_name("jais-adapted-70b")
    assert (c.n_embd, c.n_inner, c.n_layer, c.n_head, c.n_kv_head, c.vocab_size) == (8192, 28672, 80, 64, 8, 64000)
    c = Config.from_name("jais-family-590m")
    assert math.isclose(c.logits_scale, 1.09518349815769 * 256 / 1536) and c.attn_scale_power == 1.0
    with pytest.raises(KeyError, match="unknown model preset"):
        Config.from_name("jais-family-7b")


def test_config_hf_round_trip():
    for name in ("jais-family-590m", "jais-13b", "jais-30b-v3", "allam-2-7b", "jais-adapted-70b", "tiny-jais"):
        c = Config.from_name(name)
        back = Config.from_hf(c.to_hf())
        for f in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "n_inner", "block_size", "norm",
                  "position", "mlp", "bias", "tie_embeddings", "attn_scale_power", "hf_layout"):
            assert getattr(back, f) == getattr(c, f), (name, f)
        assert math.isclose(back.logits_scale, c.logits_scale) and math.isclose(back.embedding_scale, c.embedding_scale)
    legacy = Config.from_name("jais-13b").to_hf()
    assert legacy["width_scale"] == 0.111 and legacy["embeddings_scale"] == 14.6 and legacy["scale_qk_dot_by_d"] is True
    assert legacy["n_inner"] == 13653
    mup = Config.from_name("jais-family-2p7b").to_hf()
    assert math.isclose(mup["mup_width_scale"], 0.1) and mup["mup_scale_qk_dot_by_d"] is True


def test_config_from_hf_alibi_scaling_and_errors():
    d = Config.from_name("tiny-jais").to_hf()
    d["alibi_scaling"] = {"type": "linear", "train_seq_len": 2048}
    assert Config.from_hf(d).alibi_scaling == {"type": "linear", "train_seq_len": 2048}
    with pytest.raises(ValueError, match="unsupported model_type"):
        Config.from_hf({"model_type": "bert"})
    with pytest.raises(ValueError, match="divisible"):
        Config(n_embd=65, n_head=4)


def test_flops_per_token():
    # ALLaM-2-7b by hand: per layer 4*4096^2 (attention) + 3*4096*11008 (MLP) + 2*4096 (norms) = 202,383,360;
    # x 32 layers + 4096 (final norm) = 6,476,271,616; + LM head 64,000*4096 = 6,738,415,616 = N.
    # 6N = 40,430,493,696; attention 12 * 32 layers * 4096 wide * 4096 tokens = 6,442,450,944.
    assert Config.from_name("allam-2-7b").flops_per_token(4096) == 46_872_944_640


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-jais"])
def test_flops_per_token_equals_counted_training_flops(preset):
    """What torch's FLOP counter sees in one forward + backward of the real model equals flops_per_token
    x tokens. Attention runs as SDPA's math decomposition (the counter does not see the CPU flash kernel);
    the formula counts norm and bias parameters as if they were matrix weights (6N), 1.4% of tiny-jais'
    N and negligible at real sizes, hence the tolerance."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    c = Config.from_name(preset)
    model = Transformer(c).init_weights(seed=0)
    B, T = 2, 32
    ids = torch.randint(0, c.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids, targets=ids).backward()
    expected = c.flops_per_token(T) * B * T
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)
    assert counter.get_total_flops() <= expected
