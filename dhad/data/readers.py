"""Readers: jsonl / json / txt / csv / tsv / parquet files (jsonl/json/txt/csv/tsv also compressed: .gz, .bz2,
.xz) and (opt-in) Hugging Face datasets, as a stream of ``Doc`` records, counting every bad input instead of
crashing on it.

Why per-line decoding: a single invalid UTF-8 byte or a malformed JSON row must cost one record, not the
file (real crawls have both). Every input unit (a line of JSON lines, a CSV record, a row of a JSON
array or parquet file) is either yielded or counted in a ``ReadStats`` under one reason, with the first
few locations (``file:line``) so the report can say where to look:

    missing_file       an input path that does not exist
    unreadable_file    no permission, a corrupt/truncated archive or parquet file (counted where it stopped)
    unsupported_format a file whose kind no reader handles (e.g. ``x.zip``; also found in a directory)
    invalid_utf8       a line that is not UTF-8, or a row with a lone surrogate (``"\\ud800"``) in any string
    malformed_json     a line (or ``.json`` file) that does not parse
    malformed_row      a CSV record that is not well-formed (unterminated quote, ...) or has too many cells
    not_an_object      a JSON value that is not an object (``[1, 2]``, ``5``)
    missing_field      a row without any of the text fields
    not_text           a text field that is not a string (``{"text": 12345}``)
    empty              a blank line / record, or text fields that are empty or blank

``ReadStats.records + sum(ReadStats.skipped.values())`` is therefore the number of units read, plus one
per file-level problem. The structured readers (``text_fields=None``: sft, prefs) get whole rows.

Inputs may be local paths or any fsspec URL (``s3://bucket/corpus``, ``hf://datasets/org/name/data``,
``memory://...``): directories, globs and files work the same way (``hf:NAME`` without ``//`` is a Hugging
Face *dataset* read through `datasets`, see :func:`read_hf`).
"""
from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import os
import re
import zlib
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | {".json", ".csv", ".tsv", ".parquet"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# what reading a (compressed) file can raise besides decoding errors: I/O, bad or truncated archives
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def is_url(spec: str) -> bool:
    """An fsspec URL (``s3://…``, ``hf://…``, ``memory://…``), as opposed to a local path or ``hf:NAME``."""
    return "://" in str(spec)


def _is_hf_dataset(spec: str) -> bool:
    return spec.startswith("hf:") and not spec.startswith("hf://")


def _kind(path) -> str | None:
    """jsonl | json | csv | tsv | parquet | txt, from the name (``x.jsonl.gz`` is jsonl), else None."""
    suffixes = [s.lower() for s in PurePosixPath(str(path)).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None  # parquet compresses inside; an outer .gz is not readable as parquet
    s = suffixes[-1] if suffixes else ""
    if s in JSONL_SUFFIXES:
        return "jsonl"
    if s in TEXT_SUFFIXES:
        return "txt"
    return s[1:] if s in SUFFIXES else None


@dataclass
class Doc:
    text: str
    source: str          # mixture group (e.g. "arabic", "english", "code")
    origin: str          # "file:line" for reports
    row: dict | None = None  # the parsed JSON/CSV row when structured (SFT / prefs readers use it)


@dataclass
class ReadStats:
    """Counts of records read and skipped (by reason), with example locations for each reason."""
    files: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def skip(self, reason: str, where: str, max_examples: int = 5) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < max_examples:  # printable and JSON-writable even when it quotes a lone surrogate
            ex.append(where.encode("utf-8", "backslashreplace").decode("utf-8"))

    def merge(self, other: "ReadStats") -> None:
        self.files += other.files
        self.records += other.records
        self.skipped.update(other.skipped)
        for k, v in other.examples.items():
            ex = self.examples.setdefault(k, [])
            ex.extend(v[: max(0, 5 - len(ex))])

    def to_dict(self) -> dict:
        return {"files": self.files, "records": self.records, "skipped": dict(self.skipped),
                "skipped_examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> "ReadStats":
        return cls(files=d["files"], records=d["records"], skipped=Counter(d["skipped"]),
                   examples={k: list(v) for k, v in d["skipped_examples"].items()})


class NoInput(ValueError):
    """Not a single record could be read: nothing is written (an existing output stays as it was)."""

    def __init__(self, stats: "ReadStats"):
        what = ", ".join(f"{k} {v} (e.g. {stats.examples.get(k, ['?'])[0]})" for k, v in stats.skipped.items())
        super().__init__(f"no records could be read from the inputs ({what or 'nothing matched'}); nothing written")


class HubDisabled(RuntimeError):
    """A Hugging Face dataset was named without allowing Hub downloads, or the Hub is unreachable."""


def expand_inputs(inputs: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Resolve inputs into ``(path_or_hf_spec, source)``.

    An input may be a file, a directory (the files below it, sorted), a glob, or ``hf:NAME``.
    ``SOURCE=PATH`` assigns the source (mixture group) explicitly; otherwise the source is the name of the
    top-level directory under ``root`` (``--data``) the file lives in, else the file's stem.
    Inputs that do not exist are kept so the reader counts them as ``missing_file``.
    """
    out: list[tuple[str, str]] = []
    root = Path(root) if root else None
    for raw in inputs:
        raw = str(raw)
        src = None
        if "=" in raw and not raw.startswith("hf:") and not is_url(raw.split("=", 1)[0]):
            src, raw = raw.split("=", 1)
        if _is_hf_dataset(raw):
            out.append((raw, src or raw[3:].split(":")[0].replace("/", "_")))
            continue
        if is_url(raw):
            out += _expand_url(raw, src)
            continue
        p = Path(raw)
        if root is not None and not p.is_absolute() and not p.exists() and (root / p).exists():
            p = root / p
        if p.is_dir():
            # every file below it except hidden ones, MANIFEST.md and licenses/ folders; files no reader
            # handles are listed too, so that they are counted (unsupported_format), never silently left out
            files = sorted(f for f in p.rglob("*") if f.is_file() and _listed(f.relative_to(p).parts))
            for f in files:  # source: the top-level folder under p, or p's own name for files directly in it
                rel = f.relative_to(p)
                out.append((str(f), src or (rel.parts[0] if len(rel.parts) > 1 else p.name)))
        elif any(ch in raw for ch in "*?["):
            base = root if (root is not None and not Path(raw).is_absolute()) else Path("/") if Path(raw).is_absolute() else Path(".")
            pattern = raw.lstrip("/") if Path(raw).is_absolute() else raw
            for f in sorted(base.glob(pattern)):
                if f.is_file():
                    out.append((str(f), src or _default_source(f, root)))
        else:
            out.append((str(p), src or _default_source(p, root)))
    return out


def _listed(rel_parts: tuple[str, ...]) -> bool:
    """Whether a file found below an input directory is read: not hidden, not MANIFEST.md, not licenses/."""
    return (not any(part.startswith(".") for part in rel_parts) and rel_parts[-1].upper() != "MANIFEST.MD"
            and "licenses" not in rel_parts)


def _expand_url(raw: str, src: str | None) -> list[tuple[str, str]]:
    """``expand_inputs`` for an fsspec URL: a directory (every file below it, sources = its top-level
    folders), a glob, or one file (kept even when missing, so that it is counted)."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(raw)
    if any(ch in path for ch in "*?["):
        return [(fs.unstrip_protocol(f), src or PurePosixPath(f).stem) for f in sorted(fs.glob(path)) if fs.isfile(f)]
    if fs.isdir(path):
        base = PurePosixPath(path.rstrip("/"))
        out = []
        for f in sorted(fs.find(path)):
            rel = PurePosixPath(f).relative_to(base).parts
            if rel and _listed(rel):
                out.append((fs.unstrip_protocol(f), src or (rel[0] if len(rel) > 1 else base.name)))
        return out
    return [(raw, src or PurePosixPath(path).stem)]


def _default_source(f: Path, root: Path | None) -> str:
    if root is not None:
        try:
            rel = f.resolve().relative_to(Path(root).resolve())
            if len(rel.parts) > 1:
                return rel.parts[0]
        except ValueError:
            pass
    return f.stem


def split_long(text: str, max_chars: int, _seps: tuple[str, ...] = ("\n\n", "\n", " ")) -> list[str]:
    """Cut a document longer than ``max_chars`` into consecutive pieces at paragraph breaks (a paragraph
    that is itself too long at line breaks, then spaces, then anywhere), packed greedily up to
    ``max_chars``. ``"".join(pieces) == text``. Books stored as one JSON row become chapter-sized
    documents instead of being dropped as too long."""
    if len(text) <= max_chars:
        return [text]
    if not _seps:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    sep = _seps[0]
    parts = text.split(sep)
    units: list[str] = []
    for k, p in enumerate(parts):
        u = p + sep if k < len(parts) - 1 else p
        units += [u] if len(u) <= max_chars else split_long(u, max_chars, _seps[1:])
    out, cur = [], ""
    for u in units:
        if cur and len(cur) + len(u) > max_chars:
            out.append(cur)
            cur = ""
        cur += u
    if cur:
        out.append(cur)
    return out


def _open(path):
    """The file's bytes, decompressed when its name ends in .gz / .bz2 / .xz (a local path or an fsspec URL)."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    if is_url(path):
        return _open_url(str(path), {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}.get(suffix))
    opener = COMPRESSIONS.get(suffix)
    return opener(path, "rb") if opener else open(path, "rb")


@contextmanager
def _open_url(url: str, compression: str | None):
    import fsspec
    with fsspec.open(url, "rb", compression=compression) as f:
        yield f


def splittable(spec: str) -> bool:
    """Whether a file can be read in byte ranges (``read_documents`` with ``(spec, source, (start, end))``):
    an uncompressed local JSON-lines file, whose records are its lines."""
    return not is_url(spec) and not _is_hf_dataset(spec) and _kind(spec) == "jsonl" \
        and PurePosixPath(spec).suffix.lower() not in COMPRESSIONS and Path(spec).is_file()


def _seek_line(f, start: int) -> tuple[int, int]:
    """Position ``f`` at the first line that starts at byte ``start`` or later; returns (lines before it,
    its byte position). A line belongs to the byte range its first byte is in."""
    if start <= 0:
        return 0, 0
    lines, left = 0, start - 1
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        lines += chunk.count(b"\n")
        left -= len(chunk)
    rest = f.readline()   # through the first newline at or after start - 1
    return lines + rest.endswith(b"\n"), start - 1 + len(rest)


def _iter_lines(path: Path, stats: ReadStats, byte_range: tuple[int, int] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line) — an invalid UTF-8 line is counted and skipped; a file
    that cannot be read to its end (a truncated or corrupt archive, an I/O error) is counted at the line
    where reading stopped, keeping the lines before it. ``byte_range=(start, end)``: only the lines that
    start in it (line numbers still count from the top of the file)."""
    i = 0
    try:
        with _open(path) as f:
            lines = f
            if byte_range is not None:
                i, pos = _seek_line(f, byte_range[0])
                lines = _lines_before(f, pos, byte_range[1])
            for i, raw in enumerate(lines, i + 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats.skip("invalid_utf8", f"{path}:{i}")
                    continue
                if i == 1 and line.startswith("\ufeff"):  # UTF-8 BOM
                    line = line[1:]
                yield i, line
    except _READ_ERRORS as e:
        stats.skip("unreadable_file", f"{path}:{i + 1} ({type(e).__name__}: {e})")


def _lines_before(f, pos: int, end: int) -> Iterator[bytes]:
    while pos < end:
        raw = f.readline()
        if not raw:
            return
        pos += len(raw)
        yield raw


def lone_surrogate(obj, where: str = "") -> str | None:
    """Where (a field path, "" for the value itself) ``obj`` holds a string that is not valid Unicode — a
    lone surrogate such as ``"\\ud800"``, which JSON escapes can produce but no UTF-8 file can hold
    (it cannot be encoded, normalized or tokenized) — else None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "value"
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = f"{where}.{k}" if where else str(k)
            if (bad := lone_surrogate(k, name + " (key)")) or (bad := lone_surrogate(v, name)):
                return bad
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            if bad := lone_surrogate(v, f"{where}[{i}]"):
                return bad
    return None


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a cheap test before walking a parsed row


def _loads(text: str):
    """json.loads, with every way it can fail (bad syntax, too deep, too many digits) as ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _text_of(row: dict, text_fields: list[str]) -> tuple[str | None, str]:
    """(the text of the row's text fields joined by blank lines, else None; the reason when None)."""
    parts, present, wrong = [], False, None
    for k in text_fields:
        if k not in row:
            continue
        present = True
        v = row[k]
        if isinstance(v, str):
            if v.strip():
                parts.append(v)
        elif v is not None and wrong is None:
            wrong = f"{k} is {type(v).__name__}, not text"
    if parts:
        return "\n\n".join(parts), ""
    if wrong:
        return None, "not_text"
    return None, "empty" if present else "missing_field"


def _row_doc(row, where: str, source, stats, text_fields, checked: bool = False):
    """One parsed row -> a Doc (or a counted skip). ``checked``: the caller knows it holds valid Unicode."""
    if not isinstance(row, dict):
        stats.skip("not_an_object", f"{where} ({type(row).__name__})")
        return
    if not checked and (bad := lone_surrogate(row)):
        stats.skip("invalid_utf8", f"{where} (lone surrogate in {bad})")
        return
    if text_fields is None:  # structured readers (sft / prefs) take the row as is
        stats.records += 1
        yield Doc(text="", source=source, origin=where, row=row)
        return
    text, reason = _text_of(row, text_fields)
    if text is None:
        stats.skip(reason, f"{where} (no non-empty text in {'/'.join(text_fields)})")
        return
    stats.records += 1
    yield Doc(text=text, source=source, origin=where, row=row)


def read_jsonl(path: Path, source: str, stats: ReadStats, text_fields: list[str] | None,
               byte_range: tuple[int, int] | None = None) -> Iterator[Doc]:
    for i, line in _iter_lines(path, stats, byte_range):
        if not line.strip():
            stats.skip("empty", f"{path}:{i}")
            continue
        try:
            row = _loads(line)
        except ValueError as e:
            stats.skip("malformed_json", f"{path}:{i} ({getattr(e, 'msg', str(e))[:80]})")
            continue
        yield from _row_doc(row, f"{path}:{i}", source, stats, text_fields,
                            checked=not _ESCAPED_SURROGATE.search(line))


def read_json(path: Path, source: str, stats: ReadStats, text_fields: list[str] | None) -> Iterator[Doc]:
    """A .json file holding a list of objects (Alpaca's own format), ``{"data": [...]}``, one object, or —
    when the whole file does not parse — one object per line (read as JSON lines)."""
    try:
        with _open(path) as f:
            data = f.read().decode("utf-8")
        obj = _loads(data[1:] if data.startswith("\ufeff") else data)
    except (UnicodeDecodeError, ValueError, *_READ_ERRORS):
        # not one JSON document (or not all UTF-8 / not readable to the end): maybe JSON lines with a bad
        # row — per-line reading counts every bad line and keeps the good ones
        yield from read_jsonl(path, source, stats, text_fields)
        return
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    rows = obj if isinstance(obj, list) else [obj]
    checked = not _ESCAPED_SURROGATE.search(data)
    for i, row in enumerate(rows, 1):   # origin path:N = the N-th row (1-based), like a line number
        yield from _row_doc(row, f"{path}:{i}", source, stats, text_fields, checked)


def read_txt(path: Path, source: str, stats: ReadStats, mode: str = "paragraph",
             max_chars: int = 20_000) -> Iterator[Doc]:
    """Plain text. ``mode``: ``line`` (one doc per non-empty line), ``paragraph`` (blank-line separated;
    files without blank lines are cut into chunks of whole lines of up to ``max_chars``), ``file``
    (the whole file, also chunked at ``max_chars``). Chunking keeps poetry/verse files (one line per
    hemistich) from becoming one giant document or thousands of tiny ones."""
    if mode not in ("line", "paragraph", "file"):
        raise ValueError(f"txt mode must be line, paragraph or file, got {mode!r}")
    buf: list[str] = []
    size, first = 0, 0

    def emit():
        nonlocal buf, size
        text = "".join(buf).strip("\n")
        buf, size = [], 0
        if text.strip():
            stats.records += 1
            return Doc(text=text, source=source, origin=f"{path}:{first}")
        return None

    for i, line in _iter_lines(path, stats):
        if mode == "line":
            if line.strip():
                stats.records += 1
                yield Doc(text=line.rstrip("\r\n"), source=source, origin=f"{path}:{i}")
            else:
                stats.skip("empty", f"{path}:{i}")
            continue
        if mode == "paragraph" and not line.strip():
            if buf and (d := emit()):
                yield d
            continue
        if buf and size + len(line) > max_chars and (d := emit()):
            yield d
        if not buf:
            first = i
        buf.append(line)
        size += len(line)
    if buf and (d := emit()):
        yield d


class _Replay:
    """Decoded lines for the csv module, replayable: after a malformed record, the lines it swallowed
    (all but its first) are read again, so one bad quote costs one row, not the rest of the file."""

    def __init__(self, lines: Iterator[tuple[int, str]]):
        self.lines, self.pending = lines, deque()
        self.record: list[tuple[int, str]] = []   # the lines of the record being parsed

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self.pending.popleft() if self.pending else next(self.lines)
        self.record.append(item)
        return item[1]

    def replay_after_first(self) -> None:
        self.pending.extendleft(reversed(self.record[1:]))


def read_csv(path: Path, source: str, stats: ReadStats, text_fields: list[str] | None) -> Iterator[Doc]:
    """CSV / TSV with a header row. Parsed strictly: a record that is not well-formed CSV (an unterminated
    or stray quote, a line break in an unquoted field, a field over the csv module's size limit) or has
    more cells than the header is counted as ``malformed_row`` at its first line, and parsing resumes
    at the line after it."""
    src = _Replay(_iter_lines(path, stats))
    reader = csv.reader(src, delimiter="\t" if _kind(path) == "tsv" else ",", strict=True)
    header = None
    while True:
        src.record = []
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if not src.record:   # nothing was read (cannot happen with a line iterator; be safe)
                break
            stats.skip("malformed_row", f"{path}:{src.record[0][0]} ({e})")
            src.replay_after_first()
            reader = csv.reader(src, delimiter=reader.dialect.delimiter, strict=True)
            continue
        line = src.record[0][0] if src.record else 0
        if not cells or not any(c.strip() for c in cells):
            stats.skip("empty", f"{path}:{line}")
            continue
        if header is None:
            header = cells
            continue
        if len(cells) > len(header):
            stats.skip("malformed_row", f"{path}:{line} ({len(cells)} cells, the header has {len(header)})")
            continue
        row = dict(zip(header, cells))
        yield from _row_doc(row, f"{path}:{line}", source, stats, text_fields, checked=True)


def read_parquet(path: Path, source: str, stats: ReadStats, text_fields: list[str] | None) -> Iterator[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        stats.skip("unsupported_format", f"{path} (install pyarrow to read parquet)")
        return
    i = 0
    try:
        with _open(path) if is_url(path) else _nullcontext(path) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    i += 1
                    yield from _row_doc(row, f"{path}:{i}", source, stats, text_fields)
    except Exception as e:  # a corrupt file or row group: count it (with how far it got), keep the rows before
        stats.skip("unreadable_file", f"{path}:{i + 1} ({type(e).__name__}: {str(e)[:120]})")


@contextmanager
def _nullcontext(x):
    yield x


def read_hf(spec: str, source: str, stats: ReadStats, text_fields: list[str] | None, allow_hub: bool) -> Iterator[Doc]:
    """``hf:NAME[:CONFIG][:SPLIT]`` — only with ``allow_hub`` (``--hf``); downloads through `datasets`."""
    if not allow_hub:
        raise HubDisabled(f"{spec}: Hugging Face datasets are downloaded only with --hf (allow_hub=True)")
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 2 else None
    split = parts[-1] if len(parts) > 1 else "train"
    try:
        import datasets
    except ImportError:
        raise HubDisabled(f"{spec}: the `datasets` package is not installed (pip install 'dhad[hub]')") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise HubDisabled(f"{spec}: could not load from the Hugging Face Hub ({type(e).__name__}: {e}); "
                          "are you offline? Download it elsewhere and pass the files instead") from None
    i = 0
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # the stream broke off (network, a bad shard): say where, do not pretend it ended
            raise HubDisabled(f"{spec}: reading stopped after {i} rows ({type(e).__name__}: {e})") from None
        i += 1
        yield from _row_doc(dict(row), f"{spec}:{i}", source, stats, text_fields)


def read_documents(inputs: Iterable[tuple[str, str]], stats: ReadStats, text_fields: list[str] | None = ("text",),
                   txt_mode: str = "paragraph", max_chars: int = 20_000, allow_hub: bool = False) -> Iterator[Doc]:
    """Stream documents from ``expand_inputs`` output. ``text_fields=None`` yields raw rows (``Doc.row``).
    An input may also be ``(spec, source, (start, end))``: the lines of a JSON-lines file that start in
    that byte range (``splittable``), so that one large file can be read by several tasks."""
    tf = list(text_fields) if text_fields is not None else None
    for spec, source, *part in inputs:
        byte_range = tuple(part[0]) if part and part[0] is not None else None
        if byte_range is not None:   # a part of a JSON-lines file (see ``splittable``); its first part counts the file
            path = Path(spec)
            if not path.is_file():
                if byte_range[0] == 0:
                    stats.skip("missing_file", str(path))
                continue
            stats.files += byte_range[0] == 0
            yield from read_jsonl(path, source, stats, tf, byte_range)
            continue
        if _is_hf_dataset(spec):
            stats.files += 1
            yield from read_hf(spec, source, stats, tf, allow_hub)
            continue
        if is_url(spec):
            path = spec
            if not _url_is_file(spec):
                stats.skip("missing_file", spec)
                continue
        else:
            path = Path(spec)
            if not path.is_file():
                stats.skip("missing_file", str(path))
                continue
            if not os.access(path, os.R_OK):
                stats.skip("unreadable_file", f"{path} (permission denied)")
                continue
        kind = _kind(path)
        if kind is None:
            stats.skip("unsupported_format", f"{path} (readable: {', '.join(sorted(SUFFIXES))}, "
                                             f"optionally {'/'.join(COMPRESSIONS)}-compressed)")
            continue
        stats.files += 1
        if kind == "jsonl":
            yield from read_jsonl(path, source, stats, tf)
        elif kind == "json":
            yield from read_json(path, source, stats, tf)
        elif kind in ("csv", "tsv"):
            yield from read_csv(path, source, stats, tf)
        elif kind == "parquet":
            yield from read_parquet(path, source, stats, tf)
        elif tf is None:
            stats.skip("unsupported_format", f"{path} (structured data must be jsonl/json/csv/parquet)")
        else:
            yield from read_txt(path, source, stats, txt_mode, max_chars)


def _url_is_file(url: str) -> bool:
    import fsspec
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isfile(path)


def format_skips(verb: str, counts: dict, examples: dict, width: int = 24) -> list[str]:
    """Report lines ``  <verb> <reason>  <count>   e.g. <first location>`` (one per reason)."""
    out = []
    for k, v in counts.items():
        ex = (examples.get(k) or [""])[0]
        out.append(f"  {verb} {k:<{width}}{v:>7}   e.g. {ex[:110]}")
    return out
