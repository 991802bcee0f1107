"""GGUF export and loading (dhad.gguf, dhad.tokenizer.gguf_vocab): round trips for a tiny Llama and a tiny
Jais, stored bytes against `gguf.quants` (the quantiser llama.cpp's convert_hf_to_gguf.py calls), the
metadata keys and tensor names llama.cpp's `llama` / `jais` loaders read, and bad inputs.
Against llama.cpp itself: tests/test_llamacpp_real.py (scripts/test-llamacpp.sh)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gguf  # noqa: E402  (a runtime dependency: missing is a failure, not a skip)

import dhad  # noqa: E402
from dhad.checkpoint import save_model  # noqa: E402
from dhad.cli import main  # noqa: E402
from dhad.config import Config  # noqa: E402
from dhad.gguf import GGUFError, export_gguf, gguf_tensors, load_gguf, read_metadata  # noqa: E402
from dhad.model import Transformer  # noqa: E402
from dhad.tokenizer import load_tokenizer, train_bpe, train_sentencepiece  # noqa: E402
from dhad.tokenizer.gguf_vocab import tokenizer_from_gguf  # noqa: E402

# dhad's own BPE regex has no llama.cpp twin: the export says so (tested below) and names GPT-2's
pytestmark = [pytest.mark.one_thread, pytest.mark.filterwarnings("ignore:llama.cpp has no pre-tokenizer")]

TEXTS = ["Hello world, this is a small test of the tokenizer. " * 3,
         "مرحبا بالعالم، هذا اختبار صغير للمقسم. " * 3, "Numbers 12345 and more words here.\n"] * 40
PROMPTS = ["Hello world, how are you?", "مرحبا بالعالم", "a\nb c 123"]


def jais_config(**kw) -> Config:
    base = dict(vocab_size=320, n_layer=2, n_embd=64, n_head=4, n_inner=96, block_size=128,
                embedding_scale=9.1705785388303, mup_width_scale=0.25, mup_output_alpha=1.09518349815769,
                logits_scale=1.09518349815769 * 0.25, attn_scale_power=1.0)
    base.update(kw)
    return Config(**base)


def llama_config(**kw) -> Config:
    base = dict(vocab_size=448, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_inner=96, block_size=128,
                norm="rmsnorm", position="rope", mlp="gated", bias=False, tie_embeddings=False,
                embedding_scale=1.0, logits_scale=1.0, attn_scale_power=0.5, bos_token_id=1, eos_token_id=2,
                pad_token_id=None)
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def bpe_tok():
    return train_bpe(TEXTS, 300)


LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                   "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def spm_tok():
    """A small Llama-2-style SentencePiece BPE (byte fallback, <unk> <s> </s>, BOS added)."""
    return train_sentencepiece(TEXTS, 400, chat_template=LLAMA2_TEMPLATE, num_threads=1)


def model(config, seed=0) -> Transformer:
    return Transformer(config).init_weights(seed=seed).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bpe_tok, spm_tok):
    """exported(arch, type) -> (model, tokenizer, GGUF path): the standard tiny Llama / Jais, each written once
    per type for the whole module."""
    root, cache = tmp_path_factory.mktemp("gguf"), {}
    models = {"llama": (model(llama_config()), spm_tok), "jais": (model(jais_config()), bpe_tok)}

    def get(arch, type_):
        if (arch, type_) not in cache:
            m, tok = models[arch]
            cache[arch, type_] = m, tok, export_gguf(m, tok, root / f"{arch}-{type_}.gguf", type_)
        return cache[arch, type_]
    return get


def logits(m, tok, text, bos=False):
    ids = torch.tensor([tok.encode(text, add_special_tokens=bos)])
    with torch.no_grad():
        return m(ids)[0]


def f16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


# ---------------------------------------------------------------------------------------------
# round trips

def test_llama_f16_round_trip_is_exact_to_f16_rounding(exported, spm_tok):
    m, _, path = exported("llama", "f16")
    back = dhad.load_model(path)  # the public API reads GGUF files
    assert back.config.hf_layout == "llama" and back.config.n_kv_head == 2 and not back.config.tie_embeddings
    sd, ref = back.state_dict(), m.state_dict()
    for k, v in ref.items():
        want = v if v.dim() == 1 else f16(v)  # norms stay float32
        assert torch.equal(sd[k], want), k  # the q/k RoPE permutation undone exactly
    for p in PROMPTS:
        assert (logits(back, spm_tok, p, True) - logits(m, spm_tok, p, True)).abs().max() < 2e-3


def test_jais_f16_round_trip_folds_mup_scales(exported, bpe_tok):
    m, _, path = exported("jais", "f16")
    c = m.config
    back = load_gguf(path)
    bc = back.config
    assert (bc.embedding_scale, bc.logits_scale, bc.attn_scale_power, bc.tie_embeddings) == (1.0, 1.0, 1.0, False)
    sd, ref = back.state_dict(), m.state_dict()
    assert torch.equal(sd["wte.weight"], f16(ref["wte.weight"] * c.embedding_scale))
    assert torch.equal(sd["lm_head.weight"], f16(ref["wte.weight"] * c.logits_scale))
    for k in ("h.1.attn.qkv.weight", "h.0.mlp.fc.weight", "h.1.mlp.proj.weight"):
        assert torch.equal(sd[k], f16(ref[k])), k
    for k in ("h.0.attn.qkv.bias", "h.0.mlp.fc.bias", "h.1.ln_2.weight", "ln_f.bias"):
        assert torch.equal(sd[k], ref[k]), k
    for p in PROMPTS:  # the folded model computes the same function
        assert torch.allclose(logits(back, bpe_tok, p), logits(m, bpe_tok, p), atol=2e-2, rtol=0)


def test_jais_without_mup_attention_is_folded_into_q(tmp_path, bpe_tok):
    """llama.cpp's jais divides scores by head_dim; a 1/sqrt(d) Jais model gets q * sqrt(d) in attn_qkv."""
    c = jais_config(attn_scale_power=0.5, embedding_scale=1.0, logits_scale=1.0, mup_width_scale=None,
                    mup_output_alpha=None)
    m = model(c)
    with torch.no_grad():  # big enough q·k that the scale matters
        for b in m.h:
            b.attn.qkv.weight.mul_(8)
    back = load_gguf(export_gguf(m, bpe_tok, tmp_path / "j.gguf", "f16"))
    qkv, ref = back.state_dict()["h.0.attn.qkv.weight"], m.state_dict()["h.0.attn.qkv.weight"]
    assert torch.equal(qkv[:64], f16(ref[:64] * 4.0)) and torch.equal(qkv[64:], f16(ref[64:]))
    unfolded = Transformer(back.config).eval()
    unfolded.load_state_dict({**back.state_dict(), "h.0.attn.qkv.weight": f16(ref),
                              "h.1.attn.qkv.weight": f16(m.state_dict()["h.1.attn.qkv.weight"])})
    for p in PROMPTS:
        want = logits(m, bpe_tok, p)
        assert torch.allclose(logits(back, bpe_tok, p), want, atol=2e-2, rtol=0)
        assert not torch.allclose(logits(unfolded, bpe_tok, p), want, atol=2e-2, rtol=0)  # the fold matters


