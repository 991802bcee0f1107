"""Weight-only quantisation (dhad.quant): the kernels against hand values and a dequantise-then-matmul
reference, whole models (Llama and Jais layouts, fused q|k|v and gate|up, tied and untied heads, padded
groups), checkpoints saved and loaded, the CLI flags, and clear errors for bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import dhad
from dhad.checkpoint import CheckpointError, load_model, save_model
from dhad.cli import main
from dhad.config import Config
from dhad.generate import SamplingParams, generate_ids
from dhad.model import KVCache, Transformer
from dhad.quant import (Int4Linear, Int8Linear, QuantError, check_scheme, dequantize_int4, dequantize_int8, linear_names,
                        pack_nibbles, quantize, quantize_int4, quantize_int8, unpack_nibbles)

pytestmark = pytest.mark.one_thread


def bf16_matmul_reference(x, w, bias=None):
    """What the weight-only kernels compute, in float32: bfloat16 activations times the dequantised
    weights, accumulated in float32 (the kernels then round the product to bfloat16; the bias is added
    after, in float32). Returns (y, the product before the bias)."""
    mm = x.to(torch.bfloat16).float() @ w.t()
    return (mm if bias is None else mm + bias), mm


def assert_bf16_close(y, ref):
    """Equal up to the bfloat16 rounding of the kernel's product (at most 2^-8 of it, relative; 2^-7
    allowed for the summation order) -- a wrong code, scale or nibble order is off by far more."""
    want, mm = ref
    err = (y - want).abs()
    bound = 2 ** -7 * mm.abs() + 1e-6 * mm.abs().max()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


# -- one matrix --------------------------------------------------------------------------------

def test_int8_codes_and_scales_by_hand():
    # absmax 31.75 -> scale 31.75 / 127 = 0.25 (exact in bfloat16); codes = w / 0.25
    w = torch.tensor([[31.75, -0.5, 1.0, 0.0], [-12.7, 1.27, 0.1, 6.35]])
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16
    assert q[0].tolist() == [127, -2, 4, 0]
    assert s[0].item() == 0.25
    assert q[1, 0].item() == -127  # the row's absmax is +-127
    assert torch.equal(dequantize_int8(q, s)[0], w[0])


def test_int4_codes_scales_zeros_by_hand():
    # a group 0..15 (x 0.5): scale (7.5 - 0) / 15 = 0.5, zero = 0 + 8 * 0.5 = 4, codes = w / 0.5
    w = (torch.arange(32.0) % 16 * 0.5)[None].repeat(16, 1)
    q, s, z = quantize_int4(w, 32)
    assert q.dtype == torch.uint8 and q.shape == (16, 32) and s.shape == z.shape == (16, 1)
    assert q[0].tolist() == [i % 16 for i in range(32)]
    assert s[0, 0].item() == 0.5 and z[0, 0].item() == 4.0
    assert torch.equal(dequantize_int4(q, s, z), w)  # (q - 8) * 0.5 + 4


def test_nibble_packing_by_hand():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    p = pack_nibbles(q)
    assert p.tolist() == [[1 | 2 << 4, 15]]
    assert torch.equal(unpack_nibbles(p), q)


@pytest.mark.parametrize("bias,k", [(True, 96), (False, 96), (True, 172), (False, 40)])
def test_int8_linear_is_a_matmul_with_the_dequantised_weights(bias, k):
    """k = 172, 40: not multiples of 16, where torch's CPU kernel alone returns garbage (the layer pads)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 100, bias=bias)  # 100 rows: not a multiple of anything special
    layer = Int8Linear.from_linear(lin)
    assert layer.state_dict()["weight"].shape == (100, k)
    x = torch.randn(3, 5, k)
    y = layer(x)
    assert y.shape == (3, 5, 100) and y.dtype == torch.float32
    assert_bf16_close(y, bf16_matmul_reference(x, layer.dequantize(), lin.bias))
    # and the dequantised weights are the float ones to within half a step of each row's scale
    err = (layer.dequantize() - lin.weight).abs().amax(1)
    assert (err <= layer.scales.float() / 2 * 1.01).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_is_a_matmul_with_the_dequantised_weights(group):
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 40)  # 40 rows: padded to 48 for the CPU packing, sliced back
    layer = Int4Linear.from_linear(lin, group)
    q, s, z = quantize_int4(lin.weight, group)
    assert torch.equal(layer.codes(), q)  # what the kernel holds is what was quantised
    assert torch.equal(layer.dequantize(), dequantize_int4(q, s, z))
    x = torch.randn(2, 7, 256)
    assert_bf16_close(layer(x), bf16_matmul_reference(x, layer.dequantize(), lin.bias))
    err = (layer.dequantize() - lin.weight).abs().view(40, -1, group).amax(-1)
    assert (err <= s.float() / 2 * 1.05 + 1e-6).all()


