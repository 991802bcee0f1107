"""GGUF files (llama.cpp, Ollama): export a dhad model, and load one as a dhad model.

Written and read with the `gguf` package (llama.cpp's own Python library); quantisation and
dequantisation are its `gguf.quants`, the same code llama.cpp's `convert_hf_to_gguf.py` calls.

Two llama.cpp architectures:
- `llama` (Jais-adapted, ALLaM, any Llama-layout model): RMSNorm, RoPE, SwiGLU, optional GQA. llama.cpp
  applies RoPE to consecutive pairs of a head, Hugging Face to its two halves, so the q and k rows are
  permuted on the way out (and back on the way in) exactly as `convert_hf_to_gguf.py` does.
- `jais` (the Jais family): LayerNorm with bias, fused q|k|v with bias, SwiGLU with bias (`ffn_gate` =
  Jais' `c_fc2`, the SiLU branch; `ffn_up` = `c_fc`), ALiBi from `jais.attention.max_alibi_bias` (8: the
  standard slopes), attention scores scaled by 1/head_dim (hard-wired in llama.cpp's jais graph). There
  are no muP keys in llama.cpp: like `convert_hf_to_gguf.py` the export folds `mup_embeddings_scale`
  into `token_embd` and the logits scale (`mup_output_alpha * mup_width_scale`, or `width_scale`) into
  `output` (a tied head is written as its own, scaled, tensor). What llama.cpp cannot express:
    * scores scaled by 1/sqrt(head_dim) (a Jais config without `mup_scale_qk_dot_by_d`): folded exactly
      by multiplying the q rows of `attn_qkv` (weight and bias) by sqrt(head_dim) --
      `convert_hf_to_gguf.py` ignores this and writes a model that attends wrongly;
    * `alibi_scaling` with a `factor` (slopes divided by f: no `max_alibi_bias` gives those slopes):
      refused with GGUFError;
    * `alibi_scaling` with `train_seq_len` n (slopes shrink once the context passes n): the export writes
      `context_length` = min(n_positions, n), within which the two agree, and says so in a warning;
    * learned positions or a GELU MLP (GPT-2-style dhad configs, not the Jais family): refused.
  Loading a `jais` GGUF gives a dhad model with those scales already folded (embedding and logits scale 1,
  attn_scale_power 1, untied head).

`--type`: f16 (2-D weights in float16), q8_0 and q4_0 (2-D weights in those block formats, via
`gguf.quants`; a matrix whose rows are not a multiple of 32 stays f16, as in `convert_hf_to_gguf.py`),
q4_k_m (written as f16, then requantised with llama.cpp's own quantiser through `llama_cpp`, which
must be installed: `gguf` has no k-quant quantiser). 1-D tensors (norms, biases) are float32 always.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from dhad.config import Config
from dhad.model import Transformer

TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
ARCHS = ("llama", "jais")


class GGUFError(ValueError):
    """A model, tokenizer or file that cannot be written to / read from GGUF as asked: names the problem."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# dhad <-> llama.cpp tensors

def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face RoPE (rotate halves) rows -> llama.cpp's (rotate pairs), per head (convert_hf_to_gguf's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def arch_of(config: Config) -> str:
    """The llama.cpp architecture for a dhad config, or GGUFError naming what llama.cpp cannot run."""
    c = config
    if c.position == "rope" and c.mlp == "gated" and c.norm == "rmsnorm":
        if c.bias:
            raise GGUFError("a Llama-layout model with biases has no llama.cpp `llama` mapping in dhad's export")
        if c.embedding_scale != 1.0 or c.logits_scale != 1.0 or c.attn_scale_power != 0.5:
            raise GGUFError("a Llama-layout model with muP scales has no llama.cpp `llama` equivalent")
        return "llama"
    if c.position == "alibi" and c.mlp == "swiglu_jais" and c.norm == "layernorm" and c.bias:
        sc = c.alibi_scaling or {}
        if sc.get("factor") is not None and float(sc["factor"]) != 1.0:
            raise GGUFError(f"alibi_scaling {sc} divides the ALiBi slopes by a factor; llama.cpp's jais "
                            "architecture has only max_alibi_bias, which cannot give those slopes")
        if c.n_kv_head != c.n_head:
            raise GGUFError("llama.cpp's jais architecture has no grouped-query attention")
        return "jais"
    raise GGUFError(f"no llama.cpp architecture for this model (position={c.position}, mlp={c.mlp}, "
                    f"norm={c.norm}): dhad exports the Llama family (llama) and the Jais family (jais: ALiBi, SwiGLU)")