@pytest.mark.parametrize("arch", ["llama", "jais"])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantised_tensors_are_gguf_quants_bytes(exported, arch, qtype):
    m, tok, path = exported(arch, qtype)
    Q = getattr(gguf.GGMLQuantizationType, qtype.upper())
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    _, want = gguf_tensors(m)
    assert set(stored) == {n for n, _ in want}
    back = load_gguf(path).state_dict()
    for name, t in want:
        s = stored[name]
        a = t.numpy()
        if a.ndim == 1 or name.endswith("_norm.weight"):
            assert s.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(s.data, a), name
            continue
        ref = gguf.quants.quantize(a, Q)
        assert s.tensor_type == Q and s.data.tobytes() == ref.tobytes(), name
    # what dhad runs is gguf.quants' dequantisation of those bytes
    wte = gguf.quants.dequantize(stored["token_embd.weight"].data, Q)
    assert np.array_equal(back["wte.weight"].numpy(), wte)
    if arch == "jais":
        ffn_down = gguf.quants.dequantize(stored["blk.1.ffn_down.weight"].data, Q)
        assert np.array_equal(back["h.1.mlp.proj.weight"].numpy(), ffn_down)


def test_rows_not_a_multiple_of_the_block_stay_f16(tmp_path, bpe_tok):
    m = model(jais_config(n_inner=40))  # ffn_down rows of 40 values
    path = export_gguf(m, bpe_tok, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    load_gguf(path)


# ---------------------------------------------------------------------------------------------
# what llama.cpp reads

# the keys llama.cpp's loaders require (src/llama-model.cpp, src/models/{llama,jais}.cpp; llama-vocab.cpp)
LLAMA_KEYS = {"general.architecture": "llama", "llama.context_length": 128, "llama.embedding_length": 64,
              "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0,
              "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
JAIS_KEYS = {"general.architecture": "jais", "jais.context_length": 128, "jais.embedding_length": 64,
             "jais.feed_forward_length": 96, "jais.block_count": 2, "jais.attention.head_count": 4,
             "jais.attention.max_alibi_bias": 8.0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "jais",
             "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
             "tokenizer.ggml.add_bos_token": False}


def _names(per_layer, n_layer, top):
    return set(top) | {f"blk.{i}.{n}" for i in range(n_layer) for n in per_layer}


def test_llama_metadata_and_tensor_names(tmp_path, exported, spm_tok):
    m, _, path = exported("llama", "f16")
    meta = read_metadata(path)
    for k, v in LLAMA_KEYS.items():
        assert meta[k] == v, k
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(meta["tokenizer.ggml.scores"]) == len(types) == 448
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3] and types[3] == 6  # <0x00>: byte
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    per = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
           "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    assert names == _names(per, 2, ["token_embd.weight", "output_norm.weight", "output.weight"])
    # a tied model writes no output.weight (llama.cpp then uses token_embd)
    tied = export_gguf(model(llama_config(tie_embeddings=True)), spm_tok, tmp_path / "t.gguf", "f16")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(tied)).tensors}
    assert load_gguf(tied).config.tie_embeddings


