"""Recipe types as plug-ins: what a batch is and what loss it gives. The loop is shared.

A recipe's `type` names an `Objective`. The loop (dhad.train.loop) owns everything else — model,
optimizer, schedule, mixture, precision, gradient accumulation, distributed wrapping, checkpoints,
metrics — and asks the objective only for:

    expected_kind                         shard kind its sources hold ("pretrain" | "sft" | "prefs")
    setup(model, recipe, device, run_dir) once, after the model is built and the sources are opened, before
                                          wrapping and before a checkpoint is loaded on resume (DPO: fix
                                          the reference from the initial weights)
    open_source(name, dir, split, seed, shuffle) -> stream   a training stream (see dhad.train.loader)
    val_items(name, dir, split, seq_len, n)      -> list of items for validation
    collate(items, device)                -> dict of tensors (one micro batch)
    count(batch)                          -> units the loss of this batch sums over, known before the forward
    loss(model, batch)                    -> (loss_sum, count): a sum over counted units (tokens, pairs)
                                            and how many there were; the loop divides by the count over
                                            the whole global batch, so micro batches and processes with
                                            different counts still give the exact global mean.
                                            The LM objectives (pretrain, adapt, sft) ask the model for
                                            the summed loss itself, `model(ids, targets=labels)`, so with
                                            the training kernels (dhad.train.kernels) the LM head and
                                            cross-entropy run fused and chunked.
    metrics()                             -> extra floats for the step record, called on every process at
                                            every logged step (it may all-reduce); e.g. DPO reward margins
    eval_metrics()                        -> extra floats after each evaluation (every process)

Adding a type (DPO, issue 9): write `dhad/train/dpo.py` with a subclass decorated
`@register_objective("dpo")`, add `"dpo": "dhad.train.dpo"` to `LAZY` below, and recipes with
`type: dpo` run through the same loop; `objective:` in the recipe is passed to the constructor
as keyword arguments (e.g. `objective: {beta: 0.1, reference: path}`).
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dhad.data.shards import ShardError, ShardSet, sft_row_to_example
from dhad.model import segments
from dhad.train.loader import DocStream, IndexStream, validation_windows

OBJECTIVES: dict[str, type] = {}
# Objectives that live in their own module, imported on first use.
LAZY: dict[str, str] = {"dpo": "dhad.train.dpo"}


def register_objective(name: str):
    def deco(cls):
        OBJECTIVES[name] = cls
        cls.name = name
        return cls
    return deco


def known_objectives() -> list[str]:
    names = list(OBJECTIVES)
    for k, mod in LAZY.items():
        if k not in names and importlib.util.find_spec(mod) is not None:
            names.append(k)
    return names


def get_objective(name: str, options: dict | None = None) -> Objective:
    if name not in OBJECTIVES and name in LAZY:
        importlib.import_module(LAZY[name])
    if name not in OBJECTIVES:
        raise ValueError(f"unknown recipe type {name!r}; known: {known_objectives()}")
    try:
        return OBJECTIVES[name](**(options or {}))
    except TypeError as e:
        raise ValueError(f"objective options for type {name!r}: {e}") from None


class Objective:
    name = "base"
    expected_kind = "pretrain"

    def setup(self, model, recipe, device, run_dir=None) -> None:
        pass

    def open_shards(self, name: str, path: str | Path, split: str) -> ShardSet:
        ss = ShardSet.open(path, split)
        if ss.kind != self.expected_kind:
            raise ShardError(f"{ss.path}: source {name!r} holds {ss.kind!r} shards; a {self.name!r} recipe "
                             f"needs {self.expected_kind!r} shards")
        return ss

    def open_source(self, name, path, split, seed, shuffle):
        raise NotImplementedError

    def val_items(self, name, path, split, seq_len, n):
        raise NotImplementedError

    def collate(self, items, device) -> dict:
        raise NotImplementedError

    def count(self, batch) -> torch.Tensor:
        """How many units this micro batch's loss sums over (known before the forward pass)."""
        return (batch["labels"] != -100).sum()

    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def metrics(self) -> dict:
        return {}

    def eval_metrics(self) -> dict:
        return {}


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies in fp32 (targets -100 ignored), from materialised logits.
    dhad's own model does not come here: `model(ids, targets=labels)` computes the loss inside its
    forward, and with the training kernels (dhad.train.kernels.linear_cross_entropy) fuses the LM head
    with it, never building the [B, T, vocab] logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


@register_objective("pretrain")
class LanguageModeling(Objective):
    """Causal LM on EOS-separated document streams, loss on all tokens (the cards' pretraining)."""
    expected_kind = "pretrain"

    def open_source(self, name, path, split, seed, shuffle):
        return DocStream(self.open_shards(name, path, split), name, seed, shuffle)

    def val_items(self, name, path, split, seq_len, n):
        return validation_windows(self.open_shards(name, path, split), seq_len, n)

    def collate(self, items, device):
        w = torch.from_numpy(np.stack(items)).to(device, non_blocking=True)
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    def loss(self, model, batch):
        s = model(batch["input_ids"], targets=batch["labels"])
        return s, torch.tensor(batch["labels"].numel(), device=s.device)


@register_objective("adapt")
class AdaptivePretraining(LanguageModeling):
    """Adaptive pretraining: the LM loss of `pretrain`; the loop freezes per stage (`trainable`)."""


@register_objective("sft")
class InstructionTuning(Objective):
    """Loss on assistant tokens only; packed rows keep examples apart with segment ids."""
    expected_kind = "sft"

    def open_source(self, name, path, split, seed, shuffle):
        ss = self.open_shards(name, path, split)
        return IndexStream(ss.n_rows, ss.row, name, seed, shuffle, tokens_per_item=int(ss.seq_len), kind="sft")

    def val_items(self, name, path, split, seq_len, n):
        ss = self.open_shards(name, path, split)
        return [ss.row(i) for i in range(min(n, ss.n_rows))]

    def collate(self, items, device):
        t = np.stack([it[0] for it in items])
        m = np.stack([it[1] for it in items])
        s = np.stack([it[2] for it in items])
        ids, labels, seg = sft_row_to_example(t, m, s)
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
        return {"input_ids": to(ids), "labels": to(labels), "segment_ids": to(seg)}

    def loss(self, model, batch):
        labels = batch["labels"]
        return model(batch["input_ids"], **segments(batch["segment_ids"]), targets=labels), (labels != -100).sum()
