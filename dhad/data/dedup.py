"""Exact and near-duplicate removal (MinHash-LSH, via ``datasketch``).

* Exact: SHA-1 of the text lower-cased with whitespace collapsed (so re-crawls differing only in spacing
  or case count as one document).
* Near: MinHash over word n-gram shingles (default 5-grams, 128 permutations), LSH banding tuned by
  datasketch for Jaccard ``threshold`` (default 0.8, as in the near-dedup of Gopher / The Pile style
  pipelines). The first document of a near-duplicate cluster is kept, later ones dropped: the result
  depends only on input order, never on the number of workers.

Two ways to apply the same rule:

* ``Deduplicator``: feed documents in order (one process; the sequential reference, dhad.data.reference).
* At scale (dhad.data.steps, datatrove's MinHash stages): every document's LSH band values and its exact
  key become datatrove "buckets" (``bucket_layout``, ``bucket_values``); datatrove's bucket stage finds the
  documents sharing a bucket value (sorted merges, one task per bucket), and ``first_occurrence`` replays
  the sequential rule over those groups in input order: a document is dropped when an earlier *kept*
  document has its exact key (exact_duplicate) or shares one of its LSH bands (near_duplicate) — exactly
  ``Deduplicator``'s decisions, for any number of tasks.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np

_WS = re.compile(r"\s+")


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1


def exact_key(text: str) -> bytes:
    return hashlib.sha1(_WS.sub(" ", text).strip().lower().encode("utf-8")).digest()


def is_validation(key: bytes, seed: int, frac: float) -> bool:
    """A document's split, from its exact key and the seed: duplicates can never sit on both sides, and
    adding files never moves earlier documents between splits."""
    if frac <= 0:
        return False
    h = hashlib.sha1(key + seed.to_bytes(8, "little")).digest()
    return int.from_bytes(h[:8], "little") / 2.0 ** 64 < frac


_TEMPLATES: dict = {}


def signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """MinHash hash values (uint64[num_perm]) of the text's word n-gram shingles."""
    from datasketch import MinHash
    key = (cfg.num_perm, cfg.seed)
    if key not in _TEMPLATES:  # permutations are the expensive part: make them once per process
        _TEMPLATES[key] = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
    tmpl = _TEMPLATES[key]
    words = _WS.sub(" ", text).strip().lower().split(" ")
    n = cfg.ngram
    if len(words) <= n:
        shingles = {" ".join(words)}
    else:
        shingles = {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, permutations=tmpl.permutations, scheme=tmpl.scheme)
    m.update_batch([s.encode("utf-8") for s in shingles])
    return m.hashvalues


def _scheme(cfg: DedupConfig) -> str:
    from datasketch import MinHash
    key = (cfg.num_perm, cfg.seed)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
    return _TEMPLATES[key].scheme


class Deduplicator:
    """Feed documents in order; ``check`` returns None for a new document (and remembers it) or the rule
    that makes it a duplicate ("exact_duplicate" / "near_duplicate")."""

    def __init__(self, cfg: DedupConfig | None = None):
        self.cfg = cfg or DedupConfig()
        self._seen: set[bytes] = set()
        self._lsh = None
        if self.cfg.near:
            from datasketch import MinHashLSH
            self._lsh = MinHashLSH(threshold=self.cfg.threshold, num_perm=self.cfg.num_perm)
        self._n = 0

    def check(self, key: bytes | None, hashvalues: np.ndarray | None) -> str | None:
        if self.cfg.exact and key is not None:
            if key in self._seen:
                return "exact_duplicate"
        if self._lsh is not None and hashvalues is not None:
            from datasketch import LeanMinHash
            m = LeanMinHash(seed=self.cfg.seed, hashvalues=hashvalues, scheme=_scheme(self.cfg))
            if self._lsh.query(m):
                return "near_duplicate"
            self._lsh.insert(self._n, m, check_duplication=False)
        if self.cfg.exact and key is not None:
            self._seen.add(key)
        self._n += 1
        return None


