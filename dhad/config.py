"""Model configuration: one dataclass for Jais-family, Jais-adapted and ALLaM.

Architecture differences are flags, not classes (litgpt / gpt-fast style):
  norm      "layernorm" (Jais, bias + eps) | "rmsnorm" (Llama)
  position  "alibi" (Jais-family) | "rope" (Llama) | "learned" (GPT-2-style wpe)
  mlp       "swiglu_jais" (c_proj(c_fc(x) * silu(c_fc2(x)))) | "gated" (Llama down(silu(gate) * up)) | "gelu"
  n_kv_head grouped-query attention (Llama-2-70B: 8)
  bias, tie_embeddings, and the muP scalars (embedding scale, 1/d attention, logits scale).

`Config.from_hf` / `to_hf` convert to and from a Hugging Face config.json in the Jais layout
(`model_type: jais`, both the `mup_*` and the older `embeddings_scale`/`width_scale` spellings)
and the Llama layout (`model_type: llama`).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

_NO = object()


class ConfigError(ValueError):
    """A configuration that cannot describe a model: names the field (dhad's name, or the config.json
    key it came from), the problem and the bad value."""

    def __init__(self, problem: str, field: str | None = None, value: Any = _NO, source: str | None = None):
        self.problem, self.field, self.value, self.source = problem, field, value, source
        where = source or "config"
        if field:
            where = f"{where}: {field}" if source else f"{where}.{field}"
        super().__init__(f"{where}: {problem}" + ("" if value is _NO else f", got {value!r}"))

    def renamed(self, field: str | None = None, source: str | None = None) -> "ConfigError":
        return ConfigError(self.problem, field or self.field, self.value, source or self.source)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy integers too


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_scaling(field: str, v) -> None:
    if v is None:
        return
    if not isinstance(v, dict):
        raise ConfigError("must be a mapping like {type: linear, factor: 2.0} or null", field, v)
    for k in ("factor", "train_seq_len"):
        if k in v and not (_is_num(v[k]) and v[k] > 0):
            raise ConfigError("must be a positive number", f"{field}.{k}", v[k])


POS_INT, POS_NUM, NUM, BOOL, MAPPING = ("must be a positive integer", "must be a positive number",
                                        "must be a finite number", "must be true or false", "must be a mapping")


def _pos_int(v) -> bool:
    return _is_int(v) and v >= 1


def _pos_num(v) -> bool:
    return _is_num(v) and v > 0


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_dict(v) -> bool:
    return isinstance(v, dict)


def _hf(d: dict, key: str, ok, problem: str, default: Any = _NO):
    """config.json's `key`, checked; a missing (or null) key takes `default`, or is an error without one."""
    v = d.get(key)
    if v is None:
        if default is _NO:
            raise ConfigError("missing (required)", key)
        return default
    if not ok(v):
        raise ConfigError(problem, key, v)
    return v


def _build(cls, hf_names: dict, kw: dict) -> "Config":
    """cls(**kw); a field's error names the config.json key it came from."""
    try:
        return cls(**kw)
    except ConfigError as e:
        raise e.renamed(field=hf_names.get(e.field, e.field)) from None


JAIS_VOCAB = 84992
ADAPTED_VOCAB = 64000  # Llama-2's 32,000 + 32,000 Arabic tokens
# Jais-family muP constants (from the published config.json files)
JAIS_MUP_EMB = 9.1705785388303
JAIS_MUP_ALPHA = 1.09518349815769


