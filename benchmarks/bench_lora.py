"""LoRA / QLoRA fine-tuning: dhad against TRL + PEFT, and against full fine-tuning, same run, model and batch.

One Llama-architecture checkpoint (default ~220M parameters: 16 x 1024, vocabulary 8192) written by
transformers and loaded by every configuration; the same token rows (random ids: speed and memory do not
depend on the text) for SFT and the same preference pairs for DPO; LoRA r 16, alpha 32 on q,k,v,o,gate,up,down;
bf16 autocast, AdamW; LoRA runs keep the frozen base in bf16 (both dhad and TRL: PEFT makes the adapters
fp32), full fine-tuning keeps fp32 master weights. Each configuration runs in its own fresh process (so its peak memory
is its own): --warmup steps untimed, then --steps timed; the median step time is reported.

  dhad LoRA SFT            `sft` recipe with a `peft:` block              vs  TRL SFTTrainer + PEFT LoraConfig
  dhad full SFT            the same recipe without `peft:`                (peak memory: LoRA / full)
  dhad QLoRA SFT           `peft: {quantize: nf4}`                        (weights memory: QLoRA / LoRA)
  dhad LoRA DPO            `dpo` recipe with `peft:` (CPU default: reference log-probs precomputed with the
                           adapters off; prompt once per pair)         vs  TRL DPOTrainer + PEFT (reference =
                           adapters disabled, run every step)
  dhad LoRA DPO (TRL's work)  reference = adapters off, run every step, prompt+answer rows

Memory: on CUDA torch's peak allocated bytes; on CPU the process's peak RSS minus its RSS before the model
was loaded. "Weights memory" is the bytes of the model's parameters and buffers (the NF4 codes and scales
for QLoRA's frozen layers).

    .venv/bin/python benchmarks/bench_lora.py [--steps 3] [--warmup 1] [--batch 4] [--seq-len 256]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def weights_mb(model) -> float:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    return n / 2**20


# ---------------------------------------------------------------------------------------------
# Data and model (built once by the parent)

def build(tmp: Path, args) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from dhad.data.shards import ShardWriter

    V = args.vocab
    cfg = LlamaConfig(vocab_size=V, hidden_size=args.dim, intermediate_size=args.dim * 8 // 3 // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=args.dim // 64,
                      num_key_value_heads=args.dim // 64, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp / "model")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<pad>").save_pretrained(tmp / "model")
    g = torch.Generator().manual_seed(0)
    T, n_rows = args.seq_len, args.batch * (args.steps + args.warmup + 1)
    rows = []
    with ShardWriter(tmp / "sft", "train", "sft", vocab_size=V, eos_token_id=2, seq_len=T, packed=False) as w:
        for _ in range(n_rows):
            ids = torch.randint(3, V, (T,), generator=g).tolist()
            p = T // 3
            mask = [0] * p + [1] * (T - p)
            w.add(ids, mask=mask)
            rows.append({"input_ids": ids, "completion_mask": mask})
    (tmp / "sft_rows.json").write_text(json.dumps(rows))
    pairs = []
    with ShardWriter(tmp / "prefs", "train", "prefs", vocab_size=V, eos_token_id=2, pad_token_id=0) as w:
        for _ in range(args.batch * (args.steps + args.warmup + 1)):
            P, A = args.seq_len // 2, args.seq_len // 4
            pr, ch, rj = (torch.randint(3, V, (n,), generator=g).tolist() for n in (P, A, A))
            w.add_pair(pr, ch, rj, source="random")
            pairs.append({"prompt_ids": pr, "chosen_ids": ch, "rejected_ids": rj})
    (tmp / "pairs.json").write_text(json.dumps(pairs))


# ---------------------------------------------------------------------------------------------
# One configuration (in a child process)

def _dhad(tmp: Path, args, kind: str, peft: dict | None, **objective) -> dict:
    from dhad.train.loop import train
    from dhad.train.metrics import read_metrics
    from dhad.train.recipe import parse_recipe

    base = rss_mb()
    d = dict(type=kind, name="bench", seed=0, model={"init_from": str(tmp / "model")},
             data={"sources": {"x": str(tmp / ("sft" if kind == "sft" else "prefs"))}},
             optimizer={"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0},
             schedule={"total_steps": args.steps + args.warmup, "decay": "constant"},
             batch={"micro_batch_size": args.batch, **({"seq_len": args.seq_len} if kind == "dpo" else {})},
             precision="bf16", eval_batches=0, clip_grad=1.0, peak_flops=1e12)
    if peft is not None:
        d["peft"] = peft
    if objective:
        d["objective"] = {"beta": 0.1, "ref_batch_size": args.batch, **objective}
    run = tmp / f"run-{os.getpid()}"
    res = train(parse_recipe(d), run_dir=run, progress=False, save_final=False)
    steps = [x for x in read_metrics(run / "metrics.jsonl") if x.get("event") == "step"]
    el = [0.0] + [x["elapsed_s"] for x in steps]
    times = [b - a for a, b in zip(el, el[1:])][args.warmup:]
    out = {"step_s": statistics.median(times), "peak_mb": peak_mb() - (0 if torch.cuda.is_available() else base),
           "weights_mb": weights_mb(res.model)}
    if kind == "dpo" and (run / "dpo_report.json").is_file():
        out["ref_pass_s"] = json.loads((run / "dpo_report.json").read_text()).get("reference", {}).get("seconds")
    return out


class _Clock:
    def __init__(self):
        from transformers import TrainerCallback

        times = self.times = []

        class C(TrainerCallback):
            def on_step_begin(self, a, s, c, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, a, s, c, **kw):
                times.append(time.perf_counter() - self.t)
        self.callback = C()


def _trl_common(tmp, args):
    return dict(output_dir=str(tmp / f"trl-{os.getpid()}"), per_device_train_batch_size=args.batch,
                max_steps=args.steps + args.warmup, learning_rate=1e-4, lr_scheduler_type="constant", report_to=[],
                use_cpu=not torch.cuda.is_available(), bf16=True, max_grad_norm=1.0, save_strategy="no",
                logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                gradient_checkpointing=False, weight_decay=0.0, adam_beta2=0.999)


def _lora_config():
    from peft import LoraConfig
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")


def _trl_sft(tmp: Path, args) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base = rss_mb()
    ds = datasets.Dataset.from_list(json.loads((tmp / "sft_rows.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.bfloat16)  # frozen base in bf16, as dhad
    cfg = SFTConfig(**_trl_common(tmp, args), max_length=args.seq_len, packing=False, completion_only_loss=True)
    clock = _Clock()
    tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(tmp / "model"),
                    peft_config=_lora_config(), callbacks=[clock.callback])
    tr.train()
    return {"step_s": statistics.median(clock.times[args.warmup:]), "peak_mb": peak_mb() - base,
            "weights_mb": weights_mb(tr.model)}


def _trl_dpo(tmp: Path, args) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class Pretokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **kw):  # the ids are already given: skip TRL's tokenization
            return dataset

    base = rss_mb()
    ds = datasets.Dataset.from_list(json.loads((tmp / "pairs.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.bfloat16)
    cfg = DPOConfig(**_trl_common(tmp, args), beta=0.1)
    clock = _Clock()
    tr = Pretokenized(model=model, args=cfg, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(tmp / "model"),
                      peft_config=_lora_config(), callbacks=[clock.callback])
    tr.train()
    return {"step_s": statistics.median(clock.times[args.warmup:]), "peak_mb": peak_mb() - base,
            "weights_mb": weights_mb(tr.model)}


LORA = {"r": 16, "alpha": 32, "targets": TARGETS}
CASES = {
    "dhad_lora_sft": lambda t, a: _dhad(t, a, "sft", LORA),
    "trl_lora_sft": _trl_sft,
    "dhad_full_sft": lambda t, a: _dhad(t, a, "sft", None),
    "dhad_qlora_sft": lambda t, a: _dhad(t, a, "sft", {**LORA, "quantize": "nf4"}),
    "dhad_lora_dpo": lambda t, a: _dhad(t, a, "dpo", LORA, reference="precomputed", share_prompt=True),
    "dhad_lora_dpo_trl_work": lambda t, a: _dhad(t, a, "dpo", LORA, reference="frozen", share_prompt=False),
    "trl_lora_dpo": _trl_dpo,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences (SFT) / pairs (DPO) per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child: run one configuration
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.case:
        print("RESULT " + json.dumps(CASES[args.case](Path(args.tmp), args)), flush=True)
        return
    res = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build(tmp, args)
        n = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(tmp / "model" / "model.safetensors")).values())
        print(f"model: Llama {args.layers} x {args.dim}, vocabulary {args.vocab}, {n / 1e6:.0f}M parameters; batch "
              f"{args.batch} x {args.seq_len} tokens; bf16 autocast; LoRA r 16 on q,k,v,o,gate,up,down; "
              f"{args.warmup} warmup + {args.steps} timed steps; torch threads {torch.get_num_threads()}", flush=True)
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--case", case, "--tmp", str(tmp)] + [
                x for k in ("steps", "warmup", "batch", "seq_len", "vocab", "dim", "layers", "threads")
                if getattr(args, k) is not None for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE,
                               env={**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{case}: FAILED\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}", flush=True)
                continue
            res[case] = json.loads(line[7:])
            r = res[case]
            print(f"{case:<24} {r['step_s']:8.2f} s/step  peak {r['peak_mb']:8.0f} MiB  weights {r['weights_mb']:8.0f} MiB"
                  + (f"  reference pass {r['ref_pass_s']:.1f}s" if r.get("ref_pass_s") else ""), flush=True)
    tok = args.batch * args.seq_len

    def ratio(label, a, b, fn, goal):
        if a in res and b in res:
            print(f"{label:<52} {fn(res[a], res[b]):6.2f}x   (goal {goal})")
    print(f"tokens/s: dhad LoRA SFT {tok / res['dhad_lora_sft']['step_s']:.0f}" if "dhad_lora_sft" in res else "")
    ratio("LoRA SFT tokens/s, dhad / TRL SFTTrainer + PEFT", "dhad_lora_sft", "trl_lora_sft",
          lambda a, b: b["step_s"] / a["step_s"], ">= 1.3x")
    ratio("peak memory, dhad LoRA / dhad full fine-tune", "dhad_lora_sft", "dhad_full_sft",
          lambda a, b: a["peak_mb"] / b["peak_mb"], "<= 0.5x")
    ratio("weights memory, dhad QLoRA / dhad LoRA", "dhad_qlora_sft", "dhad_lora_sft",
          lambda a, b: a["weights_mb"] / b["weights_mb"], "<= 0.5x")
    ratio("peak memory, dhad QLoRA / dhad LoRA", "dhad_qlora_sft", "dhad_lora_sft",
          lambda a, b: a["peak_mb"] / b["peak_mb"], "-")
    ratio("LoRA DPO steps/s, dhad / TRL DPOTrainer + PEFT", "dhad_lora_dpo", "trl_lora_dpo",
          lambda a, b: b["step_s"] / a["step_s"], ">= 1.5x")
    ratio("LoRA DPO steps/s, dhad (TRL's work) / TRL", "dhad_lora_dpo_trl_work", "trl_lora_dpo",
          lambda a, b: b["step_s"] / a["step_s"], "same work per step")
    if "dhad_lora_dpo" in res and res["dhad_lora_dpo"].get("ref_pass_s"):
        print(f"dhad LoRA DPO reference pass (once per run, cached): {res['dhad_lora_dpo']['ref_pass_s']:.1f}s")


if __name__ == "__main__":
    main()
