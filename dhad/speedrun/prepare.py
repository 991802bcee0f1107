"""Stages 1-2: sample the corpus, train the tokenizers, prepare pretraining and SFT shards.

Everything here calls the library: `dhad.data.sample` (sampling), `dhad.tokenizer` (BPE, fertility,
extension), `dhad.data.prepare` (cleaning, filters, dedup, shards) and `dhad.data.sft`.
"""
from __future__ import annotations

import os
from pathlib import Path

from dhad.data.sample import corpus_files, read_texts, sample_corpus, sample_rows, write_texts
from dhad.speedrun.common import LANGS, SCRIPT, SFT_FILES, SpeedrunError, write_json
from dhad.utils import atomic_write_text


def stage_tokenizer(run, markers: dict) -> dict:
    from dhad.tokenizer import Source, plot_stats, token_stats, train_tokenizer
    plan, cfg = run.plan, run.cfg
    V = plan["size"]["vocab"]
    # sample the corpus once: the tokenizer trains on part of it, the data stage prepares all of it; the
    # sample's held-out documents are in neither (fertility, and the n-gram baseline's choice of order)
    sample = {}
    for lang in LANGS:
        sample[lang] = sample_corpus(corpus_files(run.data, lang), run.p("data", "sample", lang),
                                     plan["sample_chars_per_lang"], max(plan["heldout_chars_per_lang"], 20_000),
                                     cfg.seed)
    srcs = {lang: Source(lang, [run.p("data", "sample", lang, "train.jsonl")], 1.0, "text") for lang in LANGS}
    total = 2 * plan["tokenizer_chars_per_lang"]
    run.say(f"  training BPE tokenizers (vocab {V}) on {total / 1e6:.1f}M characters each")
    bi = train_tokenizer([srcs["arabic"], srcs["english"]], V, total_chars=total, seed=cfg.seed)
    en = train_tokenizer([srcs["english"]], V, total_chars=total, seed=cfg.seed)
    bi.save(run.p("tokenizer"))
    en.save(run.p("tokenizer-en"))
    held = {lang: read_texts(run.p("data", "sample", lang, "heldout.jsonl")) for lang in LANGS}
    rows = []
    toks = {"bilingual": bi, "english-only": en}
    ext_report = None
    if cfg.recipe == "adapted":
        from dhad.tokenizer import extend_tokenizer
        arabic_train = read_texts(run.p("data", "sample", "arabic", "train.jsonl"))[:2000]
        ext, rep = extend_tokenizer(en, bi, V, by="frequency", corpus=arabic_train)
        ext.save(run.p("tokenizer-ext"))
        ext_report = rep.as_dict()
        toks["english+arabic (extended)"] = ext
        run.say(f"  extended the English tokenizer with {rep.added} Arabic tokens of the bilingual one "
                f"({rep.base_vocab} -> {rep.new_vocab})")
    for name, tok in toks.items():
        for lang in LANGS:
            rows.append(token_stats(tok, held[lang], name=name, lang=lang))
    plot_stats(rows, run.p("fertility.png"))
    fert = [dict(r.as_dict(), vocab_size=toks[r.tokenizer].vocab_size) for r in rows]
    write_json(run.p("tokenizer", "fertility.json"), {"rows": fert, "extension": ext_report, "sample": sample})
    for r in fert:
        run.say(f"  {r['tokenizer']:<28} {r['lang']:<8} {r['fertility']:.3f} tokens/word")
    return {"tokenizer": str(run.p("tokenizer")), "tokenizer_en": str(run.p("tokenizer-en")),
            "fertility": fert, "extension": ext_report}


def _prepare_lang(run, lang: str, tok_dir: Path, out: Path, val_fraction: float) -> dict:
    from dhad.data.filters import FilterConfig
    from dhad.data.prepare import PrepareConfig, prepare
    # the sample's train.jsonl only: its held-out documents stay out of every split
    pc = PrepareConfig(inputs=[f"{lang}={run.p('data', 'sample', lang, 'train.jsonl')}"], tokenizer=str(tok_dir),
                       out=str(out), val_fraction=val_fraction, seed=run.cfg.seed,
                       workers=min(2, os.cpu_count() or 1), filters=FilterConfig(scripts={lang: SCRIPT[lang]}),
                       progress=run.cfg.progress)
    return prepare(pc)


def _heldout_texts(run, lang: str, shard_dir: Path, tok_dir: Path) -> list[str]:
    """Held-out documents (the validation split), decoded back to text, up to the plan's characters."""
    from dhad.data.shards import ShardSet
    from dhad.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    ss = ShardSet.open(shard_dir, "validation")
    out, n = [], 0
    for i in range(ss.n_docs):
        ids = [int(t) for t in ss.doc(i)]
        if ids and ids[-1] == ss.meta["eos_token_id"]:
            ids = ids[:-1]
        t = tok.decode(ids)
        out.append(t)
        n += len(t)
        if n >= run.plan["heldout_chars_per_lang"]:
            break
    if not out:
        raise SpeedrunError(f"{shard_dir}: the validation split is empty; give the run more data or budget")
    return out


