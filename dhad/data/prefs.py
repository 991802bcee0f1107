"""`dhad data prefs`: preference pairs -> "prefs" shards of (prompt_ids, chosen_ids, rejected_ids).

Accepted row schemas (jsonl / json / csv / parquet, or ``hf:`` datasets with ``--hf``):

1. ``{"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages], "system"?}``
   (TRL's explicit-prompt shape, the shared data's shape). When chosen/rejected are message lists they
   are either the final assistant turn alone or the whole conversation repeating the prompt.
2. ``{"chosen": [messages], "rejected": [messages]}`` — two whole conversations with a shared prefix
   (hh-rlhf / UltraFeedback-binarized): the longest common message prefix is the prompt, and what
   remains of each must be one assistant message, else the pair is dropped as ``prefixes_differ``.
3. ``{"chosen": "\\n\\nHuman: … \\n\\nAssistant: …", "rejected": …}`` — raw hh-rlhf transcripts, split on
   ``\\n\\n(Human|Assistant): `` then treated as 2.

Rendering: ``prompt + [assistant: answer]`` is rendered with the chat format (``render_segments``); the
last loss-counted pieces are the response (plus the tokenizer's EOS in formats that write no end-of-turn
text, e.g. Jais), the pieces before them the prompt — earlier turns rendered exactly as at generation
time (no EOS inside the history); pieces are tokenized separately (exact boundary; the
prompt ids are what generation would see). ``chosen_ids`` / ``rejected_ids`` are the response tokens
only — the DPO loss sums log-probs over exactly these.

Length: with ``max_len``, a pair whose ``prompt + longer response`` exceeds it is either left-truncated
(``truncation="left"``: the oldest prompt tokens go, a leading BOS is kept, responses stay whole; the
pair is still dropped as ``too_long`` if fewer than ``min_prompt_tokens`` prompt tokens would remain) or
dropped (``truncation="drop"``).

Split: pairs are assigned to train / validation by a *group* key, so that every pair of one group lands in
the same split (``group_by``):

* ``context`` (default): the prompt without its final question — the conversation before the last user
  turn plus that turn minus its last paragraph (``\n\n``-separated), system messages left out; a prompt
  that is nothing but its question is its own group. Derived QA pairs (paragraph + question, several
  questions per paragraph, answers mirrored between pairs) thus keep a paragraph in one split; hh-rlhf
  conversations stay independent (2,297 groups for the 2,299 harmless pairs kept).
* ``prompt``: the whole prompt (pairs sharing a prompt exactly).
* any other name: that field of the input row (e.g. a document or conversation id); rows without it fall
  back to ``context`` and are counted (``group_field_missing`` in the report).
A hash of (key, seed) decides, so the split is deterministic and the validation share is ``val_fraction``
of the groups (of the pairs only on average: groups differ in size).

Every pair not written is counted with its reason: read problems (``invalid_utf8``, ``malformed_json``,
``missing_file``, ``empty``), ``missing_fields``, ``bad_type``, ``empty_answer``, ``identical``,
``prefixes_differ``, ``non_alternating`` (roles out of order — e.g. two assistant turns in a row),
``prompt_not_ending_with_user``, ``too_long``. ``truncated`` counts kept pairs that lost prompt tokens.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dhad.data.prepare import _is_val, _jsonable
from dhad.data.readers import NoInput, ReadStats, expand_inputs, format_skips, read_documents
from dhad.data.sft import RowError, check_utf8, resolve_format
from dhad.data.shards import PrefsSet, ShardWriter, _write_json_atomic, output_dir  # noqa: F401  (PrefsSet re-exported)

_HH_SPLIT = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str) -> list[dict]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a…"`` -> messages (hh-rlhf's raw format)."""
    parts = _HH_SPLIT.split(text)
    if parts[0].strip():
        raise RowError("bad_type", "transcript does not start with '\\n\\nHuman: '")
    msgs = []
    for who, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if who == "Human" else "assistant", "content": content})
    if not msgs:
        raise RowError("bad_type", "no Human/Assistant turns found")
    return msgs


