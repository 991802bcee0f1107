"""The tokenizer every dhad path uses, and the one rule by which it turns text into ids.

The rule: `encode(text, add_special_tokens=True)` is what
`transformers.AutoTokenizer.from_pretrained(dir)(text)["input_ids"]` gives (transformers 5.x), and
`add_special_tokens=False` likewise; `decode` is transformers' `decode` (`skip_special_tokens` both ways).
dhad does not import transformers for it: `load_tokenizer` builds the same `tokenizers` backend
transformers builds from the same files, and every encode and decode goes through that backend.
What transformers does with a directory, and dhad with it:

- `tokenizer.json` (fast tokenizers: Jais's byte-level BPE, Llama-3, dhad's own) is used as written.
  Special tokens written in the text (`<|im_start|>`, `<s>`) are one id each.
- `tokenizer_class: LlamaTokenizer` (Llama-2, Mistral, ALLaM, Jais-adapted) rebuilds the backend from
  the file's vocabulary and merges: no normaliser, a Metaspace pre-tokenizer (`▁` for spaces, a dummy
  prefix at the start of the text -- and, with `legacy: true`, after every special token too -- but
  never a second `▁` where the text already starts with a space), byte fallback. This is where
  transformers 5 and the `tokenizers` library reading the same file disagree (`" Hello"`: `[▁Hello]`
  vs `[▁, ▁Hello]`); dhad follows transformers (docs/tokenizers.md says why).
- `tokenizer.model` alone (SentencePiece BPE): converted to the same Llama backend (vocabulary from
  the pieces, merges ordered by piece id, control pieces special), so `<s>`/`</s>` in text are one id
  each and the model is served exactly what it was trained on.
- BOS/EOS: with a `tokenizer.json`, its post-processor alone (Llama-3 adds `<|begin_of_text|>` with a
  `TemplateProcessing`; transformers 5 ignores `add_bos_token`/`add_eos_token` then). With a
  `tokenizer.model` alone, exactly what `add_bos_token`/`add_eos_token` say (default: neither).
- Named special tokens of the config (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...) are
  special added tokens: recognised in text, dropped by `decode(..., skip_special_tokens=True)`.

Text with a lone surrogate (not valid Unicode, cannot be UTF-8 encoded) raises `TokenizerError`
naming the position, never an error from inside the backend.

`hash()` is a content hash of the effective backend (what decides the ids), used to tag token shards
so that a shard is never read with a tokenizer that would encode its text differently.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from dhad.utils import atomic_write_bytes

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# id 0 is <|endoftext|> (bos/eos/pad/unk, as in Jais); ChatML markers for dhad's own chat models.
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

N_BYTES = 256  # byte-level alphabet size

# transformers classes that rebuild the backend from vocab + merges with the Llama rules
LLAMA_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})
# what transformers' LlamaTokenizer assumes when the config names no special tokens
LLAMA_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """A user-facing tokenizer problem (bad path, bad text, empty corpus, impossible vocabulary size, ...)."""


def _token_str(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


# ----------------------------------------------------------------------------------------------
# GPT-2's byte <-> printable-character table (byte-level BPE stores bytes as these characters)

_BYTE_DECODER: dict[str, int] | None = None


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte<->unicode table, inverted: printable char -> byte value."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    return _BYTE_DECODER


def byte_level_encoder() -> dict[int, str]:
    return {b: c for c, b in byte_level_decoder().items()}


# ----------------------------------------------------------------------------------------------
# building the backend transformers would build


def _is_byte_piece(t: str) -> bool:
    return len(t) == 6 and t.startswith("<0x") and t.endswith(">")


def _added(content: str, special: bool, *, lstrip=False, rstrip=False, single_word=False, normalized=None):
    from tokenizers import AddedToken

    return AddedToken(content, single_word=single_word, lstrip=lstrip, rstrip=rstrip,
                      normalized=(not special) if normalized is None else normalized, special=special)


def _added_from_dict(d: dict):
    return _added(d["content"], bool(d.get("special", False)), lstrip=d.get("lstrip", False),
                  rstrip=d.get("rstrip", False), single_word=d.get("single_word", False),
                  normalized=d.get("normalized"))


def _config_added_tokens(config: dict) -> list[tuple[int, dict]]:
    out = []
    for k, v in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(v, dict) and isinstance(v.get("content"), str):
            out.append((int(k), v))
    return sorted(out, key=lambda kv: kv[0])


def _llama_pipeline(hf, config: dict) -> None:
    """Give `hf` transformers' LlamaTokenizer normaliser (none), pre-tokenizer and decoder."""
    from tokenizers import decoders, pre_tokenizers

    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy") else "first") if add_prefix_space else "never"
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    hf.decoder = decoders.Sequence(steps)


