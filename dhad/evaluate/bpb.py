"""Held-out bits per byte: a tokenizer-independent measure of how well a model predicts text.

    res = bits_per_byte(model, tokenizer, texts, seq_len=512)   # {"bpb", "bytes", "tokens", "nats_per_token"}

The texts are encoded, each followed by EOS, and concatenated into one stream; every token after the
first is a target once. The loss is summed in nats over the targets, divided by ln 2 and by the UTF-8
bytes of the target tokens. Targets that are special tokens (EOS) have no bytes and are left out of
both sums (nanochat's convention), so models with different tokenizers are scored on exactly the same
bytes and their numbers compare. `dhad.evaluate.ngram` scores a count-based model the same way.
"""
from __future__ import annotations

import math

import numpy as np


def text_stream(tok, texts: list[str]) -> list[int]:
    """The token stream scored: every text encoded and followed by EOS."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc)
        ids.append(eos)
    return ids


def token_byte_lengths(tok, size: int | None = None) -> np.ndarray:
    """UTF-8 bytes of every token id (0 for special tokens, and for ids past the tokenizer's vocabulary)."""
    out = np.zeros(max(size or 0, tok.vocab_size), dtype=np.int64)
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        out[i] = len(b) if b is not None else 0
    return out


def bits_per_byte(model, tok, texts: list[str], seq_len: int, batch_size: int = 8, device=None) -> dict:
    """Held-out bits per UTF-8 byte of `texts` under `model`: the stream (`text_stream`) is cut into
    non-overlapping windows of `seq_len` + 1 tokens that share one token with the next (each window's
    first token has no target, so every token after the stream's first is predicted once)."""
    import torch
    import torch.nn.functional as F

    device = device or model.device
    eos = tok.eos_token_id
    ids = text_stream(tok, texts)
    nbytes = torch.from_numpy(token_byte_lengths(tok, model.config.vocab_size)).double()
    stream = torch.tensor(ids, dtype=torch.long)
    windows = [stream[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    nll = 0.0
    total_bytes = 0.0
    n_tokens = 0
    model.eval()
    with torch.inference_mode():
        for k in range(0, len(windows), batch_size):
            group = windows[k:k + batch_size]
            T = max(len(w) for w in group) - 1
            x = torch.full((len(group), T), eos, dtype=torch.long)
            y = torch.full((len(group), T), -100, dtype=torch.long)
            for r, w in enumerate(group):
                x[r, :len(w) - 1] = w[:-1]
                y[r, :len(w) - 1] = w[1:]
            logits = model(x.to(device)).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                   ignore_index=-100, reduction="none").reshape(y.shape).double().cpu()
            tb = nbytes[y.clamp(min=0)] * (y != -100)
            counted = tb > 0
            nll += float(loss[counted].sum())
            total_bytes += float(tb.sum())
            n_tokens += int(counted.sum())
    return {"bpb": nll / math.log(2) / max(total_bytes, 1.0), "bytes": int(total_bytes), "tokens": n_tokens,
            "nats_per_token": nll / max(n_tokens, 1)}
