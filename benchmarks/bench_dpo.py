"""DPO training steps/s: dhad's `dpo` recipe type vs TRL's DPOTrainer, same model, data and batch, same run.

Data: the shared derived Arabic/English QA preference pairs, rendered and tokenized once by
`dhad data prefs` (jais format, prompts left-truncated to --max-len); TRL gets exactly those token ids
(its tokenization step is skipped, nothing else of its trainer is touched). Model: one Llama-architecture
checkpoint written by transformers, loaded by both. Both fp32, AdamW, same lr, same pairs per step.

Measured, steady state: each configuration runs --steps steps per round, the first --warmup of them not
timed, in --rounds interleaved rounds (so a busy machine slows every system alike); the median step
time over all rounds is reported. Configurations:
  dhad                         the defaults on CPU: reference log-probs precomputed (and cached), prompt
                               once per pair with both answers on its KV cache
  dhad (TRL's work)            reference frozen and run every step, [prompt+chosen; prompt+rejected]
  TRL DPOTrainer               its defaults: reference model run every step (one forward for both answers)
  TRL DPOTrainer (precompute)  precompute_ref_log_probs=True
The one-off reference pass is reported separately, and in the amortised "incl. reference" number
(steady-state time per step x steps + the reference pass) for the --steps of this run.

    .venv/bin/python benchmarks/bench_dpo.py [--steps 20] [--batch 16] [--max-len 192] [--pairs 512]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]


def shared_pairs() -> list[Path]:
    from dhad.utils import data_dir
    root = (data_dir() or HERE.parent / "shared" / "data") / "preference" / "derived"
    files = sorted(root.glob("*_qa_pairs_*.jsonl"))
    if not files:
        raise SystemExit(f"no derived preference pairs under {root} (set DHAD_DATA_DIR)")
    return files


def build(tmp: Path, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dhad.data.prefs import PrefsConfig, prepare_prefs
    from dhad.tokenizer import train_bpe

    files = shared_pairs()
    texts = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines()[:400]:
            r = json.loads(line)
            texts += [r["prompt"][-1]["content"], r["chosen"]]
    tok = train_bpe(texts, args.vocab, chat_template="jais")
    tok.save(tmp / "tok")
    rows = []
    for f in files:
        rows += f.read_text(encoding="utf-8").splitlines()[:args.pairs // len(files) + 1]
    (tmp / "pairs.jsonl").write_text("\n".join(rows[:args.pairs]) + "\n", encoding="utf-8")
    prepare_prefs(PrefsConfig(inputs=[str(tmp / "pairs.jsonl")], tokenizer=str(tmp / "tok"), out=str(tmp / "prefs"),
                              chat_format="jais", max_len=args.max_len, val_fraction=0.0))
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.dim, intermediate_size=args.dim * 8 // 3 // 16 * 16,
                      num_hidden_layers=args.layers, num_attention_heads=args.dim // 64, num_key_value_heads=args.dim // 64,
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp / "model")
    tok.save(tmp / "model")
    return tmp / "model", tmp / "prefs"


def run_dhad(model_dir, prefs, args, tmp, reference, share_prompt, tag, rnd):
    import shutil

    from dhad.train.loop import train
    from dhad.train.metrics import read_metrics
    from dhad.train.recipe import parse_recipe

    run = tmp / f"{tag}-{rnd}"
    if rnd and (tmp / f"{tag}-0" / "ref_logps").is_dir():  # later rounds reuse the cached reference pass
        shutil.copytree(tmp / f"{tag}-0" / "ref_logps", run / "ref_logps")
    r = parse_recipe(dict(
        type="dpo", name=tag, seed=0, model={"init_from": str(model_dir)},
        data={"sources": {"qa": str(prefs)}},
        objective={"beta": 0.1, "reference": reference, "share_prompt": share_prompt, "ref_batch_size": args.batch},
        optimizer={"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0},
        schedule={"total_steps": args.steps, "decay": "constant"},
        batch={"micro_batch_size": args.batch, "seq_len": args.max_len}, precision="fp32",
        eval_batches=0, clip_grad=None, peak_flops=1e12))
    train(r, run_dir=run, progress=False, save_final=False)
    steps = [x for x in read_metrics(run / "metrics.jsonl") if x.get("event") == "step"]
    el = [0.0] + [x["elapsed_s"] for x in steps]
    times = [b - a for a, b in zip(el, el[1:])][args.warmup:]
    ref_s = None
    if reference == "precomputed" and rnd == 0:
        ref_s = json.loads((run / "dpo_report.json").read_text()).get("reference", {}).get("seconds")
    return times, ref_s


def run_trl(model_dir, prefs, args, tmp, precompute, tag, rnd):
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dhad.data.shards import PrefsSet

    ps = PrefsSet.open(prefs, "train")
    ds = datasets.Dataset.from_list([{k: ps[i][k].tolist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                     for i in range(len(ps))])

    class Pretokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **kw):  # the ids are already dhad's: skip TRL's tokenization
            return dataset

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - self.t)

    cfg = DPOConfig(output_dir=str(tmp / f"{tag}-{rnd}"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                    beta=0.1, learning_rate=1e-4, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                    bf16=False, max_grad_norm=0.0, save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                    dataloader_num_workers=0, seed=0, gradient_checkpointing=False, weight_decay=0.0,
                    precompute_ref_log_probs=precompute, precompute_ref_batch_size=args.batch,
                    adam_beta2=0.999)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tr = Pretokenized(model=str(model_dir), args=cfg, train_dataset=ds, processing_class=tok)
    tr.add_callback(Clock())
    tr.train()
    return times[args.warmup:], None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps per round and configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--max-len", type=int, default=192, help="prompt + longer answer, tokens")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir, prefs = build(tmp, args)
        from dhad.data.shards import PrefsSet
        L = PrefsSet.open(prefs, "train").lengths()
        n_pairs = len(L)
        print(f"data: {len(L)} pairs, mean prompt {L[:, 0].mean():.0f} tokens, mean answers "
              f"{L[:, 1].mean():.1f}/{L[:, 2].mean():.1f} tokens; batch {args.batch} pairs; "
              f"model Llama {args.layers}x{args.dim}; fp32; torch threads {torch.get_num_threads()}")
        configs = {"dhad": lambda r: run_dhad(model_dir, prefs, args, tmp, "precomputed", True, "dhad", r),
                   "dhad_trl_work": lambda r: run_dhad(model_dir, prefs, args, tmp, "frozen", False, "dhad-fc", r),
                   "trl": lambda r: run_trl(model_dir, prefs, args, tmp, False, "trl", r),
                   "trl_pre": lambda r: run_trl(model_dir, prefs, args, tmp, True, "trl-pre", r)}
        times = {k: [] for k in configs}
        dref = None
        for rnd in range(args.rounds):
            for k, fn in configs.items():
                ts, ref_s = fn(rnd)
                times[k] += ts
                dref = dref or ref_s
    import statistics
    med = {k: statistics.median(v) for k, v in times.items()}
    d, dw, t, tp = med["dhad"], med["dhad_trl_work"], med["trl"], med["trl_pre"]
    print(f"median over {args.rounds} rounds x {args.steps - args.warmup} timed steps")
    print(f"{'':38}{'s/step':>7}{'steps/s':>9}")
    for name, s in (("dhad (precomputed ref, shared prompt)", d), ("dhad (frozen ref, concatenated)", dw),
                    ("TRL DPOTrainer (default)", t), ("TRL DPOTrainer (precompute ref)", tp)):
        print(f"{name:<38}{s:>7.3f}{1 / s:>9.2f}")
    print(f"ratio dhad / TRL default            : {t / d:.2f}x   (goal >= 1.5x)")
    print(f"ratio dhad / TRL precompute         : {tp / d:.2f}x")
    print(f"ratio dhad (TRL's work) / TRL       : {t / dw:.2f}x   (same work per step: the engine alone)")
    if dref:
        epoch = max(1, n_pairs // args.batch)
        amort = (d * epoch + dref) / epoch
        print(f"dhad reference pass over all {n_pairs} pairs: {dref:.2f}s, once per run (cached beside it); "
              f"amortised over one epoch ({epoch} steps): {1 / amort:.2f} steps/s = {t / amort:.2f}x TRL default")


if __name__ == "__main__":
    main()
