"""`dhad eval`: log-likelihood benchmarks, result tables, MT-bench, Vicuna-80 and the DPO comparison.

    dhad eval --model DIR --tasks arabicmmlu,exams_ar,acva --shots 5 --limit 100 --data DATA --out runs/eval
    dhad eval --list
    dhad eval table runs/a runs/b                      # the cards' tables from saved results
    dhad eval mt-bench answer --model DIR --lang en,ar --out runs/mt
    dhad eval mt-bench answer --endpoint http://host:8000/v1 --served-model NAME --out runs/mt
    dhad eval mt-bench judge --answers runs/mt --judge-endpoint URL --judge-model gpt-4 --out runs/mt
    dhad eval mt-bench judge --mode pairwise --answers runs/mt --baseline runs/base ...
    dhad eval vicuna --model DIR --baseline-answers runs/b --judge-endpoint URL --judge-model gpt-4 --out runs/v
    dhad eval compare --model DPO_DIR --parent SFT_DIR --prefs PREFS --judge-url URL --out runs/cmp

Library code: dhad.evaluate (tasks, runner, mtbench, vicuna, results) and dhad.train.compare.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dhad.cli import CLIError, add_quantize_arguments, quantize_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="dhad / Hugging Face model directory, or a GGUF file")
    p.add_argument("--tasks", default=None, help="comma-separated task names or groups (arabic, english, all)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples (the harness's selection); default 0")
    p.add_argument("--limit", type=int, default=None, help="first N rows per (sub)task")
    p.add_argument("--data", default=None, help="data directory (default $DHAD_DATA_DIR)")
    p.add_argument("--hub", action="store_true", help="read the datasets from the Hugging Face Hub (needs network)")
    p.add_argument("--task-file", action="append", default=[], metavar="TASK=FILE",
                   help="your own data file for a task whose data is not public (crows_pairs_ar, siqa_ar, "
                        "*_jais, ...; repeatable)")
    p.add_argument("--download", action="store_true",
                   help="treat --model as a Hugging Face repo id and download it (needs network)")
    p.add_argument("--out", default=None, help="write results.json, samples.jsonl and results.md here")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token budget of one forward pass")
    p.add_argument("--max-rows", type=int, default=64, help="rows of one forward pass")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    add_quantize_arguments(p)
    sub = p.add_subparsers(dest="action", metavar="{table,mt-bench,vicuna,compare}")
    t = sub.add_parser("table", help="the cards' tables (Markdown + PNG bar chart) from saved results")
    t.add_argument("results", nargs="+", help="results.json files or the directories holding them "
                                              "(runs of one model, e.g. 0- and 5-shot, fill one row)")
    t.add_argument("--card", default="jais-ar,jais-en,allam",
                   help="which tables: jais-ar, jais-en, allam (comma-separated; default all)")
    t.add_argument("--out", dest="table_out", default=None, help="write tables.md and tables.png here")
    mt = sub.add_parser("mt-bench", help="MT-bench answers and judging")
    mts = mt.add_subparsers(dest="mt_action", metavar="{answer,judge}")
    a = mts.add_parser("answer", help="two-turn answers to the 80 questions")
    a.add_argument("--model", dest="mt_model", help="dhad model directory (local generation)")
    a.add_argument("--endpoint", help="OpenAI-compatible base URL instead of a local model (…/v1)")
    a.add_argument("--served-model", help="model name to send to the endpoint")
    a.add_argument("--model-id", help="name recorded in the answer file (default: directory / served name)")
    a.add_argument("--lang", default="en,ar")
    a.add_argument("--limit", dest="mt_limit", type=int, default=None, help="first N questions (smoke runs)")
    a.add_argument("--max-new-tokens", type=int, default=1024)
    a.add_argument("--system", default=None, help="system prompt (default none)")
    a.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")
    a.add_argument("--data", dest="mt_data", default=None)
    a.add_argument("--out", dest="mt_out", required=True, help="writes answers_<lang>.jsonl here")
    j = mts.add_parser("judge", help="single-answer grading or pairwise comparison")
    j.add_argument("--answers", required=True, help="directory with answers_<lang>.jsonl (or one such file)")
    j.add_argument("--baseline", help="(pairwise) the other model's answers directory / file")
    j.add_argument("--mode", choices=["single", "pairwise"], default="single")
    j.add_argument("--judge-endpoint", required=True, help="OpenAI-compatible base URL (…/v1)")
    j.add_argument("--judge-model", required=True)
    j.add_argument("--api-key-env", default=None, help="environment variable holding the judge's API key")
    j.add_argument("--lang", default="en,ar")
    j.add_argument("--limit", dest="mt_limit", type=int, default=None)
    j.add_argument("--parallel", type=int, default=1)
    j.add_argument("--data", dest="mt_data", default=None)
    j.add_argument("--out", dest="mt_out", required=True)
    v = sub.add_parser("vicuna", help="Vicuna-80 pairwise win rate (Arabic and English), judged both ways round")
    for prefix, who in (("", "the model"), ("baseline-", "its opponent")):
        d = "v_" + prefix.replace("-", "_")
        g = v.add_argument_group(f"{who} (one of)")
        g.add_argument(f"--{prefix}model", dest=d + "model", metavar="DIR", help=f"{who}: dhad model directory (local generation)")
        g.add_argument(f"--{prefix}answers", dest=d + "answers", metavar="PATH",
                       help=f"{who}: saved answers (FastChat answer JSONL, or a directory with answers_<lang>.jsonl)")
        g.add_argument(f"--{prefix}endpoint", dest=d + "endpoint", metavar="URL", help=f"{who}: OpenAI-compatible base URL (…/v1)")
        g.add_argument(f"--{prefix}served-model", dest=d + "served_model", metavar="NAME", help="model name at that endpoint")
        g.add_argument(f"--{prefix}name", dest=d + "name", metavar="NAME", help="name in the results (default: directory / served name)")
    v.add_argument("--judge-endpoint", dest="v_judge_endpoint", metavar="URL", required=True, help="OpenAI-compatible judge (…/v1)")
    v.add_argument("--judge-model", dest="v_judge_model", metavar="NAME", required=True, help="e.g. gpt-4-0613 (the Jais team's)")
    v.add_argument("--judge-prompts", dest="v_judge_prompts", choices=["jais", "pair-v2"], default="jais",
                   help="jais: gpt4_prompts.json 0-10 scores (default); pair-v2: FastChat's [[A]]/[[B]]/[[C]]")
    v.add_argument("--questions", dest="v_questions", choices=["jais", "acegpt"], default="jais",
                   help="jais: the Jais team's En/Ar file (default); acegpt: FastChat English + AceGPT Arabic")
    v.add_argument("--lang", dest="v_lang", metavar="LANGS", default="ar,en")
    v.add_argument("--limit", dest="v_limit", metavar="N", type=int, default=None, help="first N questions (smoke runs)")
    v.add_argument("--parallel", dest="v_parallel", metavar="N", type=int, default=4, help="concurrent judge requests")
    v.add_argument("--retries", dest="v_retries", metavar="N", type=int, default=3, help="judge retries before an error is counted")
    v.add_argument("--backoff", dest="v_backoff", metavar="S", type=float, default=1.0,
                   help="first retry wait in seconds, doubling")
    v.add_argument("--timeout", dest="v_timeout", metavar="S", type=float, default=600.0, help="seconds per judge request")
    v.add_argument("--judge-max-tokens", dest="v_judge_max_tokens", metavar="N", type=int, default=2048)
    v.add_argument("--judge-temperature", dest="v_judge_temperature", metavar="T", type=float, default=None,
                   help="default: 0.2 for jais (its GPT-4 setting), 0 for pair-v2")
    v.add_argument("--max-new-tokens", dest="v_max_new_tokens", metavar="N", type=int, default=1024, help="answer length")
    v.add_argument("--system", dest="v_system", metavar="TEXT", default=None, help="system prompt for generated answers")
    v.add_argument("--api-key-env", dest="v_api_key_env", metavar="VAR", default=None, help="variable holding the endpoints' API key")
    v.add_argument("--download", dest="v_download", action="store_true", help="--model values are Hub repo ids")
    v.add_argument("--data", dest="v_data", metavar="DIR", default=None)
    v.add_argument("--out", dest="v_out", metavar="DIR", required=True, help="answers, judgments.jsonl, vicuna.json/.md/.png; resumed")
    _add_compare_arguments(sub.add_parser(
        "compare", help="an aligned (DPO) model vs its SFT parent: MT-bench pairwise judge + held-out preference accuracy"))


def _add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from dhad.evaluate.mtbench import MAX_NEW_TOKENS

    p.add_argument("--model", required=True, help="the aligned (DPO) model directory")
    p.add_argument("--parent", required=True, help="its SFT parent model directory")
    p.add_argument("--out", required=True, help="output directory for answers, judgments and the report")
    p.add_argument("--data", default=None, help="data root with eval/mt_bench_{en,ar} (default $DHAD_DATA_DIR)")
    p.add_argument("--langs", default="en,ar", help="MT-bench languages (comma-separated)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", default="gpt-4")
    p.add_argument("--api-key", default=None, help="judge API key (default $OPENAI_API_KEY)")
    p.add_argument("--limit", type=int, default=None, help="first N MT-bench questions per language")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--prefs", default=None, help="prefs shard directory with held-out pairs")
    p.add_argument("--prefs-split", default="validation")
    p.add_argument("--prefs-limit", type=int, default=None)
    p.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward (the DPO run's)")
    p.add_argument("--parallel", type=int, default=4, help="concurrent judge requests")


def run(args) -> int:
    from dhad.evaluate import tasks as T
    from dhad.evaluate.mtbench import MTBenchError

    try:
        if args.list:
            return _list()
        if args.action == "table":
            return _table(args)
        if args.action == "vicuna":
            return _vicuna(args)
        if args.action == "compare":
            return _compare(args)
        if args.action == "mt-bench":
            if args.mt_action == "answer":
                return _mt_answer(args)
            if args.mt_action == "judge":
                return _mt_judge(args)
            raise CLIError("dhad eval mt-bench needs 'answer' or 'judge'")
        return _loglik(args)
    except (T.TaskError, MTBenchError, FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None


def _list() -> int:
    from dhad.evaluate import tasks as T

    for name, t in T.TASKS.items():
        shots = "0-shot only" if t.max_shots == 0 else f"shots from {t.fewshot_split or t.eval_split} ({t.sampler})"
        print(f"{name:40s} {t.lang}  {', '.join(t.metrics):30s} {shots:28s} {t.harness}")
    print("groups: " + "; ".join(f"{g} = {','.join(v)}" for g, v in T.GROUPS.items() if g != "all"))
    return 0


def _load(model_dir, dtype, device, download: bool = False, quant: dict | None = None):
    import dhad
    from dhad.checkpoint import resolve_model_dir
    if not model_dir:
        raise CLIError("--model DIR is required")
    if not download and not Path(model_dir).is_dir():
        raise CLIError(f"model directory not found: {model_dir} (a Hugging Face repo id needs --download)")
    try:
        model_dir = resolve_model_dir(model_dir, download=download)
        return dhad.load_model(model_dir, dtype=dtype, device=device, **(quant or {})), dhad.load_tokenizer(model_dir)
    except Exception as e:  # noqa: BLE001 - a broken checkpoint, an offline download: user errors here
        raise CLIError(f"could not load {model_dir}: {e}") from None


def _task_files(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise CLIError(f"--task-file {spec!r}: expected TASK=FILE")
        out[name.strip()] = path.strip()
    return out


def _loglik(args) -> int:
    from dhad.evaluate import results, runner
    from dhad.evaluate import tasks as T

    if not args.tasks:
        raise CLIError("--tasks is required (see dhad eval --list)")
    tasks = T.resolve_tasks(args.tasks)  # unknown names fail before the model loads
    files = _task_files(args.task_file)
    for name in files:
        T.get_task(name)
    if not args.hub and any(t.name not in files for t in tasks):
        T.resolve_data_dir(args.data)
    model, tok = _load(args.model, args.dtype, args.device, args.download, quantize_kwargs(args))
    records: list = []
    res = runner.evaluate(model, tok, tasks, shots=args.shots, limit=args.limit, data_dir=args.data, hub=args.hub,
                          batch_tokens=args.batch_tokens, max_rows=args.max_rows, model_path=args.model,
                          records=records, task_files=files)
    print(results.markdown_tables([res]))
    t = res["time"]
    print(f"{t['examples']} examples in {t['seconds']:.1f}s ({t['examples_per_s']:.2f} examples/s)")
    for name, e in res["tasks"].items():
        if e["skipped"]:
            print(f"{name}: skipped {e['skipped']} rows: {json.dumps(e['skip_reasons'], ensure_ascii=False)}")
    if args.out:
        paths = results.write_results(res, args.out, records)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _table(args) -> int:
    from dhad.evaluate import results as R
    from dhad.utils import atomic_write_text

    runs = [R.load_results(p) for p in args.results]
    cards = _langs(args.card)
    text = R.card_tables(runs, cards)
    print(text)
    if args.table_out:
        md = atomic_write_text(Path(args.table_out) / "tables.md", text)
        png = R.plot_card_tables(runs, Path(args.table_out) / "tables.png", cards)
        print(f"wrote {md} and {png}")
    return 0


def _langs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _api_key(name):
    if not name:
        return None
    if name not in os.environ:
        raise CLIError(f"--api-key-env {name}: environment variable not set")
    return os.environ[name]


def _mt_answer(args) -> int:
    from dhad.evaluate import mtbench as M

    if bool(args.mt_model) == bool(args.endpoint):
        raise CLIError("give either --model DIR (local generation) or --endpoint URL")
    if args.endpoint:
        if not args.served_model:
            raise CLIError("--endpoint needs --served-model NAME")
        client = M.ChatClient(args.endpoint, args.served_model, api_key=_api_key(args.api_key_env))
        chat = M.endpoint_chat_fn(client, args.max_new_tokens)
        model_id = args.model_id or args.served_model
    else:
        model, tok = _load(args.mt_model, "float32", "cpu")
        chat = M.local_chat_fn(model, tok, max_new_tokens=args.max_new_tokens)
        model_id = args.model_id or Path(args.mt_model).name
    for lang in _langs(args.lang):
        qs = M.load_questions(args.mt_data, lang)[: args.mt_limit]
        out = Path(args.mt_out) / f"answers_{lang}.jsonl"
        M.generate_answers(qs, chat, model_id, out, system=args.system)
        print(f"wrote {out}")
    return 0


def _vicuna(args) -> int:
    from dhad.evaluate import mtbench as M
    from dhad.evaluate import vicuna as V

    key = _api_key(args.v_api_key_env)
    langs = _langs(args.v_lang)
    for lang in langs:
        if lang not in V.LANGS:
            raise CLIError(f"--lang {lang!r}: Vicuna-80 has {', '.join(V.LANGS)}")
    sides = []
    for prefix, flag in (("v_", ""), ("v_baseline_", "baseline-")):
        model, answers, endpoint = (getattr(args, prefix + k) for k in ("model", "answers", "endpoint"))
        if sum(x is not None for x in (model, answers, endpoint)) != 1:
            raise CLIError(f"give exactly one of --{flag}model, --{flag}answers, --{flag}endpoint")
        name = getattr(args, prefix + "name")
        if answers is not None:
            files = [V.answer_file(answers, lang) for lang in langs]
            for f in files:
                if not f.is_file():
                    raise CLIError(f"--{flag}answers: {f} not found")
            sides.append(V.Side(name or _model_id(files[0]), answers=answers))
        elif endpoint is not None:
            served = getattr(args, prefix + "served_model")
            if not served:
                raise CLIError(f"--{flag}endpoint needs --{flag}served-model NAME")
            client = M.ChatClient(endpoint, served, api_key=key, timeout=args.v_timeout)
            sides.append(V.Side(name or served, chat=M.endpoint_chat_fn(client, args.v_max_new_tokens),
                                system=args.v_system))
        else:
            m, tok = _load(model, "float32", "cpu", args.v_download)
            sides.append(V.Side(name or Path(model).name, chat=M.local_chat_fn(m, tok, max_new_tokens=args.v_max_new_tokens),
                                system=args.v_system))
    judge = M.ChatClient(args.v_judge_endpoint, args.v_judge_model, api_key=key, timeout=args.v_timeout, retries=0)
    s = V.run_vicuna(sides[0], sides[1], judge, args.v_out, data_dir=args.v_data, langs=langs,
                     judge_prompts=args.v_judge_prompts, questions=args.v_questions, limit=args.v_limit,
                     parallel=args.v_parallel, retries=args.v_retries, backoff=args.v_backoff, judge_temperature=args.v_judge_temperature,
                     judge_max_tokens=args.v_judge_max_tokens)
    print(V.vicuna_table([s]))
    print(f"judge requests this run: {s['asked_this_run']}; wrote {args.v_out}/vicuna.json, vicuna.md, vicuna.png")
    return 0


def _answer_file(path: str, lang: str) -> Path:
    p = Path(path)
    return p / f"answers_{lang}.jsonl" if p.is_dir() else p


def _mt_judge(args) -> int:
    from dhad.evaluate import mtbench as M
    from dhad.evaluate.results import atomic_write_jsonl, mtbench_table
    from dhad.utils import atomic_write_text

    client = M.ChatClient(args.judge_endpoint, args.judge_model, api_key=_api_key(args.api_key_env))
    prompts = M.load_judge_prompts(args.mt_data)
    out = Path(args.mt_out)
    rows_all = []
    if args.mode == "pairwise" and not args.baseline:
        raise CLIError("--mode pairwise needs --baseline (the other model's answers)")
    for lang in _langs(args.lang):
        qs = M.load_questions(args.mt_data, lang)[: args.mt_limit]
        f1 = _answer_file(args.answers, lang)
        ans = M.load_answers(f1)
        model_id = _model_id(f1)
        if args.mode == "single":
            rows_all += M.judge_single(qs, ans, client, prompts, model_id, parallel=args.parallel)
        else:
            f2 = _answer_file(args.baseline, lang)
            rows_all += M.judge_pairwise(qs, ans, M.load_answers(f2), client, prompts, model_id, _model_id(f2),
                                         parallel=args.parallel)
    if args.mode == "single":
        summary = M.summarize_single(rows_all)
        atomic_write_jsonl(out / "judgments_single.jsonl", rows_all)
        atomic_write_text(out / "mtbench_single.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
        text = mtbench_table([summary])
    else:
        summary = M.summarize_pairwise(rows_all)
        atomic_write_jsonl(out / "judgments_pairwise.jsonl", rows_all)
        atomic_write_text(out / "mtbench_pairwise.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
        text = M.pairwise_table([summary])
    atomic_write_text(out / f"mtbench_{args.mode}.md", text)
    print(text)
    return 0


def _model_id(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline()).get("model_id") or path.parent.name
    except (OSError, json.JSONDecodeError):
        return path.parent.name


def _compare(args) -> int:
    from dhad.train.compare import CompareError, compare_models, format_comparison

    try:
        r = compare_models(args.model, args.parent, args.out, data_dir=args.data,
                           langs=[x for x in args.langs.split(",") if x], judge_url=args.judge_url,
                           judge_model=args.judge_model, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                           limit=args.limit, max_new_tokens=args.max_new_tokens, prefs_dir=args.prefs,
                           prefs_split=args.prefs_split, prefs_limit=args.prefs_limit, beta=args.beta,
                           parallel=args.parallel)
    except CompareError as e:
        raise CLIError(str(e)) from None
    print(format_comparison(r))
    print(f"wrote {args.out}/comparison.json and comparison.md")
    return 0