def _bpe_from(vocab: dict[str, int], merges: list) -> object:
    """A bare `tokenizers` BPE as transformers' LlamaTokenizer makes it (byte fallback, fused unknowns)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    return HFTokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))


def merges_by_piece_id(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary: every split of a piece into two pieces of the
    vocabulary, ordered by the merged piece's id (SentencePiece BPE ranks pieces by score, which is
    id order), then by the length of the left part -- the order transformers uses for Llama."""
    out = []
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                out.append((left, right))
    return out


def _sentencepiece_backend(sp, config: dict):
    """The Llama backend transformers 5 builds from a `tokenizer.model` (SentencePiece BPE)."""
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    if len(vocab) != n:
        raise TokenizerError("SentencePiece model has duplicate pieces")
    hf = _bpe_from(vocab, merges_by_piece_id(vocab))
    # control pieces are special, user-defined pieces are plain added tokens (both matched on raw text)
    types = sp_piece_types(sp)
    extra = [_added(sp.id_to_piece(i), t == 3, normalized=False) for i, t in enumerate(types) if t in (3, 4)]
    for tok in extra:
        (hf.add_special_tokens if tok.special else hf.add_tokens)([tok])
    return hf


def _apply_rules(hf, config: dict, sentencepiece: bool):
    """Turn a `tokenizers.Tokenizer` read from the files into the one transformers would use."""
    cls = config.get("tokenizer_class")
    if sentencepiece:
        _llama_pipeline(hf, config)
    elif cls in LLAMA_CLASSES:
        m = hf.model
        if type(m).__name__ != "BPE":
            raise TokenizerError(f"tokenizer_class {cls} needs a BPE tokenizer.json, got {type(m).__name__}")
        file_added = {t.content for t in hf.get_added_tokens_decoder().values()}
        if (not config.get("added_tokens_decoder") or file_added <= {t["content"] for _, t in _config_added_tokens(config)}) \
                and m.continuing_subword_prefix is None and m.end_of_word_suffix is None:
            # transformers rebuilds BPE(vocab, merges, fuse_unk, byte_fallback) and re-adds these same added
            # tokens: setting the same model options in place gives the same tokenizer, without the rebuild
            m.unk_token, m.fuse_unk, m.byte_fallback, m.dropout, m.ignore_merges = None, True, True, None, False
            _llama_pipeline(hf, config)
            return _finish_rules(hf, config, sentencepiece, cls)
        d = json.loads(hf.to_str())
        model = d["model"]
        pp = hf.post_processor
        file_added = d.get("added_tokens") or []
        hf = _bpe_from(model["vocab"], model.get("merges") or [])
        _llama_pipeline(hf, config)
        if pp is not None:
            hf.post_processor = pp
        if not config.get("added_tokens_decoder"):  # transformers falls back to the file's added tokens
            for t in sorted(file_added, key=lambda t: t["id"]):
                tok = _added_from_dict(t)
                (hf.add_special_tokens if tok.special else hf.add_tokens)([tok])
    return _finish_rules(hf, config, sentencepiece, cls)


