"""Recipes, learning-rate schedule and optimizer groups: every shipped recipe validates, the cards' numbers
are what the recipes say, bad recipes fail with errors that name the field."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dhad.config import Config
from dhad.model import Transformer
from dhad.train.optim import build_optimizer, classify, param_groups
from dhad.train.recipe import (
    RecipeError,
    find_recipe,
    load_recipe,
    parse_recipe,
    parse_tokens,
    shipped_recipes,
)
from dhad.train.schedule import build_plan, lr_at

SHIPPED = shipped_recipes()


def test_every_recipe_type_has_a_tiny_cpu_variant():
    names = [p.stem for p in SHIPPED]
    assert "jais-adapted-70b-chat-sft" in names
    kinds = {load_recipe(p).type for p in SHIPPED}
    tiny_kinds = {load_recipe(p).type for p in SHIPPED if p.stem.startswith("tiny-")}
    assert {"pretrain", "adapt", "sft"} <= kinds <= tiny_kinds | {"dpo"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_validates_and_plans(path):
    r = load_recipe(path)
    plan = build_plan(r, world_size=1, seq_len_default=r.batch.seq_len or 64)
    assert plan.total_steps > 0 and plan.total_tokens > 0
    if r.model.preset:
        assert Config.from_name(r.model.preset).name == r.model.preset
    for s, st in zip(r.stages, plan.stage_names):
        assert s.name == st
    if path.stem.startswith("tiny-"):  # a tiny preset, or the output of another tiny recipe
        assert r.model.preset in ("tiny-jais", "tiny-llama") or r.model.init_from.startswith("runs/tiny-")
        assert plan.total_steps <= 200 and max(s.seq_len for s in plan.segments) <= 256


def _recipe_params(path, r) -> float:
    """Parameters of the model a shipped recipe trains: its preset's, or (init_from a directory that
    exists only where it trains) those of the preset that the recipe's or the directory's name starts
    with (jais-adapted-70b-adapt -> jais-adapted-70b, models/allam-2-7b-sft -> allam-2-7b)."""
    from dhad.config import PRESETS
    if r.model.preset:
        return Config.from_name(r.model.preset).num_params()
    if path.stem.startswith("tiny-"):
        return 0  # the output of another tiny recipe
    names = [p for p in PRESETS for n in (path.stem, Path(r.model.init_from).name) if n.startswith(p + "-")]
    assert names, f"{path.stem}: which model does it train?"
    return Config.from_name(max(names, key=len)).num_params()


def test_large_recipes_build_on_the_meta_device():
    """From 30B parameters (120 GB of fp32 weights) a whole model per process does not fit a GPU host:
    the shipped recipes that big build on the meta device and fill each rank's shards (docs/training.md)."""
    big = {p.stem for p in SHIPPED if _recipe_params(p, load_recipe(p)) >= 30e9}
    assert big == {"jais-family-30b-16k-pretrain", "jais-adapted-70b-adapt", "jais-adapted-70b-chat-sft"}
    for p in SHIPPED:
        r = load_recipe(p)
        assert r.model.meta_init == (p.stem in big), p.stem
        if r.model.meta_init:
            assert r.distributed == "fsdp"


def test_jais_adapted_70b_chat_sft_has_the_cards_numbers():
    r = load_recipe(find_recipe("jais-adapted-70b-chat-sft"))
    assert r.type == "sft" and r.precision == "fp32"
    assert r.optimizer.name == "adamw" and r.optimizer.lr == 2e-5 and r.optimizer.weight_decay == 0.1
    assert r.schedule.warmup_steps == 380 and r.schedule.total_steps == 13175 and r.schedule.min_lr == 2e-6
    assert r.batch.global_batch_size == 264 and r.batch.seq_len == 4096
    plan = build_plan(r, world_size=8)
    assert plan.total_steps == 13175 and plan.at(0).global_seqs == 264 and plan.at(0).grad_accum == 33
    # card: "0 to 2.0e-05 (<= 380 warmup steps), 2.0e-05 to 2.0e-06 (> 380 and <= 13175 steps, cosine)"
    sched = lambda s: lr_at(s, r.optimizer.lr, 380, plan.total_steps, r.schedule.min_lr)
    assert sched(0) == pytest.approx(2e-5 / 380, rel=1e-12)      # update 1
    assert sched(379) == pytest.approx(2e-5, rel=1e-12)          # update 380: the peak
    assert sched(13174) == pytest.approx(2e-6, rel=1e-12)        # update 13,175: the floor
    mid = 380 + (13175 - 380) / 2                                # halfway through the cosine
    assert sched(int(mid) - 1) == pytest.approx(2e-6 + 0.5 * 1.8e-5, rel=1e-3)
    assert all(sched(s) >= sched(s + 1) for s in range(379, 13174, 97))


