"""Checkpoint I/O: HF round trips both ways, Jais layout, sharding, dtypes, and the error cases."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

import dhad
from dhad.checkpoint import CheckpointError
from dhad.config import Config
from dhad.model import Transformer

transformers = pytest.importorskip("transformers")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    cfg = Config.from_name("tiny-llama")
    model = Transformer(cfg).init_weights(seed=3).eval()
    dhad.save_model(model, tmp_path / "m")
    return model, tmp_path / "m"


def keys_and_shapes(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def test_dhad_saved_llama_loads_in_transformers(tiny_llama_dir):
    model, d = tiny_llama_dir
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert type(ref).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max() <= 1e-4


def test_dhad_saved_rope_scaling_loads_in_transformers(tmp_path):
    cfg = Config.from_name("tiny-llama", rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_embeddings=True)
    model = Transformer(cfg).init_weights(seed=4).eval()
    dhad.save_model(model, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["jais-family-mup", "jais-width-scale-6heads", "jais-learned-gelu"])
def test_jais_resave_keeps_layout(fixtures_dir, tmp_path, case):
    src = fixtures_dir / "parity" / case
    model = dhad.load_model(src)
    dhad.save_model(model, tmp_path)
    ignored = ("relative_pe.slopes", ".attn.bias", ".attn.masked_bias", "lm_head.weight")
    want = {k: v for k, v in keys_and_shapes(src).items() if not k.endswith(ignored)}
    got = keys_and_shapes(tmp_path)
    assert got == want
    saved = json.loads((tmp_path / "config.json").read_text())
    orig = json.loads((src / "config.json").read_text())
    for k in ("model_type", "n_embd", "n_head", "n_layer", "n_inner", "vocab_size", "position_embedding_type",
              "activation_function", "mup_width_scale", "mup_embeddings_scale", "mup_output_alpha",
              "mup_scale_qk_dot_by_d", "width_scale", "embeddings_scale", "scale_qk_dot_by_d"):
        if orig.get(k) is not None:
            assert saved[k] == orig[k], k
    again = dhad.load_model(tmp_path)
    ids = torch.from_numpy(np.load(src / "input_ids.npy"))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_sharded_round_trip(tiny_llama_dir, tmp_path):
    model, _ = tiny_llama_dir
    out = dhad.save_model(model, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    assert not (out / "model.safetensors").exists()
    back = dhad.load_model(out)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert (ref(ids).logits - back(ids)).abs().max() <= 1e-4


def test_bf16_round_trip(tiny_llama_dir, tmp_path):
    model, d = tiny_llama_dir
    dhad.save_model(model, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as h:
        assert h.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = dhad.load_model(tmp_path / "bf16", dtype="bfloat16")
    assert back.dtype == torch.bfloat16
    for p1, p2 in zip(model.parameters(), back.parameters()):
        assert torch.equal(p1.to(torch.bfloat16), p2)
    fp16 = dhad.load_model(tmp_path / "bf16", dtype="float16")
    assert fp16.dtype == torch.float16


def test_tied_jais_saves_no_lm_head(tmp_path):
    model = Transformer(Config.from_name("tiny-jais")).init_weights(seed=0)
    dhad.save_model(model, tmp_path)
    assert "lm_head.weight" not in keys_and_shapes(tmp_path)
    back = dhad.load_model(tmp_path)
    assert back.lm_head.weight is back.wte.weight


# -- errors ----------------------------------------------------------------------------------

def test_refuses_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Config.from_name("tiny-llama").to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="refuses to load pickles"):
        dhad.load_model(tmp_path)


def test_truncated_file(tiny_llama_dir, tmp_path):
    _, d = tiny_llama_dir
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        dhad.load_model(bad)


def test_corrupt_header(tiny_llama_dir, tmp_path):
    _, d = tiny_llama_dir
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        dhad.load_model(bad)


def test_missing_tensor_and_shape_mismatch(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    _, d = tiny_llama_dir
    tensors = load_file(str(d / "model.safetensors"))
    missing = tmp_path / "missing"
    shutil.copytree(d, missing)
    t = dict(tensors)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        dhad.load_model(missing)
    wrong = tmp_path / "wrong"
    shutil.copytree(d, wrong)
    t = dict(tensors)
    t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(t, str(wrong / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj.weight \(64, 32\).*expects.*\(64, 64\)"):
        dhad.load_model(wrong)


def test_missing_dir_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        dhad.load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dhad.load_model(tmp_path)


def test_atomic_save_leaves_previous_checkpoint_on_failure(tiny_llama_dir, monkeypatch):
    model, d = tiny_llama_dir
    before = (d / "model.safetensors").read_bytes()
    import dhad.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        ck._atomic_save({"x": torch.zeros(1)}, d / "model.safetensors")
    assert (d / "model.safetensors").read_bytes() == before


# -- hostile or broken model folders: a clear error naming the file, the key and the value -----------

def _llama_cfg():
    return Config.from_name("tiny-llama").to_hf()


def _jais_cfg():
    return Config.from_name("tiny-jais").to_hf()


def _drop(d, *keys):
    for k in keys:
        d.pop(k)
    return d


@pytest.mark.parametrize("config,match", [
    (_drop(_llama_cfg(), "hidden_size"), r"config\.json: hidden_size: missing \(required\)$"),
    ({**_llama_cfg(), "hidden_size": [64]}, r"hidden_size: must be a positive integer, got \[64\]"),
    ({**_llama_cfg(), "hidden_size": "64"}, r"hidden_size: must be a positive integer, got '64'"),
    ({**_llama_cfg(), "num_hidden_layers": -1}, r"num_hidden_layers: must be a positive integer, got -1"),
    ({**_llama_cfg(), "num_hidden_layers": 2.5}, r"num_hidden_layers: must be a positive integer, got 2\.5"),
    ({**_llama_cfg(), "rms_norm_eps": "1e-5"}, r"rms_norm_eps: must be a positive number, got '1e-5'"),
    ({**_llama_cfg(), "num_key_value_heads": 3}, r"num_attention_heads: must be divisible by num_key_value_heads \(3\)"),
    ({**_llama_cfg(), "rope_scaling": {"rope_type": "linear"}}, r"factor: missing"),
    ({**_llama_cfg(), "tie_word_embeddings": "no"}, r"tie_word_embeddings: must be true or false, got 'no'"),
    ({**_jais_cfg(), "n_layer": 0}, r"n_layer: must be a positive integer, got 0"),
    ({**_jais_cfg(), "layer_norm_epsilon": "tiny"}, r"layer_norm_epsilon: must be a positive number, got 'tiny'"),
    ({**_jais_cfg(), "mup_width_scale": "wide"}, r"mup_width_scale: must be a positive number, got 'wide'"),
    ({**_jais_cfg(), "eos_token_id": -3}, r"eos_token_id: must be a token id"),
    (_drop(_llama_cfg(), "model_type", "architectures"), r"config\.json: model_type: missing; dhad reads Jais"),
    ([1, 2], r"config\.json: expected a JSON object, got list"),
])
def test_bad_config_json_names_the_key_and_value(tiny_llama_dir, tmp_path, capsys, config, match):
    """load_model raises ConfigError (a ValueError) naming the file, key and value; `dhad info` exits 2
    with that message (no traceback)."""
    from dhad.cli import main
    from dhad.config import ConfigError
    _, d = tiny_llama_dir
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match) as e:
        dhad.load_model(bad)
    assert str(bad / "config.json") in str(e.value)
    capsys.readouterr()
    assert main(["info", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.search(match.rstrip("$"), err) and "Traceback" not in err


def test_config_fields_are_checked_by_name():
    from dhad.config import ConfigError
    with pytest.raises(ConfigError, match=r"config\.n_layer: must be a positive integer, got -1"):
        Config.from_name("tiny-jais", n_layer=-1)
    with pytest.raises(ConfigError, match=r"config\.norm_eps: must be a positive number, got '1e-5'"):
        Config(norm_eps="1e-5")
    with pytest.raises(ConfigError, match=r"config\.position: must be one of"):
        Config(position="sinusoidal")
    assert Config(n_layer=np.int64(3)).n_layer == 3 and type(Config(n_layer=np.int64(3)).n_layer) is int


def test_n_inner_defaults_to_4x_width_like_the_jais_code(tmp_path):
    """A Jais config.json without n_inner: transformers' Jais (GPT-2) code uses 4 * n_embd for the
    SwiGLU MLP too -- dhad reads the same shapes (and documents that rule)."""
    cfg = _jais_cfg()
    cfg.pop("n_inner")
    assert Config.from_hf(cfg).n_inner == 4 * 64 == Config(n_embd=64, mlp="swiglu_jais").n_inner


def test_int64_weights_are_refused(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    _, d = tiny_llama_dir
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has dtype torch\.int64"):
        dhad.load_model(bad)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_cannot_name_files_outside_the_model_folder(tiny_llama_dir, tmp_path, where):
    """A shard name with `../` or an absolute path is refused before anything is opened, although the
    file it names is a valid shard (so the old loader read it)."""
    model, d = tiny_llama_dir
    out = dhad.save_model(model, tmp_path / "m" / "sharded", max_shard_size="40KB")
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    first = sorted(set(idx["weight_map"].values()))[0]
    outside = tmp_path / "m" / first
    shutil.move(out / first, outside)
    name = f"../{first}" if where == "parent" else str(outside)
    idx["weight_map"] = {k: (name if v == first else v) for k, v in idx["weight_map"].items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"points outside the model folder"):
        dhad.load_model(out)
    from dhad.cli import main
    assert main(["info", "--model", str(out)]) == 2


def test_info_on_a_pickle_only_folder_fails(tmp_path, capsys):
    from dhad.cli import main
    (tmp_path / "config.json").write_text(json.dumps(_llama_cfg()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds only pickle checkpoints (pytorch_model.bin)" in err and "Traceback" not in err


def test_info_lists_the_shards_an_index_names(tiny_llama_dir, tmp_path, capsys):
    from dhad.cli import main
    model, _ = tiny_llama_dir
    out = dhad.save_model(model, tmp_path / "sharded", max_shard_size="40KB")
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert info["files"] == shards and info["disk_bytes"] == sum((out / f).stat().st_size for f in shards)
