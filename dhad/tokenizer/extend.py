"""Vocabulary extension (the Jais-adapted recipe: Llama-2's 32,000 tokens + Arabic tokens).

`extend_tokenizer(base, donor, n)` adds up to n Arabic tokens of a donor tokenizer that the base lacks;
`learn_donor(base, texts, n)` first learns such a donor from Arabic text, in the base's own style.
New tokens get ids after the base's, so every base id keeps its meaning (and its trained embedding
row), and every new merge produces a token with Arabic in it: a merge fires only when both of its
sides are adjacent in the text, so text without Arabic encodes exactly as before.

Three kinds of base:
- byte-level BPE (tokenizer.json: Jais, Llama-3, dhad's own): the donor's merges, in its order; a
  merge is Arabic when its result holds a UTF-8 lead byte 0xD8-0xDB (exactly the block U+0600-U+06FF).
- SentencePiece-style BPE in tokenizer.json (`▁` for spaces, `<0xNN>` byte fallback: Llama-2,
  Mistral): new merges in text form; Arabic characters the base lacks (it writes them as bytes) are
  added to its alphabet first.
- tokenizer.model (SentencePiece): new pieces appended to the model proto with scores below every
  base piece, in the donor's order.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dhad.tokenizer.core import Tokenizer, TokenizerError, byte_level_decoder, merges_by_piece_id

# UTF-8 lead bytes 0xD8-0xDB encode exactly U+0600-U+06FF (the Arabic block).
_ARABIC_LEAD_BYTES = frozenset(range(0xD8, 0xDC))
_ARABIC_RANGES = ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))
SPACE = "\u2581"


def is_arabic_char(c: str) -> bool:
    o = ord(c)
    return any(a <= o <= b for a, b in _ARABIC_RANGES)


@dataclass
class ExtendReport:
    base_vocab: int
    donor_vocab: int
    new_vocab: int
    added: int  # tokens added (including intermediate tokens a merge chain needed, and new characters)
    requested: int
    candidates: int  # donor tokens with Arabic text that the base lacks
    skipped: int  # candidates that could not be added safely (non-Arabic intermediates) or reachably
    by: str
    new_ids: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "new_ids"}
        d["new_id_range"] = [min(self.new_ids), max(self.new_ids)] if self.new_ids else None
        return d


def _style(tok: Tokenizer) -> str:
    """"byte-level", "metaspace" (SentencePiece-style tokenizer.json), "sentencepiece" (tokenizer.model)
    or "other" (WordPiece, WordLevel, ...)."""
    if tok.kind == "sentencepiece":
        return "sentencepiece"
    if tok._is_byte_level():
        return "byte-level"
    model = json.loads(tok.backend.model.__getstate__())
    return "metaspace" if model.get("type") == "BPE" and tok.adds_prefix_space else "other"


def _pair(m) -> tuple[str, str]:
    if isinstance(m, str):
        a, _, b = m.partition(" ")
        return a, b
    return m[0], m[1]


def donor_merges(donor: Tokenizer, text: bool) -> list[tuple[str, str]]:
    """The donor's merges in priority order; `text=True`: as text with `▁` for spaces (byte-level merges
    that are not whole UTF-8 characters dropped), else in the donor's own symbols."""
    style = _style(donor)
    if style == "sentencepiece":
        vocab = {donor.id_to_token(i): i for i in range(donor.sp_model.get_piece_size())}
        merges = merges_by_piece_id(vocab)
    elif style in ("byte-level", "metaspace"):
        merges = [_pair(m) for m in json.loads(donor.backend.to_str())["model"].get("merges", [])]
    else:
        raise TokenizerError(f"the donor is a {json.loads(donor.backend.model.__getstate__()).get('type')} "
                             "tokenizer without merges: use a byte-level BPE or SentencePiece donor")
    if not text or style != "byte-level":
        return merges
    dec = byte_level_decoder()

    def as_text(s: str) -> str | None:
        try:
            return bytes(dec[c] for c in s).decode("utf-8").replace(" ", SPACE)
        except (KeyError, UnicodeDecodeError):
            return None

    out = []
    for a, b in merges:
        ta, tb = as_text(a), as_text(b)
        if ta is not None and tb is not None:
            out.append((ta, tb))
    return out


def _text_of(tok: Tokenizer, i: int) -> str | None:
    """Token i as SentencePiece-style text (`▁` for spaces); None for specials and partial characters."""
    b = tok.token_bytes(i)
    try:
        return None if b is None else b.decode("utf-8").replace(" ", SPACE)
    except UnicodeDecodeError:
        return None


