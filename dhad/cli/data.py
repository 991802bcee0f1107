"""`dhad data {prepare,sft,prefs,translate,synth}` — thin argument parsing over dhad.data.prepare / sft /
prefs (translate and synth: dhad.cli.data_synth, over dhad.synth)."""
from __future__ import annotations

import argparse
from pathlib import Path

SUBCOMMANDS = {
    "prepare": "clean, filter, dedup and tokenize raw text into pretraining shards (train/validation)",
    "sft": "render instruction/chat data with the chat format into SFT shards (assistant-only loss mask)",
    "prefs": "preference pairs (prompt, chosen, rejected) into DPO shards, with a drop report",
}
# Sub-commands that drive a teacher model (dhad.synth, above the engine): their arguments are in
# dhad.cli.data_synth, imported only when asked for: name -> (module, add_arguments, run, help).
EXTERNAL = {
    "translate": ("dhad.cli.data_synth", "add_translate_arguments", "run_translate",
                  "machine-translate a corpus (en->ar) with a teacher model, resumable, quality-checked"),
    "synth": ("dhad.cli.data_synth", "add_synth_arguments", "run_synth",
              "instruction data by distillation / self-chat with a teacher model"),
}


def data_default() -> list[str] | None:
    """``--data``'s default: ``$DHAD_DATA_DIR`` (for every `dhad data` command)."""
    from dhad.utils import data_dir
    d = data_dir()
    return [str(d)] if d else None


def _common(p: argparse.ArgumentParser, what: str):
    p.add_argument("--data", nargs="+", default=data_default(), metavar="PATH",
                   help=f"{what}: directories, files (jsonl/json/txt/csv/tsv/parquet), globs, SOURCE=PATH to name "
                        "a mixture source, or hf:NAME[:CONFIG][:SPLIT] (needs --hf). Default: $DHAD_DATA_DIR")
    p.add_argument("--tokenizer", required=True, help="tokenizer or model directory (tokenizer.json / tokenizer.model)")
    p.add_argument("--out", required=True, help="output directory (writes <out>/train, <out>/validation, a report)")
    p.add_argument("--val-fraction", type=float, default=None, help="share of items held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf", action="store_true", help="allow downloading hf:NAME datasets from the Hugging Face Hub")
    p.add_argument("--max-rows", type=int, default=None, help="stop after this many input records (quick runs)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{" + ",".join([*SUBCOMMANDS, *EXTERNAL]) + "}")
    p = sub.add_parser("prepare", help=SUBCOMMANDS["prepare"], description=SUBCOMMANDS["prepare"])
    _common(p, "raw text")
    p.add_argument("--text-field", default="text", help="JSON/CSV field(s) holding the text, comma-separated")
    p.add_argument("--txt-mode", choices=("paragraph", "line", "file"), default="paragraph",
                   help="how .txt files split into documents")
    p.add_argument("--mix", default=None, help="train mixture weights SOURCE=W,... (e.g. english=2,arabic=1,code=0.4) "
                                                "or a card preset: jais-family, jais-adapted-7b, ...")
    p.add_argument("--total-tokens", type=int, default=None, help="train tokens to write (sources repeat as needed)")
    p.add_argument("--executor", choices=("local", "slurm", "ray"), default="local",
                   help="datatrove executor: local processes (default), a Slurm job array per stage, or Ray")
    p.add_argument("--tasks", type=int, default=None,
                   help="datatrove tasks reading the inputs (contiguous runs of files; big .jsonl files are cut in "
                        "byte ranges). Default: locally 4 per worker (at most one per MiB), else one per input file")
    p.add_argument("--workers", type=int, default=None,
                   help="tasks run at once (default: 2 locally; no limit on slurm/ray)")
    p.add_argument("--logging-dir", default=None,
                   help="datatrove logging folder (completions, stats, logs, work files; any fsspec path): rerun "
                        "with the same one to resume after a crash. Required for slurm/ray")
    p.add_argument("--executor-config", default=None, metavar="FILE.yaml",
                   help="executor options: {slurm|ray|local: {...}, stages: {process|buckets|dedup|merge: {...}}} "
                        "(see docs/examples/prepare-slurm.yaml, prepare-ray.yaml)")
    p.add_argument("--bucket-workers", type=int, default=1,
                   help="datatrove tasks per MinHash bucket (hash ranges; for very large runs)")
    p.add_argument("--normalization", choices=("arabic", "nfc", "nfkc", "none"), default="arabic")
    p.add_argument("--keep-tatweel", action="store_true", help="do not remove tatweel (kashida)")
    p.add_argument("--no-boilerplate", action="store_true", help="keep boilerplate lines")
    p.add_argument("--min-words", type=int, default=20)
    p.add_argument("--no-filters", action="store_true", help="disable every quality filter except length")
    p.add_argument("--skip-filters-for", default="", help="sources the prose filters do not apply to (e.g. code)")
    p.add_argument("--script", action="append", default=[], metavar="SOURCE=arabic|latin",
                   help="expected script of a source; documents mostly in another script are dropped")
    p.add_argument("--no-dedup", action="store_true", help="no exact or near-duplicate removal")
    p.add_argument("--no-near-dedup", action="store_true", help="exact dedup only")
    p.add_argument("--dedup-threshold", type=float, default=0.8, help="MinHash-LSH Jaccard threshold")
    p.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("sft", help=SUBCOMMANDS["sft"], description=SUBCOMMANDS["sft"])
    _common(s, "SFT rows (Alpaca {instruction,input,output}, chat {messages}, ShareGPT {conversations})")
    s.add_argument("--format", default=None, help="chat format name (jais, jais-legacy, llama2, chatml) or model "
                                                  "dir; default: the tokenizer directory's chat_template")
    s.add_argument("--seq-len", type=int, default=2048)
    s.add_argument("--unpacked", action="store_true", help="one example per (padded) row instead of packing")
    s.add_argument("--overflow", choices=("drop", "truncate"), default="drop", help="examples longer than --seq-len")
    s.add_argument("--system", default=None, help="system message added to conversations without one")
    s.add_argument("--answer-as-served", action="store_true",
                   help="train the last answer after the format's generation prompt (what serving sends); "
                        "differs from the template only for jais: '\n[|AI|]\n### Response :' vs '\n[|AI|]'")

    f = sub.add_parser("prefs", help=SUBCOMMANDS["prefs"], description=SUBCOMMANDS["prefs"])
    _common(f, "preference pairs ({prompt,chosen,rejected} or {chosen:[msgs],rejected:[msgs]})")
    f.add_argument("--format", default=None, help="chat format name or model dir (default: the tokenizer's)")
    f.add_argument("--max-len", type=int, default=1024, help="max prompt + response tokens (0 = no limit)")
    f.add_argument("--truncation", choices=("left", "drop"), default="left",
                   help="over-long pairs: left-truncate the prompt (responses stay whole) or drop them")
    f.add_argument("--min-prompt-tokens", type=int, default=8)
    f.add_argument("--answer-as-served", action="store_true",
                   help="answers after the format's generation prompt, as served (jais: '\n[|AI|]\n### Response :')")
    f.add_argument("--group-by", default="context",
                   help="train/validation split key, one group in one split: context (the prompt without its "
                        "last question: a paragraph's pairs stay together), prompt, or a row field")

    import importlib
    for name, (module, add, _, help_) in EXTERNAL.items():
        e = sub.add_parser(name, help=help_, description=help_)
        getattr(importlib.import_module(module), add)(e)   # light: it imports dhad.synth only when run


