"""Tokenizers: one wrapper over Hugging Face `tokenizers` (tokenizer.json) and SentencePiece (tokenizer.model).

Design choices
- Jais-family uses a byte-level BPE (84,992 tokens, `<|endoftext|>` = id 0 as bos/eos/pad/unk);
  Jais-adapted / ALLaM use Llama-2's SentencePiece BPE (unk 0, bos 1, eos 2) extended with Arabic
  pieces. Both formats load through `load_tokenizer`, which returns the same small `Tokenizer` API, so
  the data, generation and evaluation code never branch on the format.
- dhad's own BPE is byte level (every string encodes, nothing is ever unknown) with an Arabic-aware
  pre-tokenizer: a "word" is letters *and combining marks* (`[\\p{L}\\p{M}]+`), so Arabic diacritics
  (harakat are category Mn) and attached clitics stay inside the word they belong to. GPT-2's
  `?\\p{L}+` would cut a fully vocalised word at every haraka. Digits are split one per token by
  default (as Llama-2's `split_digits`), which keeps number handling uniform for Arabic-Indic and
  Western digits alike.
- No normalisation by default: `decode(encode(x)) == x` for any string. Arabic normalisation
  (tatweel removal, alef/yaa/taa-marbuta folding, diacritics stripping) is available but off; see
  docs/tokenizers.md for why.
- `hash()` is a content hash of what decides the ids (the tokenizer.json / model proto), used to tag
  token shards so a shard is never read with the wrong tokenizer.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from dhad.utils import atomic_write_bytes as _atomic_write

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# id 0 is <|endoftext|> (bos/eos/pad/unk, as in Jais); ChatML markers for dhad's own chat models.
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

N_BYTES = 256  # byte-level alphabet size

# Arabic-aware pre-tokenization (onig regex, used by `tokenizers.pre_tokenizers.Split`).
#   1. English contractions, as GPT-2/GPT-4.
#   2. a word: optional leading space + letters/combining marks (+ ZWNJ/ZWJ which join inside words).
#   3. digits, `digit_group` at a time.
#   4. punctuation / symbols / emoji / bidi marks runs, with an optional leading space.
#   5. newlines, then other whitespace (a trailing space stays with the next word: `\s+(?!\S)`).
_ZW = "\u200c\u200d"


def pretokenizer_pattern(digit_group: int = 1) -> str:
    if digit_group < 1:
        raise TokenizerError(f"digit_group must be >= 1, got {digit_group}")
    digits = r"\p{N}" if digit_group == 1 else r"\p{N}{1," + str(digit_group) + "}"
    return (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
        rf"| ?[\p{{L}}\p{{M}}{_ZW}]+"
        rf"|{digits}"
        rf"| ?[^\s\p{{L}}\p{{M}}\p{{N}}{_ZW}]+[\r\n]*"
        r"|\s*[\r\n]+"
        r"|\s+(?!\S)"
        r"|\s+"
    )


class TokenizerError(ValueError):
    """A user-facing tokenizer problem (bad path, empty corpus, impossible vocabulary size, ...)."""


# ----------------------------------------------------------------------------------------------
# Arabic normalisation (optional, off by default)

# Alef with hamza above/below, madda, wasla -> bare alef; alef maqsura -> yaa; taa marbuta -> haa.
ALEF_VARIANTS = "\u0623\u0625\u0622\u0671"
ARABIC_DIACRITICS = "\u064b-\u0652\u0670"  # tanwin, harakat, shadda, sukun, superscript alef
TATWEEL = "\u0640"


@dataclass
class ArabicNormalization:
    """Which Arabic normalisations the tokenizer applies before splitting. All off by default."""

    tatweel: bool = False  # remove kashida (U+0640), a purely typographic stretch
    alef: bool = False  # أ إ آ ٱ -> ا
    yaa: bool = False  # ى -> ي
    taa_marbuta: bool = False  # ة -> ه
    diacritics: bool = False  # strip harakat/tanwin/shadda/sukun

    @classmethod
    def parse(cls, spec: str | None) -> ArabicNormalization:
        """`"tatweel,alef"` -> flags; `"all"`; `None`/`""`/`"none"` -> all off."""
        out = cls()
        if not spec or spec == "none":
            return out
        names = [f for f in cls.__dataclass_fields__]
        parts = names if spec == "all" else [p.strip() for p in spec.split(",") if p.strip()]
        for p in parts:
            p = p.replace("-", "_")
            if p not in names:
                raise TokenizerError(f"unknown Arabic normalization {p!r}; choose from {', '.join(names)}, all")
            setattr(out, p, True)
        return out

    def any(self) -> bool:
        return any(getattr(self, f) for f in self.__dataclass_fields__)

    def apply(self, text: str) -> str:
        """The same normalisation in Python (for corpora/stats; the tokenizer does it in Rust)."""
        import re

        if self.tatweel:
            text = text.replace(TATWEEL, "")
        if self.alef:
            text = re.sub(f"[{ALEF_VARIANTS}]", "\u0627", text)
        if self.yaa:
            text = text.replace("\u0649", "\u064a")
        if self.taa_marbuta:
            text = text.replace("\u0629", "\u0647")
        if self.diacritics:
            text = re.sub(f"[{ARABIC_DIACRITICS}]", "", text)
        return text

    def hf_normalizer(self):
        from tokenizers import Regex, normalizers

        steps = []
        if self.tatweel:
            steps.append(normalizers.Replace(TATWEEL, ""))
        if self.alef:
            steps.append(normalizers.Replace(Regex(f"[{ALEF_VARIANTS}]"), "\u0627"))
        if self.yaa:
            steps.append(normalizers.Replace("\u0649", "\u064a"))
        if self.taa_marbuta:
            steps.append(normalizers.Replace("\u0629", "\u0647"))
        if self.diacritics:
            steps.append(normalizers.Replace(Regex(f"[{ARABIC_DIACRITICS}]"), ""))
        return normalizers.Sequence(steps) if steps else None


# ----------------------------------------------------------------------------------------------
# chat template


def default_chat_template(name: str = "jais") -> str:
    """The chat template written into tokenizer_config.json.

    Templates live in `dhad.prompts` (one place for every family's format); until that module is
    importable we fall back to a ChatML template using our own `<|im_start|>`/`<|im_end|>` tokens.
    """
    try:
        from dhad import prompts  # owned by the prompts module; optional here
    except Exception:  # noqa: BLE001 - any import problem -> fallback, the tokenizer must still work
        prompts = None
    attr = f"{name.upper()}_CHAT_TEMPLATE"
    if prompts is not None and isinstance(getattr(prompts, attr, None), str):
        return getattr(prompts, attr)
    return CHATML_TEMPLATE


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# the wrapper


def _token_str(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


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


class Tokenizer:
    """encode/decode + special ids + chat template, for a HF tokenizer.json or a SentencePiece model."""

    def __init__(self, hf=None, sp=None, config: dict | None = None):
        if (hf is None) == (sp is None):
            raise ValueError("Tokenizer needs exactly one of hf= (tokenizers.Tokenizer) or sp= (SentencePieceProcessor)")
        self._hf = hf
        self._sp = sp
        self.config: dict = dict(config or {})
        self._byte_level = None
        self._special_ids = None

    # -- construction ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return "bpe" if self._hf is not None else "sentencepiece"

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer` or `sentencepiece.SentencePieceProcessor`."""
        return self._hf if self._hf is not None else self._sp

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return None if (i == self._sp.unk_id() and token != self._sp.id_to_piece(i)) else i

    def id_to_token(self, i: int) -> str | None:
        if self._hf is not None:
            return self._hf.id_to_token(i)
        return self._sp.id_to_piece(i) if 0 <= i < self._sp.get_piece_size() else None

    def get_vocab(self) -> dict[str, int]:
        if self._hf is not None:
            return self._hf.get_vocab(with_added_tokens=True)
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    def _special_id(self, key: str, hf_default: str | None, sp_fn: str) -> int | None:
        tok = _token_str(self.config.get(key))
        if tok is not None:
            return self.token_to_id(tok)
        if key in self.config:  # explicitly null
            return None
        if self._hf is not None:
            return self._hf.token_to_id(hf_default) if hf_default else None
        i = getattr(self._sp, sp_fn)()
        return None if i < 0 else i

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token", ENDOFTEXT, "bos_id")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token", ENDOFTEXT, "eos_id")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token", ENDOFTEXT, "unk_id")

    @property
    def pad_token_id(self) -> int | None:
        """The pad id; falls back to eos (as Jais, whose pad is <|endoftext|>) when none is defined."""
        i = self._special_id("pad_token", ENDOFTEXT, "pad_id")
        return self.eos_token_id if i is None else i

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special/control tokens (never produced from ordinary text)."""
        if self._special_ids is None:
            if self._hf is not None:
                ids = {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
            else:
                sp = self._sp
                ids = {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
            self._special_ids = frozenset(ids)
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self.config["chat_template"] = value

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. `add_special_tokens` prepends bos when the tokenizer's config says
        so (`add_bos_token`, Llama/ALLaM style); Jais-style tokenizers add nothing."""
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp.encode(text)
        return self._add_special(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Many texts at once (parallel in Rust for tokenizer.json)."""
        if self._hf is not None:
            # encode_batch_fast skips character offsets, which we never use
            fn = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
            out = [e.ids for e in fn(list(texts), add_special_tokens=False)]
        else:
            out = self._sp.encode(list(texts))
        return [self._add_special(x) for x in out] if add_special_tokens else out

    def _add_special(self, ids: list[int]) -> list[int]:
        default_bos = self.kind == "sentencepiece"
        if self.config.get("add_bos_token", default_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if self.config.get("add_eos_token", False) and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._sp.decode(ids)

    def token_bytes(self, i: int) -> bytes | None:
        """The exact bytes token `i` stands for (None for special/control tokens). Leading spaces
        included, so a byte-level `Ġthe` and a SentencePiece `▁the` compare equal; used to match
        tokens across vocabularies (adaptation) and for byte-fallback statistics."""
        if i in self.special_ids:
            return None
        tok = self.id_to_token(i)
        if tok is None:
            return None
        if self._hf is not None:
            if self._is_byte_level():
                dec = byte_level_decoder()
                try:
                    return bytes(dec[c] for c in tok)
                except KeyError:
                    return tok.encode("utf-8")  # an added (non-special) token stored as text
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):  # Llama tokenizer.json byte fallback
                return bytes([int(tok[3:5], 16)])
            return tok.replace("\u2581", " ").encode("utf-8")
        if self._sp.is_byte(i):
            return bytes([int(tok[3:5], 16)])  # "<0xE2>"
        return tok.replace("\u2581", " ").encode("utf-8")

    def is_byte_fallback(self, i: int) -> bool:
        """True for a token that stands for a bare byte rather than text: SentencePiece `<0xNN>`
        pieces, or byte-level BPE tokens whose bytes are not valid UTF-8 on their own."""
        if self._sp is not None:
            return self._sp.is_byte(i)
        if not self._is_byte_level():
            t = self.id_to_token(i) or ""
            return len(t) == 6 and t.startswith("<0x") and t.endswith(">")
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
            d = json.loads(self._hf.to_str())
            self._byte_level = _mentions_byte_level(d.get("pre_tokenizer")) or _mentions_byte_level(d.get("decoder"))
        return self._byte_level

    # -- identity / persistence ---------------------------------------------------------------
    def hash(self) -> str:
        """Stable content hash (16 hex chars) of what decides the ids; tags token shards."""
        h = hashlib.sha256()
        if self._hf is not None:
            h.update(b"tokenizers\0")
            h.update(json.dumps(json.loads(self._hf.to_str()), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        else:
            h.update(b"sentencepiece\0")
            h.update(self._sp.serialized_model_proto())
        return h.hexdigest()[:16]

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json (or tokenizer.model) + tokenizer_config.json into `out_dir` atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._hf is not None:
            _atomic_write(out / "tokenizer.json", self._hf.to_str(pretty=True).encode("utf-8"))
        else:
            _atomic_write(out / "tokenizer.model", self._sp.serialized_model_proto())
        _atomic_write(out / "tokenizer_config.json", (json.dumps(self.full_config(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return out

    def full_config(self) -> dict:
        """tokenizer_config.json contents that transformers' AutoTokenizer understands."""
        cfg = dict(self.config)
        if self._hf is not None:
            cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
            added = {}
            for i, t in sorted(self._hf.get_added_tokens_decoder().items()):
                added[str(i)] = {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                 "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            cfg.setdefault("added_tokens_decoder", added)
        else:
            sp = self._sp
            cfg.setdefault("tokenizer_class", "LlamaTokenizer")
            for key, fn in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("unk_token", "unk_id"), ("pad_token", "pad_id")):
                i = getattr(sp, fn)()
                cfg.setdefault(key, sp.id_to_piece(i) if i >= 0 else None)
            cfg.setdefault("add_bos_token", True)
            cfg.setdefault("add_eos_token", False)
            cfg.setdefault("legacy", False)
        cfg.setdefault("clean_up_tokenization_spaces", False)
        cfg.setdefault("model_max_length", 2048)
        return cfg

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind}, vocab_size={self.vocab_size}, hash={self.hash()})"


