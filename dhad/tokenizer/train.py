"""Training dhad's tokenizers: the Arabic-aware byte-level BPE (Jais-family style) and the SentencePiece
BPE (Llama-2 / ALLaM style), on a per-language weighted mix of corpus files.

Design choices
- dhad's own BPE is byte level (every string encodes, nothing is ever unknown) with an Arabic-aware
  pre-tokenizer: a "word" is letters *and combining marks* (`[\\p{L}\\p{M}]+`), so Arabic diacritics
  (harakat are category Mn) and attached clitics stay inside the word they belong to. GPT-2's
  `?\\p{L}+` would cut a fully vocalised word at every haraka. Digits are split one per token by
  default (as Llama-2's `split_digits`), which keeps number handling uniform for Arabic-Indic and
  Western digits alike.
- No normalisation by default: `decode(encode(x)) == x` for any string. Arabic normalisation
  (tatweel removal, alef/yaa/taa-marbuta folding, diacritics stripping) is available but off; see
  docs/tokenizers.md for why.
- A trained tokenizer carries the tokenizer_config.json it is saved with, so the tokenizer in memory
  encodes exactly as the saved one does when dhad or transformers reads it back.
"""
from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dhad.tokenizer.core import DEFAULT_SPECIAL_TOKENS, N_BYTES, Tokenizer, TokenizerError

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
    """The chat template written into tokenizer_config.json: `dhad.prompts`' template of a format
    (jais, jais-legacy, chatml, llama2/allam)."""
    from dhad import prompts

    fmt = prompts.ALIASES.get(name, name)
    if fmt not in prompts.FORMATS:
        raise TokenizerError(f"unknown chat template {name!r}: choose one of {', '.join(prompts.FORMATS)}, allam, "
                             "a .jinja file or none")
    return prompts.FORMATS[fmt].template


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
    """None, a format name ("default" = jais), or a Jinja template as is."""
    if chat_template is None:
        return None
    if chat_template == "default":
        return default_chat_template("jais")
    if "{" not in chat_template:  # a name, not a template
        return default_chat_template(chat_template)
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
    no normalisation, dummy prefix, BOS added by `encode(..., add_special_tokens=True)`. This is the
    base format the Jais-adapted recipe extends."""
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
    # Llama-2 / ALLaM: transformers' LlamaTokenizer, BOS added to every encoded text, no prefix space after
    # a special token (legacy false)
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
           "model_max_length": model_max_length}
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