def run(args) -> int:
    from dhad.cli import CLIError
    cmd = getattr(args, "data_command", None)
    if not cmd:
        raise CLIError(f"choose a subcommand: dhad data {{{','.join([*SUBCOMMANDS, *EXTERNAL])}}} (see dhad data --help)")
    if cmd in EXTERNAL:
        import importlib
        module, _, run_name, _ = EXTERNAL[cmd]
        return getattr(importlib.import_module(module), run_name)(args)
    if not args.data:
        raise CLIError("no input: pass --data PATH ... or set DHAD_DATA_DIR")
    if not Path(args.tokenizer).exists():
        raise CLIError(f"tokenizer not found: {args.tokenizer}")
    root = args.data[0] if len(args.data) == 1 and Path(args.data[0]).is_dir() else None
    from dhad.data.readers import HubDisabled
    try:
        if cmd == "prepare":
            return _prepare(args, root)
        if cmd == "sft":
            return _sft(args, root)
        return _prefs(args, root)
    except (ValueError, HubDisabled, FileNotFoundError) as e:  # bad config/tokenizer/format: user errors
        if isinstance(e, CLIError):
            raise
        raise CLIError(str(e)) from None


def _prepare(args, root) -> int:
    from dhad.data.clean import CleanConfig
    from dhad.data.dedup import DedupConfig
    from dhad.data.filters import FilterConfig
    from dhad.data.prepare import PrepareConfig, format_report, parse_mix, prepare

    scripts = {}
    for item in args.script:
        if "=" not in item or item.split("=", 1)[1] not in ("arabic", "latin"):
            from dhad.cli import CLIError
            raise CLIError(f"--script {item!r}: expected SOURCE=arabic or SOURCE=latin")
        k, v = item.split("=", 1)
        scripts[k] = v
    fc = FilterConfig(min_words=args.min_words, scripts=scripts,
                      skip_sources={x for x in args.skip_filters_for.split(",") if x})
    if args.no_filters:
        fc = FilterConfig(min_words=args.min_words, min_letter_ratio=None, max_replacement_ratio=None,
                          min_mean_word_len=None, max_mean_word_len=None, max_symbol_ratio=None,
                          max_bullet_lines=None, max_ellipsis_lines=None, min_alpha_words=None, min_stopwords=None,
                          max_dup_line_fraction=None, max_dup_para_fraction=None, max_dup_line_chars=None,
                          max_dup_para_chars=None, max_top_ngram={}, max_dup_ngram={})
    cfg = PrepareConfig(
        inputs=args.data, data_root=root, tokenizer=args.tokenizer, out=args.out,
        text_fields=tuple(x.strip() for x in args.text_field.split(",") if x.strip()), txt_mode=args.txt_mode,
        clean=CleanConfig(normalization=args.normalization, remove_tatweel=not args.keep_tatweel,
                          boilerplate=not args.no_boilerplate),
        filters=fc,
        dedup=DedupConfig(exact=not args.no_dedup, near=not (args.no_dedup or args.no_near_dedup),
                          threshold=args.dedup_threshold),
        val_fraction=0.01 if args.val_fraction is None else args.val_fraction, seed=args.seed,
        mix=parse_mix(args.mix), total_tokens=args.total_tokens,
        workers=args.workers if args.workers is not None else (2 if args.executor == "local" else -1),
        allow_hub=args.hf, max_docs=args.max_rows, progress=not args.no_progress, executor=args.executor,
        tasks=args.tasks, logging_dir=args.logging_dir, executor_options=_executor_config(args.executor_config),
        bucket_workers=args.bucket_workers)
    report = prepare(cfg)
    if report is None:   # slurm: submitted
        print(f"submitted the prepare stages as Slurm job arrays (logs, stats and completions in {args.logging_dir}); "
              f"the last job writes {args.out}/train, {args.out}/validation and {args.out}/report.json. "
              "Rerun the same command to resubmit unfinished tasks.")
        return 0
    print(format_report(report))
    print(f"\nwrote {args.out}/train, {args.out}/validation and {args.out}/report.json")
    return 0