def _finish_rules(hf, config: dict, sentencepiece: bool, cls: str | None):
    # tokens the config lists, then its named special tokens (transformers adds both, in this order)
    have = {t.content for t in hf.get_added_tokens_decoder().values()}
    for _, t in _config_added_tokens(config):
        if t["content"] not in have:
            tok = _added_from_dict(t)
            (hf.add_special_tokens if tok.special else hf.add_tokens)([tok])
            have.add(t["content"])
    for key in NAMED_SPECIALS:
        s = _named(config, key, sentencepiece or cls in LLAMA_CLASSES)
        if s and s not in have:
            hf.add_special_tokens([_added(s, True)])
            have.add(s)
    for s in list(config.get("additional_special_tokens") or []) + list(config.get("extra_special_tokens") or []):
        s = _token_str(s)
        if s and s not in have:
            hf.add_special_tokens([_added(s, True)])
            have.add(s)
    # BOS/EOS: a tokenizer.json's own post-processor (transformers ignores add_bos_token/add_eos_token
    # when there is a tokenizer.json); for a tokenizer.model, what add_bos_token/add_eos_token say
    if sentencepiece:
        from tokenizers import processors

        ends = []
        for flag, key in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
            s = _named(config, key, True)
            i = hf.token_to_id(s) if s else None
            ends.append((s, i) if config.get(flag) and i is not None else None)
        bos, eos = ends
        if bos or eos:
            single = " ".join(([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else []))
            pair = single + " " + " ".join(([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else []))
            hf.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                              special_tokens=[e for e in (bos, eos) if e])
    return hf


def _named(config: dict, key: str, llama: bool) -> str | None:
    if key in config:
        return _token_str(config.get(key))
    return LLAMA_DEFAULT_SPECIALS.get(key) if llama else None


def _mentions(node, type_: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == type_:
            return True
        return any(_mentions(v, type_) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_) for v in node)
    return False


def _component(obj) -> dict:
    """The JSON of a backend component (normaliser, pre-tokenizer, decoder), {} when there is none."""
    return {} if obj is None else json.loads(obj.__getstate__())


def _bad_text(texts: Sequence, cause: Exception) -> TokenizerError:
    """A clear error for text the backend refused: not a str, or a lone surrogate (not valid Unicode)."""
    for k, t in enumerate(texts):
        where = f"text {k}: " if len(texts) > 1 else ""
        if not isinstance(t, str):
            return TokenizerError(f"{where}text must be a str, got {type(t).__name__}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            c = t[e.start]
            return TokenizerError(f"{where}invalid text: code point U+{ord(c):04X} at position {e.start} is a lone "
                                  "surrogate, not a Unicode character (it has no UTF-8 encoding)")
    return TokenizerError(f"the tokenizer refused the text: {cause}")


# ----------------------------------------------------------------------------------------------
# the wrapper


class Tokenizer:
    """encode/decode + special ids + chat template over one `tokenizers` backend.

    `Tokenizer(hf=tokenizers.Tokenizer, config=...)` or `Tokenizer(sp=SentencePieceProcessor, config=...)`;
    `config` is tokenizer_config.json's content. Either way the backend is the one transformers would
    build from those files (module docstring); `kind` says which file format it came from.
    """

    def __init__(self, hf=None, sp=None, config: dict | None = None):
        if (hf is None) == (sp is None):
            raise ValueError("Tokenizer needs exactly one of hf= (tokenizers.Tokenizer) or sp= (SentencePieceProcessor)")
        self.config: dict = dict(config or {})
        self._sp = sp
        if sp is not None:
            hf = _sentencepiece_backend(sp, self.config)
        self._hf = _apply_rules(hf, self.config, sentencepiece=sp is not None)
        self._byte_level: bool | None = None
        self._special_ids: frozenset[int] | None = None
        self._prefix: bool | None = None
        self._sentinel: list[int] | None = None

    # -- construction ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """"bpe" (from tokenizer.json) or "sentencepiece" (from tokenizer.model)."""
        return "bpe" if self._sp is None else "sentencepiece"

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` every encode and decode goes through."""
        return self._hf

    @property
    def sp_model(self):
        """The `sentencepiece.SentencePieceProcessor` this tokenizer was read from (None for tokenizer.json)."""
        return self._sp

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(i)

    def get_vocab(self) -> dict[str, int]:
        return self._hf.get_vocab(with_added_tokens=True)

    def _special_id(self, key: str) -> int | None:
        llama = self._sp is not None or self.config.get("tokenizer_class") in LLAMA_CLASSES
        if key in self.config or llama:
            tok = _named(self.config, key, llama)
            return self.token_to_id(tok) if tok is not None else None
        return self._hf.token_to_id(ENDOFTEXT)  # a bare tokenizer.json: Jais's all-purpose token, if present

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        """The pad id; falls back to eos (as Jais, whose pad is <|endoftext|>) when none is defined."""
        i = self._special_id("pad_token")
        return self.eos_token_id if i is None else i

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens (what `decode(..., skip_special_tokens=True)` drops)."""
        if self._special_ids is None:
            self._special_ids = frozenset(i for i, t in self._hf.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    @property
    def special_strings(self) -> dict[str, int]:
        """Text form -> id of every special token (each is one id wherever it appears in text)."""
        return {t.content: int(i) for i, t in self._hf.get_added_tokens_decoder().items() if t.special and t.content}

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self.config["chat_template"] = value

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it are one id each. `add_special_tokens=True`
        adds BOS/EOS as transformers does for this tokenizer (post-processor / add_bos_token)."""
        try:
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as e:
            raise _bad_text([text], e) from None

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` of many texts at once (parallel in Rust)."""
        texts = list(texts)
        try:
            fn = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)  # no offsets: we never use them
            return [e.ids for e in fn(texts, add_special_tokens=add_special_tokens)]
        except TypeError as e:
            raise _bad_text(texts, e) from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def adds_prefix_space(self) -> bool:
        """True for SentencePiece-style tokenizers that put a `▁` before the first word of a text."""
        if self._prefix is None:
            pre = _component(self._hf.pre_tokenizer)
            metas = [pre] if pre.get("type") == "Metaspace" else \
                [p for p in pre.get("pretokenizers") or [] if isinstance(p, dict) and p.get("type") == "Metaspace"]
            self._prefix = any(m.get("prepend_scheme", "always") != "never" for m in metas) or \
                _mentions(_component(self._hf.normalizer), "Prepend")
        return self._prefix

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as the continuation of a text already encoded (no special tokens added): for a
        tokenizer that puts a `▁` at the start of a text, `text` gets none unless it begins with a space
        (it is encoded behind a newline sentinel that is then removed). Otherwise = `encode(text)`."""
        if not self.adds_prefix_space:
            return self.encode(text)
        if self._sentinel is None:
            self._sentinel = self.encode("\n")
        s = self._sentinel
        full = self.encode("\n" + text)
        if full[:len(s)] == s:
            return full[len(s):]
        return self.encode(text)  # the sentinel merged with the text: cannot separate them

    def encode_pieces(self, texts: Sequence[str], first: bool = True) -> list[list[int]]:
        """Consecutive pieces of one text, each encoded on its own: the first (with `first`) as `encode`,
        the rest as `encode_continuation`. Concatenated, they are the ids the model reads; the ids of the
        pieces before any point are exactly `encode` of the text before that point when no merge crosses
        a piece boundary (special tokens, pre-token boundaries)."""
        texts = list(texts)
        if not texts:
            return []
        if not self.adds_prefix_space:
            return self.encode_batch(texts)
        return [self.encode(t) if first and k == 0 else self.encode_continuation(t) for k, t in enumerate(texts)]

    def token_bytes(self, i: int) -> bytes | None:
        """The exact bytes token `i` stands for (None for special tokens). Leading spaces included, so a
        byte-level `Ġthe` and a SentencePiece `▁the` compare equal; used to match tokens across
        vocabularies (adaptation) and for byte-fallback statistics."""
        if i in self.special_ids:
            return None
        tok = self.id_to_token(i)
        if tok is None:
            return None
        if self._is_byte_level():
            dec = byte_level_decoder()
            try:
                return bytes(dec[c] for c in tok)
            except KeyError:
                return tok.encode("utf-8")  # an added (non-special) token stored as text
        if _is_byte_piece(tok):  # SentencePiece-style byte fallback
            return bytes([int(tok[3:5], 16)])
        return tok.replace("\u2581", " ").encode("utf-8")

    def is_byte_fallback(self, i: int) -> bool:
        """True for a token that stands for a bare byte rather than text: `<0xNN>` pieces, or byte-level
        BPE tokens whose bytes are not valid UTF-8 on their own."""
        if not self._is_byte_level():
            return _is_byte_piece(self.id_to_token(i) or "")
        b = self.token_bytes(i)
        if b is None:
            return False
        try:
            b.decode("utf-8")
            return False
        except UnicodeDecodeError:
            return True

    def _is_byte_level(self) -> bool:
        if self._byte_level is None:
            self._byte_level = _mentions(_component(self._hf.pre_tokenizer), "ByteLevel") or \
                _mentions(_component(self._hf.decoder), "ByteLevel")
        return self._byte_level

    # -- identity / persistence ---------------------------------------------------------------
    def hash(self) -> str:
        """Stable content hash (16 hex chars) of the backend, i.e. of what decides the ids; tags token shards."""
        h = hashlib.sha256()
        h.update(b"tokenizers\0")
        h.update(json.dumps(json.loads(self._hf.to_str()), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()[:16]

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json (or tokenizer.model) + tokenizer_config.json into `out_dir` atomically;
        dhad and transformers load the result to this same tokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._sp is None:
            atomic_write_bytes(out / "tokenizer.json", self._hf.to_str(pretty=True).encode("utf-8"))
        else:
            atomic_write_bytes(out / "tokenizer.model", self._sp.serialized_model_proto())
        atomic_write_bytes(out / "tokenizer_config.json",
                           (json.dumps(self.full_config(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return out

    def full_config(self) -> dict:
        """tokenizer_config.json contents that transformers' AutoTokenizer reads to this same tokenizer."""
        cfg = dict(self.config)
        if self._sp is None:
            cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
            added = {}
            for i, t in sorted(self._hf.get_added_tokens_decoder().items()):
                added[str(i)] = {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                 "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            cfg.setdefault("added_tokens_decoder", added)
        else:
            cfg.setdefault("tokenizer_class", "LlamaTokenizer")
            for key, default in LLAMA_DEFAULT_SPECIALS.items():
                cfg.setdefault(key, default)
            cfg.setdefault("legacy", False)
        cfg.setdefault("clean_up_tokenization_spaces", False)
        cfg.setdefault("model_max_length", 2048)
        return cfg

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind}, vocab_size={self.vocab_size}, hash={self.hash()})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a model/tokenizer directory, a tokenizer.json or a tokenizer.model.

    A directory with tokenizer.json wins over tokenizer.model (transformers does the same).
    tokenizer_config.json next to it supplies the class, special tokens, BOS/EOS flags and the chat
    template (`chat_template.jinja`, transformers 5's layout, is read too).
    """
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer not found: {p} does not exist")
    if p.is_dir():
        d = p
        if (d / "tokenizer.json").is_file():
            f = d / "tokenizer.json"
        elif (d / "tokenizer.model").is_file():
            f = d / "tokenizer.model"
        else:
            raise TokenizerError(f"no tokenizer in {d}: expected tokenizer.json or tokenizer.model")
    else:
        f, d = p, p.parent
    config: dict = {}
    cfg_file = d / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{cfg_file}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{cfg_file}: expected a JSON object")
    if "chat_template" not in config and (d / "chat_template.jinja").is_file():  # transformers 5 layout
        config["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if f.suffix == ".json":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(f))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise TokenizerError(f"{f}: not a valid tokenizer.json ({e})") from None
        return Tokenizer(hf=hf, config=config)
    if f.suffix == ".model":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(f))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"{f}: not a valid SentencePiece model ({e})") from None
        if not _sp_is_bpe(sp):
            raise TokenizerError(f"{f}: a SentencePiece unigram model; dhad reads SentencePiece BPE models (the Llama "
                                 "family's) -- convert it to tokenizer.json with transformers")
        return Tokenizer(sp=sp, config=config)
    raise TokenizerError(f"{f}: unknown tokenizer file (expected tokenizer.json or tokenizer.model)")


def _sp_is_bpe(sp) -> bool:
    # ModelProto.trainer_spec (field 2) .model_type (field 3): 1 unigram (the default), 2 BPE
    spec = next((v for num, v in _proto_fields(sp.serialized_model_proto()) if num == 2), b"")
    return next((v for num, v in _proto_fields(spec) if num == 3), 1) == 2


def sp_piece_types(sp) -> list[int]:
    """The type of every piece of a SentencePiece model (1 normal, 2 unknown, 3 control, 4 user-defined,
    5 unused, 6 byte), read from the serialized ModelProto (repeated field 1; type is field 3)."""
    out = []
    for num, v in _proto_fields(sp.serialized_model_proto()):
        if num == 1:
            out.append(next((t for n, t in _proto_fields(v) if n == 3), 1))
    return out


def _varint_at(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        x = b[i]
        i += 1
        n |= (x & 0x7F) << shift
        shift += 7
        if not x & 0x80:
            return n, i


def _proto_fields(b: bytes):
    """(field number, value) of a serialized protobuf message, in order (varint -> int, else bytes);
    enough to read a SentencePiece model without a protobuf runtime."""
    i = 0
    while i < len(b):
        key, i = _varint_at(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint_at(b, i)
        elif wt == 2:
            n, i = _varint_at(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        else:
            raise TokenizerError(f"not a SentencePiece model: unexpected protobuf wire type {wt}")
        yield num, v


# ----------------------------------------------------------------------------------------------
# model config <-> tokenizer consistency

_WARNED: set[tuple] = set()


def special_ids_of(tok: Tokenizer) -> dict[str, int | None]:
    """The bos/eos/pad ids a model config should hold for this tokenizer (pad: None when it names none)."""
    pad = tok._special_id("pad_token")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": pad}


def check_config_ids(config, tok: Tokenizer, where: str = "model") -> list[str]:
    """Warn (once per disagreement) where a model config's bos/eos/pad ids disagree with its tokenizer;
    returns the messages. `config` is a dhad Config or a config.json dict. An eos list (Llama-3's
    generation config) agrees when it holds the tokenizer's eos; a pad the tokenizer lacks is not checked."""
    want = special_ids_of(tok)
    out = []
    for key, t in want.items():
        c = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if t is None or c is None:
            continue
        ok = t in c if isinstance(c, (list, tuple)) else c == t
        if not ok:
            msg = (f"{where}: config {key} = {c} but the tokenizer's {key.replace('_id', '')} is id {t} "
                   f"({tok.id_to_token(t)!r}); generation and training use the config's value")
            out.append(msg)
            if (where, key, str(c), t) not in _WARNED:
                _WARNED.add((where, key, str(c), t))
                warnings.warn(msg, stacklevel=2)
    return out
