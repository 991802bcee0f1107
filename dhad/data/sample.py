"""Sampling a corpus by characters: documents of a corpus folder, equal shares per file, a held-out part.

    docs = file_documents(Path("corpus/english/tinyshakespeare.txt"))      # paragraphs of ~1,500 chars
    stats = sample_corpus(corpus_files(root, "arabic"), out, chars=2_000_000, heldout_chars=40_000, seed=1)
    rows, left_out = sample_rows(files, 500, seed=1)                         # instruction rows, uniformly

Used by the speedrun to size its data to its time budget before anything is tokenized: a sample of
about `chars` characters, split equally over the files of a language (a file smaller than its share
gives the rest to the others: water filling), plus held-out documents that are never in the sample.
Plain text and JSON only: no model, no tokenizer.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from dhad.utils import atomic_write_text


class SampleError(ValueError):
    """A corpus folder that cannot be sampled (missing, or without .jsonl / .txt files)."""


def chunks(text: str, max_chars: int) -> list[str]:
    """Split a long document at line breaks (else at spaces) into pieces of at most `max_chars`."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    out, cur = [], ""
    for line in text.split("\n"):
        while len(line) > max_chars:  # one very long line: cut at the last space before the limit
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:cut])
            line = line[cut:].lstrip()
        if cur and len(cur) + 1 + len(line) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line
    if cur.strip():
        out.append(cur)
    return [c.strip() for c in out if c.strip()]


def file_documents(path: Path, max_chars: int = 4000, group_chars: int = 1500) -> list[str]:
    """Documents of a corpus file: `.jsonl` rows' `text`; `.txt` consecutive lines grouped into
    paragraphs of about `group_chars` (one-line-per-verse poetry and plays become readable documents).
    Long documents (books) are cut into pieces of at most `max_chars` at line breaks."""
    docs: list[str] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # counted by the data pipeline's reader when it matters; a sample can skip it
                t = row.get("text") if isinstance(row, dict) else None
                if isinstance(t, str) and t.strip():
                    docs.extend(chunks(t, max_chars))
        return docs
    cur: list[str] = []
    size = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                if size >= group_chars // 3 and cur:
                    docs.append("\n".join(cur))
                    cur, size = [], 0
                continue
            cur.append(line)
            size += len(line) + 1
            if size >= group_chars:
                docs.append("\n".join(cur))
                cur, size = [], 0
    if cur:
        docs.append("\n".join(cur))
    return [c for d in docs for c in chunks(d, max_chars)]


def water_fill(sizes: dict[str, int], budget: int) -> dict[str, int]:
    """Split `budget` equally over files; a file smaller than its share gives the rest to the others."""
    quota = {k: 0 for k in sizes}
    left = dict(sizes)
    remaining = budget
    while left and remaining > 0:
        share = remaining / len(left)
        small = {k: v for k, v in left.items() if v <= share}
        if not small:
            for k in left:
                quota[k] += int(share)
            break
        for k, v in small.items():
            quota[k] += v
            remaining -= v
            del left[k]
    return quota


def corpus_files(root: Path, lang: str) -> list[Path]:
    """The .jsonl and .txt files of `root/corpus/<lang>/`, sorted."""
    d = Path(root) / "corpus" / lang
    if not d.is_dir():
        raise SampleError(f"no {lang} corpus: {d} is not a directory (the data root must hold corpus/{lang}/)")
    files = sorted(p for p in d.iterdir() if p.suffix in (".jsonl", ".txt") and p.is_file())
    if not files:
        raise SampleError(f"no .jsonl or .txt files in {d}")
    return files


def write_texts(path: Path, texts: list[str]) -> Path:
    """`{"text": ...}` per line, atomically."""
    return atomic_write_text(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def read_texts(path: Path) -> list[str]:
    """The `text` of every row of a file `write_texts` wrote."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def sample_corpus(files: list[Path], out_dir: Path, chars: int, heldout_chars: int, seed: int) -> dict:
    """Sample about `chars` characters of documents from `files` (equal shares, water-filled) into
    `out_dir/train.jsonl`, and up to `heldout_chars` of other documents into `out_dir/heldout.jsonl`
    (never in train.jsonl). Returns per-file counts."""
    rng = random.Random(seed)
    docs = {p.name: file_documents(p) for p in files}
    sizes = {k: sum(len(d) for d in v) for k, v in docs.items()}
    quota = water_fill(sizes, chars)
    held_quota = water_fill(sizes, heldout_chars)
    train, held, stats = [], [], {}
    for name, ds in docs.items():
        order = list(range(len(ds)))
        rng.shuffle(order)
        got_h = got_t = 0
        for i in order:
            d = ds[i]
            if got_h < held_quota[name] and len(ds) > 1:
                held.append(d)
                got_h += len(d)
            elif got_t < quota[name]:
                train.append(d)
                got_t += len(d)
            elif got_h >= held_quota[name]:
                break
        stats[name] = {"available_chars": sizes[name], "train_chars": got_t, "heldout_chars": got_h}
    out_dir = Path(out_dir)
    write_texts(out_dir / "train.jsonl", train)
    write_texts(out_dir / "heldout.jsonl", held)
    return stats


def answer_starts_with_digit(line: str) -> bool:
    """True for an instruction row whose answer (`output`) opens with a digit ("1. First, ...", "1958")."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False  # the SFT reader counts it
    out = row.get("output") if isinstance(row, dict) else None
    return isinstance(out, str) and out.strip()[:1].isdigit()


def sample_rows(files: list[Path], n: int, seed: int, skip_digit_answers: bool = True) -> tuple[list[str], int]:
    """Up to `n` JSONL rows (raw lines) drawn uniformly from all `files` together, leaving out rows whose
    answer starts with a digit (unless `skip_digit_answers` is False); returns (rows, number left out).

    Why the speedrun leaves those out: greedy decoding takes the single likeliest first token, and a
    model that small learns little more than the first-token distribution of its SFT answers. A
    byte-level BPE splits digits, so " " + digit is *one* token for every numbered list and numeric
    answer (~10% of Alpaca's answers); it outweighs any single word and the model answers "1. 1. 10000."
    in either language."""
    lines = [line for f in files for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    kept, skipped = [], 0
    for line in lines:
        if len(kept) >= n:
            break
        if skip_digit_answers and answer_starts_with_digit(line):
            skipped += 1
        else:
            kept.append(line)
    return kept, skipped
