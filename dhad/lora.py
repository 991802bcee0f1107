"""LoRA adapters (and QLoRA's 4-bit base), applied from outside the model, saved in PEFT's format.

    cfg = LoraConfig(r=16, alpha=32, targets=("q", "k", "v", "o", "gate", "up", "down"))
    apply_lora(model, cfg)              # base frozen; only the adapters require grad
    save_adapter(model, "adapter/")     # adapter_config.json + adapter_model.safetensors (PEFT's names)
    load_adapter(base_model, "adapter/")   # a dhad- or PEFT-trained adapter, applied (unmerged)
    merge_lora(model)                   # W += scaling * B @ A; plain nn.Linear again

The model (dhad.model) stays plain: `apply_lora` swaps its nn.Linear projections for `LoraLinear`, an
nn.Linear holding the *same* weight and bias (state dict names unchanged) plus, per sub-projection,
A [r, in] and B [out_sub, r]:  y = x W^T + b + scaling * B (A dropout(x)),  scaling = alpha / r
(alpha / sqrt(r) with rsLoRA). dhad fuses q|k|v in `attn.qkv` and gate|up in `mlp.fc`; as PEFT does on
an unfused HF Llama, each targeted sub-projection gets its own A/B (the rows it owns in the fused
output), the others none. One dropout mask is shared by the sub-projections of one fused layer (PEFT
draws one per layer: the same in distribution).

Target names: q, k, v, o (attn.proj), gate, up, down (mlp.proj). On the Jais layout the published
model fuses q|k|v itself (`c_attn`, HF Conv1D), so PEFT puts one A/B on all of it: q, k and v are
targeted together there, as the sub-projection "qkv". Jais' `c_fc2` is the gate, `c_fc` the up
projection (a GELU model's one `c_fc` is "up").

Adapter files are PEFT's: keys `base_model.model.<HF module name>.lora_A.weight` / `.lora_B.weight`
(e.g. `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, for Jais
`base_model.model.transformer.h.3.attn.c_attn.lora_A.weight`), A [r, in], B [out, r] in both layouts
(PEFT's fan_in_fan_out for Conv1D only changes how it merges). `peft.PeftModel.from_pretrained` on the
transformers Llama loads what `save_adapter` writes, and `load_adapter` loads what PEFT saves.

QLoRA: `apply_lora(model, cfg, quantize="nf4")` stores every targeted layer's frozen weight as 4-bit
NormalFloat (QLoRA, Dettmers et al. 2023) through bitsandbytes: per block of 64 values the nearest of
the 16 NF4 levels times the block's absmax, the absmax scales optionally double-quantised (8-bit, blocks
of 256); `bitsandbytes.matmul_4bit` dequantises the layer in the forward and again in the backward
(the full weight is never kept), on CPU and CUDA. Chosen by measurement over torchao's NF4Tensor
(same format, same bytes): on this CPU bitsandbytes dequantises a 2048x2048 weight in 37 ms (bf16) /
4 ms (fp32) against torchao's 183 / 89 ms, and a [512, 2048] layer's forward+backward costs 1.3x / 1.1x
the dense layer's against torchao's 3.9x / 1.8x (docs/finetuning.md).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dhad.config import Config

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


class LoraError(ValueError):
    """A bad LoRA configuration or adapter directory (the message names the problem)."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    rslora: bool = False       # scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)
    init: str = "default"      # PEFT's init_lora_weights: "default" (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r))
    base_model: str | None = field(default=None, compare=False)  # written as base_model_name_or_path

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise LoraError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise LoraError(f"targets must be distinct names among {', '.join(TARGETS)}; got {list(self.targets)}")
        if self.init not in ("default", "gaussian"):
            raise LoraError(f"init must be 'default' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# ---------------------------------------------------------------------------------------------
# Where each target lives: dhad module (relative to block h.N) + sub-projection, and its HF name

def _subs(config: Config, target: str) -> tuple[str, str]:
    """(module within a block, sub-projection) of a target on this model."""
    if target in ("q", "k", "v"):
        return "attn.qkv", ("qkv" if config.hf_layout == "jais" else target)
    if target == "o":
        return "attn.proj", "o"
    if target == "down":
        return "mlp.proj", "down"
    if config.mlp == "gelu":
        if target == "gate":
            raise LoraError("this model's MLP has no gate projection (GELU): target 'up' and 'down'")
        return "mlp.fc", "up"
    return "mlp.fc", target


def sub_rows(config: Config, sub: str, out_features: int) -> slice:
    """The rows of a dhad module's output (``out_features`` wide) that a sub-projection owns, e.g.
    ``sub_rows(config, "k", 128)`` -> slice(64, 96) on tiny-llama's attn.qkv (read_adapter's ``sub``)."""
    nq, nkv = config.n_embd, config.n_kv_head * config.head_dim
    if sub == "q":
        return slice(0, nq)
    if sub == "k":
        return slice(nq, nq + nkv)
    if sub == "v":
        return slice(nq + nkv, nq + 2 * nkv)
    if sub == "gate" and config.mlp != "gelu":
        return slice(0, config.n_inner)
    if sub == "up" and config.mlp != "gelu":
        return slice(config.n_inner, 2 * config.n_inner)
    return slice(0, out_features)


_LLAMA_HF = {("attn.qkv", "q"): "self_attn.q_proj", ("attn.qkv", "k"): "self_attn.k_proj",
             ("attn.qkv", "v"): "self_attn.v_proj", ("attn.proj", "o"): "self_attn.o_proj",
             ("mlp.fc", "gate"): "mlp.gate_proj", ("mlp.fc", "up"): "mlp.up_proj", ("mlp.proj", "down"): "mlp.down_proj"}
_JAIS_HF = {("attn.qkv", "qkv"): "attn.c_attn", ("attn.proj", "o"): "attn.c_proj",
            ("mlp.fc", "gate"): "mlp.c_fc2", ("mlp.fc", "up"): "mlp.c_fc", ("mlp.proj", "down"): "mlp.c_proj"}
_HF_BLOCK = {"llama": "model.layers.", "jais": "transformer.h."}


def _hf_name(layout: str, layer: int, module: str, sub: str) -> str:
    return _HF_BLOCK[layout] + f"{layer}." + (_LLAMA_HF if layout == "llama" else _JAIS_HF)[(module, sub)]


def _dhad_name(hf_module: str) -> tuple[str, tuple[str, str], int] | None:
    """HF module name -> (layout, (module within block, sub), layer), or None."""
    for layout, table in (("llama", _LLAMA_HF), ("jais", _JAIS_HF)):
        head = _HF_BLOCK[layout]
        if hf_module.startswith(head):
            layer, _, rest = hf_module[len(head):].partition(".")
            for key, name in table.items():
                if rest == name and layer.isdigit():
                    return layout, key, int(layer)
    return None


# PEFT target_modules names (suffixes of module names) per target
_PEFT_TARGET = {"llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                          "up": "up_proj", "down": "down_proj"},
                "jais": {"q": "c_attn", "k": "c_attn", "v": "c_attn", "o": "attn.c_proj", "gate": "c_fc2",
                         "up": "c_fc", "down": "mlp.c_proj"}}
_SUB_TARGETS = {"q": ("q",), "k": ("k",), "v": ("v",), "qkv": ("q", "k", "v"), "o": ("o",), "gate": ("gate",),
                "up": ("up",), "down": ("down",)}


# ---------------------------------------------------------------------------------------------
# The layer

class LoraLinear(nn.Linear):
    """An nn.Linear (the frozen base: the original module's own weight and bias tensors) plus LoRA
    adapters on row blocks of its output: ``lora_A[sub]`` [r, in], ``lora_B[sub]`` [rows, r].

    With ``nf4=True`` (QLoRA) the weight is replaced by its NF4 codes (buffer ``weight_nf4``) and a
    bitsandbytes QuantState; ``weight`` is then None."""

    def __init__(self, base: nn.Linear, rows: dict[str, slice], cfg: LoraConfig, dtype=None, nf4: bool = False,
                 double_quant: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bias = base.bias
        self.r, self.scaling, self.disabled = cfg.r, cfg.scaling, False
        self.rows = dict(sorted(rows.items(), key=lambda kv: kv[1].start))
        w = base.weight
        dev = w.device
        dt = dtype or w.dtype
        self.quant_state = None
        if nf4:
            packed, self.quant_state = quantize_nf4(w.data, double_quant)
            self.weight = None
            self.register_buffer("weight_nf4", packed)
        else:
            self.weight = w
        self.lora_A = nn.ParameterDict({s: nn.Parameter(torch.empty(cfg.r, self.in_features, device=dev, dtype=dt))
                                        for s in self.rows})
        self.lora_B = nn.ParameterDict({s: nn.Parameter(torch.zeros(sl.stop - sl.start, cfg.r, device=dev, dtype=dt))
                                        for s, sl in self.rows.items()})
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def _apply(self, fn, recurse=True):  # .to(device) moves the NF4 QuantState with the codes
        out = super()._apply(fn, recurse)
        if self.quant_state is not None:
            self.quant_state.to(self.weight_nf4.device)
        return out

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as a plain tensor (NF4 dequantised)."""
        return self.weight.detach() if self.quant_state is None else dequantize_nf4(self.weight_nf4, self.quant_state)

    def reset_lora(self, init: str = "default", generator: torch.Generator | None = None) -> None:
        """PEFT's initialisation: B = 0; A Kaiming-uniform (a = sqrt(5), nn.Linear's) or N(0, 1/r)."""
        with torch.no_grad():
            for s, a in self.lora_A.items():
                full = torch.empty(a.shape, dtype=torch.float32)
                if init == "gaussian":
                    full.normal_(0.0, 1.0 / self.r, generator=generator)
                else:
                    bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                    full.uniform_(-bound, bound, generator=generator)
                a.copy_(full)
                self.lora_B[s].zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B (A x) over the whole output (zeros where no adapter sits)."""
        subs = list(self.rows)
        A = torch.cat([self.lora_A[s] for s in subs], 0) if len(subs) > 1 else self.lora_A[subs[0]]
        h = F.linear(self.drop(x).to(A.dtype), A)  # [..., n_subs * r]: one matmul for every sub-projection
        pieces, at = [], 0
        for i, s in enumerate(subs):
            sl = self.rows[s]
            if sl.start > at:
                pieces.append(h.new_zeros(*h.shape[:-1], sl.start - at))
            pieces.append(F.linear(h[..., i * self.r:(i + 1) * self.r], self.lora_B[s]))
            at = sl.stop
        if at < self.out_features:
            pieces.append(h.new_zeros(*h.shape[:-1], self.out_features - at))
        return torch.cat(pieces, -1) * self.scaling if len(pieces) > 1 else pieces[0] * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_state is None:
            y = F.linear(x, self.weight, self.bias)
        else:  # dequantised here and again in the backward: the full weight is never kept
            y = _bnb().matmul_4bit(x, self.weight_nf4.t(), quant_state=self.quant_state, bias=self.bias)
        if self.disabled or not self.rows:
            return y
        return y + self.delta(x).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A as a plain tensor (in the adapters' dtype, or W's when it is floating point)."""
        w = self.base_weight()
        out = w.clone().float()
        for s, sl in self.rows.items():
            out[sl] += self.scaling * (self.lora_B[s].detach().float() @ self.lora_A[s].detach().float())
        return out.to(w.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora r={self.r} on {list(self.rows)}, scaling={self.scaling:g}"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


# ---------------------------------------------------------------------------------------------
# NF4 (QLoRA's base)

NF4_BLOCK = 64


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as e:
        raise LoraError("QLoRA (quantize='nf4') needs bitsandbytes: pip install 'dhad[qlora]'") from e
    return bitsandbytes


def quantize_nf4(w: torch.Tensor, double_quant: bool = True):
    """(packed uint8 codes [numel / 2, 1], bitsandbytes QuantState) of a weight in NF4, blocks of 64."""
    return _bnb().functional.quantize_4bit(w.detach().contiguous(), blocksize=NF4_BLOCK,
                                           compress_statistics=double_quant, quant_type="nf4")


def dequantize_nf4(packed: torch.Tensor, state) -> torch.Tensor:
    return _bnb().functional.dequantize_4bit(packed, state)


# ---------------------------------------------------------------------------------------------
# Applying, merging, switching off

def _block_modules(model: nn.Module) -> list[nn.Module]:
    if not hasattr(model, "h") or not hasattr(model, "config"):
        raise LoraError("apply_lora expects a dhad Transformer (with .h blocks and .config)")
    return list(model.h)


def _get(block: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        block = getattr(block, part)
    return block


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(block, parent) if parent else block, name, module)


def plan(config: Config, targets) -> dict[str, list[str]]:
    """{module within a block: [sub-projections]} for these targets on this model."""
    out: dict[str, list[str]] = {}
    for t in targets:
        mod, sub = _subs(config, t)
        if sub not in out.setdefault(mod, []):
            out[mod].append(sub)
    if config.hf_layout == "jais" and "qkv" in out.get("attn.qkv", []):
        chosen = [t for t in targets if t in ("q", "k", "v")]
        if len(chosen) != 3:
            raise LoraError(f"the Jais layout fuses q|k|v in one projection (c_attn), which PEFT adapts as one "
                            f"layer: target q, k and v together (got {chosen})")
    return out


def apply_lora(model: nn.Module, cfg: LoraConfig, *, seed: int | None = 0, quantize: str | None = None,
               double_quant: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Add LoRA adapters to a dhad Transformer in place and freeze everything else; returns it.

    quantize="nf4": QLoRA -- the targeted layers' frozen weights stored as NF4 (``double_quant``: the
    block scales too). The adapters take the base weights' dtype unless ``dtype`` says otherwise. Apply before compiling, wrapping
    (FSDP2) or building the optimizer; `trainable_parameters(model)` are the adapters."""
    if quantize not in (None, "nf4"):
        raise LoraError(f"quantize must be None or 'nf4', got {quantize!r}")
    if lora_layers(model):
        raise LoraError("the model already has LoRA adapters (merge_lora or load a fresh model first)")
    config = model.config
    where = plan(config, cfg.targets)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for block in _block_modules(model):
        for path, subs in where.items():
            base = _get(block, path)
            layer = LoraLinear(base, {s: sub_rows(config, s, base.out_features) for s in subs}, cfg, dtype=dtype,
                               nf4=quantize == "nf4", double_quant=double_quant)
            layer.reset_lora(cfg.init, g)
            _set(block, path, layer)
    model.lora_config = cfg
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model alone (e.g. DPO's reference: the base with adapters off, no second copy)."""
    layers = list(lora_layers(model).values())
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.disabled = b


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (NF4 bases dequantised) and put plain nn.Linear layers
    back; returns the model (a plain dhad Transformer that save_model writes as an HF checkpoint)."""
    for block in _block_modules(model):
        for name, m in list(block.named_modules()):
            if isinstance(m, LoraLinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                lin.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
                lin.bias = m.bias
                _set(block, name, lin)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---------------------------------------------------------------------------------------------
# PEFT's file format

def adapter_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor for every adapter of the model (what adapter_model.safetensors holds).
    ``state_dict``: the model's full state dict to take the tensors from (e.g. gathered from FSDP
    shards by `dhad.train.distributed.full_state_dict`); default the modules' own tensors."""
    layout = model.config.hf_layout
    out = {}
    for name, m in lora_layers(model).items():
        _, layer, path = name.split(".", 2)  # h.N.<module path>
        for s in m.rows:
            key = PREFIX + _hf_name(layout, int(layer), path, s)
            for ab, params in (("A", m.lora_A), ("B", m.lora_B)):
                t = state_dict[f"{name}.lora_{ab}.{s}"] if state_dict is not None else params[s]
                out[f"{key}.lora_{ab}.weight"] = t.detach().cpu().contiguous()
    return out


def peft_config(cfg: LoraConfig, layout: str) -> dict:
    """adapter_config.json as PEFT (0.x, LoraConfig) writes it, for these settings."""
    names = sorted({_PEFT_TARGET[layout][t] for t in cfg.targets})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.base_model,
            "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": names,
            "use_rslora": cfg.rslora, "init_lora_weights": True if cfg.init == "default" else cfg.init,
            "fan_in_fan_out": layout == "jais", "bias": "none", "modules_to_save": None,
            "inference_mode": True, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None, "revision": None}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter directory (tensors from ``state_dict`` when given,
    see `adapter_state`); returns it."""
    from safetensors.torch import save_file
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_layers(model):
        raise LoraError("the model has no LoRA adapters to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    save_file(adapter_state(model, state_dict), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    text = json.dumps(peft_config(cfg, model.config.hf_layout), indent=2)
    (out / (ADAPTER_CONFIG + ".tmp")).write_text(text)
    os.replace(out / (ADAPTER_CONFIG + ".tmp"), out / ADAPTER_CONFIG)
    return out


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]]:
    """Read a PEFT LoRA adapter directory (dhad- or PEFT-written) without a model.

    Returns (config, weights): ``weights[(module, sub)] = (A [r, in], B [rows, r])`` where ``module`` is
    the dhad module name (``"h.3.attn.qkv"``, ``"h.3.attn.proj"``, ``"h.3.mlp.fc"``, ``"h.3.mlp.proj"``)
    and ``sub`` the sub-projection whose output rows B writes: ``"q"``, ``"k"``, ``"v"`` (Llama; rows of
    `attn.qkv` in that order), ``"qkv"`` (Jais' c_attn: all of `attn.qkv`), ``"o"``, ``"gate"`` / ``"up"``
    (the first / second half of a gated `mlp.fc`; a GELU model's whole `mlp.fc` is ``"up"``), ``"down"``.
    The adapter's contribution is ``config.scaling * B @ A @ x`` on those rows (`sub_rows(model_config,
    sub, out_features)` gives them as a slice). Tensors are as stored
    (dtype and all); `config.targets` lists the targets found in the file."""
    from safetensors import safe_open
    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise LoraError(f"{d}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    if not w_path.is_file():
        raise LoraError(f"{d}: no {ADAPTER_WEIGHTS} (adapters are read from safetensors only)")
    try:
        pc = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise LoraError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(pc, dict) or pc.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{cfg_path}: peft_type {pc.get('peft_type') if isinstance(pc, dict) else pc!r} "
                        "is not supported (LoRA only)")
    for key, ok in (("use_dora", False), ("bias", "none")):
        if pc.get(key, ok) != ok:
            raise LoraError(f"{cfg_path}: {key}={pc[key]!r} is not supported (need {ok!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key):
            raise LoraError(f"{cfg_path}: per-layer {key} is not supported")
    if pc.get("modules_to_save"):
        raise LoraError(f"{cfg_path}: modules_to_save {pc['modules_to_save']} is not supported (adapters only)")
    weights: dict[tuple[str, str], list] = {}
    layouts, subs = set(), set()
    with safe_open(str(w_path), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise LoraError(f"{w_path}: unexpected tensor {key!r} (expected PEFT LoRA keys "
                                f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
            hf_module, ab = key[len(PREFIX):-len(".lora_A.weight")], key[-len("A.weight")]
            found = _dhad_name(hf_module)
            if found is None:
                raise LoraError(f"{w_path}: adapter on {hf_module!r}, a module dhad cannot map "
                                "(Llama q/k/v/o/gate/up/down_proj, Jais c_attn/c_proj/c_fc/c_fc2)")
            layout, (mod, sub), layer = found
            layouts.add(layout)
            subs.add(sub)
            pair = weights.setdefault((f"h.{layer}.{mod}", sub), [None, None])
            pair[0 if ab == "A" else 1] = f.get_tensor(key)
    if not weights:
        raise LoraError(f"{w_path}: no LoRA tensors")
    if len(layouts) > 1:
        raise LoraError(f"{w_path}: mixes Llama and Jais module names")
    r = int(pc.get("r", 8))
    for (mod, sub), (a, b) in weights.items():
        if a is None or b is None:
            raise LoraError(f"{w_path}: {mod} {sub} has only one of lora_A / lora_B")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoraError(f"{w_path}: {mod} {sub}: A {tuple(a.shape)} / B {tuple(b.shape)} do not have rank r={r}")
    targets = tuple(t for t in TARGETS if any(t in _SUB_TARGETS[s] for s in subs))
    init = pc.get("init_lora_weights", True)
    cfg = LoraConfig(r=r, alpha=float(pc.get("lora_alpha", 8)), dropout=float(pc.get("lora_dropout") or 0.0),
                     targets=targets, rslora=bool(pc.get("use_rslora", False)),
                     init="gaussian" if init == "gaussian" else "default", base_model=pc.get("base_model_name_or_path"))
    return cfg, {k: (v[0], v[1]) for k, v in weights.items()}


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, quantize: str | None = None,
                 double_quant: bool = True) -> nn.Module:
    """Apply a PEFT-format adapter to a (plain) dhad Transformer, unmerged; returns the model.
    Shapes are checked against the model; a layer the file does not name keeps no adapter there."""
    cfg, weights = read_adapter(adapter_dir)
    config = model.config
    layout = {s for (_, s) in weights}
    if config.hf_layout == "llama" and "qkv" in layout or config.hf_layout == "jais" and layout & {"q", "k", "v"}:
        raise LoraError(f"{adapter_dir}: the adapter's module names are for the other layout than this "
                        f"model's ({config.hf_layout})")
    apply_lora(model, cfg, quantize=quantize, double_quant=double_quant, seed=None)
    layers = lora_layers(model)
    seen = set()
    with torch.no_grad():
        for (mod, sub), (a, b) in weights.items():
            m = layers.get(mod)
            if m is None or sub not in m.rows:
                raise LoraError(f"{adapter_dir}: adapter for {mod} {sub}, which this model does not have")
            if tuple(a.shape) != tuple(m.lora_A[sub].shape) or tuple(b.shape) != tuple(m.lora_B[sub].shape):
                raise LoraError(f"{adapter_dir}: {mod} {sub}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the "
                                f"model (A {tuple(m.lora_A[sub].shape)}, B {tuple(m.lora_B[sub].shape)})")
            m.lora_A[sub].copy_(a)
            m.lora_B[sub].copy_(b)
            seen.add((mod, sub))
    for name, m in layers.items():  # layers the file leaves out (PEFT's layers_to_transform): no adapter
        for s in list(m.rows):
            if (name, s) not in seen:
                del m.lora_A[s], m.lora_B[s]
                del m.rows[s]
    return model
