"""Token shards: flat memory-mapped arrays of token ids plus a small JSON index (DESIGN.md contract).

On disk, one directory per split::

    <dir>/<split>/index.json          the index below (written last: its presence means "complete")
    <dir>/<split>/tokens_00000.bin    raw little-endian token ids, dtype from the index (uint16 | uint32)
    <dir>/<split>/docs_00000.bin      int64 start offset (within that shard) of every document / row / pair
    <dir>/<split>/mask_00000.bin      uint8, one per token (sft: 1 = the loss counts this token) or absent
    <dir>/<split>/segments_00000.bin  uint16|uint32, one per token (sft: example id inside its row, 0 = pad)
    <dir>/<split>/pairs_00000.bin     int64 [n_pairs, 3] = (prompt_len, chosen_len, rejected_len) (prefs only)

Everything is a raw array read with ``np.memmap`` (never a pickle), so a shard of any size opens in
microseconds and pages in lazily. A document never straddles two shards; shards roll over once they
exceed ``shard_tokens``.

index.json::

    {"format": "dhad-shards-v1", "kind": "pretrain" | "sft" | "prefs", "split": "train",
     "dtype": "uint16" | "uint32", "n_tokens": int, "n_docs": int,
     "seq_len": int | null,            # sft rows have this fixed length; null for pretrain / prefs
     "packed": bool | null,            # sft: several examples per row (true) or one padded example (false)
     "tokenizer_hash": str | null, "eos_token_id": int, "pad_token_id": int, "bos_token_id": int | null,
     "vocab_size": int, "sources": {name: n_tokens}, "segments_dtype": "uint16" | "uint32" | null,
     "shards": [{"tokens": "tokens_00000.bin", "n_tokens": int, "docs": "docs_00000.bin", "n_docs": int,
                 "mask": "mask_00000.bin" | null, "segments": "segments_00000.bin" | null,
                 "pairs": "pairs_00000.bin" | null}],
     "extra": {...}}                   # free-form provenance (chat format, cleaning report path, ...)

Kinds
-----
pretrain
    Documents concatenated, each followed by ``eos_token_id`` (so EOS sits between every two documents
    and after the last one: the cards' "documents packed into EOS-separated sequences"). ``doc_starts``
    gives the first token of every document. A trainer reads ``window(start, T + 1)`` and uses
    ``x = w[:-1], y = w[1:]`` with loss on all tokens (the cards' pretraining recipe).
sft
    Fixed rows of ``seq_len`` tokens, one row per ``add`` (``n_docs`` = number of rows). Each row carries
    ``mask`` (1 = an assistant token the loss counts, including the end-of-turn / EOS text of that turn)
    and ``segments`` (1, 2, 3, ... = which example of the row a token belongs to; 0 = padding).
    Packed: several whole examples per row, never split across rows. Unpacked: one example per row.
    Padding is ``pad_token_id`` with mask 0 and segment 0.

    **How a trainer turns row i into model inputs** (see :func:`sft_row_to_example`)::

        t, m, s = ss.row(i)                    # int arrays of length seq_len
        input_ids   = t                         # [seq_len]
        segment_ids = s                         # [seq_len] model confines attention to equal ids and
                                                #           restarts positions at each new id
        labels      = full(seq_len, -100)       # next-token targets, already shifted:
        keep = (m[1:] == 1) & (s[1:] == s[:-1]) & (s[1:] != 0)
        labels[:-1][keep] = t[1:][keep]         # position j predicts token j+1 when that token counts
                                                # and belongs to the same example; the last position never
                                                # has a target (the next token is another example's)

    These are *shifted* targets (nanoGPT ``x, y`` style: ``cross_entropy(logits.view(-1, V),
    labels.view(-1), ignore_index=-100)`` with no further shift). For the HF convention (model shifts
    internally) use ``labels_hf = where(m == 1, t, -100)``; both count exactly the same tokens because the
    first token of every example is prompt text (mask 0).
prefs
    One "document" per preference pair: ``prompt_ids + chosen_ids + rejected_ids`` concatenated;
    ``pairs_*.bin`` holds (prompt_len, chosen_len, rejected_len) for each. Read with
    :class:`PrefsSet` (``ps[i] -> {"prompt_ids", "chosen_ids", "rejected_ids"}``, numpy int64 arrays).
    The DPO trainer builds ``prompt + chosen`` and ``prompt + rejected`` and counts log-probs of the
    response tokens only.

Atomic writes: a ShardWriter writes into ``<dir>/.<split>.tmp-<pid>`` and ``close()`` renames it to
``<dir>/<split>`` (an existing split is moved aside first and deleted only after the rename), so a
crash at any point leaves either the old complete split or the new complete one — never a half.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from dhad.utils import atomic_write_json as _write_json_atomic

FORMAT = "dhad-shards-v1"
KINDS = ("pretrain", "sft", "prefs")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MiB as uint16; one file per shard keeps mmap count low


class ShardError(ValueError):
    """A shard directory is missing, incomplete or inconsistent (names the file)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536: Llama-2/ALLaM's 64,000 does), else uint32 (Jais 84,992)."""
    return np.dtype(np.uint16) if vocab_size <= (1 << 16) else np.dtype(np.uint32)