# ---------------------------------------------------------------------------------------------
# The same rule over buckets (datatrove's MinHash stages, dhad.data.steps)

EXACT_KEY_WORDS = 5   # an exact key (SHA-1) is five 32-bit words


@lru_cache(maxsize=None)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for ``threshold`` (0.8, 128 perms: 9 x 13)."""
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return int(lsh.b), int(lsh.r)


def bucket_layout(cfg: DedupConfig) -> tuple[int, int, int | None]:
    """(number of buckets, 32-bit words per bucket, index of the exact-key bucket or None).

    Near + exact: the LSH bands, then one bucket holding the exact key (SHA-1, zero-padded to the band
    width; a width under 5 words — thresholds below 0.45 — holds a BLAKE2b digest of the key of that width
    instead, >= 96 bits from threshold 0.3 up). Exact only: one 5-word bucket. Neither: no buckets."""
    if cfg.near:
        b, r = lsh_bands(cfg.threshold, cfg.num_perm)
        return (b + 1, r, b) if cfg.exact else (b, r, None)
    return (1, EXACT_KEY_WORDS, 0) if cfg.exact else (0, 0, None)


def exact_words(key: bytes, width: int) -> np.ndarray:
    """An exact key as ``width`` little-endian 32-bit words (see ``bucket_layout``)."""
    if width >= EXACT_KEY_WORDS:
        words = np.frombuffer(key, dtype="<u4")
        return np.concatenate([words, np.zeros(width - words.size, dtype="<u4")])
    return np.frombuffer(hashlib.blake2b(key, digest_size=4 * width).digest(), dtype="<u4")


def bucket_values(text: str, cfg: DedupConfig) -> np.ndarray:
    """Every bucket's value for a document, concatenated (uint32, n_buckets x width): the MinHash band
    values of ``signature`` (the first bands x rows hash values, as datasketch's LSH bands them), then the
    exact key."""
    n, width, exact = bucket_layout(cfg)
    parts = []
    if cfg.near:
        b, r = lsh_bands(cfg.threshold, cfg.num_perm)
        parts.append(np.asarray(signature(text, cfg)[: b * r], dtype=np.uint32))
    if exact is not None:
        parts.append(exact_words(exact_key(text), width))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def first_occurrence(pairs: Iterable[tuple[int, int, int]], exact_bucket: int | None) -> dict[int, str]:
    """Dedup decisions from bucket matches. ``pairs``: ``(bucket, a, b)`` — documents ``a`` and ``b`` (ints
    numbering the documents in input order, e.g. ``task << 32 | index``) hold the same value in ``bucket``
    (< 256; chains are enough: a-b, b-c). Returns ``{doc: "exact_duplicate" | "near_duplicate"}`` for the
    documents to drop: walking the matched documents in order, one is dropped when an earlier kept document
    shares its exact-key bucket (exact) or any other bucket (near), else kept — ``Deduplicator.check``'s
    rule, which never compares with a dropped document. Memory: one dict entry per (document, bucket) with
    a match — about 100 bytes each."""
    parent: dict[int, int] = {}   # union-find over keys doc << 8 | bucket, one forest per bucket

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while x != root:   # path compression
            parent[x], x = root, parent[x]
        return root

    for bucket, a, b in pairs:
        ka, kb = a << 8 | bucket, b << 8 | bucket
        ra, rb = find(parent.setdefault(ka, ka)), find(parent.setdefault(kb, kb))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    kept, drop = set(), {}
    keys = sorted(parent)   # by document, then bucket
    i = 0
    while i < len(keys):
        doc, j = keys[i] >> 8, i
        while j < len(keys) and keys[j] >> 8 == doc:
            j += 1
        groups = [find(k) for k in keys[i:j]]
        if exact_bucket is not None and any(g & 255 == exact_bucket and g in kept for g in groups):
            drop[doc] = "exact_duplicate"
        elif any(g & 255 != exact_bucket and g in kept for g in groups):
            drop[doc] = "near_duplicate"
        else:
            kept.update(groups)
        i = j
    return drop