def _mentions_byte_level(node) -> bool:
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return True
        return any(_mentions_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_mentions_byte_level(v) for v in node)
    return False


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a model/tokenizer directory, a tokenizer.json or a tokenizer.model.

    A directory with tokenizer.json wins over tokenizer.model (transformers' fast tokenizer does the
    same). tokenizer_config.json next to it supplies special tokens and the chat template.
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
        return Tokenizer(sp=sp, config=config)
    raise TokenizerError(f"{f}: unknown tokenizer file (expected tokenizer.json or tokenizer.model)")


# ----------------------------------------------------------------------------------------------
# training


def _base_config(special_tokens: Sequence[str], chat_template: str | None, model_max_length: int) -> dict:
    first = special_tokens[0] if special_tokens else None
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # Jais: <|endoftext|> (id 0) is bos, eos, pad and unk; no BOS is added automatically.
        "bos_token": first,
        "eos_token": first,
        "pad_token": first,
        "unk_token": first,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg


def _resolve_template(chat_template: str | None) -> str | None:
    if chat_template is None:
        return None
    if chat_template in ("jais", "chatml", "llama2", "allam") or chat_template == "default":
        return default_chat_template("jais" if chat_template == "default" else chat_template)
    return chat_template


def build_bpe_tokenizer(vocab: dict[str, int] | None = None, merges: list | None = None, *,
                        normalization: ArabicNormalization | None = None, digit_group: int = 1):
    """An (untrained or given) byte-level BPE `tokenizers.Tokenizer` with dhad's pre-tokenizer."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    model = models.BPE(vocab=vocab, merges=merges) if vocab is not None else models.BPE()
    tok = HFTokenizer(model)
    norm = (normalization or ArabicNormalization()).hf_normalizer()
    if norm is not None:
        tok.normalizer = norm
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pretokenizer_pattern(digit_group)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *,
              min_frequency: int = 2, normalization: ArabicNormalization | None = None, digit_group: int = 1,
              chat_template: str | None = "default", model_max_length: int = 2048,
              show_progress: bool = False) -> Tokenizer:
    """Train dhad's byte-level BPE on `texts`. Special tokens get ids 0.. in order (`<|endoftext|>` = 0).

    Fast enough for tests: a few hundred KB and a vocabulary of ~1,000 train in well under a second.
    """
    from tokenizers import pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise TokenizerError(f"duplicate special tokens: {special_tokens}")
    need = N_BYTES + len(special_tokens)
    if vocab_size < need:
        raise TokenizerError(f"vocab_size {vocab_size} is smaller than the alphabet: a byte-level BPE needs at least "
                             f"{N_BYTES} byte tokens + {len(special_tokens)} special tokens = {need}")
    tok = build_bpe_tokenizer(normalization=normalization, digit_group=digit_group)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    n_chars = 0

    def counted():
        nonlocal n_chars
        for t in texts:
            if not isinstance(t, str):
                raise TokenizerError(f"training texts must be str, got {type(t).__name__}")
            if t:
                n_chars += len(t)
                yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_chars == 0:
        raise TokenizerError("empty corpus: no text to train the tokenizer on")
    return Tokenizer(hf=tok, config=_base_config(special_tokens, _resolve_template(chat_template), model_max_length))


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, user_defined_symbols: Sequence[str] = (),
                        character_coverage: float = 0.9995, chat_template: str | None = None,
                        model_max_length: int = 4096, max_sentence_length: int = 16384,
                        num_threads: int = 2) -> Tokenizer:
    """Train a Llama-2/ALLaM-style SentencePiece BPE: unk 0, bos 1, eos 2, byte fallback, split digits,
    no normalisation, dummy prefix. This is the base format the Jais-adapted recipe extends."""
    import sentencepiece as spm

    def lines():
        for t in texts:
            for line in t.splitlines():
                if line.strip():
                    yield line

    it = lines()
    try:
        first = next(it)
    except StopIteration:
        raise TokenizerError("empty corpus: no text to train the tokenizer on") from None
    need = N_BYTES + 3 + len(user_defined_symbols)
    if vocab_size < need:
        raise TokenizerError(f"vocab_size {vocab_size} is smaller than the alphabet: a byte-fallback SentencePiece "
                             f"model needs at least {N_BYTES} byte pieces + 3 control pieces"
                             f"{f' + {len(user_defined_symbols)} user symbols' if user_defined_symbols else ''} = {need}")

    def all_lines():
        yield first
        yield from it

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_lines(), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            character_coverage=character_coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=list(user_defined_symbols), max_sentence_length=max_sentence_length,
            num_threads=num_threads, minloglevel=2, train_extremely_large_corpus=False,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size is smaller than required_chars" in msg or "vocab_size" in msg.lower():
            raise TokenizerError(f"vocab_size {vocab_size} is too small for this corpus: {msg.strip()}") from None
        raise TokenizerError(f"SentencePiece training failed: {msg.strip()}") from None
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    cfg = {"model_max_length": model_max_length}
    if chat_template:
        cfg["chat_template"] = _resolve_template(chat_template)
    return Tokenizer(sp=sp, config=cfg)


# ----------------------------------------------------------------------------------------------
# corpora


def read_texts(path: str | os.PathLike, field: str | None = None, max_chars: int | None = None) -> Iterator[str]:
    """Texts of a corpus file: `.txt` -> one text per non-empty line; `.jsonl` -> `row[field]` (default:
    `text`, else the only string field). Errors name the file and row."""
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"corpus file not found: {p}")
    n = 0
    with p.open(encoding="utf-8") as f:
        if p.suffix == ".jsonl":
            for row_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TokenizerError(f"{p}: row {row_no}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise TokenizerError(f"{p}: row {row_no}: expected a JSON object")
                key = field
                if key is None:
                    if "text" in row:
                        key = "text"
                    else:
                        strs = [k for k, v in row.items() if isinstance(v, str)]
                        if len(strs) != 1:
                            raise TokenizerError(f"{p}: row {row_no}: no 'text' field; say which field to use "
                                                 f"(one of {', '.join(strs) or 'none'})")
                        key = strs[0]
                v = row.get(key)
                if not isinstance(v, str):
                    raise TokenizerError(f"{p}: row {row_no}: field {key!r} missing or not a string")
                if v:
                    yield v
                    n += len(v)
                    if max_chars is not None and n >= max_chars:
                        return
        else:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
                    n += len(line)
                    if max_chars is not None and n >= max_chars:
                        return


@dataclass
class Source:
    """One language of a training mix: its files and its sampling weight (share of characters)."""

    lang: str
    paths: list[Path]
    weight: float = 1.0
    field: str | None = None


def parse_sources(specs: Sequence[str], weights: Sequence[str] = (), field: str | None = None) -> list[Source]:
    """`["arabic=a.txt,b.jsonl", "english=c.txt"]` + `["arabic=2", "english=1"]` -> Sources.

    A path may be a directory (all .txt/.jsonl files in it, sorted)."""
    out: dict[str, Source] = {}
    for s in specs:
        lang, sep, rest = s.partition("=")
        if not sep:
            lang, rest = Path(s).stem, s
        paths: list[Path] = []
        for part in rest.split(","):
            part = part.strip()
            if not part:
                continue
            q = Path(part)
            if q.is_dir():
                files = sorted(x for x in q.iterdir() if x.suffix in (".txt", ".jsonl"))
                if not files:
                    raise TokenizerError(f"no .txt or .jsonl files in {q}")
                paths.extend(files)
            elif q.is_file():
                paths.append(q)
            else:
                raise TokenizerError(f"corpus file not found: {q}")
        src = out.setdefault(lang, Source(lang, [], 1.0, field))
        src.paths.extend(paths)
    for w in weights:
        lang, sep, val = w.partition("=")
        if not sep or lang not in out:
            raise TokenizerError(f"bad weight {w!r}: expected LANG=W with LANG one of {', '.join(out) or '(none)'}")
        try:
            out[lang].weight = float(val)
        except ValueError:
            raise TokenizerError(f"bad weight {w!r}: {val!r} is not a number") from None
        if out[lang].weight < 0:
            raise TokenizerError(f"bad weight {w!r}: must be >= 0")
    if not out:
        raise TokenizerError("no input corpus given")
    return list(out.values())


def mix_sources(sources: Sequence[Source], total_chars: int, seed: int = 0) -> list[str]:
    """Sample a training mix where each language gets `weight / sum(weights)` of `total_chars`.

    Texts are shuffled per language and taken until the language's share is reached; a language with
    less text than its share is repeated (BPE counts are what the weights change, so repetition is
    exactly up-weighting)."""
    wsum = sum(s.weight for s in sources)
    if wsum <= 0:
        raise TokenizerError("all language weights are zero")
    rng = random.Random(seed)
    mix: list[str] = []
    for s in sources:
        budget = int(total_chars * s.weight / wsum)
        if budget <= 0:
            continue
        texts = [t for p in s.paths for t in read_texts(p, s.field, max_chars=None if budget > 50_000_000 else 4 * budget)]
        if not texts:
            raise TokenizerError(f"empty corpus for {s.lang}: {', '.join(map(str, s.paths))} contain no text")
        rng.shuffle(texts)
        got = 0
        i = 0
        while got < budget:
            t = texts[i % len(texts)]
            mix.append(t)
            got += len(t)
            i += 1
    rng.shuffle(mix)
    return mix


def train_tokenizer(sources: Sequence[Source], vocab_size: int, *, kind: str = "bpe", total_chars: int = 20_000_000,
                    seed: int = 0, **kw) -> Tokenizer:
    """Train on a per-language weighted mix (`kind` = "bpe" or "sentencepiece")."""
    texts = mix_sources(sources, total_chars, seed)
    if kind == "bpe":
        return train_bpe(texts, vocab_size, **kw)
    if kind in ("sentencepiece", "spm", "sp"):
        return train_sentencepiece(texts, vocab_size, **kw)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}: choose bpe or sentencepiece")


# ----------------------------------------------------------------------------------------------
# statistics


@dataclass
class TokenStats:
    tokenizer: str
    lang: str
    n_texts: int = 0
    n_chars: int = 0
    n_words: int = 0
    n_tokens: int = 0
    n_byte_tokens: int = 0

    @property
    def fertility(self) -> float:
        """tokens per whitespace-separated word"""
        return self.n_tokens / max(1, self.n_words)

    @property
    def chars_per_token(self) -> float:
        return self.n_chars / max(1, self.n_tokens)

    @property
    def byte_fallback_rate(self) -> float:
        return self.n_byte_tokens / max(1, self.n_tokens)

    def as_dict(self) -> dict:
        return {"tokenizer": self.tokenizer, "lang": self.lang, "texts": self.n_texts, "chars": self.n_chars,
                "words": self.n_words, "tokens": self.n_tokens, "fertility": self.fertility,
                "chars_per_token": self.chars_per_token, "byte_fallback_rate": self.byte_fallback_rate}


def token_stats(tok: Tokenizer, texts: Sequence[str], name: str = "tokenizer", lang: str = "all",
                batch_size: int = 256) -> TokenStats:
    """Fertility, characters per token and byte-fallback rate of `tok` over `texts`."""
    st = TokenStats(name, lang)
    byte_ids = {i for i in range(tok.vocab_size) if tok.is_byte_fallback(i)}
    for k in range(0, len(texts), batch_size):
        chunk = list(texts[k:k + batch_size])
        for t, ids in zip(chunk, tok.encode_batch(chunk), strict=True):
            st.n_texts += 1
            st.n_chars += len(t)
            st.n_words += len(t.split())
            st.n_tokens += len(ids)
            st.n_byte_tokens += sum(1 for i in ids if i in byte_ids)
    return st


def format_stats_table(rows: Sequence[TokenStats]) -> str:
    """Side-by-side table: one line per (tokenizer, language)."""
    head = f"{'tokenizer':<24} {'lang':<10} {'vocab':>7} {'fertility':>9} {'chars/tok':>9} {'byte-fb %':>9} {'tokens':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        vocab = getattr(r, "vocab_size", "")
        lines.append(f"{r.tokenizer[:24]:<24} {r.lang[:10]:<10} {vocab!s:>7} {r.fertility:>9.3f} {r.chars_per_token:>9.3f} "
                     f"{100 * r.byte_fallback_rate:>9.2f} {r.n_tokens:>10,}")
    return "\n".join(lines)


def plot_stats(rows: Sequence[TokenStats], out_png: str | os.PathLike) -> Path:
    """Grouped bar chart of fertility per language, one bar per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(dict.fromkeys(r.lang for r in rows))
    toks = list(dict.fromkeys(r.tokenizer for r in rows))
    val = {(r.tokenizer, r.lang): r.fertility for r in rows}
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(langs) * max(1, len(toks)) / 2), 4))
    width = 0.8 / max(1, len(toks))
    for j, t in enumerate(toks):
        xs = [i + j * width for i in range(len(langs))]
        ax.bar(xs, [val.get((t, lang), 0.0) for lang in langs], width, label=t)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(langs))])
    ax.set_xticklabels(langs)
    ax.set_ylabel("fertility (tokens / word)")
    ax.set_title("tokenizer fertility by language (lower is better)")
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------
# vocabulary extension (Jais-adapted: Llama-2's 32,000 + 32,000 Arabic tokens of the Jais vocabulary)