def file_hash(path: str | os.PathLike, n: int = 16) -> str:
    """Short sha256 of a file's bytes (used as ``tokenizer_hash`` of a tokenizer.json)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def tokenizer_hash(tokenizer_dir_or_file: str | os.PathLike) -> str | None:
    """Hash of the tokenizer file that produced the ids, so a trainer can refuse mismatched shards."""
    p = Path(tokenizer_dir_or_file)
    for cand in ([p] if p.is_file() else [p / "tokenizer.json", p / "tokenizer.model"]):
        if cand.is_file():
            return file_hash(cand)
    return None


@contextmanager
def output_dir(path: str | os.PathLike):
    """The output folder of a run (created when missing). When the run fails and the folder did not exist
    before, it is removed again — with any parents it created — so a failed run leaves nothing behind
    (an existing folder keeps its previous output: the writers publish atomically)."""
    p = Path(path)
    top = None
    for q in (p, *p.parents):  # the outermost folder this call creates
        if q.exists():
            break
        top = q
    p.mkdir(parents=True, exist_ok=True)
    try:
        yield p
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


class ShardWriter:
    """Append documents (pretrain), rows (sft) or pairs (prefs); ``close()`` publishes atomically.

    >>> w = ShardWriter(out, "train", "pretrain", vocab_size=32000, eos_token_id=2)
    >>> w.add([5, 6, 7], source="ar"); w.add([8], source="en"); w.close()
    tokens on disk: 5 6 7 2 8 2
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, kind: str, vocab_size: int,
                 eos_token_id: int, pad_token_id: int | None = None, bos_token_id: int | None = None,
                 seq_len: int | None = None, packed: bool | None = None,
                 tokenizer_hash: str | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 extra: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "sft" and not seq_len:
            raise ValueError("sft shards need seq_len (the fixed row length)")
        self.out_dir, self.split, self.kind = Path(out_dir), split, kind
        self.dtype = token_dtype(vocab_size)
        self.vocab_size, self.eos, self.seq_len = int(vocab_size), int(eos_token_id), seq_len
        self.pad = int(eos_token_id if pad_token_id is None else pad_token_id)
        self.seg_dtype = (np.dtype(np.uint16) if (seq_len or 0) < (1 << 16) else np.dtype(np.uint32)) \
            if kind == "sft" else None
        if kind == "sft" and (self.seq_len is not None) and self.seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        self.meta = {
            "format": FORMAT, "kind": kind, "split": split, "dtype": self.dtype.name,
            "n_tokens": 0, "n_docs": 0, "seq_len": seq_len if kind == "sft" else None,
            "packed": (bool(packed) if packed is not None else True) if kind == "sft" else None,
            "tokenizer_hash": tokenizer_hash, "eos_token_id": self.eos, "pad_token_id": self.pad,
            "bos_token_id": bos_token_id, "vocab_size": self.vocab_size, "sources": {},
            "segments_dtype": self.seg_dtype.name if self.seg_dtype is not None else None,
            "shards": [], "extra": dict(extra or {}),
        }
        self.shard_tokens = int(shard_tokens)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir / f".{split}.tmp-{os.getpid()}-{id(self) & 0xFFFF:x}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._closed = False
        self._open_shard()

    # -- shard files --------------------------------------------------------------------------
    def _open_shard(self):
        i = len(self.meta["shards"])
        names = {"tokens": f"tokens_{i:05d}.bin", "docs": f"docs_{i:05d}.bin",
                 "mask": f"mask_{i:05d}.bin" if self.kind == "sft" else None,
                 "segments": f"segments_{i:05d}.bin" if self.kind == "sft" else None,
                 "pairs": f"pairs_{i:05d}.bin" if self.kind == "prefs" else None}
        self._cur = {**names, "n_tokens": 0, "n_docs": 0}
        self._fh = {k: open(self.tmp / v, "wb") for k, v in names.items() if v}

    def _finish_shard(self):
        for f in self._fh.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self.meta["shards"].append(self._cur)
        self._fh = {}

    # -- adding -------------------------------------------------------------------------------
    def _check_ids(self, arr: np.ndarray, what: str):
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"{what}: token id out of range [0, {self.vocab_size}): "
                             f"min {arr.min()}, max {arr.max()}")

    def _append(self, tokens: np.ndarray, mask=None, segments=None, pairs=None, source=None):
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if self._cur["n_tokens"] >= self.shard_tokens:  # roll over between documents only
            self._finish_shard()
            self._open_shard()
        start = self._cur["n_tokens"]
        np.asarray([start], dtype=np.int64).tofile(self._fh["docs"])
        tokens.astype(self.dtype, copy=False).tofile(self._fh["tokens"])
        if mask is not None:
            mask.astype(np.uint8, copy=False).tofile(self._fh["mask"])
        if segments is not None:
            segments.astype(self.seg_dtype, copy=False).tofile(self._fh["segments"])
        if pairs is not None:
            np.asarray(pairs, dtype=np.int64).tofile(self._fh["pairs"])
        n = int(tokens.size)
        self._cur["n_tokens"] += n
        self._cur["n_docs"] += 1
        self.meta["n_tokens"] += n
        self.meta["n_docs"] += 1
        if source is not None:
            self.meta["sources"][source] = self.meta["sources"].get(source, 0) + n

    def add(self, tokens: Sequence[int], mask: Sequence[int] | None = None, source: str | None = None,
            segments: Sequence[int] | None = None) -> None:
        """Add one unit.

        pretrain: ``tokens`` is one document; EOS is appended (a trailing EOS already present is kept
        as is, not doubled). sft: ``tokens``/``mask``/``segments`` is one finished row of exactly
        ``seq_len`` (use :func:`pack_examples` / :func:`pad_example` to build rows); ``segments``
        defaults to 1 on every token. prefs: use :meth:`add_pair`.
        """
        t = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if self.kind == "pretrain":
            if mask is not None:
                raise ValueError("pretrain shards have no mask (loss on all tokens)")
            if t.size == 0 or t[-1] != self.eos:
                t = np.concatenate([t, np.asarray([self.eos], dtype=np.int64)])
            self._check_ids(t, "document")
            self._append(t, source=source)
        elif self.kind == "sft":
            if t.size != self.seq_len:
                raise ValueError(f"sft row has {t.size} tokens, expected seq_len={self.seq_len}")
            m = np.ones_like(t) if mask is None else np.asarray(mask, dtype=np.int64).reshape(-1)
            s = np.ones_like(t) if segments is None else np.asarray(segments, dtype=np.int64).reshape(-1)
            if m.size != t.size or s.size != t.size:
                raise ValueError("mask/segments must have the row's length")
            self._check_ids(t, "sft row")
            self._append(t, mask=m, segments=s, source=source)
        else:
            raise ValueError("prefs shards: use add_pair(prompt_ids, chosen_ids, rejected_ids)")

    def add_pair(self, prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int],
                 source: str | None = None) -> None:
        """prefs: one preference pair (ids already rendered with the chat format, responses whole)."""
        if self.kind != "prefs":
            raise ValueError("add_pair is for prefs shards")
        p, c, r = (np.asarray(x, dtype=np.int64).reshape(-1) for x in (prompt_ids, chosen_ids, rejected_ids))
        t = np.concatenate([p, c, r])
        self._check_ids(t, "preference pair")
        self._append(t, pairs=[p.size, c.size, r.size], source=source)

    # -- finishing ----------------------------------------------------------------------------
    def close(self) -> Path:
        """Flush, write index.json, and atomically publish ``<out_dir>/<split>``. Returns that path."""
        if self._closed:
            return self.out_dir / self.split
        self._finish_shard()
        # drop a trailing empty shard (created by a roll-over right before close) unless it is the only one
        if len(self.meta["shards"]) > 1 and self.meta["shards"][-1]["n_docs"] == 0:
            last = self.meta["shards"].pop()
            for k in ("tokens", "docs", "mask", "segments", "pairs"):
                if last.get(k):
                    (self.tmp / last[k]).unlink(missing_ok=True)
        _write_json_atomic(self.tmp / "index.json", self.meta)
        final = self.out_dir / self.split
        old = None
        if final.exists():
            old = self.out_dir / f".{self.split}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(self.tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._closed = True
        return final

    def abort(self) -> None:
        """Discard everything written (the previous split, if any, is untouched)."""
        if not self._closed:
            for f in self._fh.values():
                f.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def __del__(self):  # a writer dropped without close leaves no half-written split behind
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class ConcatArray:
    """A read-only 1-D view over several memmaps, sliced as if they were one array (no copy for one shard)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        sizes = np.asarray([p.shape[0] for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self):
        return (len(self),)

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                return self[start:stop][::step]
            return self.slice(start, stop)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(idx)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k][i - self.offsets[k]]

    def slice(self, start: int, stop: int) -> np.ndarray:
        stop = max(start, stop)
        k0 = int(np.searchsorted(self.offsets, start, side="right") - 1)
        k1 = int(np.searchsorted(self.offsets, max(stop - 1, start), side="right") - 1)
        k0 = min(max(k0, 0), len(self.parts) - 1)
        k1 = min(max(k1, k0), len(self.parts) - 1)
        if k0 == k1:
            o = self.offsets[k0]
            return self.parts[k0][start - o: stop - o]
        out = [self.parts[k0][start - self.offsets[k0]:]]
        out += [self.parts[k] for k in range(k0 + 1, k1)]
        out.append(self.parts[k1][: stop - self.offsets[k1]])
        return np.concatenate(out)

    def __array__(self, dtype=None, copy=None):
        a = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts) if self.parts \
            else np.zeros(0, self.dtype)
        return np.asarray(a, dtype=dtype)


def _memmap(path: Path, dtype, count: int, shape=None) -> np.ndarray:
    dtype = np.dtype(dtype)
    if not path.is_file():
        raise ShardError(f"{path}: missing shard file")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise ShardError(f"{path}: {size} bytes, index says {count} x {dtype.name} "
                         f"({count * dtype.itemsize} bytes) — truncated or not from this index")
    if count == 0:
        return np.zeros(shape or (0,), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape or (count,))


@dataclass
class ShardSet:
    """A published split, memory-mapped. ``ShardSet.open(dir, "train")``."""

    path: Path
    meta: dict
    tokens: ConcatArray
    mask: ConcatArray | None
    segments: ConcatArray | None
    doc_starts: np.ndarray  # global int64 start of every document / row / pair
    pairs: np.ndarray | None  # prefs: [n_pairs, 3] lengths

    @classmethod
    def open(cls, dir: str | os.PathLike, split: str = "train") -> "ShardSet":
        path = Path(dir) / split
        idx = path / "index.json"
        if not idx.is_file():
            raise ShardError(f"{idx}: no index (not a dhad shard directory, or the write never finished)")
        try:
            meta = json.loads(idx.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ShardError(f"{idx}: invalid JSON ({e})") from None
        if meta.get("format") != FORMAT:
            raise ShardError(f"{idx}: format {meta.get('format')!r}, expected {FORMAT!r}")
        dt = np.dtype(meta["dtype"])
        toks, masks, segs, starts, pairs = [], [], [], [], []
        offset = 0
        for sh in meta["shards"]:
            n, nd = int(sh["n_tokens"]), int(sh["n_docs"])
            toks.append(_memmap(path / sh["tokens"], dt, n))
            if sh.get("mask"):
                masks.append(_memmap(path / sh["mask"], np.uint8, n))
            if sh.get("segments"):
                segs.append(_memmap(path / sh["segments"], meta["segments_dtype"], n))
            starts.append(np.asarray(_memmap(path / sh["docs"], np.int64, nd)) + offset)
            if sh.get("pairs"):
                pairs.append(np.asarray(_memmap(path / sh["pairs"], np.int64, nd * 3, shape=(nd, 3))))
            offset += n
        if offset != meta["n_tokens"]:
            raise ShardError(f"{idx}: shards hold {offset} tokens, index says {meta['n_tokens']}")
        doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        return cls(path=path, meta=meta, tokens=ConcatArray(toks),
                   mask=ConcatArray(masks) if masks else None,
                   segments=ConcatArray(segs) if segs else None,
                   doc_starts=doc_starts,
                   pairs=np.concatenate(pairs) if pairs else None)

    # convenience -------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def sources(self) -> dict:
        return dict(self.meta.get("sources", {}))

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def seq_len(self) -> int | None:
        return self.meta.get("seq_len")

    @property
    def n_rows(self) -> int:
        """sft: number of fixed-length rows."""
        return self.n_docs

    def window(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as an int64 array (crosses shard boundaries; no wraparound)."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside [0, {self.n_tokens})")
        return np.asarray(self.tokens.slice(start, start + length), dtype=np.int64)

    def doc(self, i: int) -> np.ndarray:
        """Document i (pretrain: including its trailing EOS), as int64."""
        s = int(self.doc_starts[i])
        e = int(self.doc_starts[i + 1]) if i + 1 < self.n_docs else self.n_tokens
        return self.window(s, e - s)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """sft: row i as (tokens, mask, segments), int64 arrays of length seq_len."""
        if self.kind != "sft":
            raise ValueError("row() is for sft shards")
        L = self.seq_len
        s = i * L
        return (self.window(s, L), np.asarray(self.mask.slice(s, s + L), dtype=np.int64),
                np.asarray(self.segments.slice(s, s + L), dtype=np.int64))


def sft_row_to_example(tokens, mask, segments):
    """(input_ids, labels, segment_ids) for one sft row; ``labels`` are shifted next-token targets with
    -100 where no loss counts (see module docstring). Works on numpy arrays of shape [T] or [B, T]."""
    t = np.asarray(tokens, dtype=np.int64)
    m = np.asarray(mask, dtype=np.int64)
    s = np.asarray(segments, dtype=np.int64)
    labels = np.full_like(t, -100)
    keep = (m[..., 1:] == 1) & (s[..., 1:] == s[..., :-1]) & (s[..., 1:] != 0)
    labels[..., :-1] = np.where(keep, t[..., 1:], -100)
    return t, labels, s


# ---------------------------------------------------------------------------------------------
# Building sft rows
# ---------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One tokenized SFT example: ids and a parallel loss mask (1 = assistant token that counts)."""
    ids: list[int]
    mask: list[int]