def extend_tokenizer(base: Tokenizer, donor: Tokenizer, n_add: int, *, by: str = "rank",
                     corpus: Sequence[str] | None = None) -> tuple[Tokenizer, ExtendReport]:
    """Add up to `n_add` Arabic tokens of `donor` that `base` lacks; base ids and English encodings stay.

    by="rank": the donor's most basic/frequent-in-training tokens first (its merge order);
    by="frequency": the donor tokens most used when the donor encodes `corpus`.
    """
    if n_add < 1:
        raise TokenizerError(f"--add must be >= 1, got {n_add}")
    if by not in ("rank", "frequency"):
        raise TokenizerError(f"unknown selection {by!r}: choose rank or frequency")
    if by == "frequency" and not corpus:
        raise TokenizerError("selection by frequency needs a corpus (empty corpus given)")
    style = _style(base)
    if style == "byte-level":
        if _style(donor) != "byte-level":
            raise TokenizerError("extending a byte-level BPE base needs a byte-level BPE donor (tokenizer.json); "
                                 f"got a {_style(donor)} donor")
        return _extend_bpe(base, donor, n_add, by, corpus, byte_level=True)
    if style == "metaspace":
        return _extend_bpe(base, donor, n_add, by, corpus, byte_level=False)
    if style == "sentencepiece":
        return _extend_sentencepiece(base, donor, n_add, by, corpus)
    raise TokenizerError("extending needs a BPE base: byte-level or SentencePiece-style tokenizer.json, or a "
                         "SentencePiece tokenizer.model")


def _frequency_order(donor: Tokenizer, corpus: Sequence[str], ranked: list[str], key_of: Callable) -> list[str]:
    counts: Counter = Counter()
    for k in range(0, len(corpus), 256):
        for ids in donor.encode_batch(list(corpus[k:k + 256])):
            counts.update(ids)
    pos = {t: r for r, t in enumerate(ranked)}
    by_tok: dict[str, int] = {}
    for i, c in counts.items():
        key = key_of(i)
        if key is not None and key in pos:
            by_tok[key] = by_tok.get(key, 0) + c
    # frequent tokens first, then the rest in rank order (so --add larger than what the corpus uses still fills)
    return sorted(ranked, key=lambda t: (-by_tok.get(t, 0), pos[t]))