# UTF-8 lead bytes 0xD8-0xDB encode exactly U+0600-U+06FF (the Arabic block). A merge whose result
# contains one of them can only fire on text that contains an Arabic-block character, which is what
# guarantees that English (any text without such characters) tokenizes exactly as before.
_ARABIC_LEAD_BYTES = frozenset(range(0xD8, 0xDC))
_ARABIC_RANGES = ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))


def is_arabic_char(c: str) -> bool:
    o = ord(c)
    return any(a <= o <= b for a, b in _ARABIC_RANGES)


@dataclass
class ExtendReport:
    base_vocab: int
    donor_vocab: int
    new_vocab: int
    added: int  # tokens added (including intermediate tokens a merge chain needed)
    requested: int
    candidates: int  # donor tokens with Arabic text that the base lacks
    skipped: int  # candidates that could not be added safely (non-Arabic intermediates) or reachably
    by: str
    new_ids: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "new_ids"}
        d["new_id_range"] = [min(self.new_ids), max(self.new_ids)] if self.new_ids else None
        return d


def _merge_pair(m) -> tuple[str, str]:
    if isinstance(m, str):
        a, _, b = m.partition(" ")
        return a, b
    return m[0], m[1]


def _donor_ranked_tokens(donor: Tokenizer) -> tuple[list[str], dict[str, tuple[str, str]] | None]:
    """Donor tokens in priority order (merge rank for BPE, id order for SentencePiece = score order)
    and, for a byte-level BPE donor, the merge that produces each token."""
    if donor.kind == "bpe":
        d = json.loads(donor.backend.to_str())
        if d["model"].get("type") != "BPE":  # WordPiece/WordLevel/Unigram: no merges, id order
            vocab = donor.get_vocab()
            return sorted(vocab, key=vocab.__getitem__), None
        order, recipe = [], {}
        for m in d["model"]["merges"]:
            a, b = _merge_pair(m)
            t = a + b
            if t not in recipe:
                recipe[t] = (a, b)
                order.append(t)
        return order, recipe
    sp = donor.backend
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) is False and not sp.is_byte(i)
            and not sp.is_unknown(i)], None