@torch.no_grad()
def gguf_tensors(model: Transformer) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """(architecture, [(llama.cpp tensor name, float32 tensor)]) for a dhad model, scales folded."""
    c = model.config
    arch = arch_of(c)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    E, F, kv = c.n_embd, c.n_inner, c.n_kv_head * c.head_dim
    out: list[tuple[str, torch.Tensor]] = []
    if arch == "llama":
        out.append(("token_embd.weight", sd["wte.weight"]))
        for i in range(c.n_layer):
            p, g = f"h.{i}.", f"blk.{i}."
            q, k, v = sd[p + "attn.qkv.weight"].split([E, kv, kv], 0)
            gate, up = sd[p + "mlp.fc.weight"].split([F, F], 0)
            out += [(g + "attn_norm.weight", sd[p + "ln_1.weight"]),
                    (g + "attn_q.weight", _permute(q, c.n_head)), (g + "attn_k.weight", _permute(k, c.n_kv_head)),
                    (g + "attn_v.weight", v), (g + "attn_output.weight", sd[p + "attn.proj.weight"]),
                    (g + "ffn_norm.weight", sd[p + "ln_2.weight"]),
                    (g + "ffn_gate.weight", gate), (g + "ffn_up.weight", up),
                    (g + "ffn_down.weight", sd[p + "mlp.proj.weight"])]
        out.append(("output_norm.weight", sd["ln_f.weight"]))
        if not c.tie_embeddings:
            out.append(("output.weight", sd["lm_head.weight"]))
        return arch, out
    # jais: llama.cpp scales scores by 1/head_dim; dhad by 1/head_dim**p -> q times head_dim**(1-p)
    q_fold = c.head_dim ** (1.0 - c.attn_scale_power)
    out.append(("token_embd.weight", sd["wte.weight"] * c.embedding_scale if c.embedding_scale != 1.0
                else sd["wte.weight"]))
    for i in range(c.n_layer):
        p, g = f"h.{i}.", f"blk.{i}."
        w, b = sd[p + "attn.qkv.weight"].clone(), sd[p + "attn.qkv.bias"].clone()
        if q_fold != 1.0:
            w[:E] *= q_fold
            b[:E] *= q_fold
        gate, up = sd[p + "mlp.fc.weight"].split([F, F], 0)
        gate_b, up_b = sd[p + "mlp.fc.bias"].split([F, F], 0)
        out += [(g + "attn_norm.weight", sd[p + "ln_1.weight"]), (g + "attn_norm.bias", sd[p + "ln_1.bias"]),
                (g + "attn_qkv.weight", w), (g + "attn_qkv.bias", b),
                (g + "attn_output.weight", sd[p + "attn.proj.weight"]), (g + "attn_output.bias", sd[p + "attn.proj.bias"]),
                (g + "ffn_norm.weight", sd[p + "ln_2.weight"]), (g + "ffn_norm.bias", sd[p + "ln_2.bias"]),
                (g + "ffn_up.weight", up), (g + "ffn_up.bias", up_b),
                (g + "ffn_gate.weight", gate), (g + "ffn_gate.bias", gate_b),
                (g + "ffn_down.weight", sd[p + "mlp.proj.weight"]), (g + "ffn_down.bias", sd[p + "mlp.proj.bias"])]
    out += [("output_norm.weight", sd["ln_f.weight"]), ("output_norm.bias", sd["ln_f.bias"])]
    head = sd["lm_head.weight"]
    out.append(("output.weight", head * c.logits_scale if c.logits_scale != 1.0 else head))
    return arch, out


