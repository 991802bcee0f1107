"""Tokenizer training time and encoding throughput: dhad byte-level BPE vs SentencePiece BPE.

Same data, same vocabulary size, same thread count, same run; prints each measurement and the ratio
(dhad / sentencepiece; > 1 means dhad is faster for throughput, slower for time), then the fertility
table of every tokenizer built here (dhad BPE, SentencePiece, an English-only base and that base
extended with the dhad BPE's Arabic tokens).

"encode paths" compares what `Tokenizer.encode` runs now (the backend transformers would build) with
the call dhad made before it followed transformers, on the same text in the same run: the raw
`tokenizers` call for a tokenizer.json, `SentencePieceProcessor.encode` for a tokenizer.model (now
converted to a `tokenizers` BPE), and the real Llama-2-style tokenizer.json read as is by `tokenizers`
(now rebuilt with transformers' Llama pre-tokenizer).

    .venv/bin/python benchmarks/bench_tokenizer.py [--chars 4e6] [--vocab-size 16000] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def corpus(root: Path, lang: str, max_chars: int, skip: int = 0) -> list[str]:
    from dhad.tokenizer import read_texts

    files = sorted((root / "corpus" / lang).iterdir())
    per = max_chars // len(files)
    out = []
    for p in files:
        n = 0
        for t in read_texts(p):
            if n >= skip + per:
                break
            if n >= skip:
                out.append(t)
            n += len(t)
    return out


def _best_pair(before, after, reps: int = 5) -> tuple[float, float]:
    """Best time of each, the two run alternately (so load from other jobs hits both alike)."""
    tb = ta = float("inf")
    for _ in range(reps):
        for fn, which in ((before, 0), (after, 1)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if which == 0:
                tb = min(tb, dt)
            else:
                ta = min(ta, dt)
    return tb, ta


def encode_paths(bpe, sp, texts: list[str], one: list[str], args) -> None:
    """Same-run ratio of each encode path: before (what dhad called) / after (`Tokenizer.encode`)."""
    from tokenizers import Tokenizer as HF

    from dhad.tokenizer import load_tokenizer

    rows = [
        ("dhad BPE, batch", lambda: [e.ids for e in bpe.backend.encode_batch_fast(texts, add_special_tokens=False)],
         lambda: bpe.encode_batch(texts)),
        ("dhad BPE, one by one", lambda: [bpe.backend.encode(t, add_special_tokens=False).ids for t in one],
         lambda: [bpe.encode(t) for t in one]),
        ("SentencePiece .model, batch", lambda: sp.sp_model.encode(texts, num_threads=args.threads),
         lambda: sp.encode_batch(texts)),
        ("SentencePiece .model, one by one", lambda: [sp.sp_model.encode(t) for t in one],
         lambda: [sp.encode(t) for t in one]),
    ]
    real = REPO.parent / "shared" / "fixtures" / "tokenizers" / "llama2-style"
    if real.is_dir():
        raw, ours = HF.from_file(str(real / "tokenizer.json")), load_tokenizer(real)
        rows += [("llama2-style tokenizer.json, batch", lambda: [e.ids for e in raw.encode_batch_fast(texts, add_special_tokens=False)],
                  lambda: ours.encode_batch(texts)),
                 ("llama2-style tokenizer.json, one by one", lambda: [raw.encode(t, add_special_tokens=False).ids for t in one],
                  lambda: [ours.encode(t) for t in one])]
    print("\nencode paths (best of 5, alternating)   before s   after s   speed after/before")
    for name, before, after in rows:
        b, a = _best_pair(before, after)
        print(f"  {name:<38} {b:8.3f}  {a:8.3f}   {b / a:5.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("DHAD_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--chars", type=float, default=4e6, help="training characters per language")
    ap.add_argument("--eval-chars", type=float, default=2e6, help="held-out characters per language for encoding")
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before tokenizers starts its pool
    from dhad.tokenizer import (
        extend_tokenizer,
        format_stats_table,
        token_stats,
        train_bpe,
        train_sentencepiece,
    )

    root = Path(args.data)
    if not (root / "corpus").is_dir():
        print(f"no corpus at {root}/corpus (set --data or DHAD_DATA_DIR)", file=sys.stderr)
        return 2
    ch, ev = int(args.chars), int(args.eval_chars)
    en, ar = corpus(root, "english", ch), corpus(root, "arabic", ch)
    en_ev, ar_ev = corpus(root, "english", ev, skip=ch // 5 + 1), corpus(root, "arabic", ev, skip=ch // 6 + 1)
    train = en + ar
    n_train = sum(map(len, train))
    print(f"training text: {n_train / 1e6:.1f} M chars ({sum(len(t.encode()) for t in train) / 1e6:.1f} MB), "
          f"vocab {args.vocab_size}, {args.threads} threads")

    t0 = time.perf_counter()
    bpe = train_bpe(train, args.vocab_size)
    t_bpe = time.perf_counter() - t0
    t0 = time.perf_counter()
    sp = train_sentencepiece(train, args.vocab_size, num_threads=args.threads)
    t_sp = time.perf_counter() - t0
    faster = "faster" if t_bpe < t_sp else "slower"
    print(f"train  dhad BPE {t_bpe:7.2f} s | sentencepiece {t_sp:7.2f} s | time ratio dhad/sp {t_bpe / t_sp:.2f} "
          f"(dhad {max(t_bpe, t_sp) / min(t_bpe, t_sp):.1f}x {faster})")

    ev_texts = en_ev + ar_ev
    mb = sum(len(t.encode()) for t in ev_texts) / 1e6
    bpe.encode_batch(ev_texts[:50])
    sp.encode_batch(ev_texts[:50])  # warm both
    t0 = time.perf_counter()
    bpe.encode_batch(ev_texts)
    e_bpe = time.perf_counter() - t0
    t0 = time.perf_counter()
    sp.sp_model.encode(ev_texts, num_threads=args.threads)
    e_sp = time.perf_counter() - t0
    print(f"encode dhad BPE {mb / e_bpe:7.2f} MB/s | sentencepiece {mb / e_sp:7.2f} MB/s | "
          f"throughput ratio dhad/sp {e_sp / e_bpe:.2f}x  ({mb:.1f} MB held-out en+ar)")
    # single thread, one text at a time (what a server does per request)
    one = ev_texts[:2000]
    mb1 = sum(len(t.encode()) for t in one) / 1e6
    t0 = time.perf_counter()
    for t in one:
        bpe.encode(t)
    e1_bpe = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in one:
        sp.sp_model.encode(t)
    e1_sp = time.perf_counter() - t0
    print(f"encode one-by-one: dhad BPE {mb1 / e1_bpe:6.2f} MB/s | sentencepiece {mb1 / e1_sp:6.2f} MB/s | "
          f"ratio {e1_sp / e1_bpe:.2f}x")

    encode_paths(bpe, sp, ev_texts, one, args)

    base = train_bpe(en, args.vocab_size // 2)
    ext, rep = extend_tokenizer(base, bpe, args.vocab_size // 2)
    rows = []
    for name, tok in (("dhad-bpe", bpe), ("sentencepiece", sp), ("en-base", base), ("en-base+ar", ext)):
        for lang, texts in (("arabic", ar_ev), ("english", en_ev)):
            r = token_stats(tok, texts, name, lang)
            r.vocab_size = tok.vocab_size
            rows.append(r)
    print()
    print(format_stats_table(rows))
    print(f"\nen-base+ar: +{rep.added} Arabic tokens of dhad-bpe; English ids unchanged: "
          f"{ext.encode_batch(en_ev) == base.encode_batch(en_ev)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