def extend_tokenizer(base: Tokenizer, donor: Tokenizer, n_add: int, *, by: str = "rank",
                     corpus: Sequence[str] | None = None) -> tuple[Tokenizer, ExtendReport]:
    """Add up to `n_add` Arabic tokens of `donor` that `base` lacks; base ids and English encodings stay.

    by="rank": the donor's most basic/frequent-in-training tokens first (its merge order);
    by="frequency": the donor tokens most used when the donor encodes `corpus`.
    New tokens get ids after the base's; new BPE merges follow the base's merges in the donor's order,
    and only ever involve Arabic-block bytes, so text without Arabic encodes exactly as before.
    """
    if n_add < 1:
        raise TokenizerError(f"--add must be >= 1, got {n_add}")
    if by not in ("rank", "frequency"):
        raise TokenizerError(f"unknown selection {by!r}: choose rank or frequency")
    if by == "frequency" and not corpus:
        raise TokenizerError("selection by frequency needs a corpus (empty corpus given)")
    if base.kind == "bpe":
        return _extend_bpe(base, donor, n_add, by, corpus)
    return _extend_sentencepiece(base, donor, n_add, by, corpus)


def _frequency_order(donor: Tokenizer, corpus: Sequence[str], ranked: list[str], to_key) -> list[str]:
    from collections import Counter

    counts: Counter = Counter()
    for k in range(0, len(corpus), 256):
        for ids in donor.encode_batch(list(corpus[k:k + 256])):
            counts.update(ids)
    pos = {t: r for r, t in enumerate(ranked)}
    by_tok: dict[str, int] = {}
    for i, c in counts.items():
        key = to_key(i)
        if key is not None and key in pos:
            by_tok[key] = by_tok.get(key, 0) + c
    # frequent tokens first, then the rest in rank order (so --add larger than what the corpus uses still fills)
    return sorted(ranked, key=lambda t: (-by_tok.get(t, 0), pos[t]))