def _extend_bpe(base: Tokenizer, donor: Tokenizer, n_add: int, by: str, corpus,
                byte_level: bool) -> tuple[Tokenizer, ExtendReport]:
    from tokenizers import Tokenizer as HFTokenizer

    d = json.loads(base.backend.to_str())
    model = d["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    string_merges = bool(merges) and isinstance(merges[0], str)
    recipe: dict[str, tuple[str, str]] = {}
    ranked: list[str] = []
    for a, b in donor_merges(donor, text=not byte_level):
        t = a + b
        if t not in recipe:
            recipe[t] = (a, b)
            ranked.append(t)
    rank = {t: r for r, t in enumerate(ranked)}
    if byte_level:
        dec = byte_level_decoder()

        def arabic(t: str) -> bool:
            return any(dec.get(c, 0) in _ARABIC_LEAD_BYTES for c in t)

        def new_char(c: str) -> bool:
            return False  # a byte-level alphabet is complete

        def key_of(i: int) -> str | None:
            return donor.id_to_token(i)
    else:
        def arabic(t: str) -> bool:
            return any(is_arabic_char(c) for c in t)

        def new_char(c: str) -> bool:
            return is_arabic_char(c)  # written as <0xNN> bytes by the base until it is a symbol

        def key_of(i: int) -> str | None:
            return _text_of(donor, i)
    if not any(t in vocab for t in list(recipe)[:1000] + [c for t in recipe for c in t][:1000]):
        raise TokenizerError("donor and base share no tokens: they are not the same kind of BPE")
    cands = [t for t in ranked if t not in vocab and arabic(t)]
    order = cands if by == "rank" else _frequency_order(donor, corpus, cands, key_of)
    chosen: set[str] = set()
    skipped = 0

    def closure(t: str, acc: list[str]) -> bool:
        """Tokens (t and missing ancestors) needed to build t; False if one is not Arabic (unsafe)."""
        if t in vocab or t in chosen or t in acc:
            return True
        if len(t) == 1:
            if not new_char(t):
                return False  # a symbol the base alphabet lacks and that may not be added
            acc.append(t)
            return True
        if not arabic(t) or t not in recipe:
            return False
        a, b = recipe[t]
        if not (closure(a, acc) and closure(b, acc)):
            return False
        acc.append(t)
        return True

    for t in order:
        if len(chosen) >= n_add:
            break
        acc: list[str] = []
        if not closure(t, acc):
            skipped += 1
            continue
        if len(chosen) + len(acc) > n_add:
            continue
        chosen.update(acc)
    # new characters first (symbols, no merge), then the merges in the donor's order
    new_tokens = sorted(chosen, key=lambda t: (len(t) > 1, rank.get(t, -1), t))
    next_id = max(list(vocab.values()) + [t["id"] for t in d.get("added_tokens", [])]) + 1
    new_ids = []
    for t in new_tokens:
        vocab[t] = next_id
        new_ids.append(next_id)
        next_id += 1
        if len(t) > 1:
            a, b = recipe[t]
            merges.append(f"{a} {b}" if string_merges else [a, b])
    hf = HFTokenizer.from_str(json.dumps(d, ensure_ascii=False))
    cfg = dict(base.config)
    cfg.pop("added_tokens_decoder", None)
    out = Tokenizer(hf=hf, config=cfg)
    rep = ExtendReport(base.vocab_size, donor.vocab_size, out.vocab_size, len(new_tokens), n_add, len(cands), skipped,
                       by, new_ids)
    return out, rep


def _extend_sentencepiece(base: Tokenizer, donor: Tokenizer, n_add: int, by: str, corpus) -> tuple[Tokenizer, ExtendReport]:
    import sentencepiece as spm

    bsp = base.sp_model
    existing = {bsp.id_to_piece(i) for i in range(bsp.get_piece_size())}
    if _style(donor) == "other":  # no merges (WordPiece, WordLevel, ...): its tokens in id order
        ranked = [t for t in (_text_of(donor, i) for i in range(donor.vocab_size)) if t]
    else:
        ranked = list(dict.fromkeys(a + b for a, b in donor_merges(donor, text=True)))

    def key_of(i: int) -> str | None:
        return _text_of(donor, i)
    # single characters (the donor's alphabet) first: they replace byte fallback for Arabic letters
    chars = [c for c in dict.fromkeys(c for t in ranked for c in t) if is_arabic_char(c)]
    ranked = list(dict.fromkeys(chars + ranked))
    if not any(t in existing for t in ranked):
        raise TokenizerError("donor and base share no tokens: nothing to anchor the extension on")
    cands = [t for t in ranked if t not in existing and any(is_arabic_char(c) for c in t)]
    order = cands if by == "rank" else _frequency_order(donor, corpus, cands, key_of)
    pieces_now = set(existing)
    added: list[str] = []

    def reachable(t: str) -> bool:
        # SentencePiece BPE merges two adjacent symbols (single chars or pieces) into a piece.
        return len(t) == 1 or any((t[:k] in pieces_now or k == 1) and (t[k:] in pieces_now or k == len(t) - 1)
                                  for k in range(1, len(t)))

    pending = list(order)
    for _ in range(3):  # a few passes: a piece may become reachable once a shorter one is in
        nxt = []
        for t in pending:
            if len(added) >= n_add:
                break
            if reachable(t):
                pieces_now.add(t)
                added.append(t)
            else:
                nxt.append(t)
        pending = nxt
        if len(added) >= n_add or not pending:
            break
    skipped = len(pending) if len(added) < n_add else 0
    normal = [bsp.get_score(i) for i in range(bsp.get_piece_size())
              if not (bsp.is_control(i) or bsp.is_unknown(i) or bsp.is_byte(i) or bsp.is_unused(i))]
    low = min(normal) if normal else 0.0
    # scores below every base piece, in the donor's order: base merges always win, then the donor's order
    ranked_pos = {t: r for r, t in enumerate(ranked)}
    added.sort(key=lambda t: ranked_pos[t])
    first_new = bsp.get_piece_size()
    proto = bsp.serialized_model_proto() + b"".join(_sp_piece_field(t, low - 1.0 - k) for k, t in enumerate(added))
    out = Tokenizer(sp=spm.SentencePieceProcessor(model_proto=proto), config=dict(base.config))
    rep = ExtendReport(base.vocab_size, donor.vocab_size, out.vocab_size, len(added), n_add, len(cands), skipped, by,
                       list(range(first_new, first_new + len(added))))
    return out, rep


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _sp_piece_field(piece: str, score: float, type_: int = 1) -> bytes:
    """One `ModelProto.pieces` entry in protobuf wire format (field 1), type NORMAL (1).

    Protobuf appends repeated fields found later in a message, so appending these bytes to a
    serialized model adds pieces after the existing ones: no protobuf runtime needed."""
    raw = piece.encode("utf-8")
    msg = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(type_)
    return b"\x0a" + _varint(len(msg)) + msg


# ----------------------------------------------------------------------------------------------
# learning the donor from Arabic text


def learn_donor(base: Tokenizer, texts: Sequence[str], n_add: int, *, min_frequency: int = 2,
                show_progress: bool = False) -> Tokenizer:
    """A donor tokenizer learned on `texts` (Arabic) in the base's style, with enough merges that the
    base lacks for `n_add` new tokens: a byte-level BPE (dhad's pre-tokenizer) for a byte-level base, a
    SentencePiece-style BPE (words split at spaces, `▁` prefix) for a Llama-style base."""
    from dhad.tokenizer.train import train_bpe

    texts = [t for t in texts if t]
    if not texts:
        raise TokenizerError("empty corpus: no Arabic text to learn tokens from")
    style = _style(base)
    # the base already holds some of what BPE learns first (letters, common pairs): learn more than asked
    size = int(n_add * 1.3) + 1000
    if style == "byte-level":
        return train_bpe(texts, size + 259, min_frequency=min_frequency, chat_template=None, show_progress=show_progress)
    if style not in ("metaspace", "sentencepiece"):
        raise TokenizerError("learning Arabic tokens needs a BPE base (byte-level or SentencePiece-style)")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    hf.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=["<unk>"], limit_alphabet=2000)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf=hf, config={"unk_token": "<unk>", "add_bos_token": False})