def pad_example(ex: Example, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpacked mode: one example per row, right-padded (pad tokens: mask 0, segment 0)."""
    n = len(ex.ids)
    if n > seq_len:
        raise ValueError(f"example of {n} tokens does not fit seq_len={seq_len}")
    t = np.full(seq_len, pad_id, dtype=np.int64)
    m = np.zeros(seq_len, dtype=np.int64)
    s = np.zeros(seq_len, dtype=np.int64)
    t[:n], m[:n], s[:n] = ex.ids, ex.mask, 1
    return t, m, s


def pack_examples(examples: Iterable[Example], seq_len: int, pad_id: int, open_rows: int = 1):
    """Packed mode: put whole examples into rows of ``seq_len`` tokens. Yields (tokens, mask, segments).

    First fit over at most ``open_rows`` partly filled rows: each example goes into the first open row
    with room, else a new row opens (and, past ``open_rows``, the fullest open row is emitted). With
    ``open_rows=1`` this is plain in-order greedy packing; a few dozen open rows lift the fill rate
    from ~75% to ~95%+ on chat data. Examples are never split, so no example's tokens leak into
    another row; within a row, segment ids 1..k keep attention and positions per example; padding is
    ``pad_id`` with mask 0 and segment 0. Deterministic for a given input order. Examples longer than
    seq_len raise (callers truncate or drop them first and report it).
    """
    rows: list[list] = []  # [tokens, mask, segments, used, n_segments]

    def new_row():
        return [np.full(seq_len, pad_id, dtype=np.int64), np.zeros(seq_len, dtype=np.int64),
                np.zeros(seq_len, dtype=np.int64), 0, 0]

    for ex in examples:
        n = len(ex.ids)
        if n == 0:
            continue
        if n > seq_len:
            raise ValueError(f"example of {n} tokens does not fit seq_len={seq_len}")
        if len(ex.mask) != n:
            raise ValueError("example mask and ids differ in length")
        j = next((j for j, r in enumerate(rows) if r[3] + n <= seq_len), None)
        if j is None:
            if len(rows) >= max(1, open_rows):
                k = max(range(len(rows)), key=lambda j: rows[j][3])
                full = rows.pop(k)
                yield full[0], full[1], full[2]
            rows.append(new_row())
            j = len(rows) - 1
        row = rows[j]
        t, m, s, used, seg = row
        t[used:used + n], m[used:used + n], s[used:used + n] = ex.ids, ex.mask, seg + 1
        row[3], row[4] = used + n, seg + 1
        if row[3] == seq_len:  # exactly full: emit now
            rows.pop(j)
            yield t, m, s
    for r in rows:
        yield r[0], r[1], r[2]


def row_examples(tokens, mask, segments) -> list[Example]:
    """Inverse of packing: the examples held in one row, in order (used by tests and inspection)."""
    t, m, s = (np.asarray(x) for x in (tokens, mask, segments))
    out = []
    for seg in [int(x) for x in np.unique(s) if x != 0]:
        sel = s == seg
        out.append(Example(ids=t[sel].astype(int).tolist(), mask=m[sel].astype(int).tolist()))
    return out


class PrefsSet:
    """Reader for kind="prefs" shards: ``ps = PrefsSet.open(dir, "train"); ps[i]`` ->
    ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (int64 numpy arrays). ``len(ps)`` pairs."""

    def __init__(self, ss: ShardSet):
        if ss.kind != "prefs":
            raise ShardError(f"{ss.path}: kind {ss.kind!r}, expected 'prefs'")
        self.ss, self.meta = ss, ss.meta

    @classmethod
    def open(cls, dir: str | os.PathLike, split: str = "train") -> "PrefsSet":
        return cls(ShardSet.open(dir, split))

    def __len__(self) -> int:
        return self.ss.n_docs

    def lengths(self) -> np.ndarray:
        """[n, 3] (prompt_len, chosen_len, rejected_len), for length-bucketed batching."""
        return self.ss.pairs

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        p, c, r = (int(x) for x in self.ss.pairs[i])
        w = self.ss.window(int(self.ss.doc_starts[i]), p + c + r)
        return {"prompt_ids": w[:p], "chosen_ids": w[p:p + c], "rejected_ids": w[p + c:]}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