def _extend_bpe(base: Tokenizer, donor: Tokenizer, n_add: int, by: str, corpus) -> tuple[Tokenizer, ExtendReport]:
    from tokenizers import Tokenizer as HFTokenizer

    if donor.kind != "bpe" or not donor._is_byte_level() or not base._is_byte_level():
        raise TokenizerError("extending a BPE base needs byte-level BPE base and donor tokenizers (tokenizer.json); "
                             f"got base={base.kind}, donor={donor.kind}. For a Llama/SentencePiece-style base, "
                             "pass its tokenizer.model instead")
    d = json.loads(base.backend.to_str())
    model = d["model"]
    if model.get("type") != "BPE":
        raise TokenizerError(f"base tokenizer model is {model.get('type')}, expected BPE")
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    string_merges = bool(merges) and isinstance(merges[0], str)
    dec = byte_level_decoder()
    ranked, recipe = _donor_ranked_tokens(donor)
    if recipe is None:
        raise TokenizerError("extending a BPE base needs a byte-level BPE donor (with merges); the donor has none")
    rank = {t: r for r, t in enumerate(ranked)}

    def arabic(t: str) -> bool:
        return any(dec.get(c, 0) in _ARABIC_LEAD_BYTES for c in t)

    shared = sum(1 for t in donor.get_vocab() if t in vocab)
    if shared == 0:
        raise TokenizerError("donor and base share no tokens: they are not the same kind of byte-level BPE")
    cands = [t for t in ranked if t not in vocab and arabic(t)]
    order = cands
    if by == "frequency":
        dv = donor
        order = _frequency_order(donor, corpus, cands, lambda i: dv.id_to_token(i))
    chosen: set[str] = set()
    skipped = 0

    def closure(t: str, acc: list[str]) -> bool:
        """Tokens (t and missing ancestors) needed to build t; False if one is not Arabic (unsafe)."""
        if t in vocab or t in chosen or t in acc:
            return True
        if len(t) == 1:
            return False  # a byte the base alphabet lacks: cannot build it
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
    new_tokens = sorted(chosen, key=rank.__getitem__)
    next_id = max(list(vocab.values()) + [t["id"] for t in d.get("added_tokens", [])]) + 1
    new_ids = []
    for t in new_tokens:
        vocab[t] = next_id
        new_ids.append(next_id)
        next_id += 1
        a, b = recipe[t]
        merges.append(f"{a} {b}" if string_merges else [a, b])
    hf = HFTokenizer.from_str(json.dumps(d, ensure_ascii=False))
    out = Tokenizer(hf=hf, config=dict(base.config))
    out.config.pop("added_tokens_decoder", None)
    rep = ExtendReport(base.vocab_size, donor.vocab_size, out.vocab_size, len(new_tokens), n_add, len(cands), skipped,
                       by, new_ids)
    return out, rep


