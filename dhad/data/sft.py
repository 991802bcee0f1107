"""`dhad data sft`: instruction / chat data -> SFT shards with an exact assistant-only loss mask.

Input rows (jsonl / json / csv / parquet), any mix of:
* Alpaca: ``{"instruction", "input"?, "output", "system"?}`` -> user = instruction (+ "\\n\\n" + input),
  assistant = output.
* Chat: ``{"messages": [{"role", "content"}, ...]}`` — single or multi-turn, optional system first.
* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`` (mapped to the above).

Each conversation is rendered with the model's chat format (``dhad.prompts.render_segments``, the
format of the tokenizer directory by default) into ``(text, is_loss)`` pieces; every piece is tokenized
on its own (see dhad.data.encoder for why) so the mask — 1 on assistant tokens and the format's
end-of-turn / EOS — is exact, including every assistant turn of a multi-turn conversation.

Rows are then packed (several whole examples per ``seq_len`` row, segment ids 1..k; the model confines
attention to a segment and restarts positions, so packing does not contaminate examples — ALiBi and
RoPE alike) or written unpacked (one example per padded row). Both modes hold exactly the same
per-example tokens and masks; only the row layout differs (tests check this).

Every row that is not used is counted with its reason: read problems (invalid_utf8, malformed_json,
missing_file, ...), ``unknown_schema``, ``empty_response``, ``bad_roles`` (non-alternating / unknown
roles), ``last_turn_not_assistant``, ``no_loss_tokens``, ``too_long`` (or ``truncated`` when
``overflow="truncate"``: the example is cut to ``seq_len`` and kept if any loss token survives).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dhad.data.prepare import _is_val, _jsonable
from dhad.data.readers import NoInput, ReadStats, expand_inputs, format_skips, read_documents
from dhad.data.shards import Example, ShardWriter, _write_json_atomic, output_dir, pack_examples, pad_example

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


class RowError(ValueError):
    """A row that cannot become an example; ``reason`` is the report key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def check_utf8(obj, where: str = "") -> None:
    """Raise RowError("invalid_utf8") for strings that cannot be UTF-8 (lone surrogates from bad JSON escapes)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise RowError("invalid_utf8", where) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_utf8(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_utf8(v, f"{where}[{i}]")


def _msg_list(x, field_name: str) -> list[dict]:
    if not isinstance(x, list) or not x:
        raise RowError("unknown_schema", f"{field_name} must be a non-empty list of messages")
    out = []
    for m in x:
        if not isinstance(m, dict):
            raise RowError("bad_roles", f"{field_name}: message is not an object")
        if "from" in m and "value" in m:  # ShareGPT
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise RowError("bad_roles", f"unknown ShareGPT speaker {m['from']!r}")
            out.append({"role": role, "content": m["value"]})
        elif "role" in m and "content" in m:
            out.append({"role": m["role"], "content": m["content"]})
        else:
            raise RowError("bad_roles", f"{field_name}: message without role/content")
        if not isinstance(out[-1]["content"], str):
            raise RowError("unknown_schema", f"{field_name}: content is not a string")
    return out


def row_to_messages(row: dict, system: str | None = None) -> list[dict]:
    """Normalize one SFT row to a validated message list ending with an assistant turn."""
    from dhad.prompts import PromptError, validate_messages
    check_utf8(row)
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        msgs = _msg_list(row[key], key)
    elif "instruction" in row or "output" in row:
        ins, out = row.get("instruction"), row.get("output")
        if not isinstance(ins, str) or not ins.strip():
            raise RowError("missing_field", "instruction")
        if not isinstance(out, str):
            raise RowError("missing_field", "output")
        inp = row.get("input")
        user = ins.strip() + ("\n\n" + inp.strip() if isinstance(inp, str) and inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            msgs.insert(0, {"role": "system", "content": row["system"]})
    else:
        raise RowError("unknown_schema", f"keys {sorted(row)[:6]}")
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    try:
        msgs = validate_messages(msgs)
    except PromptError as e:
        raise RowError("bad_roles", str(e)) from None
    if msgs[-1]["role"] != "assistant":
        raise RowError("last_turn_not_assistant")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        raise RowError("empty_response")
    return msgs


def encode_conversation(enc, msgs: list[dict], fmt, answer_as_served: bool = False) -> Example:
    """Render with the chat format and tokenize piecewise: exact assistant-token mask."""
    from dhad.prompts import render_segments
    pieces = render_segments(msgs, fmt, eos_token=enc.eos_token, answer_as_served=answer_as_served)
    ids, mask = enc.encode_segments(pieces)
    return Example(ids=ids, mask=mask)


def resolve_format(fmt_arg: str | None, tokenizer: str):
    """The chat format: the named/dir one, else the tokenizer directory's own chat_template."""
    from dhad.prompts import PromptError, get_format
    if fmt_arg:
        return get_format(fmt_arg)
    try:
        return get_format(tokenizer)
    except PromptError as e:
        raise ValueError(f"no chat format given and {tokenizer} has none ({e}); pass --format NAME") from None


