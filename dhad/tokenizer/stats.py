"""Tokenizer statistics: fertility (tokens per word), characters per token and byte-fallback rate per
language, as a table and a bar chart (`dhad tokenizer stats`)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dhad.tokenizer.core import Tokenizer


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