@dataclass
class Config:
    vocab_size: int = 256
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (MHA)
    # None -> 4 * n_embd, for every MLP kind: what the Jais (GPT-2) code reads from a config.json
    # without n_inner. The presets give it explicitly (the published sizes: 8/3 * n_embd rounded up to
    # a multiple of 16 for most of the Jais family, Llama's 11008 = 8/3 * 4096 rounded up to 256).
    n_inner: int | None = None
    block_size: int = 2048  # maximum context (n_positions / max_position_embeddings)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    position: str = "alibi"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type"/"rope_type": "linear", "factor": f}
    alibi_scaling: dict | None = None  # {"type": "linear", "factor": f} or {"type": "linear", "train_seq_len": n}
    mlp: str = "swiglu_jais"
    bias: bool = True
    tie_embeddings: bool = True
    # muP scalars. embedding_scale multiplies token (+position) embeddings; logits_scale multiplies
    # the logits; attn_scale_power p gives scores q.k / head_dim**p (1 for muP, 0.5 standard).
    embedding_scale: float = 1.0
    logits_scale: float = 1.0
    attn_scale_power: float = 0.5
    # which HF layout this model reads/writes ("jais" or "llama"); derived from the flags by default
    hf_layout: str | None = None
    # Token ids (from the checkpoint's config.json)
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 0
    # muP bookkeeping that to_hf writes back (Jais): keep both the split and the product
    mup_width_scale: float | None = None
    mup_output_alpha: float | None = None
    jais_key_style: str = "mup"  # "mup" (mup_* keys) | "legacy" (embeddings_scale / width_scale)
    initializer_range: float = 0.02
    name: str | None = None

    def __post_init__(self):
        """Check every field's type and range (a ConfigError names the field and the value), then fill
        the derived defaults."""
        def need(f, ok, problem, optional=False, to=None):
            v = getattr(self, f)
            if v is None and optional:
                return
            if not ok(v):
                raise ConfigError(problem + (" (or null)" if optional else ""), f, v)
            if to is not None:
                setattr(self, f, to(v))

        for f in ("vocab_size", "n_layer", "n_embd", "n_head", "block_size"):
            need(f, _pos_int, POS_INT, to=int)
        for f in ("n_kv_head", "n_inner"):
            need(f, _pos_int, POS_INT, optional=True, to=int)
        for f in ("norm_eps", "rope_theta"):
            need(f, _pos_num, POS_NUM, to=float)
        for f in ("embedding_scale", "logits_scale", "attn_scale_power", "initializer_range"):
            need(f, _is_num, NUM, to=float)
        for f in ("mup_width_scale", "mup_output_alpha"):
            need(f, _pos_num, POS_NUM, optional=True, to=float)
        for f in ("bias", "tie_embeddings"):
            need(f, _is_bool, BOOL)
        for f in ("bos_token_id", "pad_token_id"):
            need(f, lambda v: _is_int(v) and v >= 0, "must be a token id (an integer >= 0)", optional=True)
        need("eos_token_id", lambda v: (_is_int(v) and v >= 0) or (isinstance(v, list) and v and all(
            _is_int(x) and x >= 0 for x in v)), "must be a token id or a list of token ids", optional=True)
        for f, allowed in (("norm", ("layernorm", "rmsnorm")), ("position", ("alibi", "rope", "learned")),
                           ("mlp", ("swiglu_jais", "gated", "gelu")), ("jais_key_style", ("mup", "legacy")),
                           ("hf_layout", ("jais", "llama", None))):
            need(f, lambda v: v in allowed, f"must be one of {list(allowed)}")
        need("name", _is_str, "must be a string", optional=True)
        _check_scaling("rope_scaling", self.rope_scaling)
        _check_scaling("alibi_scaling", self.alibi_scaling)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise ConfigError(f"must be divisible by n_head ({self.n_head})", "n_embd", self.n_embd)
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"must be divisible by n_kv_head ({self.n_kv_head})", "n_head", self.n_head)
        if self.hf_layout is None:
            self.hf_layout = "llama" if (self.position == "rope" and self.mlp == "gated") else "jais"

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attn_scale(self) -> float:
        return 1.0 / (self.head_dim ** self.attn_scale_power)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Closed-form parameter count (what the published dimensions give)."""
        E, L, I, V = self.n_embd, self.n_layer, self.n_inner, self.vocab_size
        kv = self.n_kv_head * self.head_dim
        b = 1 if self.bias else 0
        attn = E * (E + 2 * kv) + b * (E + 2 * kv) + E * E + b * E
        n_mats = 2 if self.mlp == "gelu" else 3
        mlp = n_mats * E * I + b * ((n_mats - 1) * I + E)
        norms = (2 * E if self.norm == "layernorm" else E) * 2
        per_layer = attn + mlp + norms
        total = L * per_layer + (2 * E if self.norm == "layernorm" else E)
        if include_embeddings:
            total += V * E * (1 if self.tie_embeddings else 2)
            if self.position == "learned":
                total += self.block_size * E
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6N + attention term
        (PaLM appendix B: 6N + 12 L H Q T with T the sequence length)."""
        T = seq_len or self.block_size
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.n_embd  # LM head matmul
        return 6 * n + 12 * self.n_layer * self.n_embd * T

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in PRESETS:
            close = [k for k in PRESETS if name.split("-")[0] in k][:8]
            raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}" if not close
                           else f"unknown model preset {name!r}; did you mean one of {close}?")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls(name=name, **d)

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        """The Config of a config.json (a model directory or the file). A file that cannot describe a
        model raises ConfigError naming the file, the key and the bad value."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {p}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"not valid JSON ({e})", source=str(p)) from None
        try:
            if isinstance(d, dict) and "model_type" not in d and "architectures" not in d and "hf_layout" in d:
                unknown = sorted(set(d) - {f.name for f in fields(cls)})
                if unknown:  # a Config.to_dict() dump: every key is a field
                    raise ConfigError(f"unknown key(s) {unknown} in a dhad config")
                return cls(**d)
            return cls.from_hf(d)
        except ConfigError as e:
            raise e.renamed(source=str(p)) from None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Config":
        """Build a Config from a Hugging Face config.json dict (Jais or Llama layout)."""
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object, got {type(d).__name__}")
        mt = _hf(d, "model_type", lambda v: isinstance(v, str), "must be a string", None)
        arch = _hf(d, "architectures", lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
                   "must be a list of class names", None) or [""]
        if mt == "jais" or (not mt and arch[0].startswith("JAIS")):
            return cls._from_jais(d)
        if mt in ("llama", "mistral") or (not mt and arch[0].startswith("Llama")):
            return cls._from_llama(d)
        if not mt and not arch[0]:
            raise ConfigError("missing; dhad reads Jais (model_type 'jais') and Llama (model_type 'llama') "
                              "checkpoints", "model_type")
        raise ConfigError(f"unsupported model_type {mt!r} (architectures {d.get('architectures')}); dhad reads "
                          "Jais (model_type 'jais') and Llama (model_type 'llama') checkpoints")

    @classmethod
    def _from_jais(cls, d):
        act = _hf(d, "activation_function", _is_str, "must be a string", "gelu_new")
        pos = _hf(d, "position_embedding_type", _is_str, "must be a string", "learned")
        if pos not in ("alibi", "learned"):
            raise ConfigError("unsupported (dhad reads 'alibi' and 'learned')", "position_embedding_type", pos)
        if act not in ("swiglu", "gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise ConfigError("unsupported (dhad reads swiglu and the gelu variants)", "activation_function", act)
        mlp = "swiglu_jais" if act == "swiglu" else "gelu"
        n_embd = _hf(d, "n_embd", _pos_int, POS_INT)
        n_inner = _hf(d, "n_inner", _pos_int, POS_INT, None) or 4 * n_embd
        if "mup_width_scale" in d or "mup_embeddings_scale" in d or "mup_output_alpha" in d:
            style = "mup"
            width = _hf(d, "mup_width_scale", _pos_num, POS_NUM, 1.0)
            alpha = _hf(d, "mup_output_alpha", _pos_num, POS_NUM, 1.0)
            emb = _hf(d, "mup_embeddings_scale", _is_num, NUM, 1.0)
            logits_scale = alpha * width
            qk_by_d = _hf(d, "mup_scale_qk_dot_by_d", _is_bool, BOOL, False)
        else:
            style = "legacy"
            width, alpha = None, None
            emb = _hf(d, "embeddings_scale", _is_num, NUM, 1.0)
            logits_scale = _hf(d, "width_scale", _is_num, NUM, 1.0)  # the whole logits scale in the old spelling
            qk_by_d = _hf(d, "scale_qk_dot_by_d", _is_bool, BOOL, False)
        hf_names = {"block_size": "n_positions", "norm_eps": "layer_norm_epsilon", "tie_embeddings": "tie_word_embeddings",
                    "embedding_scale": "mup_embeddings_scale" if style == "mup" else "embeddings_scale"}
        return _build(cls, hf_names, dict(
            vocab_size=_hf(d, "vocab_size", _pos_int, POS_INT), n_layer=_hf(d, "n_layer", _pos_int, POS_INT),
            n_embd=n_embd, n_head=_hf(d, "n_head", _pos_int, POS_INT),
            n_inner=n_inner, block_size=d.get("n_positions", 2048), norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5), position=pos, alibi_scaling=d.get("alibi_scaling"),
            mlp=mlp, bias=True, tie_embeddings=d.get("tie_word_embeddings", True),
            embedding_scale=emb, logits_scale=logits_scale, attn_scale_power=1.0 if qk_by_d else 0.5,
            hf_layout="jais", bos_token_id=d.get("bos_token_id", 0), eos_token_id=d.get("eos_token_id", 0),
            pad_token_id=d.get("pad_token_id", 0), mup_width_scale=width, mup_output_alpha=alpha,
            jais_key_style=style, initializer_range=d.get("initializer_range", 0.02),
        ))

    @classmethod
    def _from_llama(cls, d):
        act = _hf(d, "hidden_act", _is_str, "must be a string", "silu")
        if act != "silu":
            raise ConfigError("unsupported (dhad reads silu)", "hidden_act", act)
        # transformers >= 5 writes `rope_parameters` (rope_type, factor, rope_theta); older files `rope_scaling`
        rp = _hf(d, "rope_parameters", _is_dict, MAPPING, None) or {}
        rs = _hf(d, "rope_scaling", _is_dict, MAPPING, None) or (
            {k: v for k, v in rp.items() if k != "rope_theta"} if rp else None)
        if rs and rs.get("rope_type", rs.get("type")) == "default":
            rs = None
        factor = None
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("linear", "default"):
                raise ConfigError("unsupported type (dhad supports 'linear')", "rope_scaling", kind)
            factor = _hf(rs, "factor", _pos_num, POS_NUM)
        n_embd, n_head = _hf(d, "hidden_size", _pos_int, POS_INT), _hf(d, "num_attention_heads", _pos_int, POS_INT)
        if n_embd % n_head:
            raise ConfigError(f"must be divisible by num_attention_heads ({n_head})", "hidden_size", n_embd)
        n_kv = _hf(d, "num_key_value_heads", _pos_int, POS_INT, n_head)
        if n_head % n_kv:
            raise ConfigError(f"must be divisible by num_key_value_heads ({n_kv})", "num_attention_heads", n_head)
        if d.get("head_dim") not in (None, n_embd // n_head):
            raise ConfigError(f"!= hidden_size / num_attention_heads ({n_embd // n_head}) is not supported",
                              "head_dim", d.get("head_dim"))
        theta = d.get("rope_theta")
        if theta is None:
            theta = rp.get("rope_theta", 10000.0)
        hf_names = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers", "n_kv_head": "num_key_value_heads",
                    "n_inner": "intermediate_size", "block_size": "max_position_embeddings", "norm_eps": "rms_norm_eps",
                    "rope_theta": "rope_theta", "bias": "attention_bias", "tie_embeddings": "tie_word_embeddings"}
        return _build(cls, hf_names, dict(
            vocab_size=_hf(d, "vocab_size", _pos_int, POS_INT), n_layer=_hf(d, "num_hidden_layers", _pos_int, POS_INT),
            n_embd=n_embd, n_head=n_head, n_kv_head=n_kv,
            n_inner=_hf(d, "intermediate_size", _pos_int, POS_INT),
            block_size=d.get("max_position_embeddings", 4096), norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-5),
            position="rope", rope_theta=theta,
            rope_scaling={"rope_type": "linear", "factor": float(factor)} if rs else None,
            mlp="gated", bias=d.get("attention_bias", False), tie_embeddings=d.get("tie_word_embeddings", False),
            hf_layout="llama", bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 2),
            pad_token_id=d.get("pad_token_id"), initializer_range=d.get("initializer_range", 0.02),
        ))

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config.json dict for this model (Jais or Llama layout)."""
        if self.hf_layout == "llama":
            if self.position != "rope" or self.mlp != "gated" or self.norm != "rmsnorm":
                raise ValueError("the Llama layout needs rope + gated MLP + rmsnorm")
            d = {
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": self.vocab_size, "hidden_size": self.n_embd, "intermediate_size": self.n_inner,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim, "hidden_act": "silu",
                "max_position_embeddings": self.block_size, "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "rope_parameters": {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta},
                "attention_bias": self.bias, "mlp_bias": False, "tie_word_embeddings": self.tie_embeddings,
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "initializer_range": self.initializer_range,
                "torch_dtype": "float32", "use_cache": True, "attention_dropout": 0.0, "pretraining_tp": 1,
            }
            return d
        if self.norm != "layernorm" or self.position == "rope":
            raise ValueError("the Jais layout needs layernorm and alibi/learned positions")
        d = {
            "architectures": ["JAISLMHeadModel"], "model_type": "jais",
            "vocab_size": self.vocab_size, "n_embd": self.n_embd, "n_head": self.n_head, "n_layer": self.n_layer,
            "n_inner": self.n_inner, "n_positions": self.block_size, "layer_norm_epsilon": self.norm_eps,
            "position_embedding_type": self.position,
            "activation_function": "swiglu" if self.mlp == "swiglu_jais" else "gelu_new",
            "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "scale_attn_weights": True,
            "initializer_range": self.initializer_range, "torch_dtype": "float32", "use_cache": True,
            "auto_map": {"AutoConfig": "configuration_jais.JAISConfig",
                         "AutoModelForCausalLM": "modeling_jais.JAISLMHeadModel"},
        }
        if self.position == "alibi":
            d["alibi_scaling"] = self.alibi_scaling
        if self.jais_key_style == "legacy":
            d.update(embeddings_scale=self.embedding_scale, width_scale=self.logits_scale,
                     scale_qk_dot_by_d=self.attn_scale_power == 1.0)
        else:
            width = self.mup_width_scale if self.mup_width_scale is not None else self.logits_scale
            alpha = self.mup_output_alpha if self.mup_output_alpha is not None else 1.0
            if not math.isclose(width * alpha, self.logits_scale, rel_tol=1e-9):
                width, alpha = self.logits_scale, 1.0
            d.update(mup_width_scale=width, mup_output_alpha=alpha, mup_embeddings_scale=self.embedding_scale,
                     mup_scale_qk_dot_by_d=self.attn_scale_power == 1.0)
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **kw) -> "Config":
        return replace(self, **kw)


