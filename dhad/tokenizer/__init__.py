"""Tokenizers: one `Tokenizer` whose `encode`/`decode` equal transformers' for the same directory (every
kind: byte-level BPE, SentencePiece-style tokenizer.json, tokenizer.model), training, statistics and
vocabulary extension.

    core     Tokenizer, load_tokenizer, TokenizerError: the one rule that turns text into ids
    train    dhad's byte-level BPE and SentencePiece training, corpora and language mixes
    stats    fertility, chars/token, byte-fallback rate
    extend   adding Arabic tokens to a base vocabulary (Jais-adapted)
"""
from dhad.tokenizer.core import (
    DEFAULT_SPECIAL_TOKENS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    N_BYTES,
    Tokenizer,
    TokenizerError,
    byte_level_decoder,
    byte_level_encoder,
    check_config_ids,
    special_ids_of,
)
from dhad.tokenizer.core import load_tokenizer as _load_tokenizer_files
from dhad.tokenizer.extend import ExtendReport, extend_tokenizer, is_arabic_char, learn_donor
from dhad.tokenizer.stats import TokenStats, format_stats_table, plot_stats, token_stats
from dhad.tokenizer.train import (
    ArabicNormalization,
    Source,
    build_bpe_tokenizer,
    default_chat_template,
    mix_sources,
    parse_sources,
    pretokenizer_pattern,
    read_texts,
    train_bpe,
    train_sentencepiece,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_SPECIAL_TOKENS", "ENDOFTEXT", "IM_END", "IM_START", "N_BYTES", "Tokenizer", "TokenizerError",
    "byte_level_decoder", "byte_level_encoder", "check_config_ids", "load_tokenizer", "special_ids_of",
    "ExtendReport", "extend_tokenizer", "is_arabic_char", "learn_donor",
    "TokenStats", "format_stats_table", "plot_stats", "token_stats",
    "ArabicNormalization", "Source", "build_bpe_tokenizer", "default_chat_template", "mix_sources", "parse_sources",
    "pretokenizer_pattern", "read_texts", "train_bpe", "train_sentencepiece", "train_tokenizer",
]


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer from a model/tokenizer directory, a tokenizer.json or tokenizer.model
    (`dhad.tokenizer.core.load_tokenizer`), or a GGUF file's metadata (`dhad.tokenizer.gguf_vocab`)."""
    from pathlib import Path
    p = Path(path)
    if p.is_file() and p.suffix not in (".json", ".model"):
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or p.suffix.lower() == ".gguf":  # any name: Ollama's blobs are sha256-...
            from dhad.tokenizer.gguf_vocab import load_gguf_tokenizer
            return load_gguf_tokenizer(p)
    return _load_tokenizer_files(path)
