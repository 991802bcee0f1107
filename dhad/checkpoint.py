"""Hugging Face checkpoint I/O for the one Transformer: Jais (`JAISLMHeadModel`) and Llama layouts.

Conversion is data: a key map per layout plus named transforms (Conv1D transpose, q|k|v fuse,
gate|up fuse), chosen by `config.hf_layout`. safetensors only: pickle checkpoints are refused.
Loading goes tensor by tensor from memory-mapped files into a model built on the meta device,
so a 7B model is never held twice. Writes are atomic (temporary name in the same folder, then
os.replace), the index is written last, so an interrupted save never leaves a loadable-looking
but broken directory behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dhad import quant
from dhad.config import Config
from dhad.model import Transformer
from dhad.utils import atomic_write_text as _atomic_write_text

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin", "consolidated.00.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


class CheckpointError(Exception):
    """A checkpoint that cannot be read as asked: names the file, the tensor, expected vs actual."""


def to_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# Key maps. Each entry: dhad name -> (list of HF names, to_dhad(tensors) -> tensor, to_hf(tensor) -> tensors)

def _t(x):
    return x.t().contiguous()


def _key_map(config: Config) -> list[tuple[str, list[str], Callable, Callable]]:
    c = config
    m: list[tuple[str, list[str], Callable, Callable]] = []
    ident = (lambda ts: ts[0], lambda t: [t])
    kv = c.n_kv_head * c.head_dim
    if c.hf_layout == "jais":
        conv = (lambda ts: _t(ts[0]), lambda t: [_t(t)])  # HF Conv1D stores [in, out]
        conv_bias = ident
        m.append(("wte.weight", ["transformer.wte.weight"], *ident))
        if c.position == "learned":
            m.append(("wpe.weight", ["transformer.wpe.weight"], *ident))
        for i in range(c.n_layer):
            p, q = f"h.{i}.", f"transformer.h.{i}."
            for n in ("ln_1", "ln_2"):
                m.append((p + n + ".weight", [q + n + ".weight"], *ident))
                m.append((p + n + ".bias", [q + n + ".bias"], *ident))
            m.append((p + "attn.qkv.weight", [q + "attn.c_attn.weight"], *conv))
            m.append((p + "attn.qkv.bias", [q + "attn.c_attn.bias"], *conv_bias))
            m.append((p + "attn.proj.weight", [q + "attn.c_proj.weight"], *conv))
            m.append((p + "attn.proj.bias", [q + "attn.c_proj.bias"], *conv_bias))
            if c.mlp == "swiglu_jais":
                # dhad fc = [gate | up]; Jais: c_fc2 is the SiLU (gate) branch, c_fc the linear (up) one
                m.append((p + "mlp.fc.weight", [q + "mlp.c_fc2.weight", q + "mlp.c_fc.weight"],
                          lambda ts: torch.cat([_t(ts[0]), _t(ts[1])], 0),
                          lambda t: [_t(x) for x in t.chunk(2, 0)]))
                m.append((p + "mlp.fc.bias", [q + "mlp.c_fc2.bias", q + "mlp.c_fc.bias"],
                          lambda ts: torch.cat(ts, 0), lambda t: [x.contiguous() for x in t.chunk(2, 0)]))
            else:
                m.append((p + "mlp.fc.weight", [q + "mlp.c_fc.weight"], *conv))
                m.append((p + "mlp.fc.bias", [q + "mlp.c_fc.bias"], *conv_bias))
            m.append((p + "mlp.proj.weight", [q + "mlp.c_proj.weight"], *conv))
            m.append((p + "mlp.proj.bias", [q + "mlp.c_proj.bias"], *conv_bias))
        m.append(("ln_f.weight", ["transformer.ln_f.weight"], *ident))
        m.append(("ln_f.bias", ["transformer.ln_f.bias"], *ident))
        if not c.tie_embeddings:
            m.append(("lm_head.weight", ["lm_head.weight"], *ident))
        return m

    split_qkv = [c.n_embd, kv, kv]
    m.append(("wte.weight", ["model.embed_tokens.weight"], *ident))
    for i in range(c.n_layer):
        p, q = f"h.{i}.", f"model.layers.{i}."
        m.append((p + "ln_1.weight", [q + "input_layernorm.weight"], *ident))
        m.append((p + "ln_2.weight", [q + "post_attention_layernorm.weight"], *ident))
        names = [q + f"self_attn.{x}_proj.weight" for x in "qkv"]
        m.append((p + "attn.qkv.weight", names, lambda ts: torch.cat(ts, 0),
                  lambda t: [x.contiguous() for x in t.split(split_qkv, 0)]))
        m.append((p + "attn.proj.weight", [q + "self_attn.o_proj.weight"], *ident))
        if c.bias:
            m.append((p + "attn.qkv.bias", [q + f"self_attn.{x}_proj.bias" for x in "qkv"],
                      lambda ts: torch.cat(ts, 0), lambda t: [x.contiguous() for x in t.split(split_qkv, 0)]))
            m.append((p + "attn.proj.bias", [q + "self_attn.o_proj.bias"], *ident))
        m.append((p + "mlp.fc.weight", [q + "mlp.gate_proj.weight", q + "mlp.up_proj.weight"],
                  lambda ts: torch.cat(ts, 0), lambda t: [x.contiguous() for x in t.chunk(2, 0)]))
        m.append((p + "mlp.proj.weight", [q + "mlp.down_proj.weight"], *ident))
    m.append(("ln_f.weight", ["model.norm.weight"], *ident))
    if not c.tie_embeddings:
        m.append(("lm_head.weight", ["lm_head.weight"], *ident))
    return m


def _ignored(name: str) -> bool:
    """Stored tensors the model recomputes: ALiBi slopes, GPT-2 mask buffers, rotary inv_freq."""
    return (name.endswith(("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq"))
            or name == "transformer.relative_pe.slopes")


# ---------------------------------------------------------------------------------------------
# Reading

def _read_index(model_dir: Path, index: Path) -> dict[str, Path]:
    """tensor name -> shard file of a sharded checkpoint's index. Shard names must stay inside the
    model folder: no absolute paths, no `..` (a symlink inside the folder is followed, as in the Hugging
    Face cache, whose snapshot files link to its blobs)."""
    try:
        wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(wm, dict):
        raise CheckpointError(f"{index}: weight_map is not a mapping of tensor names to shard files")
    where, shards = {}, {}
    for k, v in wm.items():
        if v not in shards:
            if not isinstance(v, str) or not v:
                raise CheckpointError(f"{index}: shard file name for {k!r} is not a file name: {v!r}")
            posix, win = PurePosixPath(v.replace("\\", "/")), PureWindowsPath(v)
            if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts:
                raise CheckpointError(f"{index}: shard {v!r} (for {k!r}) points outside the model folder "
                                      f"{model_dir}; an index may only name files inside it")
            shards[v] = model_dir / posix
        where[k] = shards[v]
    return where


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files that hold a model directory's weights: the shards its index names (each
    must exist), model.safetensors, or every *.safetensors. CheckpointError when there are none: a
    folder of pickles is refused by name."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_index(model_dir, index).values()))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) named by the index are missing: {missing}")
        return files
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    pickles = [n for n in PICKLE_NAMES if (model_dir / n).exists()] + [p.name for p in model_dir.glob("*.bin")]
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle checkpoints ({', '.join(sorted(set(pickles)))}); dhad refuses to "
            "load pickles (they can run arbitrary code). Convert them to safetensors on a trusted machine.")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


class _TensorSource:
    """All tensors of a single-file or sharded safetensors checkpoint, opened lazily."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            self.where = _read_index(model_dir, index)
        else:
            self.where = {}
            for f in weight_files(model_dir):
                self.where.update({k: f for k in self._keys(f)})
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        path = self.where.get(name)
        if path is None:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        if not path.exists():
            raise CheckpointError(f"{path}: shard named by the index is missing (needed for {name!r})")
        try:
            h = self._handles.get(path)
            if h is None:
                h = self._handles[path] = safe_open(str(path), framework="pt")
            return h.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} (corrupt or truncated file: {e})") from None

    def close(self):
        self._handles.clear()