@dataclass
class SFTConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    data_root: str | None = None
    chat_format: str | None = None
    seq_len: int = 2048
    packed: bool = True
    open_rows: int = 32         # packing: first fit over this many partly filled rows
    overflow: str = "drop"      # drop | truncate
    val_fraction: float = 0.02
    seed: int = 0
    shuffle: bool = True
    system: str | None = None
    allow_hub: bool = False
    max_rows: int | None = None
    progress: bool = True
    answer_as_served: bool = False  # last answer after the generation prompt (prompts.render_segments)


def build_examples(cfg: SFTConfig, enc, fmt, stats: ReadStats, reasons: Counter, examples_of: dict):
    """Yield (split, Example, source) for every usable row; count the others in ``reasons`` (and the
    kept rows that were cut to ``seq_len`` under ``truncated``)."""
    inputs = expand_inputs(cfg.inputs, cfg.data_root)
    docs = read_documents(inputs, stats, text_fields=None, allow_hub=cfg.allow_hub)
    for doc in itertools.islice(docs, cfg.max_rows):   # islice reads no row past the last one used
        try:
            msgs = row_to_messages(doc.row, cfg.system)
            ex = encode_conversation(enc, msgs, fmt, cfg.answer_as_served)
            if not any(ex.mask):
                raise RowError("no_loss_tokens")
            if len(ex.ids) > cfg.seq_len:
                if cfg.overflow == "truncate" and any(ex.mask[:cfg.seq_len]):
                    ex = Example(ex.ids[:cfg.seq_len], ex.mask[:cfg.seq_len])
                    reasons["truncated"] += 1
                else:
                    raise RowError("too_long", f"{len(ex.ids)} tokens > seq_len {cfg.seq_len}")
        except RowError as e:
            reasons[e.reason] += 1
            lst = examples_of.setdefault(e.reason, [])
            if len(lst) < 5:
                lst.append(f"{doc.origin}: {e}")
            continue
        key = hashlib.sha1(json.dumps(msgs, ensure_ascii=False).encode("utf-8")).digest()
        split = "validation" if _is_val(key, cfg.seed, cfg.val_fraction) else "train"
        yield split, ex, doc.source


def prepare_sft(cfg: SFTConfig) -> dict:
    """Build <out>/train and <out>/validation SFT shards; returns the report (also <out>/sft_report.json).
    A run that fails leaves the previous output as it was, and no output folder when there was none."""
    with output_dir(cfg.out):
        return _prepare_sft(cfg)