def card_system(lang: str) -> str | None:
    """The system instruction the Jais card's prompt uses for questions in `lang`: its Arabic prompt
    (`prompt_ar`) carries the instruction in Arabic; English uses the template's default instruction."""
    if lang != "arabic":
        return None
    from dhad.prompts import JAIS_PROMPT_AR
    head = JAIS_PROMPT_AR.split("### Instruction:", 1)[-1]
    system = head.split(" أكمل المحادثة", 1)[0].strip()
    if not system or "[|Human|]" in system:
        raise SpeedrunError("cannot find the system instruction in the card's Arabic prompt")
    return system


def _prepare_sft(run, lang: str, tok_dir: Path, out: Path) -> dict:
    from dhad.data.sft import SFTConfig, prepare_sft
    files = SFT_FILES[lang]
    inst = run.data / "corpus" / "instruct"
    found = [inst / f for f in files if (inst / f).is_file()]
    if not found:
        raise SpeedrunError(f"no {lang} instruction data in {inst} (expected {', '.join(files)})")
    # a uniform sample of the rows the SFT time can use (rendering + encoding every row costs time too);
    # answers that open with a digit are left out (see dhad.data.sample.sample_rows)
    sample = run.p("data", "sft_sample", f"{lang}.jsonl")
    rows, n_digit = sample_rows(found, run.plan["sft_rows_per_lang"], run.cfg.seed)
    atomic_write_text(sample, "\n".join(rows) + "\n")
    sc = SFTConfig(inputs=[f"{lang}={sample}"], tokenizer=str(tok_dir), out=str(out),
                   chat_format="jais", seq_len=run.plan["seq_len_sft"], packed=True, overflow="truncate",
                   val_fraction=0.03, seed=run.cfg.seed, system=card_system(lang), progress=run.cfg.progress,
                   answer_as_served=True)  # the answer after "\n[|AI|]\n### Response :", as `dhad serve` sends
    rep = prepare_sft(sc)
    rep["digit_start_left_out"] = n_digit
    return rep


def stage_data(run, markers: dict) -> dict:
    from dhad.data.prepare import format_report
    from dhad.data.sft import format_sft_report
    plan = run.plan
    adapted = run.cfg.recipe == "adapted"
    sample_chars = {lang: sum(len(t) for t in read_texts(run.p("data", "sample", lang, "train.jsonl")))
                    for lang in LANGS}
    reports, held = {}, {}
    # pretraining shards: bilingual tokenizer (jais); adapted: English with the base tokenizer, Arabic with
    # the extended one (the English base never sees Arabic; adaptation never needs base-tokenized Arabic)
    jobs = [("arabic", "tokenizer-ext" if adapted else "tokenizer"), ("english", "tokenizer-en" if adapted else "tokenizer")]
    if adapted:
        jobs.append(("arabic-bi", "tokenizer"))  # the donor's Arabic (bilingual tokenizer)
        jobs.append(("english-bi", "tokenizer"))
    for name, tok in jobs:
        lang = name.split("-")[0]
        vf = min(max(1.5 * plan["heldout_chars_per_lang"] / max(sample_chars[lang], 1), 0.01), 0.2)
        run.say(f"  prepare {name} ({sample_chars[lang] / 1e6:.2f}M chars, tokenizer {tok})")
        rep = _prepare_lang(run, lang, run.p(tok), run.p("data", "pretrain", name), vf)
        reports[name] = rep
        run.say("  " + format_report(rep).replace("\n", "\n  "))
        if name in LANGS:
            held[lang] = _heldout_texts(run, lang, run.p("data", "pretrain", name), run.p(tok))
            write_texts(run.p("data", "heldout", f"{lang}.jsonl"), held[lang])
    sft = {}
    sft_tok = run.p("tokenizer-ext" if adapted else "tokenizer")
    for lang in LANGS:
        sft[lang] = _prepare_sft(run, lang, sft_tok, run.p("data", "sft", lang))
        run.say(f"  sft {lang}: " + format_sft_report(sft[lang]).replace("\n", "\n  "))
    return {"pretrain": {k: {"splits": v["splits"], "rules": v["rules"], "by_source": v["by_source"],
                             "cleaning": v["cleaning"]} for k, v in reports.items()},
            "heldout": {lang: {"docs": len(t), "chars": sum(len(x) for x in t)} for lang, t in held.items()},
            "sft": {lang: {"splits": r["splits"], "dropped": r["dropped"], "chat_format": r["chat_format"],
                           "digit_start_left_out": r["digit_start_left_out"]} for lang, r in sft.items()}}