def test_int4_pads_input_features_to_whole_groups_exactly():
    torch.manual_seed(2)
    lin = torch.nn.Linear(80, 32)  # 80 = 64 + 16: the second group of 64 is padded with zero columns
    layer = Int4Linear.from_linear(lin, 64)
    assert layer.in_features == 80 and layer.codes().shape == (32, 128)
    w = layer.dequantize()
    assert w.shape == (32, 80)
    x = torch.randn(4, 80)
    assert_bf16_close(layer(x), bf16_matmul_reference(x, w, lin.bias))


def test_bad_schemes_give_clear_errors():
    m = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0)
    with pytest.raises(QuantError, match="unknown quantisation mode 'int3'"):
        quantize(m, "int3")
    with pytest.raises(QuantError, match=r"group size must be one of \[32, 64, 128\], got 48"):
        quantize(m, "int4", group_size=48)
    with pytest.raises(QuantError, match="int8 .* takes no group size"):
        quantize(m, "int8", group_size=64)
    with pytest.raises(QuantError, match="a group size needs quantize='int4'"):
        check_scheme(None, 64)
    with pytest.raises(QuantError, match="group size 64 does not divide the layer's 80 input features"):
        quantize_int4(torch.randn(4, 80), 64)
    assert isinstance(m.lm_head, torch.nn.Linear)  # nothing was changed by the refused calls
    quantize(m, "int8")
    with pytest.raises(QuantError, match="already quantised"):
        quantize(m, "int4")


# -- whole models -------------------------------------------------------------------------------

def tiny(kind: str) -> Transformer:
    return Transformer(Config.from_name(f"tiny-{kind}")).init_weights(seed=0).eval()


@pytest.mark.parametrize("kind", ["llama", "jais"])
@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 64)])
def test_every_linear_is_quantised_and_logits_stay_close(kind, mode, group):
    ref = tiny(kind)
    m = quantize(tiny(kind), mode, group)
    names = linear_names(m)
    assert {"h.0.attn.qkv", "h.0.attn.proj", "h.0.mlp.fc", "h.0.mlp.proj", "lm_head"} <= set(names)
    assert not any(isinstance(mod, torch.nn.Linear) for mod in m.modules())
    assert isinstance(m.lm_head, Int8Linear)  # the head is int8 in both modes
    assert isinstance(m.h[0].mlp.fc, Int8Linear if mode == "int8" else Int4Linear)
    assert m.wte.weight.dtype == torch.float32  # embeddings stay in the model's dtype
    x = torch.randint(0, m.config.vocab_size, (2, 24))
    a, b = ref(x), m(x)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < (0.02 if mode == "int8" else 0.2), rel
    # a model of dequantised float weights gives the same logits, up to the bfloat16 activations
    deq = tiny(kind)
    for n in names:
        deq.get_submodule(n).weight = torch.nn.Parameter(m.get_submodule(n).dequantize())
    c = deq(x)
    assert ((b - c).norm() / c.norm()).item() < 0.02