def test_jais_metadata_and_tensor_names(exported, bpe_tok):
    _, _, path = exported("jais", "q8_0")
    meta = read_metadata(path)
    for k, v in JAIS_KEYS.items():
        assert meta[k] == v, k
    assert meta["jais.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert len(meta["tokenizer.ggml.tokens"]) == 320  # padded to the embedding rows, as llama.cpp checks
    assert meta["tokenizer.ggml.tokens"][300:] == [f"[PAD{i}]" for i in range(300, 320)]
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1
    assert meta["tokenizer.chat_template"] == bpe_tok.chat_template
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    per = [f"{n}.{wb}" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_gate", "ffn_down")
           for wb in ("weight", "bias")]
    assert names == _names(per, 2, ["token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight"])


def test_unmatched_pre_tokenizer_warns(tmp_path, bpe_tok):
    with pytest.warns(UserWarning, match="no pre-tokenizer for this tokenizer's regex"):
        export_gguf(model(jais_config()), bpe_tok, tmp_path / "j.gguf", "f16")


def test_alibi_train_seq_len_caps_the_context(tmp_path, bpe_tok):
    m = model(jais_config(alibi_scaling={"type": "linear", "train_seq_len": 64}))
    with pytest.warns(UserWarning, match="context_length is set to 64"):
        path = export_gguf(m, bpe_tok, tmp_path / "j.gguf", "f16")
    assert read_metadata(path)["jais.context_length"] == 64


# ---------------------------------------------------------------------------------------------
# tokenizers

def test_tokenizer_round_trips(exported, bpe_tok):
    """dhad's exact copy gives the same ids; llama.cpp's keys alone rebuild the same tokenizer too."""
    for arch in ("jais", "llama"):
        _, tok, path = exported(arch, "q8_0")
        meta = read_metadata(path)
        exact, rebuilt = load_tokenizer(path), tokenizer_from_gguf(meta, exact=False)
        assert exact.chat_template == tok.chat_template == rebuilt.chat_template
        assert (rebuilt.bos_token_id, rebuilt.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
        for p in PROMPTS[:2] + ["<|endoftext|> x" if tok is bpe_tok else "<s> x </s>"]:
            ids = tok.encode(p, add_special_tokens=True)
            assert exact.encode(p, add_special_tokens=True) == ids, p
            assert rebuilt.encode(p, add_special_tokens=True) == ids, p
            assert rebuilt.decode(ids) == tok.decode(ids)


def _meta_of(tok, tmp_path):
    """The tokenizer metadata the export writes (read from the writer: no 100k-string file to parse back)."""
    from dhad.tokenizer.gguf_vocab import write_tokenizer
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    write_tokenizer(w, tok, tok.vocab_size, "llama")
    return {k: v.value for k, v in w.kv_data[0].items()}


def test_real_llama2_tokenizer_rebuilt_from_llama_cpp_keys(tmp_path, fixtures_dir):
    tok = load_tokenizer(fixtures_dir / "tokenizers" / "llama2-style")
    meta = _meta_of(tok, tmp_path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"] is True
    rebuilt = tokenizer_from_gguf(meta, exact=False)
    # runs of spaces: the scores written for a tokenizer.json (merge ranks) must keep "▁▁" after "▁c"
    for p in PROMPTS + ["<s> x </s>", "The quick brown fox", "b  c", "x    y", "hello\n\nworld"]:
        ids = tok.encode(p, add_special_tokens=True)
        assert rebuilt.encode(p, add_special_tokens=True) == ids, p
        assert rebuilt.decode(ids) == tok.decode(ids)


def test_llama3_pre_tokenizer_is_named_and_rebuilt(tmp_path, fixtures_dir):
    tok = load_tokenizer(fixtures_dir / "tokenizers" / "llama3")
    meta = _meta_of(tok, tmp_path)
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    rebuilt = tokenizer_from_gguf(meta, exact=False)
    for p in ["Hello world, how are you?", "12345 numbers", "<|begin_of_text|>hi"]:
        assert rebuilt.encode(p, add_special_tokens=True) == tok.encode(p, add_special_tokens=True), p


def test_unknown_gguf_pre_tokenizer_is_refused():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-coder", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-coder'"):
        tokenizer_from_gguf(meta)


# ---------------------------------------------------------------------------------------------
# commands and bad input

def test_export_command_and_generate_from_gguf(tmp_path, bpe_tok, capsys):
    d = save_model(model(jais_config()), tmp_path / "jais", tokenizer=bpe_tok)
    out = tmp_path / "j.gguf"
    assert main(["export", "gguf", "--model", str(d), "--out", str(out), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt", "Hello world", "--max-new-tokens", "5", "--json"]) == 0
    from dhad.generate import generate_text
    want = generate_text(load_gguf(out), bpe_tok, "Hello world", max_new_tokens=5)
    assert want in capsys.readouterr().out
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "jais" and info["n_layer"] == 2 and "Q8_0 x" in info["stored_dtype"]
    # a GGUF file is accepted wherever a model is (here: exported again from GGUF)
    assert main(["export", "gguf", "--model", str(out), "--out", str(tmp_path / "k.gguf")]) == 0


def test_serve_backend_loads_a_gguf(exported, bpe_tok):
    from dhad.serve.backend import load_backend
    _, _, path = exported("jais", "f16")
    b = load_backend(path, max_batch_size=1)
    assert b.fmt is not None and b.tokenizer.chat_template == bpe_tok.chat_template


def test_bad_type_and_unsupported_models(tmp_path, bpe_tok, capsys):
    d = save_model(model(jais_config()), tmp_path / "jais", tokenizer=bpe_tok)
    assert main(["export", "gguf", "--model", str(d), "--out", str(tmp_path / "x.gguf"), "--type", "q3_z"]) == 2
    err = capsys.readouterr().err
    assert "unknown GGUF type 'q3_z'" in err and "q8_0" in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()
    gpt2 = save_model(model(jais_config(position="learned", mlp="gelu", embedding_scale=1.0)), tmp_path / "g",
                      tokenizer=bpe_tok)
    assert main(["export", "gguf", "--model", str(gpt2), "--out", str(tmp_path / "y.gguf")]) == 2
    assert "no llama.cpp architecture" in capsys.readouterr().err
    with pytest.raises(GGUFError, match="divides the ALiBi slopes"):
        export_gguf(model(jais_config(alibi_scaling={"type": "linear", "factor": 2.0})), bpe_tok, tmp_path / "z.gguf")


def test_q4_k_m_without_llama_cpp_says_what_to_do(tmp_path, bpe_tok, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    monkeypatch.delenv("DHAD_LLAMACPP_PYTHON", raising=False)
    with pytest.raises(GGUFError, match="llama-quantize"):
        export_gguf(model(jais_config()), bpe_tok, tmp_path / "m.gguf", "q4_k_m")


def test_bad_gguf_files(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["generate", "--model", str(bad), "--prompt", "x"]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        load_gguf(tmp_path / "gpt2.gguf")


def test_an_ollama_blob_without_a_suffix_loads(tmp_path, exported, spm_tok):
    """Ollama keeps models as ~/.ollama/models/blobs/sha256-<hex>: recognised by GGUF's magic bytes."""
    import shutil
    m, tok, path = exported("llama", "q8_0")
    blob = tmp_path / "sha256-0123abcd"
    shutil.copyfile(path, blob)
    back = dhad.load_model(blob, dtype="bfloat16")
    assert back.dtype == torch.bfloat16
    assert dhad.load_tokenizer(blob).encode("Hello world", add_special_tokens=True) == \
        tok.encode("Hello world", add_special_tokens=True)


def test_a_lora_adapter_applies_to_a_gguf_model(tmp_path, exported):
    from dhad.lora import LoraConfig, apply_lora, lora_layers, save_adapter
    _, tok, path = exported("llama", "f16")
    adapted = apply_lora(dhad.load_model(path), LoraConfig(r=2, targets=("q", "down")))
    with torch.no_grad():
        for layer in lora_layers(adapted).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
    save_adapter(adapted, tmp_path / "a")
    ids = torch.tensor([tok.encode("Hello world", add_special_tokens=True)])
    with torch.no_grad():
        want = adapted(ids)
        back = dhad.load_model(path, adapter=tmp_path / "a")
        assert (back(ids) - want).abs().max() < 1e-5
        assert (back(ids) - dhad.load_model(path)(ids)).abs().max() > 1e-3