# ---------------------------------------------------------------------------------------------
# Presets: every model in the cards, plus tiny debug models.

def _jais_family(n_embd, n_head, n_inner, n_layer, n_positions=2048, **kw):
    # Jais-family muP: width scale = 256 / n_embd (published configs: 0.1666.. for 590m, 0.1 for 2p7b,
    # 0.05 for 13b); logits scale = output alpha * width scale; attention scores scaled by 1/d.
    width = 256 / n_embd
    d = dict(vocab_size=JAIS_VOCAB, n_embd=n_embd, n_head=n_head, n_inner=n_inner, n_layer=n_layer,
             block_size=n_positions, norm="layernorm", position="alibi", mlp="swiglu_jais", bias=True,
             tie_embeddings=True, embedding_scale=JAIS_MUP_EMB, logits_scale=JAIS_MUP_ALPHA * width,
             mup_width_scale=width, mup_output_alpha=JAIS_MUP_ALPHA, attn_scale_power=1.0,
             bos_token_id=0, eos_token_id=0, pad_token_id=0)
    d.update(kw)
    return d


def _llama(n_embd, n_inner, n_layer, n_head, n_kv_head=None, vocab=ADAPTED_VOCAB, block=4096, **kw):
    d = dict(vocab_size=vocab, n_embd=n_embd, n_inner=n_inner, n_layer=n_layer, n_head=n_head,
             n_kv_head=n_kv_head or n_head, block_size=block, norm="rmsnorm", norm_eps=1e-5, position="rope",
             rope_theta=10000.0, mlp="gated", bias=False, tie_embeddings=False, bos_token_id=1,
             eos_token_id=2, pad_token_id=None)
    d.update(kw)
    return d


