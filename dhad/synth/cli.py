"""`dhad data translate` and `dhad data synth`: argument parsing over dhad.synth.translate / synth / backends.

Wired into `dhad data` by dhad/data/cli.py (by module name, so that dhad.data never imports this
package: translation and synthesis drive models, data preparation does not). Library errors
(TranslateError, SynthError, BackendError, ValueError) become CLIError here and nowhere else.
"""
from __future__ import annotations

import os

from dhad.cli import CLIError
from dhad.data.cli import data_default
from dhad.synth.backends import BackendError
from dhad.synth.translate import TranslateError


def _cli_error(e: BaseException) -> CLIError:
    msg = str(e)
    if getattr(e, "report_path", None):
        msg += f" (the counts so far are in {e.report_path})"
    return CLIError(msg)


def data_args(data: list[str] | None, flag: str = "--data") -> tuple[list[str], str | None]:
    """(inputs, data_root) from ``--data``: a single directory is also the root ids are relative to."""
    from pathlib import Path
    if not data:
        raise TranslateError(f"no input: pass {flag} PATH ... or set DHAD_DATA_DIR")
    root = data[0] if len(data) == 1 and Path(data[0]).is_dir() else None
    return list(data), root


# ---------------------------------------------------------------------------------------------
# The teacher (both commands)

def add_backend_arguments(parser) -> None:
    g = parser.add_argument_group("teacher backend (one of --model / --endpoint)")
    g.add_argument("--model", help="a dhad model directory, run in process through the batching engine")
    g.add_argument("--endpoint", help="an OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 "
                                      "(vLLM, `dhad serve`, a hosted API)")
    g.add_argument("--teacher-model", help="model name sent to the endpoint (default: the first of GET /models)")
    g.add_argument("--api-key", help="API key for the endpoint (default: $DHAD_API_KEY or $OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it counts as timed out")
    g.add_argument("--max-retries", type=int, default=5, help="retries of a request on 429/5xx/timeout/malformed")
    g.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds (doubles each retry)")
    g.add_argument("--format", dest="chat_format", help="chat format for --model (default: the model's own)")
    g.add_argument("--dtype", default="float32", help="dtype for --model (float32, bfloat16)")
    g.add_argument("--device", default="cpu", help="device for --model")
    g.add_argument("--max-tokens", type=int, default=512, help="max new tokens per request")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)


def backend_from_args(args):
    """The backend the CLI arguments ask for (raises ValueError with a clear message otherwise)."""
    from dhad.synth.backends import EngineBackend, OpenAIBackend
    if bool(args.model) == bool(args.endpoint):
        raise ValueError("give exactly one teacher: --model DIR (a dhad model) or --endpoint URL (OpenAI-compatible)")
    if args.endpoint:
        key = args.api_key or os.environ.get("DHAD_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return OpenAIBackend(args.endpoint, model=args.teacher_model, api_key=key, timeout=args.timeout,
                             concurrency=args.concurrency, max_retries=args.max_retries, backoff=args.backoff)
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model}: not a directory (expected a dhad/HF model directory)")
    return EngineBackend.from_dir(args.model, dtype=args.dtype, device=args.device, fmt=args.chat_format,
                                  max_batch_size=args.concurrency, max_retries=args.max_retries)


def gen_params_from_args(args, default_temperature: float = 0.0):
    from dhad.synth.backends import GenParams
    t = default_temperature if args.temperature is None else args.temperature
    return GenParams(max_tokens=args.max_tokens, temperature=t, top_p=args.top_p, seed=args.seed)


# ---------------------------------------------------------------------------------------------
# dhad data translate

def _kv(items: list[str] | None, flag: str) -> dict:
    out = {}
    for it in items or []:
        for part in it.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise TranslateError(f"{flag} {part!r}: expected SOURCE=TAG")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def add_translate_arguments(parser) -> None:
    parser.add_argument("--data", nargs="+", default=data_default(), metavar="PATH",
                        help="corpora: directories (their top-level folders are the sources), files "
                             "(jsonl/json/txt/csv/tsv/parquet), globs, SOURCE=PATH. Default: $DHAD_DATA_DIR")
    parser.add_argument("--sources", help="only these sources, comma-separated (e.g. english)")
    parser.add_argument("--out", required=True, help="output JSONL (resumed if it exists)")
    parser.add_argument("--direction", default="en-ar", help="SRC-TGT: en-ar (default) or ar-en")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text (default text)")
    parser.add_argument("--id-field", default="id", help="JSON field holding a document id (default id; else file:line)")
    parser.add_argument("--quality-field", default="quality", help="row field with the quality tag")
    parser.add_argument("--quality", default="high",
                        help="accepted tags, comma-separated (default high); 'all' translates everything")
    parser.add_argument("--source-quality", action="append", metavar="SOURCE=TAG",
                        help="tag for a source's rows without their own, e.g. english=high (repeatable)")
    parser.add_argument("--max-chunk-chars", type=int, default=1500, help="split longer documents (default 1500)")
    parser.add_argument("--max-doc-chars", type=int, default=None, help="skip documents longer than this")
    parser.add_argument("--limit", type=int, default=None, help="translate at most N documents in this run")
    parser.add_argument("--round-trip", action="store_true", help="translate back and score chrF against the source")
    parser.add_argument("--min-chrf", type=float, default=None, help="reject when the round-trip chrF is below this")
    parser.add_argument("--min-script-ratio", type=float, default=0.7)
    parser.add_argument("--length-ratio", default="0.4,2.5", help="accepted target/source length ratio MIN,MAX")
    parser.add_argument("--max-repetition", type=float, default=0.3)
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    parser.add_argument("--no-progress", action="store_true")
    add_backend_arguments(parser)