def _extend_sentencepiece(base: Tokenizer, donor: Tokenizer, n_add: int, by: str, corpus) -> tuple[Tokenizer, ExtendReport]:
    import sentencepiece as spm

    bsp = base.backend
    existing = {bsp.id_to_piece(i) for i in range(bsp.get_piece_size())}
    if donor.kind == "bpe":
        ranked_raw, _ = _donor_ranked_tokens(donor)
        dec = byte_level_decoder() if donor._is_byte_level() else None

        def text_of(tok: str) -> str | None:
            if dec is None:
                return tok
            try:
                return bytes(dec[c] for c in tok).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                return None  # partial UTF-8: not expressible as a SentencePiece piece

        ranked = []
        for t in ranked_raw:
            s = text_of(t)
            if s is not None:
                ranked.append(s.replace(" ", "\u2581"))

        def key_of(i: int) -> str | None:
            t = donor.id_to_token(i)
            s = text_of(t) if t is not None else None
            return s.replace(" ", "\u2581") if s is not None else None
    else:
        ranked = _donor_ranked_tokens(donor)[0]

        def key_of(i: int) -> str | None:
            return donor.id_to_token(i)
    # single characters (the donor's alphabet) first: they replace byte fallback for Arabic letters
    chars = [c for c in dict.fromkeys(c for t in ranked for c in t) if is_arabic_char(c)]
    ranked = list(dict.fromkeys(chars + ranked))
    shared = sum(1 for t in ranked if t in existing)
    if shared == 0:
        raise TokenizerError("donor and base share no tokens: nothing to anchor the extension on")
    cands = [t for t in ranked if t not in existing and any(is_arabic_char(c) for c in t)]
    order = cands if by == "rank" else _frequency_order(donor, corpus, cands, key_of)
    pieces_now = set(existing)
    added: list[str] = []
    skipped = 0

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
    sp = spm.SentencePieceProcessor(model_proto=proto)
    out = Tokenizer(sp=sp, config=dict(base.config))
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
    import struct

    raw = piece.encode("utf-8")
    msg = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(type_)
    return b"\x0a" + _varint(len(msg)) + msg
