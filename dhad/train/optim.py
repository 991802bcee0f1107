"""AdamW with parameter groups: who gets weight decay, and muP learning rates.

Weight decay (decoupled, AdamW) goes to weight matrices only by default: `optimizer.no_decay`
lists the kinds that are exempt — `bias`, `norm` (LayerNorm / RMSNorm gains and biases) and
`embedding` (token and position tables; a tied LM head *is* the token table). Remove `embedding`
from the list to decay embeddings as nanoGPT does. Kinds are decided by module type and name, never by
model name.

muP (Maximal Update Parametrization, Yang et al. "Tensor Programs V", as Cerebras trains the
Jais family): with a config that has `mup_width_scale` (= base width / width, 256 / n_embd for the
family), the Adam learning rate of the *hidden* weight matrices — the attention and MLP projections
inside the blocks — is lr x mup_width_scale, while embeddings, the output layer, norms and biases keep
the base lr. The Cerebras Model Zoo spells this `adjust_learning_rate: {decoder_kernel: width_scale}`.
Together with the model's muP forward scalars (embedding scale, 1/d attention, output alpha x width
scale) and init (`init_weights`: hidden std x sqrt(width_scale)), this is what lets an lr tuned on a
256-wide proxy transfer to the 590M ... 30B models. `optimizer.mup: auto` turns it on exactly when
the config has the muP width scale; a Llama-family (jais-adapted, ALLaM) config has none.

Each group carries `lr_mult`; the loop sets `group["lr"] = lr(step) * group["lr_mult"]`.
"""
from __future__ import annotations

import torch
from torch import nn

from dhad.model import RMSNorm


def classify(model: nn.Module) -> dict[str, tuple[nn.Parameter, str]]:
    """name -> (parameter, kind) with kind in embedding | norm | bias | hidden | output.
    Tied parameters appear once, under their first name (the embedding for a tied LM head)."""
    out, seen = {}, set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.Embedding):
                kind = "embedding"
            elif isinstance(mod, (nn.LayerNorm, RMSNorm)) or "norm" in type(mod).__name__.lower():
                kind = "norm"
            elif p_name == "bias" or p.dim() < 2:
                kind = "bias"
            elif name.startswith("lm_head") or name.endswith("lm_head.weight"):
                kind = "output"
            else:
                kind = "hidden"
            out[name] = (p, kind)
    return out


def mup_lr_scale(config, mup="auto") -> float | None:
    """The hidden-matrix lr multiplier under muP, or None when muP is off."""
    width = getattr(config, "mup_width_scale", None)
    if mup is False or (mup == "auto" and not width):
        return None
    if not width:
        raise ValueError("optimizer.mup: true, but the model config has no mup_width_scale")
    return float(width)


def param_groups(model: nn.Module, weight_decay: float, no_decay=("bias", "norm", "embedding"),
                 hidden_lr_mult: float | None = None) -> list[dict]:
    """AdamW groups keyed by (decay?, lr multiplier); each group lists its parameter names."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, (p, kind) in classify(model).items():
        decay = weight_decay > 0 and kind not in no_decay
        mult = hidden_lr_mult if (hidden_lr_mult and kind == "hidden") else 1.0
        g = groups.setdefault((decay, mult), {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                                              "lr_mult": mult})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, spec, config, device_type: str = "cpu",
                    adapters_only: bool = False) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters (all of them: frozen ones simply get no gradient and no update).
    adapters_only (LoRA): only the parameters that require grad, all at the base lr (muP's hidden
    multiplier is for the model's own matrices, not the adapters')."""
    mult = None if adapters_only else mup_lr_scale(config, spec.mup)
    groups = param_groups(model, spec.weight_decay, tuple(spec.no_decay), mult)
    if adapters_only:
        for g in groups:
            keep = [i for i, p in enumerate(g["params"]) if p.requires_grad]
            g["params"], g["names"] = [g["params"][i] for i in keep], [g["names"][i] for i in keep]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("adapters_only: the model has no trainable parameters (apply LoRA first)")
    # The fused kernel (one pass over each tensor) on CUDA, and on CPU for plain tensors: measured on
    # this 2-core CPU for 50M parameters, fused 1.0 s/step, foreach 1.4 s, torch's CPU default (a Python
    # loop over tensors) 7.8 s. FSDP's sharded DTensors take the foreach path.
    sharded = any(type(p).__name__ == "DTensor" for g in groups for p in g["params"])
    fused = spec.fused if spec.fused is not None else (device_type == "cuda" or not sharded)
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                             lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, **kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