@pytest.mark.parametrize("kind", ["llama", "jais"])
def test_cached_decoding_and_scoring_paths_run_quantised(kind):
    m = quantize(tiny(kind), "int8")
    prompt = torch.randint(3, m.config.vocab_size, (1, 8))
    out = generate_ids(m, prompt, SamplingParams(max_new_tokens=6, eos_token_id=()))
    assert len(out[0]) == 6
    # a cached decode step gives the logits of re-running the whole sequence
    cache = KVCache.empty(m.config, 1, 32)
    m(prompt, cache=cache)
    nxt = torch.tensor([[5]])
    step = m(nxt, cache=cache)[:, -1]
    full = m(torch.cat([prompt, nxt], 1))[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-2, atol=1e-2 * full.abs().max().item())
    # keep=[B, n] (eval scoring, token trees): the kept rows of the full forward
    keep = torch.tensor([[2, 5, 7]])
    torch.testing.assert_close(m.logits(m.hidden_states(prompt, keep=keep)), m(prompt)[:, [2, 5, 7]],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,mode,group", [("llama", "int8", None), ("jais", "int4", 64), ("llama", "int4", 128)])
def test_quantised_checkpoint_round_trip(tmp_path, kind, mode, group):
    full = tmp_path / "full"
    save_model(tiny(kind), full)
    m = load_model(full, quantize=mode, group_size=group)
    out = save_model(m, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "dhad", "mode": mode, "group_size": group}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("h.0.mlp.fc.weight")
        assert w.dtype == (torch.int8 if mode == "int8" else torch.uint8)
        assert f.get_tensor("lm_head.scales").dtype == torch.bfloat16
        assert f.get_tensor("lm_head.weight").dtype == torch.int8  # the head is int8 in both modes
    assert (out / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    back = load_model(out)  # no flag: the config says it is quantised
    assert back.quantization == {"mode": mode, "group_size": group}
    x = torch.randint(0, m.config.vocab_size, (2, 16))
    assert torch.equal(back(x), m(x))
    for n in linear_names(m):  # the same codes and scales, not just the same logits
        assert torch.equal(back.get_submodule(n).dequantize(), m.get_submodule(n).dequantize())
    assert torch.equal(load_model(out, quantize=mode, group_size=group)(x), m(x))  # asking for what it is: fine
    with pytest.raises(QuantError, match="LoRA adapter on a quantised model is not supported"):
        load_model(out, adapter=tmp_path)
    other = ("int4", 32) if mode == "int8" else ("int8", None)
    with pytest.raises(QuantError, match="already quantised"):
        load_model(out, quantize=other[0], group_size=other[1])


def test_a_bfloat16_model_quantises_and_round_trips(tmp_path):
    save_model(tiny("jais"), tmp_path / "full")
    ref = load_model(tmp_path / "full")
    m = load_model(tmp_path / "full", dtype="bfloat16", quantize="int8")
    assert m.wte.weight.dtype == m.h[0].attn.qkv.bias.dtype == torch.bfloat16
    x = torch.randint(0, m.config.vocab_size, (2, 12))
    y = m(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref(x)).norm() / ref(x).norm()).item() < 0.03
    back = load_model(save_model(m, tmp_path / "q"), dtype="bfloat16")
    assert torch.equal(back(x), y)


def test_a_damaged_quantised_checkpoint_is_named(tmp_path):
    full = tmp_path / "full"
    save_model(tiny("llama"), full)
    out = save_model(load_model(full, quantize="int8"), tmp_path / "q")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(out / "model.safetensors"))
    del sd["h.1.attn.proj.scales"]
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="h.1.attn.proj.scales"):
        load_model(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not one dhad reads"):
        load_model(out)


@torch.no_grad()
def _loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_a_trained_model_keeps_its_perplexity(demo_dir):
    """The demo chat model (trained in seconds): perplexity on its conversations, float32 vs quantised
    (the full measurement on a larger model trained on the corpus: benchmarks/bench_quant_quality.py)."""
    from dhad import prompts
    from dhad.serve.demo import PAIRS
    tok = dhad.load_tokenizer(demo_dir)
    rows = [tok.encode(prompts.render([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "jais",
                                      add_generation_prompt=False)) for q, a in PAIRS]
    T = min(map(len, rows))
    ids = torch.tensor([r[:T] for r in rows])
    base = math.exp(_loss(load_model(demo_dir), ids))
    int8 = math.exp(_loss(load_model(demo_dir, quantize="int8"), ids))
    int4 = math.exp(_loss(load_model(demo_dir, quantize="int4", group_size=32), ids))
    assert base < 3  # it did learn them
    assert abs(int8 / base - 1) < 0.01, (base, int8)
    assert abs(int4 / base - 1) < 0.06, (base, int4)


# -- CLI and serving ---------------------------------------------------------------------------------

def test_cli_quantize_then_generate_without_a_flag(demo_dir, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["quantize", "--model", str(demo_dir), "--out", str(out), "--mode", "int8"]) == 0
    assert "MB of weights" in capsys.readouterr().err
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert main(["info", "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stored_dtype"] == "int8"
    args = ["--prompt", "hello", "--max-new-tokens", "5", "--json"]
    assert main(["generate", "--model", str(out)] + args) == 0
    saved = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", str(demo_dir), "--quantize", "int8"] + args) == 0
    flag = json.loads(capsys.readouterr().out)
    assert saved["text"] == flag["text"] and saved["new_tokens"] == 5


def test_cli_flags_reach_the_model(demo_dir, capsys, monkeypatch):
    import dhad.checkpoint as ckpt
    made = []
    real = ckpt.load_model
    monkeypatch.setattr(ckpt, "load_model", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    args = ["generate", "--model", str(demo_dir), "--prompt", "hi", "--max-new-tokens", "3", "--json"]
    assert main(args + ["--quantize", "int4", "--group-size", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 3
    assert made[-1].quantization == {"mode": "int4", "group_size": 32}
    assert isinstance(made[-1].h[0].mlp.fc, Int4Linear)


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int4", "--group-size", "48"], "group size must be one of [32, 64, 128], got 48"),
    (["--quantize", "int8", "--group-size", "64"], "int8 quantisation is per output channel"),
    (["--group-size", "64"], "--group-size needs --quantize int4"),
])
def test_cli_bad_quantisation_arguments(demo_dir, capsys, argv, message):
    rc = main(["generate", "--model", str(demo_dir), "--prompt", "hi", "--max-new-tokens", "2"] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_cli_unknown_mode_is_refused_by_the_parser(demo_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(demo_dir), "--prompt", "hi", "--quantize", "int3"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_serve_backend_runs_quantised(demo_dir):
    from dhad.serve.backend import load_backend
    b = load_backend(demo_dir, quantize="int4", group_size=32, max_batch_size=2)
    assert b.engine.model.quantization == {"mode": "int4", "group_size": 32}
    with pytest.raises(ValueError, match="native engine"):
        load_backend(demo_dir, engine="vllm", quantize="int8")
    want = generate_ids(b.engine.model, [b.chat_prompt([{"role": "user", "content": "hello"}])],
                        SamplingParams(max_new_tokens=8))[0]
    b.engine.start()
    try:
        got = b.engine.generate(b.chat_prompt([{"role": "user", "content": "hello"}]), SamplingParams(max_new_tokens=8),
                                timeout=60)
    finally:
        b.engine.shutdown()
    assert got.token_ids == list(want)


def test_eval_quantised_records_the_scheme(demo_dir, shared_data, tmp_path, capsys):
    rc = main(["eval", "--model", str(demo_dir), "--tasks", "piqa", "--limit", "4", "--data", str(shared_data),
               "--quantize", "int8", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["model"]["quantization"] == {"mode": "int8", "group_size": None}


@pytest.mark.parametrize("kind", ["llama", "jais"])
def test_multi_lora_adapters_serve_over_a_quantised_base(kind):
    """Serving LoRA adapters (dhad.multi_lora: forward hooks add B A x to a layer's output) over int8 / int4
    layers: the logits of a float model holding the dequantised weights with the adapter merged by hand."""
    from dhad.multi_lora import MultiLoRA, target_slot
    m = quantize(tiny(kind), "int4", 32)
    cfg, g = m.config, torch.Generator().manual_seed(1)
    weights = {}
    for layer in range(cfg.n_layer):
        for t in ("qkv", "o", "gate_up", "down"):
            mod, lo, hi = target_slot(cfg, t)
            fin = cfg.n_inner if mod == "mlp.proj" else cfg.n_embd
            weights[layer, t] = (torch.randn(4, fin, generator=g) * 0.1, torch.randn(hi - lo, 4, generator=g) * 0.1, 2.0)
    merged = tiny(kind)
    with torch.no_grad():
        for n in linear_names(m):
            merged.get_submodule(n).weight = torch.nn.Parameter(m.get_submodule(n).dequantize())
        for (layer, t), (A, B, s) in weights.items():
            mod, lo, hi = target_slot(cfg, t)
            merged.h[layer].get_submodule(mod).weight[lo:hi] += s * B @ A
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    lora = MultiLoRA(m, {"a": weights})
    with torch.no_grad():
        base = m(ids)
        with lora.batch([0, -1]):
            out = m(ids)
        ref = merged(ids)
    lora.remove()
    assert torch.equal(out[1], base[1])  # a row without an adapter: the quantised model
    assert ((out[0] - ref[0]).norm() / ref[0].norm()).item() < 0.02
    assert (out[0] - base[0]).abs().max() > 0.1  # the adapter does change the logits


def test_chat_cli_runs_quantised(demo_dir, monkeypatch, capsys):
    """`dhad chat --quantize int4`: the session's model is int4 and answers as the int4 model does."""
    import io

    import dhad.serve.backend as backend_mod
    from dhad.generate import generate_text
    made = []
    real = backend_mod.load_backend
    monkeypatch.setattr(backend_mod, "load_backend", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    assert main(["chat", "--model", str(demo_dir), "--quantize", "int4", "--group-size", "32",
                 "--max-new-tokens", "20"]) == 0
    assert made[0].engine.model.quantization == {"mode": "int4", "group_size": 32}
    m = load_model(demo_dir, quantize="int4", group_size=32)
    want = generate_text(m, dhad.load_tokenizer(demo_dir), [{"role": "user", "content": "hello"}], max_new_tokens=20)
    assert capsys.readouterr().out.split("\n")[0] == want


def test_a_gguf_file_loads_quantised(demo_dir, tmp_path):
    """`--quantize` on a GGUF (e.g. from Ollama): dequantised by dhad.gguf, then dhad's int8 / int4 layers."""
    from dhad.gguf import export_gguf
    f = export_gguf(load_model(demo_dir), dhad.load_tokenizer(demo_dir), tmp_path / "demo.gguf", type="f16")
    ref = load_model(f)
    m = load_model(f, quantize="int8")
    assert m.quantization == {"mode": "int8", "group_size": None} and isinstance(m.lm_head, Int8Linear)
    x = torch.randint(0, m.config.vocab_size, (1, 12))
    assert ((m(x) - ref(x)).norm() / ref(x).norm()).item() < 0.02
    with pytest.raises(QuantError, match="group size must be one of"):
        load_model(f, quantize="int4", group_size=16)


def test_serve_cli_quantize_errors(demo_dir, capsys):
    assert main(["serve", "--model", str(demo_dir), "--engine", "vllm", "--quantize", "int8"]) == 2
    assert "--quantize is for the native engine" in capsys.readouterr().err
    assert main(["serve", "--model", str(demo_dir), "--quantize", "int4", "--group-size", "100"]) == 2
    assert "group size must be one of [32, 64, 128], got 100" in capsys.readouterr().err