def is_gguf_file(path) -> bool:
    """A file that starts with GGUF's magic (any name: Ollama stores its models as sha256-... blobs)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_model_dir(path: str | os.PathLike, download: bool = False) -> Path:
    """A local model directory; with download=True a Hugging Face repo id is fetched (safetensors and
    JSON/tokenizer files only, never pickles) on a networked machine."""
    p = Path(path)
    if p.is_dir() or is_gguf_file(p) or (p.is_file() and p.suffix.lower() == ".gguf"):  # a GGUF file is a model
        return p
    if not download:
        raise FileNotFoundError(
            f"model directory {str(path)!r} not found. dhad loads local directories; to fetch a model from the "
            "Hugging Face Hub pass --download (or download=True), e.g. inceptionai/jais-family-590m-chat.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError("downloading needs huggingface_hub: pip install 'dhad[hub]'") from None
    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"]))
    except Exception as e:
        raise RuntimeError(f"could not download {path!r} from the Hugging Face Hub (offline or no access?): {e}") from None


def load_config(model_dir: str | os.PathLike) -> Config:
    return Config.from_file(Path(model_dir) / "config.json")


def _read_tensors(model_dir: Path, config, expected: dict[str, tuple]) -> Iterator[tuple[str, torch.Tensor]]:
    """(dhad name, tensor) for every tensor of the checkpoint, one at a time (safetensors are memory
    mapped), shapes checked against ``expected``; unexpected tensors in the files are an error."""
    src = _TensorSource(model_dir)
    try:
        for name, hf_names, to_dhad, _ in _key_map(config):
            parts = [src.get(n) for n in hf_names]
            for n, x in zip(hf_names, parts):
                if not x.is_floating_point():
                    raise CheckpointError(f"{src.where[n]}: tensor {n!r} has dtype {x.dtype}; model weights "
                                          "must be floating point (float32, bfloat16, float16)")
            t = to_dhad(parts)
            want = expected[name]
            if tuple(t.shape) != want:
                shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip(hf_names, parts))
                raise CheckpointError(f"{src.where[hf_names[0]]}: shape mismatch for {shapes}: the config "
                                      f"({model_dir / 'config.json'}) expects {name} {want}, got {tuple(t.shape)}")
            del parts
            yield name, t
        known = {n for _, hf, _, _ in _key_map(config) for n in hf}
        unexpected = [k for k in src.where if k not in known and not _ignored(k) and k != "lm_head.weight"]
        if unexpected:
            raise CheckpointError(f"unexpected tensors in {model_dir} for this config: {unexpected[:5]}"
                                  f"{' ...' if len(unexpected) > 5 else ''}")
    finally:
        src.close()


def quantization_of(model_dir: str | os.PathLike) -> dict | None:
    """{"mode", "group_size"} when config.json records a dhad weight-only quantisation, else None."""
    p = Path(model_dir) / "config.json"
    try:
        qc = json.loads(p.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # load_config reports a bad config.json
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "dhad":
        raise CheckpointError(f"{p}: quantization_config {qc!r} is not one dhad reads (quant_method 'dhad'); "
                              "GPTQ/AWQ/bitsandbytes checkpoints are not supported")
    return {"mode": qc.get("mode"), "group_size": qc.get("group_size")}


def load_model(path: str | os.PathLike, dtype="float32", device="cpu", download: bool = False,
               adapter: str | os.PathLike | None = None, quantize: str | None = None,
               group_size: int | None = None) -> Transformer:
    """Load a Jais- or Llama-layout HF model directory into a dhad Transformer (eval mode).
    adapter: a LoRA adapter directory in PEFT's format (dhad- or PEFT-trained), applied unmerged
    (`dhad.lora.load_adapter`; `dhad.lora.merge_lora` folds it in).

    quantize: "int8" or "int4" (group_size 32 / 64 / 128, default 64) quantises the linears after loading
    (`dhad.quant`). A directory written from a quantised model (config.json `quantization_config`) loads
    quantised without the argument; asking it for another scheme is an error."""
    model_dir = resolve_model_dir(path, download=download)
    if quantize is not None or group_size is not None:
        group_size = quant.check_scheme(quantize, group_size)
    if model_dir.is_file():  # a GGUF file (llama.cpp / Ollama), dequantised by dhad.gguf
        if adapter is not None and quantize is not None:
            raise quant.QuantError("a LoRA adapter on a quantised model is not supported")
        from dhad.gguf import load_gguf
        model = load_gguf(model_dir).to(device=device, dtype=to_dtype(dtype))
        if quantize is not None:  # e.g. a q4_0 file from Ollama, run on dhad's int4 kernels
            quant.quantize(model, quantize, group_size)
        if adapter is not None:
            from dhad.lora import load_adapter
            load_adapter(model, adapter)
        return model.eval()
    config = load_config(model_dir)
    dt = to_dtype(dtype)
    stored = quantization_of(model_dir)
    if adapter is not None and (quantize is not None or stored is not None):
        raise quant.QuantError("a LoRA adapter on a quantised model is not supported: merge it into the "
                               "full-precision model (dhad.lora.merge_lora), then quantise")
    if stored is not None:
        if quantize is not None and (quantize, group_size) != (stored["mode"], stored["group_size"]):
            raise quant.QuantError(f"{model_dir} is already quantised ({stored['mode']}, group size "
                                   f"{stored['group_size']}); load it without quantize= or start from the "
                                   "full-precision model")
        model = _load_quantized(model_dir, config, dt, device, stored)
        _check_tokenizer_ids(model_dir, config)
        return model.eval()
    with torch.device("meta"):
        model = Transformer(config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state = {name: t.to(device=device, dtype=dt) for name, t in _read_tensors(model_dir, config, expected)}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.reset_buffers()  # the non-persistent buffers are still on the meta device
    if quantize is not None:
        quant.quantize(model, quantize, group_size)
    _check_tokenizer_ids(model_dir, config)
    if adapter is not None:
        from dhad.lora import load_adapter
        load_adapter(model, adapter)
    return model.eval()


def _load_quantized(model_dir: Path, config: Config, dt: torch.dtype, device, scheme: dict) -> Transformer:
    """A checkpoint saved from a quantised model: dhad's parameter names, quantised linears as
    `dhad.quant` stores them, everything else in floating point (cast to ``dt``)."""
    src = _TensorSource(model_dir)
    try:
        state = {k: src.get(k) for k in src.where}
    finally:
        src.close()
    with torch.device("meta"):
        model = Transformer(config)
    try:
        quant.load_quantized_state(model, state, scheme["mode"], scheme["group_size"], device=device)
    except quant.QuantError as e:
        raise CheckpointError(f"{model_dir}: {e}") from None
    state = {k: t.to(device=device, dtype=dt) for k, t in state.items()}
    try:
        res = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{model_dir}: tensors do not match the config for a quantised model: {e}") from None
    quantized = tuple(n + "." for n in quant.linear_names(model))  # already in place
    missing = [k for k in res.missing_keys if not k.startswith(quantized)]
    if missing or res.unexpected_keys:
        raise CheckpointError(f"{model_dir}: quantised checkpoint does not match its config: missing "
                              f"{missing[:5]}, unexpected {res.unexpected_keys[:5]}")
    model.reset_buffers()
    return model


def _check_tokenizer_ids(model_dir: Path, config) -> None:
    """Warn once when config.json's bos/eos/pad ids disagree with the directory's tokenizer."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return
    from dhad.tokenizer import TokenizerError, check_config_ids, load_tokenizer
    try:
        tok = load_tokenizer(model_dir)
    except TokenizerError:
        return  # a broken tokenizer is reported where it is used
    check_config_ids(config, tok, where=str(model_dir))