def _prepare_sft(cfg: SFTConfig) -> dict:
    from dhad.data.encoder import Encoder
    enc = Encoder(cfg.tokenizer)
    fmt = resolve_format(cfg.chat_format, cfg.tokenizer)
    if cfg.overflow not in ("drop", "truncate"):
        raise ValueError(f"overflow must be drop|truncate, got {cfg.overflow!r}")
    stats, reasons, examples_of = ReadStats(), Counter(), {}
    splits: dict[str, list[tuple[Example, str]]] = {"train": [], "validation": []}
    for split, ex, src in build_examples(cfg, enc, fmt, stats, reasons, examples_of):
        splits[split].append((ex, src))
    if stats.records == 0:
        raise NoInput(stats)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    summary = {}
    for split, items in splits.items():
        if cfg.shuffle and items:
            items = [items[i] for i in rng.permutation(len(items))]
        w = ShardWriter(out, split, "sft", vocab_size=enc.vocab_size, eos_token_id=enc.eos_token_id,
                        pad_token_id=enc.pad_token_id, bos_token_id=enc.bos_token_id, seq_len=cfg.seq_len,
                        packed=cfg.packed, tokenizer_hash=enc.hash,
                        extra={"chat_format": fmt.name, "n_examples": len(items), "report": "../sft_report.json"})
        try:
            n_loss = sum(sum(ex.mask) for ex, _ in items)
            n_real = sum(len(ex.ids) for ex, _ in items)
            if cfg.packed:
                # source attribution of a packed row: its first example's source
                rows = pack_examples((ex for ex, _ in items), cfg.seq_len, enc.pad_token_id, cfg.open_rows)
                for t, m, s in rows:
                    w.add(t, mask=m, segments=s)
            else:
                for ex, src in items:
                    t, m, s = pad_example(ex, cfg.seq_len, enc.pad_token_id)
                    w.add(t, mask=m, segments=s, source=src)
        except BaseException:
            w.abort()
            raise
        n_rows = w.meta["n_docs"]
        w.meta["extra"]["loss_tokens"] = int(n_loss)
        w.close()
        summary[split] = {"examples": len(items), "rows": n_rows, "tokens": n_real, "loss_tokens": int(n_loss),
                          "fill": n_real / max(n_rows * cfg.seq_len, 1),
                          "sources": dict(Counter(src for _, src in items))}
    truncated = reasons.pop("truncated", 0)
    examples_of.pop("truncated", None)
    n_used = sum(len(v) for v in splits.values())
    report = {"inputs": stats.to_dict(), "rows": {"read": stats.records, "used": n_used,
                                                  "dropped": sum(reasons.values())},
              "dropped": dict(reasons), "dropped_examples": examples_of, "truncated": truncated,
              "splits": summary, "chat_format": fmt.name, "packed": cfg.packed, "seq_len": cfg.seq_len,
              "tokenizer": {"path": str(cfg.tokenizer), "hash": enc.hash},
              "config": _jsonable(asdict(cfg))}
    _write_json_atomic(out / "sft_report.json", report)
    return report


def format_sft_report(r: dict) -> str:
    """The report as text: read problems (lines, files) and row drops are counted separately, so a reason
    both can have (``invalid_utf8``: a bad line, or a row with a bad string) is never merged."""
    lines = [f"chat format: {r['chat_format']}, seq_len {r['seq_len']}, {'packed' if r['packed'] else 'unpacked'}"]
    inp = r["inputs"]
    lines.append(f"read: {inp['files']} files, {inp['records']} rows")
    lines += format_skips("skipped", inp["skipped"], inp["skipped_examples"])
    rows = r.get("rows") or {"used": inp["records"] - sum(r["dropped"].values()), "dropped": sum(r["dropped"].values())}
    lines.append(f"rows: {rows['used']} used, {rows['dropped']} dropped")
    lines += format_skips("dropped", r["dropped"], r["dropped_examples"])
    if r.get("truncated"):
        lines.append(f"  kept, cut to seq_len {r['truncated']:>16}")
    for s, m in r["splits"].items():
        lines.append(f"{s:<11} {m['examples']:>7} examples  {m['rows']:>6} rows  {m['tokens']:>9} tokens  "
                     f"{m['loss_tokens']:>9} loss tokens  fill {100 * m['fill']:.1f}%")
    return "\n".join(lines)
