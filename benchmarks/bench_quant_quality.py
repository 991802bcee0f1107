"""Quality of weight-only quantisation (dhad.quant) against float32, measured in one run.

Trains a small model on the shared corpus (or takes --model DIR), then on held-out text the corpus
training never saw (wikitext-2 test, later SaudiNewsNet articles):
1. perplexity of float32 vs int8 (per channel) vs int4 (groups of 32 / 64 / 128): the increase in %
   (goals: int8 <= 1 %, int4 group 64 <= 6 %);
2. with --tasks (dhad eval's tasks on $DHAD_DATA_DIR, --limit rows each): per-example agreement of the
   int8 / int4 models' answers with float32's (goal: int8 >= 97 % on each task).

    .venv/bin/python benchmarks/bench_quant_quality.py --out runs/quant-llama [--family llama|jais]
        [--steps 300] [--tasks arc_easy,piqa,exams_ar --limit 200] [--json results.jsonl]
    .venv/bin/python benchmarks/bench_quant_quality.py --model runs/quant-llama --tasks ...   # reuse a model
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dhad
from dhad.checkpoint import save_model
from dhad.config import Config
from dhad.model import Transformer
from dhad.quant import Int4Linear, quantize
from dhad.utils import data_dir

SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def read_jsonl_texts(path: Path, skip: int, n_chars: int) -> list[str]:
    out, total = [], 0
    with open(path, encoding="utf-8") as f:
        for line in itertools.islice(f, skip, None):
            t = json.loads(line).get("text", "")
            if t:
                out.append(t)
                total += len(t)
            if total >= n_chars:
                break
    return out


def corpus(root: Path, n_chars: int) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: English wikitext-2 valid / test, Arabic SaudiNewsNet articles (disjoint)."""
    en = root / "corpus" / "english"
    news = root / "corpus" / "arabic" / "saudinewsnet_2015-07-23_and_25.jsonl"
    train = [p for p in (en / "wikitext2_valid.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    train += read_jsonl_texts(news, 0, n_chars)
    held = [(en / "wikitext2_test.txt").read_text(encoding="utf-8")[: n_chars // 10]]
    held += read_jsonl_texts(news, 5000, n_chars // 10)
    return train, held


def model_config(family: str, vocab: int, tok) -> Config:
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    if family == "jais":  # ALiBi, SwiGLU, muP scalars, biases, tied head; n_inner 688 = 16 * 43 (int4 pads it)
        return Config.from_name("tiny-jais", vocab_size=vocab, n_embd=256, n_head=4, n_inner=688, n_layer=4,
                                block_size=512, **ids)
    return Config.from_name("tiny-llama", vocab_size=vocab, n_embd=256, n_head=4, n_kv_head=2, n_inner=704,
                            n_layer=4, block_size=512, **ids)


def train(out: Path, family: str, steps: int, seq: int, batch: int, root: Path, seed: int = 0) -> Path:
    from dhad.tokenizer import train_bpe
    texts, _ = corpus(root, 2_000_000)
    t0 = time.perf_counter()
    tok = train_bpe(texts, vocab_size=4096, chat_template=None)
    ids = torch.tensor([i for t in texts for i in tok.encode(t) + [tok.eos_token_id]])
    cfg = model_config(family, tok.vocab_size, tok)
    model = Transformer(cfg).init_weights(seed=seed).train()
    print(f"training {family}: {model.num_params() / 1e6:.2f}M params on {len(ids) / 1e6:.2f}M tokens, "
          f"{steps} steps of {batch} x {seq}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts])
        y = torch.stack([ids[s + 1:s + seq + 1] for s in starts])
        loss = model(x, targets=y) / y.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    save_model(model.eval(), out, tokenizer=tok)
    return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int, batch: int = 8) -> float:
    n = (len(ids) - 1) // seq
    x = ids[: n * seq].view(n, seq)
    y = ids[1: n * seq + 1].view(n, seq)
    nll = 0.0
    for i in range(0, n, batch):
        logits = model(x[i:i + batch]).float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + batch].reshape(-1), reduction="sum").item()
    return math.exp(nll / y.numel())


def agreement(model_dir: Path, tasks: str, limit: int, root: Path) -> dict:
    """Per-example agreement with float32 of each scheme's answers on dhad eval's tasks."""
    from dhad.evaluate import runner
    from dhad.evaluate import tasks as T
    tok = dhad.load_tokenizer(model_dir)
    picked = T.resolve_tasks(tasks)
    answers, accs = {}, {}
    for mode, g in [(None, None)] + SCHEMES[:1] + [("int4", 64)]:
        model = dhad.load_model(model_dir, quantize=mode, group_size=g)
        records: list = []
        res = runner.evaluate(model, tok, picked, shots=0, limit=limit, data_dir=root, records=records)
        key = mode if mode != "int4" else f"int4-g{g}"
        answers[key] = {(r.task, r.subtask, r.doc_index): (r.metrics.get("pred"), r.metrics.get("pred_norm"))
                        for r in records}
        accs[key] = {name: {m: v for m, v in e.items() if m in ("acc", "acc_norm")} for name, e in res["tasks"].items()}
    out = {}
    for key in answers:  # an example agrees when its answer (acc's argmax) and acc_norm's argmax both agree
        if key is None:
            continue
        per_task: dict[str, list[bool]] = {}
        for k, pred in answers[key].items():
            per_task.setdefault(k[0], []).append(pred == answers[None][k])
        out[key] = {t: sum(v) / len(v) for t, v in per_task.items()}
        out[key]["examples"] = sum(len(v) for v in per_task.values())
    return {"agreement": out, "acc": {str(k): v for k, v in accs.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="use this trained model directory instead of training one")
    ap.add_argument("--out", default="runs/quant-quality", help="where the trained model is saved")
    ap.add_argument("--family", choices=["llama", "jais"], default="llama")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--data", default=None, help="data directory (default $DHAD_DATA_DIR)")
    ap.add_argument("--tasks", default=None, help="dhad eval tasks for the agreement check, e.g. arc_easy,piqa,exams_ar")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = data_dir(a.data)
    if root is None:
        raise SystemExit("no data: pass --data DIR or set DHAD_DATA_DIR")
    model_dir = Path(a.model) if a.model else train(Path(a.out), a.family, a.steps, a.seq, a.batch, root)
    tok = dhad.load_tokenizer(model_dir)
    _, held = corpus(root, 2_000_000)
    ids = torch.tensor([i for t in held for i in tok.encode(t) + [tok.eos_token_id]])
    ids = ids[: 256 * 257 + 1]  # 256 sequences of 256 tokens
    base = perplexity(dhad.load_model(model_dir), ids, 256)
    print(f"model {model_dir} ({dhad.load_model(model_dir).config.hf_layout}), held-out {len(ids)} tokens: "
          f"float32 perplexity {base:.3f}")
    rows = {"float32": base}
    for mode, g in SCHEMES:
        ppl = perplexity(dhad.load_model(model_dir, quantize=mode, group_size=g), ids, 256)
        key = mode if g is None else f"int4-g{g}"
        rows[key] = ppl
        goal = {"int8": 1.0, "int4-g64": 6.0}.get(key)
        print(f"  {key:9s} perplexity {ppl:.3f}  increase {100 * (ppl / base - 1):+.2f} %"
              + (f"  (goal <= {goal:g} %: {'met' if 100 * (ppl / base - 1) <= goal else 'NOT met'})" if goal else ""))
    for head_kind in ("float32", "int4"):  # the design choice: the LM head in int8 (above), float32 or int4
        m = dhad.load_model(model_dir)
        head = m.lm_head
        quantize(m, "int4", 64)
        m.lm_head = head if head_kind == "float32" else Int4Linear.from_linear(head, 64)
        ppl = perplexity(m, ids, 256)
        key = f"int4-g64 head-{head_kind}"
        rows[key] = ppl
        print(f"  {key:9s} perplexity {ppl:.3f}  increase {100 * (ppl / base - 1):+.2f} % "
              f"(the LM head in {head_kind} instead of int8)")
    result = {"bench": "quant_quality", "model": str(model_dir), "ppl": rows}
    if a.tasks:
        agr = agreement(model_dir, a.tasks, a.limit, root)
        for key, per in agr["agreement"].items():
            print(f"  {key:9s} agreement with float32: " + ", ".join(f"{t} {100 * v:.1f} %" for t, v in per.items()
                                                                        if t != "examples")
                  + (" (goal >= 97 % each)" if key == "int8" else ""))
        print("  accuracy: " + json.dumps(agr["acc"]))
        result.update(agr)
    if a.json:
        with open(a.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
