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
pytestmark = pytest.mark.one_thread  # tiny models: see conftest._one_thread

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


# ---------------------------------------------------------------------------------------------
# Jais: PEFT's format over the published Jais names, round trip, merge

def test_jais_adapter_round_trip_uses_jais_names_and_merges(tmp_path):
    from safetensors import safe_open
    model = Transformer(Config.from_name("tiny-jais")).init_weights(seed=1).eval()
    dhad.save_model(model, tmp_path / "base")
    model = dhad.load_model(tmp_path / "base")
    with pytest.raises(LoraError, match="q, k and v together"):
        apply_lora(dhad.load_model(tmp_path / "base"), LoraConfig(targets=("q", "v")))
    apply_lora(model, LoraConfig(r=2, alpha=4, targets=("q", "k", "v", "o", "gate", "up", "down")), seed=3)
    with torch.no_grad():
        for m in lora_layers(model).values():
            for b in m.lora_B.values():
                b.normal_(0, 0.2)
    save_adapter(model, tmp_path / "a")
    # keys are PEFT's over the HF Jais module names, A [r, in] / B [out, r] against the Conv1D [in, out] weights
    with safe_open(str(tmp_path / "base" / "model.safetensors"), framework="pt") as f:
        base_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        for k in keys:
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            w_in, w_out = base_shapes[mod + ".weight"]
            shape = tuple(f.get_slice(k).get_shape())
            assert shape == ((2, w_in) if ".lora_A." in k else (w_out, 2)), k
    assert len(keys) == 2 * 5 * 2 and "base_model.model.transformer.h.1.mlp.c_fc2.lora_B.weight" in keys
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and "c_attn" in cfg["target_modules"]
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        want = model(ids)
        back = dhad.load_model(tmp_path / "base", adapter=tmp_path / "a")
        assert (back(ids) - want).abs().max() < 1e-6
        assert (back(ids) - dhad.load_model(tmp_path / "base")(ids)).abs().max() > 1e-3
        dhad.save_model(merge_lora(back), tmp_path / "merged")
        assert (dhad.load_model(tmp_path / "merged")(ids) - want).abs().max() < 1e-5


