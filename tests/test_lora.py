"""LoRA against PEFT (forward, every adapter gradient, adapter files both ways), the Jais round trip,
QLoRA's NF4 against a hand-computed NF4 rounding, and LoRA in the training recipes."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import dhad
from dhad.config import Config
from dhad.lora import (LoraConfig, LoraError, apply_lora, load_adapter, lora_disabled, lora_layers, merge_lora,
                       read_adapter, save_adapter, trainable_parameters)
from dhad.model import Transformer

peft = pytest.importorskip("peft")  # the test extra: tests/test_dependencies.py checks it is declared

HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}
DHAD_OF = {"q_proj": ("attn.qkv", "q"), "k_proj": ("attn.qkv", "k"), "v_proj": ("attn.qkv", "v"),
           "o_proj": ("attn.proj", "o"), "gate_proj": ("mlp.fc", "gate"), "up_proj": ("mlp.fc", "up"),
           "down_proj": ("mlp.proj", "down")}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    dhad.save_model(Transformer(Config.from_name("tiny-llama")).init_weights(seed=3), d)
    return d


def peft_model(model_dir, targets, r=4, alpha=8.0, rslora=False, seed=0):
    """A transformers Llama with a PEFT LoRA whose A and B are all random (B = 0 would hide A's gradient)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pc = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=rslora,
                         target_modules=[HF_NAMES[t] for t in targets], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def dhad_grads(model):
    out = {}
    for name, m in lora_layers(model).items():
        for s in m.rows:
            out[(name, s, "A")] = m.lora_A[s].grad
            out[(name, s, "B")] = m.lora_B[s].grad
    return out


def peft_grads(pm):
    out = {}
    for n, p in pm.named_parameters():
        if "lora_" in n:  # base_model.model.model.layers.N.<self_attn|mlp>.X_proj.lora_A.default.weight
            parts = n.split(".")
            layer, proj, ab = int(parts[4]), parts[6], parts[7][-1]
            mod, sub = DHAD_OF[proj]
            out[(f"h.{layer}.{mod}", sub, ab)] = p.grad
    return out


@pytest.mark.parametrize("targets,rslora", [(("q", "k", "v", "gate", "up"), False),   # fused dhad layers
                                            (("o", "down"), True),                   # unfused ones
                                            (("k", "o", "up"), False)])              # part of a fused layer
def test_forward_and_every_adapter_gradient_equal_peft(llama_dir, tmp_path, targets, rslora):
    pm = peft_model(llama_dir, targets, rslora=rslora)
    pm.save_pretrained(tmp_path / "peft")
    model = load_adapter(dhad.load_model(llama_dir), tmp_path / "peft")
    assert model.lora_config.rslora == rslora and set(model.lora_config.targets) == set(targets)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 11, 512, generator=torch.Generator().manual_seed(2))
    ref = pm(ids).logits
    got = model(ids)
    assert (ref - got).abs().max() < 1e-5
    (ref * w).sum().backward()
    (got * w).sum().backward()
    pg, dg = peft_grads(pm), dhad_grads(model)
    assert set(pg) == set(dg) and len(dg) == 2 * 2 * len(targets)
    for k in pg:
        assert (pg[k] - dg[k]).abs().max() < 1e-5 * max(1.0, pg[k].abs().max().item()), k
    # only the adapters train; every other parameter is frozen
    assert {id(p) for p in trainable_parameters(model)} == {
        id(p) for m in lora_layers(model).values() for p in [*m.lora_A.values(), *m.lora_B.values()]}
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_dhad_adapter_loads_in_peft_and_merges_like_it(llama_dir, tmp_path):
    model = dhad.load_model(llama_dir)
    apply_lora(model, LoraConfig(r=4, alpha=16, targets=("q", "v", "o", "gate", "up", "down")), seed=5)
    with torch.no_grad():  # B = 0 at init: give the adapter something to say
        for m in lora_layers(model).values():
            for b in m.lora_B.values():
                b.normal_(0, 0.1)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        ref, got = pm(ids).logits, model(ids)
        assert (ref - got).abs().max() < 1e-5
        base = dhad.load_model(llama_dir)(ids)
        assert (got - base).abs().max() > 1e-3
        with lora_disabled(model):  # adapters off = the base
            assert (model(ids) - base).abs().max() < 1e-6
        merged_ref = pm.merge_and_unload()(ids).logits
        merge_lora(model)
        assert not lora_layers(model)
        assert (model(ids) - merged_ref).abs().max() < 1e-5
