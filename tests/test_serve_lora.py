"""Serving LoRA adapters: several adapters and the base model batched together (dhad.multi_lora, the
engine, `dhad serve --adapter NAME=DIR`).

The references are independent of dhad's LoRA code: PEFT's own adapters (made with `peft` on the
transformers `LlamaForCausalLM` that loads dhad's checkpoint), merged with PEFT's `merge_and_unload`,
decoded greedily by transformers; and, for the fused targets PEFT cannot express on Llama, the merge
W + scale * B @ A done by hand in the test.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dhad.checkpoint import save_model
from dhad.config import Config
from dhad.engine import Engine, UnknownAdapter
from dhad.model import Transformer
from dhad.multi_lora import MultiLoRA, target_slot

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

NO_EOS = dict(eos_token_id=())
PEFT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}


def _tokenizer():
    from dhad.tokenizer import train_bpe
    return train_bpe(["x"], vocab_size=256 + 3, min_frequency=1)


def _peft_adapter(hf_dir, out_dir, seed, **lora_kw):
    """A PEFT adapter over the transformers model of ``hf_dir``, with random (non-zero) A and B, saved in
    PEFT's format; returns the PEFT model."""
    base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():  # PEFT's default init of B is kaiming-uniform; keep deltas moderate
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    pm.save_pretrained(out_dir)
    return pm.eval()


def _weights_of(pm) -> dict:
    """{(layer, target): (A, B, scale)} read off a PEFT model's modules in memory."""
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            layer = int(name.split(".layers.")[1].split(".")[0])
            target = PEFT_TARGETS[name.rsplit(".", 1)[1]]
            out[layer, target] = (mod.lora_A["default"].weight.detach().clone(),
                                  mod.lora_B["default"].weight.detach().clone(), mod.scaling["default"])
    return out


def _hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = _tokenizer()
    cfg = Config.from_name("tiny-llama", vocab_size=tok.vocab_size)
    model = Transformer(cfg).init_weights(seed=0).eval()
    d = tmp_path_factory.mktemp("lora-base")
    save_model(model, d, tokenizer=tok)
    every = list(PEFT_TARGETS)
    pa = _peft_adapter(d, tmp_path_factory.mktemp("alpha"), 1, r=4, lora_alpha=8, target_modules=every)
    pb = _peft_adapter(d, tmp_path_factory.mktemp("beta"), 2, r=8, lora_alpha=4, use_rslora=True,
                       target_modules=["q_proj", "v_proj", "up_proj"])
    refs = {"alpha": copy.deepcopy(pa).merge_and_unload(), "beta": copy.deepcopy(pb).merge_and_unload(),
            None: transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()}
    weights = {"alpha": _weights_of(pa), "beta": _weights_of(pb)}
    return dict(tok=tok, model=model, dir=d, refs=refs, weights=weights,
                dirs={"alpha": pa.peft_config and pa, "beta": pb})


PROMPTS = [([5, 6, 7, 8, 9], "alpha"), ([40, 41, 42], None), ([100, 7, 3, 9, 200, 31, 2], "beta"),
           ([11, 12], "alpha"), ([250, 1, 77, 3], "beta"), ([9, 9, 9, 9, 9, 9], None)]
N_NEW = 8


def test_mixed_adapter_batch_equals_each_alone_and_the_merged_model(setup):
    model, tok, refs = setup["model"], setup["tok"], setup["refs"]
    want = [_hf_greedy(refs[a], p, N_NEW) for p, a in PROMPTS]
    # the adapters matter: each changes the greedy answer of some prompt
    for name in ("alpha", "beta"):
        assert any(_hf_greedy(refs[None], p, N_NEW) != w for (p, a), w in zip(PROMPTS, want) if a == name)
    eng = Engine(model, tok, max_batch_size=8, adapters=setup["weights"]).start()
    try:
        with eng._cv:  # hold the loop back until every request is queued: one prefill, one decode batch
            hs = [eng.submit(p, max_new_tokens=N_NEW, adapter=a, **NO_EOS) for p, a in PROMPTS]
        mixed = [h.result(60).token_ids for h in hs]
        st = eng.stats()
        assert st["decode_steps"] == N_NEW - 1 and st["adapters"] == ["alpha", "beta"]  # all rows decoded together
        alone = [eng.generate(p, max_new_tokens=N_NEW, adapter=a, timeout=60, **NO_EOS).token_ids for p, a in PROMPTS]
    finally:
        eng.shutdown()
    assert mixed == alone
    assert mixed == want