def test_allam_two_step_schedule_and_jais_card_mixtures():
    r = load_recipe(find_recipe("allam-2-7b-pretrain"))
    assert [(s.tokens, s.mix) for s in r.stages] == [(4 * 10**12, {"en": 1.0}), (1_200_000_000_000, {"en": 0.5, "ar": 0.5})]
    assert r.precision == "bf16" and r.model.preset == "allam-2-7b"
    card = {"jais-family-590m-pretrain": (480e9, {"en": 283, "ar": 141, "code": 56}),
            "jais-family-30b-16k-pretrain": (1666e9, {"en": 980, "ar": 490, "code": 196}),
            "jais-adapted-7b-adapt": (39e9, {"en": 18, "ar": 19, "code": 2}),
            "jais-adapted-13b-adapt": (280e9, {"en": 127, "ar": 140, "code": 13}),
            "jais-adapted-70b-adapt": (371e9, {"en": 33, "ar": 334, "code": 4})}
    for name, (tokens, mix) in card.items():
        r = load_recipe(find_recipe(name))
        assert r.stages[-1].mix == mix and r.stages[-1].tokens == tokens, name
        assert sum(mix.values()) * 1e9 == tokens, name  # the table's columns sum to its total
        if r.type == "adapt":
            assert r.stages[0].trainable == "embeddings" and r.stages[0].tokens == 15e9  # card: ~15B tokens
    ctx = load_recipe(find_recipe("jais-family-30b-16k-pretrain")).context
    assert [c.seq_len for c in ctx] == [2048, 8192, 16384]  # card: 2k -> 8k -> 16k


@pytest.mark.parametrize("value,expected", [("4T", 4 * 10**12), ("1.2T", 1_200_000_000_000), ("15B", 15 * 10**9),
                                            ("283B", 283 * 10**9), ("500M", 500 * 10**6), ("64k", 64_000),
                                            (1234, 1234), ("2.5e3", 2500)])
def test_parse_tokens(value, expected):
    assert parse_tokens(value) == expected


@pytest.mark.parametrize("patch,match", [
    ({"optimizer": {"weight_decay_typo": 0.1}}, r"optimizer: unknown key\(s\) \['weight_decay_typo'\]"),
    ({"optimizer": {"lr": "fast"}}, r"optimizer\.lr: expected a number"),
    ({"stages": [{"tokens": "lots", "mix": {"en": 1}}]}, r"stages\[0\]\.tokens: expected a token count"),
    ({"stages": [{"mix": {"en": 1}}, {"tokens": "1k", "mix": {"en": 1}}]}, r"every stage but the last needs a token budget"),
    ({"stages": [{"tokens": "1k", "mix": {"fr": 1}}]}, r"unknown source 'fr'"),
    ({"stages": [{"tokens": "1k", "mix": {"en": -1}}]}, r"mix\.en: weight must be a number >= 0"),
    ({"type": "rlhf"}, r"type: must be one of"),
    ({"model": {"preset": "tiny-jais", "init_from": "x"}}, r"exactly one of model\.preset"),
    ({"model": {"preset": "jais-tiny"}}, r"unknown preset 'jais-tiny'"),
    ({"precision": "fp16"}, r"precision: must be one of"),
    ({"batch": {"micro_batch_size": 3, "global_batch_size": 8, "seq_len": 8}}, r"not a multiple of micro_batch_size"),
    ({"schedule": {"total_steps": 10, "warmup_steps": 20}}, r"warmup_steps \(20\) exceeds total_steps \(10\)"),
    ({"schedule": {}}, r"schedule\.total_steps: needed unless the last stage has a token budget"),
    ({"context": [{"seq_len": 8}, {"seq_len": 16}]}, r"context\[0\]: every phase but the last needs"),
    ({"type": "adapt"}, r"adapt: needs stages"),
    ({"batch": {"micro_batch_size": 2, "global_batch_size": 0, "seq_len": 8}}, r"batch\.global_batch_size: must be >= 1, got 0"),
    ({"context": [{"seq_len": 8, "until_step": 4, "global_batch_size": 0}, {"seq_len": 16}]},
     r"context\[0\]\.global_batch_size: must be >= 1, got 0"),
    ({"context": [{"seq_len": 8, "micro_batch_size": 0}]}, r"context\[0\]\.micro_batch_size: must be >= 1, got 0"),
    ({"lr": 0.1}, r"^bad\.yaml: unknown top-level key\(s\) \['lr'\]; allowed: \['batch'"),
])
def test_bad_recipes_name_the_field(patch, match):
    d = {"type": "pretrain", "model": {"preset": "tiny-jais"}, "data": {"sources": {"en": "shards/en"}},
         "schedule": {"total_steps": 10}, "batch": {"micro_batch_size": 2, "seq_len": 8}}
    d.update(patch)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(d, "bad.yaml")


