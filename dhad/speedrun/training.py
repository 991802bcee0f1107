"""Stages 3-4: pretraining (and the adapted recipe's donor and adaptation), SFT and DPO.

Every training stage is clock-driven: the trainer's recipe gets `schedule.seconds` (the stage's share of
the budget, less its start-up and final save) and a warmup-stable-decay learning rate whose decay sits
on the last 20% of that wall time, so the stage trains as many tokens as this machine manages in its
share, and ends on time. The step count the probe predicts only sizes the batch, the intervals of
evaluation and checkpoints, and a step cap far above it.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from dhad.speedrun.common import LANGS, PREF_FILES, SpeedrunError, SpeedrunInterrupted, copy_model_dir, \
    read_json, write_json
from dhad.speedrun.plan import CI_SIZE, LADDER, Size, flops_per_token, model_overrides

DECAY_FRACTION = 0.2  # of a stage's wall time, the learning rate decays to its floor (WSD)
STEP_CAP = 5.0  # the step cap is this many times the probe's estimate (a faster machine trains more)


def _size(run) -> Size:
    return Size(**run.plan["size"])


def _measured_tps(run_dir: Path) -> float | None:
    """Median training tokens/s a finished run logged (its measured throughput under today's load)."""
    from dhad.train.metrics import read_metrics
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    v = sorted(r["tokens_per_s"] for r in read_metrics(f) if r.get("event") == "step" and r.get("tokens_per_s"))
    return v[len(v) // 2] if v else None


def _batch_for(tokens: float, seq_len: int, steps_target: int, max_micro: int) -> tuple[int, int]:
    """(micro batch, global batch) in sequences: about `steps_target` steps for `tokens`, 1..64 sequences."""
    seqs = int(min(max(round(tokens / steps_target / seq_len), 1), 64))
    micro = min(seqs, max_micro)
    return micro, max(micro, seqs // micro * micro)


def loop_seconds(stage_s: float) -> float:
    """The trainer's clock budget for a stage of `stage_s` seconds: less its start-up (model, shards,
    first evaluation) and end (last evaluation, checkpoint, model files), measured ~1-4 s here."""
    return max(stage_s - (2.0 + 0.01 * stage_s), 0.25 * stage_s, 0.5)


def _schedule(seconds: float, tokens_per_step: int, tps: float, lr: float) -> tuple[dict, int]:
    """The clock-driven schedule of a stage of `seconds`, and the steps the measured `tps` predicts."""
    est = max(int(loop_seconds(seconds) * tps / tokens_per_step), 1)
    return {"warmup_steps": max(1, min(est // 20, 50)), "total_steps": max(int(STEP_CAP * est), 100),
            "seconds": loop_seconds(seconds), "decay_fraction": DECAY_FRACTION, "decay": "linear",
            "min_lr": lr / 10}, est


def _train_stage(run, name: str, recipe: dict, run_dir: Path, seconds: float) -> dict:
    """Run (or resume) one trainer recipe; returns the summary the marker keeps."""
    from dhad.train.checkpointing import latest_checkpoint
    from dhad.train.loop import train
    from dhad.train.metrics import read_metrics
    from dhad.train.recipe import parse_recipe
    saved = run.p("recipes", f"{name}.json")
    # resume only a stage whose inputs are the ones it was interrupted with: every earlier stage reused
    resume = latest_checkpoint(run_dir) is not None and saved.is_file() and not run.computed
    if resume:
        # the interrupted run's recipe, not one re-sized from the time left now: its clock continues
        recipe = read_json(saved)
        run.say(f"  {name}: resuming from {latest_checkpoint(run_dir)}")
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a run that never checkpointed: nothing to resume, start clean
        write_json(saved, recipe)
    stop_at = None
    if run.cfg.interrupt_at and run.cfg.interrupt_at[0] == name and not resume:
        stop_at = int(run.cfg.interrupt_at[1])
    t = time.perf_counter()
    res = train(parse_recipe(recipe, source=f"speedrun:{name}"), resume=resume, run_dir=run_dir,
                progress=run.cfg.progress, stop_at=stop_at)
    if res.interrupted:
        raise SpeedrunInterrupted(f"{name} stopped at step {res.step} (checkpoint {res.checkpoint}); run the same "
                                  "command again to resume")
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"]
    seen = res.mixture.get("total", {})
    return {"run_dir": str(run_dir), "model": str(res.model_dir), "steps": res.step, "resumed": resume,
            "train_seconds": time.perf_counter() - t, "loop_seconds": res.train_seconds,
            "loop_seconds_planned": recipe["schedule"].get("seconds"), "tokens_per_s": _measured_tps(run_dir),
            "tokens_seen": sum(v["tokens"] for v in seen.values()),
            "tokens_by_source": {k: v["tokens"] for k, v in seen.items()},
            "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "last_lr": steps[-1]["lr"] if steps else None,
            "evals": res.evals[-1:] if res.evals else [], "plan": res.plan}


def _pretrain_recipe(run, name: str, arch: str, size: Size, vocab: int | None, tok_dir: Path, sources: dict,
                     seconds: float, tps: float, lr: float, init_from: str | None = None,
                     rtype: str = "pretrain") -> dict:
    plan, cfg = run.plan, run.cfg
    T = plan["seq_len_pretrain"]
    if cfg.ci:
        micro = glob = 8
    else:
        micro, glob = _batch_for(max(loop_seconds(seconds), 1.0) * tps, T, 300, 8 if run.device.type == "cpu" else 32)
    schedule, est = _schedule(seconds, glob * T, tps, lr)
    preset, ov = model_overrides(size, arch, plan["block_size"], vocab)
    every = max(est // 4, 1)
    return {
        "type": rtype, "name": f"speedrun-{name}", "seed": cfg.seed,
        "model": {"init_from": init_from} if init_from else {"preset": preset, "overrides": ov},
        "tokenizer": str(tok_dir),
        "data": {"sources": {k: str(v) for k, v in sources.items()}, "train_split": "train",
                 "val_split": "validation"},
        "stages": [{"name": "main", "mix": {k: 1.0 for k in sources}}],
        "optimizer": {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]}, "schedule": schedule,
        "batch": {"micro_batch_size": micro, "global_batch_size": glob, "seq_len": T},
        "precision": plan["precision"], "peak_flops": plan["peak_flops"], "distributed": "none",
        "device": "cuda" if run.device.type == "cuda" else "cpu",
        "checkpoint_every": every, "keep_checkpoints": 1, "eval_every": every, "eval_batches": 2, "log_every": 1,
    }


def pretrain_sources(run) -> dict[str, Path]:
    if run.cfg.recipe == "jais":
        return {lang: run.p("data", "pretrain", lang) for lang in LANGS}
    return {"english": run.p("data", "pretrain", "english")}  # the adapted recipe's English-only base


def stage_pretrain(run, markers: dict) -> dict:
    plan = run.plan
    secs = run.allot("pretrain")
    jais = run.cfg.recipe == "jais"
    tok, arch = (run.p("tokenizer"), "jais") if jais else (run.p("tokenizer-en"), "llama")
    run.say(f"  pretrain: {secs:.0f}s of the budget (~{plan['tokens_per_s']:,.0f} tok/s at the probe)")
    recipe = _pretrain_recipe(run, "pretrain", arch, _size(run), None, tok, pretrain_sources(run), secs,
                              plan["tokens_per_s"], lr=3e-3)
    return _train_stage(run, "pretrain", recipe, run.p("pretrain"), secs)


def stage_donor(run, markers: dict) -> dict:
    """The adapted recipe's donor: a small bilingual Jais-style model with the bilingual tokenizer (in
    Jais-adapted the donor is Jais itself); its embeddings of the new Arabic tokens seed their init."""
    plan = run.plan
    secs = run.allot("donor")
    size = _size(run)
    small = [s for s in LADDER if s.n_embd < size.n_embd] or [size]
    donor = CI_SIZE if run.cfg.ci else small[-1]
    sources = {"arabic": run.p("data", "pretrain", "arabic-bi"), "english": run.p("data", "pretrain", "english-bi")}
    tps = plan["tokens_per_s"] * (flops_per_token(size, plan["seq_len_pretrain"]) /
                                  flops_per_token(donor, plan["seq_len_pretrain"]))
    run.say(f"  donor {donor.name}: {secs:.0f}s")
    recipe = _pretrain_recipe(run, "donor", "jais", donor, size.vocab, run.p("tokenizer"), sources, secs, tps, lr=3e-3)
    return _train_stage(run, "donor", recipe, run.p("donor"), secs)


def stage_adapt(run, markers: dict) -> dict:
    """Vocabulary extension + projected init (dhad.adapt), then the two-stage adaptive pretraining on
    Arabic: stage 1 trains only embeddings and LM head (backbone frozen), stage 2 trains everything."""
    from dhad.adapt import adapt_init
    plan = run.plan
    base = Path(markers["pretrain"]["outputs"]["model"])
    init_dir = run.p("adapt-init")
    rep = adapt_init(base, run.p("tokenizer-ext"), init_dir, donor=Path(markers["donor"]["outputs"]["model"]),
                     base_tokenizer=run.p("tokenizer-en"), seed=run.cfg.seed)
    run.say("  " + rep.summary().replace("\n", "\n  "))
    secs = run.allot("adapt")
    tps = markers["pretrain"]["outputs"].get("tokens_per_s") or plan["tokens_per_s"]
    recipe = _pretrain_recipe(run, "adapt", "llama", _size(run), None, run.p("tokenizer-ext"),
                              {"arabic": run.p("data", "pretrain", "arabic")}, secs, tps, lr=2e-3,
                              init_from=str(init_dir), rtype="adapt")
    tokens_per_step = recipe["batch"]["global_batch_size"] * plan["seq_len_pretrain"]
    steps = max(int(recipe["schedule"]["seconds"] * tps / tokens_per_step), 3)
    stage1 = max(1, steps // 3) * tokens_per_step  # about a third of the time with the backbone frozen
    recipe["stages"] = [{"name": "stage1-embeddings", "tokens": stage1, "trainable": "embeddings"},
                        {"name": "stage2-all", "trainable": "all"}]
    out = _train_stage(run, "adapt", recipe, run.p("adapt"), secs)
    out["init"] = rep.as_dict()
    out["init_model"] = str(init_dir)
    return out


def stage_sft(run, markers: dict) -> dict:
    plan = run.plan
    secs = run.allot("sft")
    prev = markers["adapt" if run.cfg.recipe == "adapted" else "pretrain"]["outputs"]
    tok = run.p("tokenizer-ext" if run.cfg.recipe == "adapted" else "tokenizer")
    tps = prev.get("tokens_per_s") or plan["tokens_per_s"]
    T = plan["seq_len_sft"]
    lr = 5e-4
    if run.cfg.ci:
        micro = glob = 4
    else:
        micro, glob = _batch_for(max(loop_seconds(secs), 1.0) * tps, T, 200, 8 if run.device.type == "cpu" else 32)
    schedule, est = _schedule(secs, glob * T, tps, lr)
    run.say(f"  sft: {secs:.0f}s, batches of {glob} x {T} tokens (~{est} steps at the last stage's speed)")
    every = max(est // 4, 1)
    recipe = {
        "type": "sft", "name": "speedrun-sft", "seed": run.cfg.seed, "model": {"init_from": prev["model"]},
        "tokenizer": str(tok),
        "data": {"sources": {lang: str(run.p("data", "sft", lang)) for lang in LANGS}, "train_split": "train",
                 "val_split": "validation"},
        "stages": [{"name": "main", "mix": {"arabic": 1.0, "english": 1.0}}],
        "optimizer": {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]}, "schedule": schedule,
        "batch": {"micro_batch_size": micro, "global_batch_size": glob},
        "precision": plan["precision"], "peak_flops": plan["peak_flops"], "distributed": "none",
        "device": "cuda" if run.device.type == "cuda" else "cpu",
        "checkpoint_every": every, "keep_checkpoints": 1, "eval_every": every, "eval_batches": 2, "log_every": 1,
    }
    out = _train_stage(run, "sft", recipe, run.p("sft"), secs)
    if not run.cfg.dpo:
        copy_model_dir(Path(out["model"]), run.p("final"))
    return out


def stage_dpo(run, markers: dict) -> dict:
    """Optional preference alignment of the SFT model on QA preference pairs (Arabic and English, derived
    from XQuAD/ARCD: the gold span preferred over another question's answer), with the DPO engineer's
    `run_dpo_stage` (the trainer's `dpo` objective). Step-sized from the SFT stage's measured speed."""
    from dhad.data.prefs import PrefsConfig, prepare_prefs
    from dhad.train.checkpointing import latest_checkpoint
    from dhad.train.dpo import run_dpo_stage
    from dhad.train.metrics import read_metrics
    plan = run.plan
    tok = run.p("tokenizer-ext" if run.cfg.recipe == "adapted" else "tokenizer")
    pref_root = run.data / "preference"
    files = [f"{lang}={pref_root / f}" for lang in LANGS for f in PREF_FILES[lang] if (pref_root / f).is_file()]
    if not files:
        raise SpeedrunError(f"--dpo: no preference data in {pref_root} (expected {PREF_FILES})")
    prefs = run.p("data", "prefs")
    rep = prepare_prefs(PrefsConfig(inputs=files, tokenizer=str(tok), out=str(prefs),
                                    chat_format="jais", answer_as_served=True, max_len=plan["seq_len_sft"],
                                    seed=run.cfg.seed, max_rows=200 if run.cfg.ci else None))
    secs = run.allot("dpo")
    tps = markers["sft"]["outputs"].get("tokens_per_s") or plan["tokens_per_s"]
    batch = 8 if run.cfg.ci else 16
    # a step is a forward + backward over batch pairs (prompt once, two answers): ~batch * seq_len tokens
    steps = 8 if run.cfg.ci else int(max((secs * 0.8 - 10) * tps / (batch * plan["seq_len_sft"]), 5))
    run.say(f"  dpo: {secs:.0f}s, {steps} steps of {batch} pairs")
    t = time.perf_counter()
    out_dir = run.p("dpo")
    res = run_dpo_stage(run.p("sft", "model"), prefs, out_dir, steps=steps, batch_pairs=batch,
                        micro_batch=min(8, batch), lr=1e-4, seq_len=plan["seq_len_sft"],
                        precision=plan["precision"], seed=run.cfg.seed, progress=run.cfg.progress,
                        peak_flops=plan["peak_flops"], resume=latest_checkpoint(out_dir) is not None)
    if res.get("interrupted"):
        raise SpeedrunInterrupted(f"dpo stopped at step {res['steps']}; run the same command again to resume")
    copy_model_dir(Path(res["model_dir"]), run.p("final"))
    steps_logged = [r for r in read_metrics(out_dir / "metrics.jsonl") if r.get("event") == "step"]
    return {"run_dir": str(out_dir), "model": res["model_dir"], "steps": res["steps"], "resumed": False,
            "train_seconds": time.perf_counter() - t, "tokens_per_s": _measured_tps(out_dir),
            "first_loss": steps_logged[0]["loss"] if steps_logged else None,
            "last_loss": steps_logged[-1]["loss"] if steps_logged else None, "dpo": res,
            "prefs": {"splits": rep.get("splits"), "dropped": rep.get("dropped")}}