def _as_messages(x, name: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": "user" if name == "prompt" else "assistant", "content": x}]
    if isinstance(x, dict) and "role" in x and "content" in x:
        x = [x]
    if not isinstance(x, list):
        raise RowError("bad_type", f"{name} must be a string or a list of messages")
    out = []
    for m in x:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError("bad_type", f"{name}: message without role/content")
        if not isinstance(m["content"], str):
            raise RowError("bad_type", f"{name}: content is not a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _same(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


def split_pair(row: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) for any supported schema; RowError otherwise."""
    check_utf8(row)
    if "chosen" not in row or "rejected" not in row:
        raise RowError("missing_fields", f"need chosen and rejected, got keys {sorted(row)[:6]}")
    ch, rj = row["chosen"], row["rejected"]
    if ch is None or rj is None:
        raise RowError("missing_fields", "chosen/rejected is null")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _as_messages(row["prompt"], "prompt")
        answers = []
        for name, x in (("chosen", ch), ("rejected", rj)):
            if isinstance(x, str):
                answers.append(x)
                continue
            msgs = _as_messages(x, name)
            if len(msgs) > len(prompt) and all(_same(a, b) for a, b in zip(prompt, msgs)):
                msgs = msgs[len(prompt):]  # whole conversation repeating the prompt
            if len(msgs) != 1 or msgs[0]["role"] != "assistant":
                raise RowError("prefixes_differ", f"{name} is not one assistant turn after the prompt")
            answers.append(msgs[0]["content"])
        c, r = answers
    else:
        cm = parse_hh_transcript(ch) if isinstance(ch, str) else _as_messages(ch, "chosen")
        rm = parse_hh_transcript(rj) if isinstance(rj, str) else _as_messages(rj, "rejected")
        k = 0
        while k < min(len(cm), len(rm)) and _same(cm[k], rm[k]):
            k += 1
        # the shared prefix ends right before the final (differing) assistant turn
        if k == len(cm) and k == len(rm):
            raise RowError("identical", "chosen and rejected conversations are the same")
        if len(cm) - k != 1 or len(rm) - k != 1:
            raise RowError("prefixes_differ", f"conversations differ before their last turn (turn {k})")
        if cm[k]["role"] != "assistant" or rm[k]["role"] != "assistant":
            raise RowError("prefixes_differ", "the differing turn is not the assistant's")
        prompt, c, r = cm[:k], cm[k]["content"], rm[k]["content"]
    if isinstance(row.get("system"), str) and row["system"].strip() and (not prompt or prompt[0]["role"] != "system"):
        prompt = [{"role": "system", "content": row["system"]}] + prompt
    if not isinstance(c, str) or not isinstance(r, str):
        raise RowError("bad_type", "chosen/rejected is not text")
    if not c.strip() or not r.strip():
        raise RowError("empty_answer", "chosen" if not c.strip() else "rejected")
    if c.strip() == r.strip():
        raise RowError("identical")
    if not prompt:
        raise RowError("missing_fields", "empty prompt")
    return prompt, c, r


@dataclass
class PrefsConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    data_root: str | None = None
    chat_format: str | None = None
    max_len: int | None = 1024
    truncation: str = "left"     # left | drop
    min_prompt_tokens: int = 8
    val_fraction: float = 0.05
    seed: int = 0
    allow_hub: bool = False
    max_rows: int | None = None
    group_by: str = "context"    # context | prompt | a row field name (see the module docstring)
    answer_as_served: bool = False  # answers after the generation prompt (prompts.render_segments)


def prompt_context(prompt: list[dict]) -> list[dict]:
    """The prompt without its final question: earlier turns plus the last turn minus its last paragraph
    (system messages left out). A prompt that is only its question is returned whole (its own group)."""
    conv = [m for m in prompt if m["role"] != "system"]
    if not conv:
        return prompt
    *head, last = conv
    parts = last["content"].rstrip().rsplit("\n\n", 1)
    if len(parts) == 2 and parts[0].strip():
        return head + [{"role": last["role"], "content": parts[0].strip()}]
    return head if head else prompt


def group_key(row: dict, prompt: list[dict], group_by: str) -> tuple[bytes, bool]:
    """(split key, whether `group_by` named a field this row lacks) for one pair."""
    if group_by == "prompt":
        return hashlib.sha1(b"p" + repr(prompt).encode("utf-8")).digest(), False
    if group_by != "context":
        v = row.get(group_by)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v) != "":
            return hashlib.sha1(b"f" + repr(v).encode("utf-8")).digest(), False
        missing = True
    else:
        missing = False
    return hashlib.sha1(b"c" + repr(prompt_context(prompt)).encode("utf-8")).digest(), missing


def encode_pair(enc, fmt, prompt: list[dict], chosen: str, rejected: str, answer_as_served: bool = False):
    """(prompt_ids, chosen_ids, rejected_ids): render each full conversation, cut at the final answer."""
    from dhad.prompts import PromptError, render_segments, validate_messages
    try:
        validate_messages(prompt)
    except PromptError as e:
        raise RowError("non_alternating", str(e)) from None
    if prompt[-1]["role"] != "user":
        raise RowError("prompt_not_ending_with_user")
    out = []
    for ans in (chosen, rejected):
        try:  # no eos_token here: the prompt's history is rendered as at generation time
            pieces = render_segments(prompt + [{"role": "assistant", "content": ans}], fmt,
                                     answer_as_served=answer_as_served)
        except PromptError as e:
            raise RowError("non_alternating", str(e)) from None
        end = len(pieces)
        while end > 0 and not pieces[end - 1][1]:  # text after the answer (ChatML's "\n") opens the next turn
            end -= 1
        start = end
        while start > 0 and pieces[start - 1][1]:
            start -= 1
        if start == end:
            raise RowError("empty_answer", "format rendered no answer tokens")
        head_texts = [t for t, _ in pieces[:start]]
        if out and head_texts == out[0][2]:  # same prompt rendering as the chosen answer's: reuse its ids
            head = out[0][0]
            resp = [i for x in enc.encode_pieces([t for t, _ in pieces[start:end]], first=False) for i in x]
        else:
            enc_all = enc.encode_pieces([t for t, _ in pieces[:end]])
            head = [i for x in enc_all[:start] for i in x]
            resp = [i for x in enc_all[start:] for i in x]
        if not fmt.ends_turn_with_text:  # Jais formats render nothing after an answer: the model stops with EOS
            resp.append(enc.eos_token_id)
        out.append((head, resp, head_texts))
    (p1, c, _), (p2, r, _) = out
    if p1 != p2:  # the format rendered the prompt differently for the two answers
        raise RowError("prefixes_differ", "rendered prompts differ")
    return p1, c, r


def fit_length(p: list[int], c: list[int], r: list[int], max_len: int | None, truncation: str,
               min_prompt: int, bos_id: int | None) -> tuple[list[int], bool]:
    """Left-truncate the prompt so prompt + max(len(c), len(r)) <= max_len; returns (prompt, truncated)."""
    if max_len is None:
        return p, False
    budget = max_len - max(len(c), len(r))
    if len(p) <= budget:
        return p, False
    if truncation == "drop":
        raise RowError("too_long", f"{len(p)} + {max(len(c), len(r))} tokens > max_len {max_len}")
    keep_bos = bos_id is not None and p and p[0] == bos_id
    room = budget - (1 if keep_bos else 0)
    if room < min_prompt:
        raise RowError("too_long", f"responses of {len(c)}/{len(r)} tokens leave {room} prompt tokens (< {min_prompt})")
    return ([p[0]] if keep_bos else []) + p[len(p) - room:], True


def prepare_prefs(cfg: PrefsConfig) -> dict:
    """Write <out>/train and <out>/validation prefs shards; returns the report (<out>/prefs_report.json).
    A run that fails leaves the previous output as it was, and no output folder when there was none."""
    with output_dir(cfg.out):
        return _prepare_prefs(cfg)


def _prepare_prefs(cfg: PrefsConfig) -> dict:
    from dhad.data.encoder import Encoder
    if cfg.truncation not in ("left", "drop"):
        raise ValueError(f"truncation must be left|drop, got {cfg.truncation!r}")
    enc = Encoder(cfg.tokenizer)
    fmt = resolve_format(cfg.chat_format, cfg.tokenizer)
    stats, reasons, examples_of = ReadStats(), Counter(), {}
    groups = {"train": set(), "validation": set()}
    no_field = 0
    out = Path(cfg.out)
    common = dict(vocab_size=enc.vocab_size, eos_token_id=enc.eos_token_id, pad_token_id=enc.pad_token_id,
                  bos_token_id=enc.bos_token_id, tokenizer_hash=enc.hash,
                  extra={"chat_format": fmt.name, "max_len": cfg.max_len, "report": "../prefs_report.json"})
    writers = {s: ShardWriter(out, s, "prefs", **common) for s in ("train", "validation")}
    counts = Counter()
    try:
        docs = read_documents(expand_inputs(cfg.inputs, cfg.data_root), stats, text_fields=None,
                              allow_hub=cfg.allow_hub)
        for doc in itertools.islice(docs, cfg.max_rows):   # islice reads no row past the last one used
            try:
                prompt, c, r = split_pair(doc.row)
                p_ids, c_ids, r_ids = encode_pair(enc, fmt, prompt, c, r, cfg.answer_as_served)
                p_ids, truncated = fit_length(p_ids, c_ids, r_ids, cfg.max_len, cfg.truncation,
                                              cfg.min_prompt_tokens, enc.bos_token_id)
            except RowError as e:
                reasons[e.reason] += 1
                lst = examples_of.setdefault(e.reason, [])
                if len(lst) < 5:
                    lst.append(f"{doc.origin}: {e}")
                continue
            if truncated:
                reasons["truncated"] += 1
            key, missing = group_key(doc.row, prompt, cfg.group_by)  # one group -> one split
            no_field += missing
            split = "validation" if _is_val(key, cfg.seed, cfg.val_fraction) else "train"
            groups[split].add(key[:8])
            writers[split].add_pair(p_ids, c_ids, r_ids, source=doc.source)
            counts[split] += 1
        if stats.records == 0:
            raise NoInput(stats)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    summary = {}
    for s, w in writers.items():
        summary[s] = {"pairs": w.meta["n_docs"], "tokens": w.meta["n_tokens"], "groups": len(groups[s]),
                      "sources": dict(w.meta["sources"])}
        w.close()
    dropped = {k: v for k, v in reasons.items() if k != "truncated"}
    examples_of.pop("truncated", None)
    report = {"inputs": stats.to_dict(),
              "rows": {"read": stats.records, "used": sum(counts.values()), "dropped": sum(dropped.values())},
              "dropped": dropped,
              "truncated": reasons.get("truncated", 0), "dropped_examples": examples_of, "splits": summary,
              "group_by": cfg.group_by, "group_field_missing": no_field,
              "chat_format": fmt.name, "tokenizer": {"path": str(cfg.tokenizer), "hash": enc.hash},
              "config": _jsonable(asdict(cfg))}
    _write_json_atomic(out / "prefs_report.json", report)
    return report


def format_prefs_report(r: dict) -> str:
    """The report as text: read problems (lines, files) and pair drops are counted separately."""
    inp = r["inputs"]
    lines = [f"chat format: {r['chat_format']}", f"read: {inp['files']} files, {inp['records']} rows"]
    lines += format_skips("skipped", inp["skipped"], inp["skipped_examples"], width=28)
    rows = r.get("rows") or {"used": inp["records"] - sum(r["dropped"].values()), "dropped": sum(r["dropped"].values())}
    lines.append(f"pairs: {rows['used']} written, {rows['dropped']} dropped")
    lines += format_skips("dropped", r["dropped"], r["dropped_examples"], width=28)
    if r["truncated"]:
        lines.append(f"  kept, prompt left-truncated   {r['truncated']:>7}")
    for s, m in r["splits"].items():
        lines.append(f"{s:<11} {m['pairs']:>7} pairs  {m['tokens']:>10} tokens  {m.get('groups', 0):>7} groups")
    lines.append(f"split by {r.get('group_by', 'prompt')}: no group in both splits")
    if r.get("group_field_missing"):
        lines.append(f"  rows without field {r['group_by']!r} (grouped by context) {r['group_field_missing']:>7}")
    return "\n".join(lines)


def pair_lengths(ps: PrefsSet) -> np.ndarray:
    """[n, 3] prompt/chosen/rejected lengths (for batching by length)."""
    return ps.lengths()