def test_recipe_file_errors_and_overrides(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: [unclosed\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(bad)
    r = load_recipe(find_recipe("tiny-allam-2-pretrain"), ["schedule.total_steps=7", "optimizer.lr=0.5",
                                                          "stages.1.mix.ar=3"])
    assert r.schedule.total_steps == 7 and r.optimizer.lr == 0.5 and r.stages[1].mix == {"en": 0.5, "ar": 3}


# ---------------------------------------------------------------------------------------------
# Optimizer groups

def test_param_groups_no_decay_on_norms_biases_embeddings_and_mup_lr():
    cfg = Config.from_name("tiny-jais")  # muP: width scale 256 / 64 = 4 (tiny is narrower than the base)
    m = Transformer(cfg)
    kinds = {n: k for n, (_, k) in classify(m).items()}
    assert kinds["wte.weight"] == "embedding" and "lm_head.weight" not in kinds  # tied: counted once
    assert kinds["h.0.ln_1.weight"] == "norm" and kinds["h.0.ln_1.bias"] == "norm"
    assert kinds["h.0.attn.qkv.bias"] == "bias" and kinds["h.1.mlp.proj.weight"] == "hidden"
    opt = build_optimizer(m, load_recipe(find_recipe("tiny-jais-family-pretrain")).optimizer, cfg)
    by_param = {}
    for g in opt.param_groups:
        for p in g["params"]:
            by_param[id(p)] = g
    named = dict(m.named_parameters())
    assert by_param[id(named["h.0.attn.qkv.weight"])]["weight_decay"] == 0.1
    assert by_param[id(named["h.0.attn.qkv.weight"])]["lr_mult"] == cfg.mup_width_scale == 256 / 64
    for n in ("wte.weight", "h.0.ln_1.weight", "h.0.attn.qkv.bias", "ln_f.bias"):
        assert by_param[id(named[n])]["weight_decay"] == 0.0 and by_param[id(named[n])]["lr_mult"] == 1.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_mup_lr_follows_the_jais_family_width_scale_and_llama_has_none():
    for name, width in (("jais-family-590m", 256 / 1536), ("jais-family-2p7b", 0.1), ("jais-family-13b", 0.05)):
        cfg = Config.from_name(name)
        with torch.device("meta"):
            m = Transformer(cfg)
        groups = param_groups(m, 0.1, hidden_lr_mult=cfg.mup_width_scale)
        hidden = [g for g in groups if any(".attn." in n or ".mlp." in n for n in g["names"] if n.endswith("weight"))]
        assert all(math.isclose(g["lr_mult"], width) for g in hidden if g["weight_decay"] > 0)
    cfg = Config.from_name("tiny-llama")
    m = Transformer(cfg)
    from dhad.train.optim import mup_lr_scale
    assert mup_lr_scale(cfg, "auto") is None
    kinds = {n: k for n, (_, k) in classify(m).items()}
    assert kinds["lm_head.weight"] == "output" and kinds["h.0.ln_1.weight"] == "norm"  # RMSNorm
    with pytest.raises(ValueError, match="no mup_width_scale"):
        mup_lr_scale(cfg, True)


def test_cli_check_prints_the_plan_and_bad_recipes_exit_2(capsys, tmp_path):
    from dhad.cli import main
    assert main(["train", "--recipe", "tiny-allam-2-pretrain", "--check"]) == 0
    out = capsys.readouterr().out
    assert "stage english " in out and "stage english-arabic" in out and "103 steps" in out
    assert main(["train", "--recipe", "tiny-jais-family-pretrain", "--check"]) == 0  # a context schedule
    out = capsys.readouterr().out
    assert "tokens (1 process)" in out and "seq_len    128" in out and "from shards" not in out
    assert main(["train", "--recipe", "no-such-recipe"]) == 2
    assert "recipe not found: no-such-recipe" in capsys.readouterr().err
    bad = tmp_path / "r.yaml"
    bad.write_text("type: pretrain\nmodel: {preset: tiny-jais}\ndata: {sources: {en: x}}\nbatch: {seq_len: 8}\n")
    assert main(["train", "--recipe", str(bad)]) == 2
    assert "schedule.total_steps: needed" in capsys.readouterr().err


def test_measured_peak_is_a_matmul_rate():
    from dhad.train.metrics import measure_peak_flops
    f = measure_peak_flops("cpu", torch.float32, n=256, seconds=0.05)
    assert 1e8 < f < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s on any CPU


def test_bad_model_overrides_name_the_field():
    from dhad.train.loop import build_model
    r = parse_recipe({"type": "pretrain", "model": {"preset": "tiny-jais", "overrides": {"block_size": -1}},
                      "data": {"sources": {"en": "x"}}, "schedule": {"total_steps": 2}, "batch": {"seq_len": 8}})
    with pytest.raises(RecipeError, match=r"model\.overrides: config\.block_size: must be a positive integer, got -1"):
        build_model(r)