def test_read_adapter_keys_and_bad_adapters(llama_dir, tmp_path):
    model = apply_lora(dhad.load_model(llama_dir), LoraConfig(r=2, targets=("k", "down")))
    save_adapter(model, tmp_path / "a")
    cfg, w = read_adapter(tmp_path / "a")
    assert cfg.r == 2 and cfg.targets == ("k", "down") and cfg.scaling == 8.0
    assert set(w) == {(f"h.{i}.{m}", s) for i in range(2) for m, s in (("attn.qkv", "k"), ("mlp.proj", "down"))}
    a, b = w[("h.0.attn.qkv", "k")]
    assert a.shape == (2, 64) and b.shape == (32, 2)  # tiny-llama: 2 KV heads of 16
    with pytest.raises(LoraError, match="adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    with pytest.raises(LoraError, match="use_dora"):
        read_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(LoraError, match="rank r=4"):
        read_adapter(tmp_path / "a")
    jais = Transformer(Config.from_name("tiny-jais"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(LoraError, match="other layout"):
        load_adapter(jais, tmp_path / "a")


# ---------------------------------------------------------------------------------------------
# QLoRA: NF4 against the paper's table, by hand

# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023, appendix E).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def _nf4_by_hand(w):
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    code = ((blocks / absmax)[..., None] - NF4).abs().argmin(-1)
    return code, absmax


def test_nf4_dequantised_weights_equal_the_nf4_rounding_by_hand():
    pytest.importorskip("bitsandbytes")
    from dhad.lora import dequantize_nf4, quantize_nf4
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    code, absmax = _nf4_by_hand(w)
    packed, st = quantize_nf4(w, double_quant=False)
    assert packed.numel() * 2 == w.numel() and packed.dtype == torch.uint8
    got = dequantize_nf4(packed, st).reshape(-1, 64)
    assert torch.allclose(got, NF4[code] * absmax, rtol=1e-6, atol=0)
    # double quantisation: the same codes, each block's scale now an 8-bit approximation of its absmax
    packed2, st2 = quantize_nf4(w, double_quant=True)
    got2 = dequantize_nf4(packed2, st2).reshape(-1, 64)
    nz = NF4[code] != 0
    scale = torch.where(nz, got2 / NF4[code].where(nz, torch.ones(())), torch.nan)
    per_block = scale.nanmean(1, keepdim=True)
    assert torch.allclose(scale[nz], per_block.expand_as(scale)[nz], rtol=1e-5)
    assert ((per_block - absmax).abs() / absmax).max() < 0.02
    assert (got2[~nz] == 0).all()


# ---------------------------------------------------------------------------------------------
# Recipes: the peft block in sft and dpo runs

def _sft_world(root, vocab=512, n=160, seq=48):
    """A tiny-llama base directory and packed SFT shards of a learnable task (answer = the prompt reversed)."""
    from dhad.data.shards import Example, ShardWriter, pack_examples
    dhad.save_model(Transformer(Config.from_name("tiny-llama", block_size=64)).init_weights(seed=0), root / "base")
    g = torch.Generator().manual_seed(0)
    exs = []
    for _ in range(n):
        p = torch.randint(3, 40, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        a = p[::-1] + [2]
        exs.append(Example(ids=[1] + p + [40] + a, mask=[0] * (len(p) + 2) + [1] * len(a)))
    for split, part in (("validation", exs[:16]), ("train", exs[16:])):
        with ShardWriter(root / "sft", split, "sft", vocab_size=vocab, eos_token_id=2, seq_len=seq, packed=True) as w:
            for t, m, s in pack_examples(part, seq, 0):
                w.add(t, mask=m, segments=s)
    return root


@pytest.fixture(scope="module")
def sft_world(tmp_path_factory):
    return _sft_world(tmp_path_factory.mktemp("lora-sft"))


def _sft_recipe(world, steps, peft_block, precision="fp32", **kw):
    from dhad.train.recipe import parse_recipe
    d = dict(type="sft", name="lora", seed=5, model={"init_from": str(world / "base")},
             data={"sources": {"chat": str(world / "sft")}}, peft=peft_block,
             optimizer={"lr": 1e-2, "weight_decay": 0.0}, schedule={"warmup_steps": 2, "total_steps": steps},
             batch={"micro_batch_size": 8, "grad_accum": 1}, precision=precision, eval_every=0, eval_batches=1,
             checkpoint_every=0, log_every=1, peak_flops=1e11)
    d.update(kw)
    return parse_recipe(d)


def _losses(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in recs if x.get("event") == "step"]


def test_lora_sft_run_trains_only_adapters_writes_a_peft_adapter_and_resumes(sft_world, tmp_path):
    from dhad.train.loop import train
    peft_block = {"r": 4, "alpha": 8, "targets": ["q", "v", "o", "up", "down"]}
    res = train(_sft_recipe(sft_world, 6, peft_block), run_dir=tmp_path / "full", progress=False)
    assert res.model_dir is None and res.adapter_dir == tmp_path / "full" / "adapter"
    losses = _losses(tmp_path / "full")
    assert len(losses) == 6 and losses[-1] < losses[0]
    base = dhad.load_model(sft_world / "base")
    trained = res.model
    for n, p in base.named_parameters():  # the base did not move, bit for bit
        assert torch.equal(p, trained.get_parameter(n)), n
    # what the run wrote is the adapter: loaded onto the base it is the trained model
    ids = torch.randint(3, 40, (2, 12))
    with torch.no_grad():
        want = trained.eval()(ids)
        assert (dhad.load_model(sft_world / "base", adapter=res.adapter_dir)(ids) - want).abs().max() < 1e-5
    assert (res.checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    # interrupted at step 3 and resumed: the same loss sequence
    train(_sft_recipe(sft_world, 6, peft_block), run_dir=tmp_path / "cut", progress=False, stop_at=3)
    train(_sft_recipe(sft_world, 6, peft_block), run_dir=tmp_path / "cut", progress=False, resume=True)
    assert _losses(tmp_path / "cut") == pytest.approx(losses, rel=1e-6)


def test_only_adapter_parameters_are_in_the_optimizer():
    from dhad.train.optim import build_optimizer
    from dhad.train.recipe import OptimizerSpec
    model = apply_lora(Transformer(Config.from_name("tiny-jais")), LoraConfig(r=2, targets=("q", "k", "v", "down")))
    opt = build_optimizer(model, OptimizerSpec(), model.config, adapters_only=True)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in trainable_parameters(model)} and len(in_opt) == 2 * 2 * 2
    assert all(g.get("lr_mult", 1.0) == 1.0 for g in opt.param_groups)  # no muP multiplier on adapters


def test_qlora_loss_tracks_bf16_lora_within_2_percent_after_200_steps(sft_world, tmp_path):
    """The tiny recipe, 200 steps each: LoRA over the bf16-autocast base and QLoRA over its NF4 copy."""
    pytest.importorskip("bitsandbytes")
    from dhad.train.loop import train
    block = {"r": 8, "alpha": 16, "targets": ["q", "k", "v", "o", "gate", "up", "down"]}
    kw = dict(optimizer={"lr": 5e-3, "weight_decay": 0.0}, eval_batches=0)
    lora = train(_sft_recipe(sft_world, 200, block, "bf16", **kw), run_dir=tmp_path / "lora", progress=False,
                 save_final=False)
    q = train(_sft_recipe(sft_world, 200, {**block, "quantize": "nf4"}, "bf16", **kw), run_dir=tmp_path / "qlora",
              progress=False, save_final=False)
    assert any(m.quant_state is not None for m in lora_layers(q.model).values())
    a, b = _losses(tmp_path / "lora"), _losses(tmp_path / "qlora")
    end_a, end_b = sum(a[-20:]) / 20, sum(b[-20:]) / 20
    assert end_a < sum(a[:5]) / 5 - 0.3  # it learned (a random-init base: slowly)
    assert abs(end_b - end_a) / end_a < 0.02, (end_a, end_b)


def test_lora_dpo_reference_is_the_base_with_adapters_off(tmp_path):
    """DPO with a peft block: the 'frozen' reference is the policy with its adapters off (no second model),
    and gives the same run as reference log-probs precomputed from the base."""
    from test_dpo import _random_pairs, _write_prefs

    from dhad.train.dpo import DPOObjective
    from dhad.train.loop import train
    from dhad.train.recipe import parse_recipe
    dhad.save_model(Transformer(Config.from_name("tiny-llama", block_size=64)).init_weights(seed=0), tmp_path / "sft")
    _write_prefs(tmp_path / "prefs", "train", _random_pairs(32, 1))
    _write_prefs(tmp_path / "prefs", "validation", _random_pairs(8, 2))
    made = []
    orig = DPOObjective.setup

    def spy(self, *a, **k):
        orig(self, *a, **k)
        made.append(self)
    runs = {}
    try:
        DPOObjective.setup = spy
        for mode in ("precomputed", "frozen"):
            r = parse_recipe(dict(
                type="dpo", name=mode, seed=7, model={"init_from": str(tmp_path / "sft")},
                data={"sources": {"syn": str(tmp_path / "prefs")}, "val_split": "validation"},
                objective={"beta": 0.1, "reference": mode}, peft={"r": 4, "alpha": 8, "targets": ["q", "v", "down"]},
                optimizer={"lr": 1e-2, "weight_decay": 0.0}, schedule={"total_steps": 4, "warmup_steps": 1},
                batch={"micro_batch_size": 4, "grad_accum": 2, "seq_len": 32}, precision="fp32",
                eval_every=0, eval_batches=1, checkpoint_every=0, log_every=1, peak_flops=1e11))
            train(r, run_dir=tmp_path / mode, progress=False)
            recs = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
            runs[mode] = [x for x in recs if x.get("event") == "step"]
    finally:
        DPOObjective.setup = orig
    frozen = made[-1]
    assert frozen.ref_adapters_off and frozen.ref_model is None  # no copy of the model was made
    a, b = runs["precomputed"], runs["frozen"]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "kl"):
            assert abs(x[k] - y[k]) < 1e-5, (k, x[k], y[k])
    assert a[-1]["rewards/margin"] != 0.0  # the adapters moved the policy away from the base
    assert (tmp_path / "frozen" / "adapter" / "adapter_config.json").is_file()


def test_cli_adapt_merge_writes_a_checkpoint_transformers_reads(llama_dir, tmp_path, capsys):
    from dhad.cli import main
    pm = peft_model(llama_dir, ("q", "o", "gate", "down"))
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        want = pm(ids).logits
    assert main(["adapt", "merge", "--model", str(llama_dir), "--adapter", str(tmp_path / "peft"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(ids).logits - want).abs().max() < 1e-5
    # a missing or broken adapter is a clear error (exit 2), not a traceback
    assert main(["adapt", "merge", "--model", str(llama_dir), "--adapter", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "m2")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("patch,match", [
    ({"type": "pretrain", "batch": {"micro_batch_size": 1, "seq_len": 8}}, r"peft: LoRA adapters are for sft and dpo"),
    ({"peft": {"targets": ["q", "qq"]}}, r"peft\.targets: names among"),
    ({"peft": {"r": 0}}, r"peft\.r: r must be a positive integer"),
    ({"peft": {"dropout": 1.5}}, r"peft\.dropout"),
    ({"peft": {"quantize": "int4"}}, r"peft\.quantize: must be nf4"),
    ({"peft": {"quantize": "nf4"}, "distributed": "fsdp"}, r"peft\.quantize: nf4 \(QLoRA\) is a one-device method"),
    ({"peft": {"rank": 8}}, r"peft: unknown key\(s\) \['rank'\]"),
    ({"peft": {"method": "ia3"}}, r"peft\.method: only 'lora'"),
])
def test_bad_peft_blocks_name_the_field(patch, match):
    from dhad.train.recipe import RecipeError, parse_recipe
    d = dict(type="sft", model={"preset": "tiny-llama"}, data={"sources": {"chat": "sft"}}, peft={},
             schedule={"total_steps": 4})
    d.update(patch)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(d)


def test_shipped_lora_recipes():
    from dhad.train.recipe import find_recipe, load_recipe
    for name in ("allam-2-7b-chat-lora", "allam-2-7b-chat-qlora", "jais-family-590m-chat-lora",
                 "jais-family-6p7b-chat-lora", "allam-2-7b-dpo-lora", "tiny-lora-sft", "tiny-qlora-sft", "tiny-lora-dpo"):
        r = load_recipe(find_recipe(name))
        assert r.peft is not None and r.type in ("sft", "dpo") and set(r.peft.targets) == set(
            ("q", "k", "v", "o", "gate", "up", "down")), name
        assert (r.peft.quantize == "nf4") == ("qlora" in name), name
        if r.type == "dpo":
            assert r.objective["reference"] == "frozen"  # = the base with adapters off
    big = load_recipe(find_recipe("allam-2-7b-chat-lora"))  # the QLoRA paper's 7B values
    assert (big.peft.r, big.peft.alpha, big.peft.dropout, big.optimizer.lr, big.clip_grad) == (64, 16, 0.1, 2e-4, 0.3)


@pytest.mark.slow
def test_lora_under_fsdp2_two_processes_equals_one_process(sft_world, tmp_path):
    """torchrun, 2 CPU processes (gloo), FSDP2: the adapters shard with their blocks, the losses are the
    1-process run's and the adapter written (gathered from the shards) is the same."""
    import yaml
    from safetensors.torch import load_file
    from test_train_dist import _close, _losses, _torchrun

    from dhad.train.loop import train
    recipe = dict(type="sft", seed=5, model={"init_from": str(sft_world / "base")},
                  data={"sources": {"chat": str(sft_world / "sft")}},
                  peft={"r": 4, "alpha": 8, "targets": ["q", "k", "v", "o", "gate", "up", "down"]},
                  optimizer={"lr": 1e-2, "weight_decay": 0.0, "fused": False},
                  schedule={"warmup_steps": 1, "total_steps": 3},
                  batch={"micro_batch_size": 2, "global_batch_size": 8}, precision="fp32", eval_batches=0,
                  peak_flops=1e12)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ref = train(path, run_dir=tmp_path / "one", progress=False)
    recs = _torchrun(tmp_path, path, tmp_path / "fsdp", "--set", "distributed=fsdp")
    assert next(r for r in recs if r["event"] == "start")["strategy"] == "fsdp"
    _close(_losses(recs), ref.losses)
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys() and len(one) == 2 * 2 * 7
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k


def test_a_lora_target_the_model_cannot_take_is_a_clear_train_error(tmp_path):
    from dhad.train.loop import TrainError, train
    from dhad.train.recipe import parse_recipe
    dhad.save_model(Transformer(Config.from_name("tiny-jais")).init_weights(seed=0), tmp_path / "jais")
    _sft_world(tmp_path)  # shards of vocabulary 512, as tiny-jais
    r = parse_recipe(dict(type="sft", model={"init_from": str(tmp_path / "jais")},
                          data={"sources": {"chat": str(tmp_path / "sft")}}, peft={"targets": ["q", "v"]},
                          schedule={"total_steps": 2}, eval_batches=0, peak_flops=1e11))
    with pytest.raises(TrainError, match=r"peft: .*target q, k and v together"):
        train(r, run_dir=tmp_path / "run", progress=False)