def load_into(model: Transformer, path: str | os.PathLike, assign=None) -> Transformer:
    """Fill an existing model's parameters from a checkpoint, tensor by tensor, each put in place by
    ``assign(param, full)`` (default: copy) -- in particular a model built on the meta device and
    sharded with FSDP2, then `to_empty`'d: with `dhad.train.distributed.assign_full` each rank keeps
    only its shard of each tensor, so no rank ever holds the whole model.
    The checkpoint's config must give the model's shapes (a mismatch names the tensor)."""
    if assign is None:
        def assign(p, t):
            with torch.no_grad():
                p.copy_(t)
    model_dir = resolve_model_dir(path)
    config = load_config(model_dir)
    params = dict(model.named_parameters())  # a tied lm_head is wte: listed once
    expected = {n: tuple(p.shape) for n, p in params.items()}
    expected.setdefault("lm_head.weight", expected["wte.weight"])
    for name, t in _read_tensors(model_dir, config, expected):
        if name in params:
            assign(params[name], t)
    return model.reset_buffers()


# ---------------------------------------------------------------------------------------------
# Writing

def hf_state_dict(model: Transformer, dtype=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs in the checkpoint layout of model.config.hf_layout."""
    sd = model.state_dict()
    dt = to_dtype(dtype) if dtype is not None else None
    for name, hf_names, _, to_hf in _key_map(model.config):
        t = sd[name].detach()
        if dt is not None:
            t = t.to(dt)
        for n, x in zip(hf_names, to_hf(t.cpu())):
            yield n, x.contiguous()


def _quantized_state_dict(model: Transformer, dtype=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a quantised model under dhad's own parameter names: the quantised linears as
    `dhad.quant` stores them (codes and bfloat16 scales, never cast), the rest cast to ``dtype``."""
    dt = to_dtype(dtype) if dtype is not None else None
    quantized = tuple(n + "." for n in quant.linear_names(model))
    for name, t in model.state_dict().items():
        t = t.detach()
        if dt is not None and t.is_floating_point() and not name.startswith(quantized):
            t = t.to(dt)
        yield name, t.cpu().contiguous()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_model(model: Transformer, out_dir: str | os.PathLike, tokenizer=None, dtype=None,
               max_shard_size: int | str | None = None, generation_config: dict | None = None) -> Path:
    """Write `model` as a Hugging Face model directory (config.json, safetensors, generation_config.json,
    and tokenizer files when `tokenizer` — a dhad Tokenizer or a directory holding tokenizer files — is given).

    max_shard_size: bytes or a string like "2GB"; bigger models are split into model-0000i-of-0000n
    shards with model.safetensors.index.json (written last).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size) if max_shard_size else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    scheme = quant.scheme_of(model)
    for name, t in (hf_state_dict(model, dtype) if scheme is None else _quantized_state_dict(model, dtype)):
        nbytes = t.numel() * t.element_size()
        if limit and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        _atomic_save(shards[0], out / "model.safetensors")
    else:
        n = len(shards)
        weight_map, total = {}, 0
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _atomic_save(sh, out / fname)
            for k, t in sh.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        _atomic_write_text(out / "model.safetensors.index.json",
                           json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(to_dtype(dtype) if dtype else model.dtype).replace("torch.", "")
    if scheme is not None:  # transformers cannot read it (it warns "Unknown quantization type, got dhad")
        cfg["quantization_config"] = {"quant_method": "dhad", **scheme}
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
           "pad_token_id": model.config.pad_token_id}
    if tokenizer is not None:  # the special ids the tokenizer (and the shards it made) use win
        from dhad.tokenizer import load_tokenizer, special_ids_of
        tok = tokenizer if hasattr(tokenizer, "save") else load_tokenizer(tokenizer)
        ids = {k: v for k, v in special_ids_of(tok).items() if v is not None}
        cfg.update(ids)
        gen.update(ids)
    _atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, ensure_ascii=False))
    gen.update(generation_config or {})
    _atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2))
    if tokenizer is not None:
        if hasattr(tokenizer, "save"):
            tokenizer.save(out)
        else:
            src = Path(tokenizer)
            for f in TOKENIZER_FILES:
                if (src / f).exists() and (src / f).resolve() != (out / f).resolve():
                    shutil.copyfile(src / f, out / f)
    return out


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out_dir: str | os.PathLike, dtype=None,
                  max_shard_size: int | str | None = None) -> Path:
    """Fold a LoRA adapter (PEFT's format) into its base and write the merged model as a Hugging Face
    model directory (the base's tokenizer files and generation config carried over); returns it."""
    from dhad.lora import merge_lora
    base_dir = resolve_model_dir(base)
    model = merge_lora(load_model(base_dir, adapter=adapter))
    tok = base_dir if any((base_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else None
    gen = None
    if (base_dir / "generation_config.json").is_file():
        try:
            gen = json.loads((base_dir / "generation_config.json").read_text(encoding="utf-8"))
        except ValueError:
            gen = None
    src_dtype = json.loads((base_dir / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
    if dtype is None and src_dtype in DTYPES:
        dtype = src_dtype
    return save_model(model, out_dir, tokenizer=tok, dtype=dtype, max_shard_size=max_shard_size,
                      generation_config=gen if isinstance(gen, dict) else None)


def _parse_size(s) -> int:
    if isinstance(s, int):
        return s
    s = str(s).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def memory_needed(config: Config, dtype="float32") -> int:
    """Bytes the weights take in memory at `dtype` (tied embeddings counted once)."""
    return config.num_params() * torch.empty(0, dtype=to_dtype(dtype)).element_size()
