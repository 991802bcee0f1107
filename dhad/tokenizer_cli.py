"""`dhad tokenizer {train,stats,extend}`: thin argument parsing over dhad.tokenizer.

  dhad tokenizer train --input arabic=DIR --input english=DIR --weight arabic=1 --vocab-size 32000 --out tok/
  dhad tokenizer stats tok/ jais=other_tok/ --input arabic=DIR --input english=DIR --plot fertility.png
  dhad tokenizer extend BASE DONOR --add 32000 --out extended/ [--by frequency --corpus arabic=DIR]
  dhad tokenizer extend BASE --learn-from arabic=DIR --add 16000 --out extended/   (donor learned on DIR)

Without --input, the corpora are `<data>/corpus/arabic` and `<data>/corpus/english` (`--data`,
default $DHAD_DATA_DIR).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _cli_error(msg: str):
    from dhad.cli import CLIError

    return CLIError(msg)


def _data_default() -> str | None:
    return os.environ.get("DHAD_DATA_DIR")


def _add_corpus_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--input", action="append", default=[], metavar="LANG=PATH[,PATH]",
                   help=f"{what}: .txt (one text per line) / .jsonl files or directories, per language; repeatable")
    p.add_argument("--data", default=_data_default(),
                   help="data dir whose corpus/arabic and corpus/english are used when --input is not given "
                        "(default: $DHAD_DATA_DIR)")
    p.add_argument("--field", default=None, help="JSONL field holding the text (default: 'text')")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tok_command", metavar="{train,stats,extend}")
    sub.required = True

    t = sub.add_parser("train", help="train a byte-level BPE (or SentencePiece) tokenizer on a weighted language mix")
    _add_corpus_args(t, "training text")
    t.add_argument("--weight", action="append", default=[], metavar="LANG=W",
                   help="sampling weight of a language (share of characters in the mix; default 1 each)")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output directory (tokenizer.json + tokenizer_config.json)")
    t.add_argument("--kind", choices=["bpe", "sentencepiece"], default="bpe",
                   help="bpe: byte-level BPE, Jais-family style; sentencepiece: Llama-2/ALLaM style")
    t.add_argument("--total-chars", type=float, default=20e6, help="characters in the training mix (default 2e7)")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--normalize", default=None, metavar="tatweel,alef,yaa,taa_marbuta,diacritics|all",
                   help="Arabic normalisation inside the tokenizer (default none: lossless; see docs/tokenizers.md)")
    t.add_argument("--digit-group", type=int, default=1, help="digits per pre-token (1 = one digit per token)")
    t.add_argument("--chat-template", default="default",
                   help="jais | chatml | a .jinja file | 'none' (default: the Jais-family template)")
    t.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("stats", help="fertility, chars/token and byte-fallback rate per language, side by side")
    s.add_argument("tokenizers", nargs="+", metavar="[NAME=]PATH", help="tokenizer or model directories / files")
    _add_corpus_args(s, "evaluation text")
    s.add_argument("--max-chars", type=float, default=2e6, help="characters per language to measure (default 2e6)")
    s.add_argument("--plot", default=None, metavar="PNG", help="write a fertility bar chart")
    s.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")

    e = sub.add_parser("extend", help="add the donor's Arabic tokens that the base lacks (English unchanged)")
    e.add_argument("base", help="base tokenizer (tokenizer.json BPE or tokenizer.model SentencePiece) or model dir")
    e.add_argument("donor", nargs="?", default=None,
                   help="donor tokenizer with the Arabic tokens (e.g. a Jais-family tokenizer); or --learn-from")
    e.add_argument("--learn-from", action="append", default=[], metavar="LANG=PATH[,PATH]",
                   help="learn the donor on this Arabic text (.txt/.jsonl files or directories), in the base's style")
    e.add_argument("--learn-chars", type=float, default=2e7, help="characters of --learn-from text to learn on")
    e.add_argument("--save-donor", default=None, metavar="DIR", help="also write the learned donor here")
    e.add_argument("--add", type=int, required=True, metavar="N", help="number of tokens to add")
    e.add_argument("--out", required=True)
    e.add_argument("--by", choices=["rank", "frequency"], default="rank",
                   help="which donor tokens first: the donor's merge order, or frequency on --corpus")
    e.add_argument("--corpus", action="append", default=[], metavar="LANG=PATH",
                   help="text to count frequencies on (with --by frequency)")
    e.add_argument("--field", default=None)
    e.add_argument("--max-chars", type=float, default=5e6)


def _sources(args, inputs):
    from dhad.tokenizer import parse_sources

    if not inputs:
        if not args.data:
            raise _cli_error("no --input given and no --data / $DHAD_DATA_DIR to take corpus/arabic and corpus/english from")
        root = Path(args.data) / "corpus"
        inputs = [f"arabic={root / 'arabic'}", f"english={root / 'english'}"]
    return parse_sources(inputs, getattr(args, "weight", []) or [], args.field)


def run(args) -> int:
    from dhad.tokenizer import TokenizerError

    try:
        return {"train": _train, "stats": _stats, "extend": _extend}[args.tok_command](args)
    except TokenizerError as e:
        raise _cli_error(str(e)) from None


def _train(args) -> int:
    from dhad.tokenizer import ArabicNormalization, train_tokenizer

    sources = _sources(args, args.input)
    tmpl = args.chat_template
    if tmpl == "none":
        tmpl = None
    elif tmpl.endswith(".jinja"):
        if not Path(tmpl).is_file():
            raise _cli_error(f"chat template file not found: {tmpl}")
        tmpl = Path(tmpl).read_text(encoding="utf-8")
    kw = {}
    if args.kind == "bpe":
        kw = {"min_frequency": args.min_frequency, "normalization": ArabicNormalization.parse(args.normalize),
              "digit_group": args.digit_group, "chat_template": tmpl, "show_progress": True}
    else:
        if args.normalize:
            raise _cli_error("--normalize applies to --kind bpe only (SentencePiece models here use identity normalisation)")
        kw = {"chat_template": None if tmpl == "default" else tmpl}
    t0 = time.perf_counter()
    tok = train_tokenizer(sources, args.vocab_size, kind=args.kind, total_chars=int(args.total_chars), seed=args.seed, **kw)
    dt = time.perf_counter() - t0
    out = tok.save(args.out)
    print(f"trained {tok.kind} tokenizer: vocab {tok.vocab_size}, {dt:.1f}s, hash {tok.hash()} -> {out}")
    print("mix: " + ", ".join(f"{s.lang}={s.weight:g} ({len(s.paths)} files)" for s in sources))
    return 0


def _load_named(spec: str):
    from dhad.tokenizer import load_tokenizer

    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/")).name or spec
    return name, load_tokenizer(path)


def _stats(args) -> int:
    from dhad.tokenizer import format_stats_table, plot_stats, read_texts, token_stats

    toks = [_load_named(s) for s in args.tokenizers]
    sources = _sources(args, args.input)
    rows = []
    for src in sources:
        texts, n = [], 0
        for p in src.paths:
            for t in read_texts(p, src.field, max_chars=int(args.max_chars) - n):
                texts.append(t)
                n += len(t)
            if n >= args.max_chars:
                break
        if not texts:
            raise _cli_error(f"empty corpus for {src.lang}: {', '.join(map(str, src.paths))}")
        for name, tok in toks:
            r = token_stats(tok, texts, name, src.lang)
            r.vocab_size = tok.vocab_size
            rows.append(r)
    print(format_stats_table(rows))
    if args.json:
        from dhad.utils import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps([r.as_dict() | {"vocab_size": r.vocab_size} for r in rows], indent=2).encode())
    if args.plot:
        print(f"plot -> {plot_stats(rows, args.plot)}")
    return 0


def _read_corpus(specs, field, max_chars: int) -> list[str]:
    from dhad.tokenizer import parse_sources, read_texts

    out, n = [], 0
    for src in parse_sources(specs, field=field):
        for p in src.paths:
            for t in read_texts(p, src.field, max_chars=max_chars - n):
                out.append(t)
                n += len(t)
            if n >= max_chars:
                return out
    return out


def _extend(args) -> int:
    from dhad.tokenizer import extend_tokenizer, learn_donor, load_tokenizer

    if (args.donor is None) == (not args.learn_from):
        raise _cli_error("give either a DONOR tokenizer or --learn-from LANG=PATH (text to learn the Arabic tokens on)")
    base = load_tokenizer(args.base)
    if args.donor is not None:
        donor = load_tokenizer(args.donor)
    else:
        texts = _read_corpus(args.learn_from, args.field, int(args.learn_chars))
        t0 = time.perf_counter()
        donor = learn_donor(base, texts, args.add, show_progress=True)
        print(f"learned a {donor.vocab_size}-token donor on {sum(map(len, texts)) / 1e6:.1f} M characters "
              f"in {time.perf_counter() - t0:.1f}s")
        if args.save_donor:
            donor.save(args.save_donor)
    corpus = _read_corpus(args.corpus, args.field, int(args.max_chars)) if args.corpus else None
    ext, rep = extend_tokenizer(base, donor, args.add, by=args.by, corpus=corpus)
    out = ext.save(args.out)
    d = rep.as_dict()
    print(f"extended {base.kind} base: {d['base_vocab']} -> {d['new_vocab']} tokens "
          f"(+{d['added']} of {d['requested']} requested; {d['candidates']} Arabic donor tokens missing from the base, "
          f"{d['skipped']} skipped) -> {out}")
    if corpus:
        nb = sum(map(len, base.encode_batch(corpus)))
        ne = sum(map(len, ext.encode_batch(corpus)))
        print(f"corpus tokens: {nb:,} -> {ne:,} ({nb / max(1, ne):.2f}x fewer)")
    return 0