def translate_config(args):
    from dhad.synth.translate import QualityConfig, TranslateConfig
    try:
        src, tgt = args.direction.split("-")
    except ValueError:
        raise TranslateError(f"--direction {args.direction!r}: expected SRC-TGT such as en-ar") from None
    try:
        lo, hi = (float(x) for x in args.length_ratio.split(","))
    except ValueError:
        raise TranslateError(f"--length-ratio {args.length_ratio!r}: expected MIN,MAX") from None
    quality = () if args.quality.strip().lower() == "all" else tuple(q.strip() for q in args.quality.split(",") if q.strip())
    inputs, root = data_args(args.data)
    sources = tuple(x.strip() for x in args.sources.split(",") if x.strip()) if args.sources else None
    return TranslateConfig(
        inputs=inputs, out=args.out, data_root=root, sources=sources, src_lang=src, tgt_lang=tgt,
        text_field=args.text_field, id_field=args.id_field or None, quality_field=args.quality_field,
        quality=quality, source_quality=_kv(args.source_quality, "--source-quality"),
        max_chunk_chars=args.max_chunk_chars, max_doc_chars=args.max_doc_chars, limit=args.limit,
        round_trip=args.round_trip,
        quality_rules=QualityConfig(min_script_ratio=args.min_script_ratio, min_length_ratio=lo, max_length_ratio=hi,
                                    max_repetition=args.max_repetition, min_chrf=args.min_chrf),
        gen=gen_params_from_args(args, 0.0), overwrite=args.overwrite, progress=not args.no_progress)


def run_translate(args) -> int:
    from dhad.synth.translate import check_config, format_report, resolve_sources, translate_corpus
    backend = None
    try:
        cfg = translate_config(args)
        check_config(cfg)
        resolve_sources(list(cfg.inputs), cfg.data_root, cfg.sources)   # fail on a bad source before loading a model
        backend = backend_from_args(args)
        report = translate_corpus(cfg, backend)
    except (TranslateError, BackendError, ValueError) as e:
        raise _cli_error(e) from None
    finally:
        if backend is not None:
            backend.close()
    print(format_report(report))
    return 0


# ---------------------------------------------------------------------------------------------
# dhad data synth

def add_synth_arguments(parser) -> None:
    parser.add_argument("--data", nargs="+", default=data_default(), metavar="PATH",
                        help="seed prompts: files/directories/globs (jsonl/json/csv/parquet rows with instruction[+input], "
                             "prompt, question or messages). Default: $DHAD_DATA_DIR")
    parser.add_argument("--out", required=True, help="output JSONL in the chat schema (resumed if it exists)")
    parser.add_argument("--mode", choices=("distill", "selfchat"), default="distill",
                        help="distill: one answer per seed; selfchat: the teacher also plays the user")
    parser.add_argument("--turns", type=int, default=3, help="user turns per conversation in selfchat (default 3)")
    parser.add_argument("--samples", type=int, default=1, help="conversations per seed (default 1)")
    parser.add_argument("--lang", choices=("ar", "en"), help="only seeds in this language")
    parser.add_argument("--prompt-field", action="append", help="seed field(s) holding the prompt "
                                                                "(default instruction, prompt, question)")
    parser.add_argument("--system", help="system prompt for the teacher (default: answer in the seed's language)")
    parser.add_argument("--keep-system", action="store_true", help="write the system turn into the conversations")
    parser.add_argument("--limit", type=int, help="generate at most N conversations in this run")
    parser.add_argument("--dedup-against", action="append", default=[], metavar="PATH",
                        help="existing SFT data to near-deduplicate against (repeatable)")
    parser.add_argument("--dedup-threshold", type=float, default=0.8, help="MinHash Jaccard threshold (default 0.8)")
    parser.add_argument("--no-dedup", action="store_true")
    parser.add_argument("--min-chars", type=int, default=2)
    parser.add_argument("--max-chars", type=int, default=8000)
    parser.add_argument("--min-lang-ratio", type=float, default=0.6)
    parser.add_argument("--allow-refusals", action="store_true")
    parser.add_argument("--max-repetition", type=float, default=0.3)
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    parser.add_argument("--no-progress", action="store_true")
    add_backend_arguments(parser)


def synth_config(args):
    from dhad.data.dedup import DedupConfig
    from dhad.synth.synth import SynthConfig, SynthFilterConfig
    seeds, root = data_args(args.data)
    return SynthConfig(
        seeds=seeds, out=args.out, data_root=root, mode=args.mode, turns=args.turns, samples=args.samples,
        lang=args.lang, prompt_fields=tuple(args.prompt_field or ("instruction", "prompt", "question")),
        system=args.system, keep_system=args.keep_system, limit=args.limit,
        filters=SynthFilterConfig(min_lang_ratio=args.min_lang_ratio, min_chars=args.min_chars,
                                  max_chars=args.max_chars, refusals=not args.allow_refusals,
                                  max_repetition=args.max_repetition),
        dedup=None if args.no_dedup else DedupConfig(threshold=args.dedup_threshold),
        dedup_against=list(args.dedup_against), gen=gen_params_from_args(args, 0.7),
        overwrite=args.overwrite, progress=not args.no_progress)   # teacher: the model id the backend resolves


def run_synth(args) -> int:
    from dhad.synth.synth import format_report, synth
    from dhad.synth.translate import resolve_sources
    backend = None
    try:
        cfg = synth_config(args)
        resolve_sources(list(cfg.seeds), cfg.data_root)   # fail on a bad seed path before loading a model
        backend = backend_from_args(args)
        report = synth(cfg, backend)
    except (TranslateError, BackendError, ValueError) as e:
        raise _cli_error(e) from None
    finally:
        if backend is not None:
            backend.close()
    print(format_report(report))
    return 0
