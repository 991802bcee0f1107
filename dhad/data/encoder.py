"""The tokenizer as the data pipeline sees it: documents for pretraining, and piecewise encoding of
rendered chat segments (exact loss masks) for SFT / preference data. Every id comes from the one
`Tokenizer.encode` (dhad.tokenizer.core), the same call that serving, generation and evaluation make.

Documents are encoded with `add_special_tokens=True`: a tokenizer that adds BOS (Llama, ALLaM, Llama-3's
post-processor) starts every document with it, as every prompt the model is later served starts with it;
Jais-style tokenizers add nothing. The shard writer then ends each document with EOS.

Why piecewise for chat: ``render_segments`` (dhad.prompts) cuts a conversation into ``(text, is_loss)``
pieces. We encode each piece on its own and concatenate, so every token belongs to exactly one piece
and the mask is exact by construction -- no character-offset bookkeeping, no token straddling a
prompt/answer boundary. The first piece is `encode(text)` of the rendered prompt, exactly what the
server and `dhad generate` send for the same conversation (special-token strings such as ``<s>`` or
``<|im_start|>`` in it are one id each); later pieces are continuations (no dummy-prefix ``▁`` for
SentencePiece-style tokenizers). The price: a merge across a piece boundary never happens (e.g.
"[|AI|]" + " answer" is never one token) -- the same convention as generation, where the prompt is
encoded and the model then emits the answer's tokens after it.
"""
from __future__ import annotations

import os
import re
from functools import cached_property


class Encoder:
    def __init__(self, path: str | os.PathLike):
        from dhad.tokenizer import load_tokenizer
        self.path = str(path)
        self.tok = load_tokenizer(path)
        self.kind = self.tok.kind
        self.vocab_size = int(self.tok.vocab_size)
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"{path}: tokenizer has no eos token (needed to separate documents)")
        self.eos_token_id = int(eos)
        pad = self.tok.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        bos = self.tok.bos_token_id
        self.bos_token_id = int(bos) if bos is not None else None
        self.eos_token = self.tok.id_to_token(self.eos_token_id)
        self.hash = self.tok.hash()

    @cached_property
    def special_strings(self) -> dict[str, int]:
        """Text form -> id of every special token (documents must not smuggle these in as text)."""
        return self.tok.special_strings

    @cached_property
    def _special_re(self):
        if not self.special_strings:
            return None
        return re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special_strings, key=len, reverse=True)) + ")")

    def strip_specials(self, text: str) -> tuple[str, int]:
        """Remove special-token strings from raw text; returns (text, number removed)."""
        if self._special_re is None:
            return text, 0
        out, n = self._special_re.subn("", text)
        return out, n

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A document's ids (BOS/EOS as the tokenizer adds them; the shard writer appends EOS)."""
        return self.tok.encode(text, add_special_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many documents (parallel in Rust)."""
        return self.tok.encode_batch(texts, add_special_tokens=True)

    def encode_pieces(self, texts: list[str], first: bool = True) -> list[list[int]]:
        """Encode consecutive pieces of one rendered text (`Tokenizer.encode_pieces`; no BOS added: a
        rendered chat carries its own)."""
        return self.tok.encode_pieces(texts, first=first)

    def encode_segments(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """(ids, mask) for rendered chat pieces: mask 1 on tokens of ``is_loss`` pieces."""
        ids: list[int] = []
        mask: list[int] = []
        for t, (_, loss) in zip(self.encode_pieces([text for text, _ in pieces]), pieces):
            ids += t
            mask += [1 if loss else 0] * len(t)
        return ids, mask