def _executor_config(path: str | None) -> dict:
    """--executor-config FILE.yaml -> the executor options dict (a mapping, or a clear error)."""
    from dhad.cli import CLIError
    if not path:
        return {}
    import yaml
    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise CLIError(f"--executor-config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise CLIError(f"--executor-config {path}: not valid YAML ({e})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise CLIError(f"--executor-config {path}: expected a mapping (slurm:/ray:/local:/stages:), got {type(d).__name__}")
    return d


def _sft(args, root) -> int:
    from dhad.data.sft import SFTConfig, format_sft_report, prepare_sft
    cfg = SFTConfig(inputs=args.data, data_root=root, tokenizer=args.tokenizer, out=args.out,
                    chat_format=args.format, seq_len=args.seq_len, packed=not args.unpacked, overflow=args.overflow,
                    val_fraction=0.02 if args.val_fraction is None else args.val_fraction, seed=args.seed,
                    system=args.system, allow_hub=args.hf, max_rows=args.max_rows,
                    answer_as_served=args.answer_as_served)
    report = prepare_sft(cfg)
    print(format_sft_report(report))
    print(f"\nwrote {args.out}/train, {args.out}/validation and {args.out}/sft_report.json")
    return 0


def _prefs(args, root) -> int:
    from dhad.data.prefs import PrefsConfig, format_prefs_report, prepare_prefs
    cfg = PrefsConfig(inputs=args.data, data_root=root, tokenizer=args.tokenizer, out=args.out,
                      chat_format=args.format, max_len=args.max_len or None, truncation=args.truncation,
                      min_prompt_tokens=args.min_prompt_tokens,
                      val_fraction=0.05 if args.val_fraction is None else args.val_fraction, seed=args.seed,
                      allow_hub=args.hf, max_rows=args.max_rows, group_by=args.group_by,
                      answer_as_served=args.answer_as_served)
    report = prepare_prefs(cfg)
    print(format_prefs_report(report))
    print(f"\nwrote {args.out}/train, {args.out}/validation and {args.out}/prefs_report.json")
    return 0