def _random_adapter(cfg, targets, r, scale, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(cfg.n_layer):
        for t in targets:
            mod, lo, hi = target_slot(cfg, t)
            fin = cfg.n_inner if mod == "mlp.proj" else cfg.n_embd
            out[layer, t] = (torch.randn(r, fin, generator=g) * 0.1, torch.randn(hi - lo, r, generator=g) * 0.1, scale)
    return out


def _merged_by_hand(model, weights):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, t), (A, B, s) in weights.items():
            mod, lo, hi = target_slot(m.config, t)
            part, name = mod.split(".")
            lin = getattr(getattr(m.h[layer], part), name)
            lin.weight[lo:hi] += s * B @ A
    return m


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-jais"])
def test_batched_forward_equals_merged_weights_fused_targets_too(preset):
    """Per-row logits of a mixed batch (adapters over the fused qkv / gate|up, over sub-projections,
    and the base) equal the model with that adapter merged by hand; base rows are untouched exactly."""
    cfg = Config.from_name(preset)
    model = Transformer(cfg).init_weights(seed=0).eval()
    a = _random_adapter(cfg, ["qkv", "o", "gate_up", "down"], 4, 2.0, 1)
    b = _random_adapter(cfg, ["q", "v", "up"], 8, 0.5, 2)
    ids = torch.randint(0, cfg.vocab_size, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids)
        ref = [_merged_by_hand(model, a)(ids[:1]), None, _merged_by_hand(model, b)(ids[2:3]),
               _merged_by_hand(model, a)(ids[3:])]
        lora = MultiLoRA(model, {"a": a, "b": b})
        with lora.batch([0, -1, 1, 0]):
            out = model(ids)
        assert torch.equal(model(ids), base)  # outside `batch`: the plain model
    for i in (0, 2, 3):
        torch.testing.assert_close(out[i], ref[i][0], rtol=0, atol=1e-5)
        assert (out[i] - base[i]).abs().max() > 1e-2  # the adapter does change the logits
    assert torch.equal(out[1], base[1])
    lora.remove()
    assert torch.equal(model(ids), base)


def test_bad_adapters_and_requests_are_refused(setup):
    model, cfg = setup["model"], setup["model"].config
    with pytest.raises(ValueError, match="do not fit"):
        MultiLoRA(model, {"x": {(0, "q"): (torch.zeros(4, 3), torch.zeros(64, 4), 1.0)}})
    with pytest.raises(ValueError, match="not a projection"):
        MultiLoRA(model, {"x": {(0, "c_attn"): (torch.zeros(4, 64), torch.zeros(64, 4), 1.0)}})
    with pytest.raises(ValueError, match="layer 9"):
        MultiLoRA(model, {"x": {(9, "o"): (torch.zeros(4, 64), torch.zeros(64, 4), 1.0)}})
    lora = MultiLoRA(model, {"x": _random_adapter(cfg, ["q"], 2, 1.0, 0)})
    try:
        with lora.batch([0]), pytest.raises(ValueError, match="keep"):
            model(torch.tensor([[1, 2, 3]]), keep=torch.tensor([[1]]))
    finally:
        lora.remove()
    eng = Engine(model, setup["tok"], adapters=setup["weights"]).start()
    try:
        with pytest.raises(UnknownAdapter, match="unknown adapter 'gamma'.*'alpha', 'beta'"):
            eng.submit([1, 2], adapter="gamma")
    finally:
        eng.shutdown()