def _qtype(gguf, name: str, t: np.ndarray, type_: str):
    """The GGML type a tensor is stored in (convert_hf_to_gguf's rules: 1-D and norms float32)."""
    Q = gguf.GGMLQuantizationType
    if t.ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if type_ in ("f16", "q4_k_m"):
        return Q.F16
    q = Q.Q8_0 if type_ == "q8_0" else Q.Q4_0
    block = gguf.GGML_QUANT_SIZES[q][0]
    return q if t.shape[-1] % block == 0 else Q.F16


def encode_tensor(gguf, name: str, t: torch.Tensor, type_: str):
    """(data, GGML type) of one float32 tensor as the export writes it."""
    a = t.contiguous().numpy().astype(np.float32, copy=False)
    q = _qtype(gguf, name, a, type_)
    if q == gguf.GGMLQuantizationType.F32:
        return a, q
    if q == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16), q
    return gguf.quants.quantize(a, q), q


# ---------------------------------------------------------------------------------------------
# Export

def export_gguf(model: Transformer, tokenizer, out: str | os.PathLike, type: str = "f16",
                name: str | None = None) -> Path:
    """Write `model` (and `tokenizer`, a dhad Tokenizer: vocabulary, merges or scores, special ids and the
    chat template) as one GGUF file llama.cpp and Ollama run. Written to a temporary name, then renamed."""
    gguf = _gguf()
    from dhad.tokenizer.gguf_vocab import write_tokenizer

    if type not in TYPES:
        raise GGUFError(f"unknown GGUF type {type!r}; use one of {list(TYPES)}")
    c = model.config
    arch_of(c)  # refuse an unsupported model before writing anything
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if type == "q4_k_m":
        return _export_k_quant(model, tokenizer, out, name)
    arch, tensors = gguf_tensors(model)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_name(name or c.name or out.stem)
        ctx = c.block_size
        sc = c.alibi_scaling or {}
        if arch == "jais" and sc.get("train_seq_len") is not None and int(sc["train_seq_len"]) < ctx:
            ctx = int(sc["train_seq_len"])
            warnings.warn(f"alibi_scaling {sc}: llama.cpp's jais has no ALiBi scaling past {ctx} tokens; "
                          f"the GGUF's context_length is set to {ctx} (n_positions is {c.block_size})", stacklevel=2)
        w.add_context_length(ctx)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(c.n_inner)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        if arch == "llama":
            w.add_head_count_kv(c.n_kv_head)
            w.add_rope_freq_base(c.rope_theta)
            w.add_layer_norm_rms_eps(c.norm_eps)
            w.add_rope_dimension_count(c.head_dim)
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
            w.add_vocab_size(c.vocab_size)
            rs = c.rope_scaling or {}
            if rs.get("rope_type", rs.get("type")) == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(float(rs["factor"]))
        else:
            w.add_layer_norm_eps(c.norm_eps)
            w.add_max_alibi_bias(8.0)  # the standard ALiBi slopes (dhad.model.alibi_slopes)
        w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(w, tokenizer, c.vocab_size, arch)
        for n, t in tensors:
            data, q = encode_tensor(gguf, n, t, type)
            w.add_tensor(n, data, raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


_QUANTIZE = """
import ctypes, sys
import llama_cpp as l
p = l.llama_model_quantize_default_params()
p.ftype = l.LLAMA_FTYPE_MOSTLY_Q4_K_M
sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def _export_k_quant(model, tokenizer, out: Path, name) -> Path:
    """q4_k_m: the `gguf` package has no k-quant quantiser, so write f16 and requantise with llama.cpp's own
    (`llama_cpp` in this Python, or the Python named by $DHAD_LLAMACPP_PYTHON, e.g. .venv-llamacpp's)."""
    import importlib.util
    import subprocess
    import sys

    py = sys.executable if importlib.util.find_spec("llama_cpp") else os.environ.get("DHAD_LLAMACPP_PYTHON")
    if not py:
        raise GGUFError("--type q4_k_m needs llama.cpp's quantiser: install llama-cpp-python (or point "
                        "DHAD_LLAMACPP_PYTHON at a Python that has it), or export --type f16 and run llama.cpp's "
                        "`llama-quantize MODEL-f16.gguf MODEL-q4_k_m.gguf Q4_K_M`")
    with tempfile.TemporaryDirectory(dir=out.parent) as d:
        f16 = export_gguf(model, tokenizer, Path(d) / "f16.gguf", "f16", name)
        tmp = out.with_name(out.name + ".tmp")
        r = subprocess.run([py, "-c", _QUANTIZE, str(f16), str(tmp)], capture_output=True, text=True)
        if r.returncode != 0 or not tmp.exists():
            raise GGUFError(f"llama.cpp's quantiser failed (status {r.returncode}): {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# Import

def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def read_metadata(path: str | os.PathLike) -> dict:
    """Every key/value of a GGUF file's header (GGUFError for a file that is not GGUF)."""
    return _fields(_reader(path))


def _reader(path):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError / struct errors for bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_config(meta: dict, shapes: dict[str, tuple]) -> Config:
    """The dhad Config of a GGUF's metadata (and its tensors' shapes)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; dhad reads {list(ARCHS)}")

    def key(k, default=None, required=True):
        v = meta.get(f"{arch}.{k}", default)
        if v is None and required:
            raise GGUFError(f"GGUF metadata key {arch}.{k} is missing")
        return v

    emb = shapes.get("token_embd.weight")
    if emb is None:
        raise GGUFError("GGUF has no token_embd.weight tensor")
    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    kw = dict(vocab_size=int(emb[0]), n_layer=int(key("block_count")), n_embd=n_embd, n_head=n_head,
              n_inner=int(key("feed_forward_length")), block_size=int(key("context_length")),
              tie_embeddings="output.weight" not in shapes, name=meta.get("general.name"))
    kw["n_kv_head"] = int(key("attention.head_count_kv", n_head))
    tok_ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    kw.update(bos_token_id=tok_ids["bos"], eos_token_id=tok_ids["eos"],
              pad_token_id=tok_ids["padding"] if tok_ids["padding"] is not None else tok_ids["eos"])
    if arch == "llama":
        head_dim = n_embd // n_head
        if int(key("rope.dimension_count", head_dim)) != head_dim:
            raise GGUFError("partial RoPE (rope.dimension_count != head size) is not supported")
        st = key("rope.scaling.type", "none", required=False)
        rope_scaling = None
        if st == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif st not in ("none", None):
            raise GGUFError(f"RoPE scaling {st!r} is not supported (dhad reads none and linear)")
        if "rope_freqs.weight" in shapes:
            raise GGUFError("RoPE frequency factors (rope_freqs, Llama-3.1 scaling) are not supported")
        if any(n.endswith(".attn_q.bias") for n in shapes):
            raise GGUFError("attention biases in a llama GGUF are not supported")
        kw.update(norm="rmsnorm", norm_eps=float(key("attention.layer_norm_rms_epsilon")), position="rope",
                  rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=rope_scaling, mlp="gated",
                  bias=False, hf_layout="llama")
    else:
        bias = key("attention.max_alibi_bias", 0.0, required=False)
        if float(bias) != 8.0:
            raise GGUFError(f"jais.attention.max_alibi_bias is {bias}; dhad runs the standard ALiBi slopes (8.0)")
        kw.update(norm="layernorm", norm_eps=float(key("attention.layer_norm_epsilon")), position="alibi",
                  mlp="swiglu_jais", bias=True, tie_embeddings=False, attn_scale_power=1.0, hf_layout="jais")
    return Config(**kw)


def _open(path):
    """(Config, {name: ReaderTensor}, {name: shape in torch order}) of a GGUF file."""
    reader = _reader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()  # not the (long) vocabulary: the tokenizer reads it
            if not k.startswith(("tokenizer.", "dhad.")) or k.endswith("_token_id") or k == "general.file_type"}
    raw = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(x) for x in reversed(t.shape.tolist())) for n, t in raw.items()}
    return gguf_config(meta, shapes), raw, shapes


def read_config(path: str | os.PathLike) -> tuple[Config, dict[str, int]]:
    """A GGUF file's dhad Config, and how many tensors it stores in each GGML type (e.g. {"Q8_0": 15, "F32": 5})."""
    c, raw, _ = _open(path)
    counts: dict[str, int] = {}
    for t in raw.values():
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return c, counts


@torch.no_grad()
def load_gguf(path: str | os.PathLike) -> Transformer:
    """A GGUF file (llama or jais architecture, any type `gguf.quants` dequantises: F32, F16, BF16, Q8_0,
    Q4_0, Q4_K, Q6_K, ...) as a float32 dhad Transformer on the CPU, eval mode (`dhad.load_model(file)`
    calls this, then casts to the dtype and device asked for)."""
    gguf = _gguf()
    c, raw, shapes = _open(path)

    def get(name) -> torch.Tensor:
        t = raw.get(name)
        if t is None:
            raise GGUFError(f"{path}: tensor {name!r} is missing")
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{path}: tensor {name!r}: {e}") from None
        return torch.from_numpy(np.array(a, dtype=np.float32)).reshape(shapes[name])

    E, kv = c.n_embd, c.n_kv_head * c.head_dim
    sd = {"wte.weight": get("token_embd.weight")}
    for i in range(c.n_layer):
        p, g = f"h.{i}.", f"blk.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_2.weight"] = get(g + "attn_norm.weight"), get(g + "ffn_norm.weight")
        sd[p + "attn.proj.weight"], sd[p + "mlp.proj.weight"] = get(g + "attn_output.weight"), get(g + "ffn_down.weight")
        sd[p + "mlp.fc.weight"] = torch.cat([get(g + "ffn_gate.weight"), get(g + "ffn_up.weight")], 0)
        if c.hf_layout == "llama":
            sd[p + "attn.qkv.weight"] = torch.cat([_unpermute(get(g + "attn_q.weight"), c.n_head),
                                                   _unpermute(get(g + "attn_k.weight"), c.n_kv_head),
                                                   get(g + "attn_v.weight")], 0)
        else:
            sd[p + "attn.qkv.weight"] = get(g + "attn_qkv.weight")
            for a, b in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm"), ("attn.proj", "attn_output"),
                         ("mlp.proj", "ffn_down"), ("attn.qkv", "attn_qkv")):
                sd[p + a + ".bias"] = get(g + b + ".bias")
            sd[p + "mlp.fc.bias"] = torch.cat([get(g + "ffn_gate.bias"), get(g + "ffn_up.bias")], 0)
    sd["ln_f.weight"] = get("output_norm.weight")
    if c.hf_layout == "jais":
        sd["ln_f.bias"] = get("output_norm.bias")
    sd["lm_head.weight"] = sd["wte.weight"] if c.tie_embeddings else get("output.weight")
    with torch.device("meta"):
        model = Transformer(c)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    for n, t in sd.items():
        if tuple(t.shape) != expected.get(n):
            raise GGUFError(f"{path}: tensor for {n} has shape {tuple(t.shape)}, the metadata implies {expected.get(n)}")
    model.load_state_dict(sd, strict=True, assign=True)
    if c.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.reset_buffers()
    return model.eval()