PRESETS: dict[str, dict[str, Any]] = {
    "jais-family-590m": _jais_family(1536, 12, 4096, 18),
    # 1p3b: not published in a form we could read. Derived from the family's pattern: n_inner is
    # 8/3 * n_embd rounded up to a multiple of 16 (6832, 10928, 13664 in the published sizes),
    # head_dim 128, width 2048 and 24 layers (the GPT-3 "XL" shape that 1.3B models use).
    "jais-family-1p3b": _jais_family(2048, 16, 5472, 24),
    "jais-family-2p7b": _jais_family(2560, 20, 6832, 32),
    "jais-family-6p7b": _jais_family(4096, 32, 10928, 32),
    "jais-family-13b": _jais_family(5120, 40, 13664, 40),
    "jais-family-30b-8k": _jais_family(7168, 56, 19114, 48, n_positions=8192),
    "jais-family-30b-16k": _jais_family(7168, 56, 19114, 48, n_positions=16384),
    # Older checkpoints with the legacy key spelling (embeddings_scale / width_scale / scale_qk_dot_by_d)
    "jais-13b": _jais_family(5120, 40, 13653, 40, embedding_scale=14.6, logits_scale=0.111,
                             mup_width_scale=None, mup_output_alpha=None, jais_key_style="legacy"),
    "jais-30b-v3": _jais_family(7168, 56, 19114, 48, n_positions=8192, embedding_scale=14.6,
                                logits_scale=2.22 * 0.0357, mup_width_scale=0.0357, mup_output_alpha=2.22),
    # Jais-adapted (Llama-2 + 32k Arabic tokens) and ALLaM (Llama architecture)
    "jais-adapted-7b": _llama(4096, 11008, 32, 32),
    "jais-adapted-13b": _llama(5120, 13824, 40, 40),
    "jais-adapted-70b": _llama(8192, 28672, 80, 64, n_kv_head=8),
    "allam-2-7b": _llama(4096, 11008, 32, 32),
    # Tiny presets for tests and CPU experiments (not from any card)
    "tiny-jais": _jais_family(64, 4, 172, 2, n_positions=512, vocab_size=512),
    "tiny-llama": _llama(64, 172, 2, 4, n_kv_head=2, vocab=512, block=512),
    "small-jais": _jais_family(256, 4, 688, 4, n_positions=1024, vocab_size=8192),
    "small-llama": _llama(256, 688, 4, 4, n_kv_head=2, vocab=8192, block=1024),
}
for _base in [k for k in PRESETS if k.startswith("jais-family-")] + ["jais-13b", "jais-30b-v3"]:
    PRESETS[_base + "-chat"] = dict(PRESETS[_base])
for _base in ("jais-adapted-7b", "jais-adapted-13b", "jais-adapted-70b"):
    PRESETS[_base + "-chat"] = dict(PRESETS[_base])
PRESETS["allam-2-7b-instruct"] = dict(PRESETS["allam-2-7b"])

# Nominal sizes the cards state, for reporting name rounding (params, billions)
NOMINAL_SIZES = {
    "jais-family-590m": 0.59, "jais-family-1p3b": 1.3, "jais-family-2p7b": 2.7, "jais-family-6p7b": 6.7,
    "jais-family-13b": 13, "jais-family-30b-8k": 30, "jais-family-30b-16k": 30, "jais-13b": 13,
    "jais-30b-v3": 30, "jais-adapted-7b": 7, "jais-adapted-13b": 13, "jais-adapted-70b": 70, "allam-2-7b": 7,
}
