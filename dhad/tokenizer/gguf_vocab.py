"""Tokenizers in GGUF files: llama.cpp's tokenizer metadata written from a dhad Tokenizer, and a dhad
Tokenizer built from a GGUF's metadata.

llama.cpp reads two kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE -- `tokens` (byte-level strings, in id order), `merges` ("a b"), `token_type`,
  and `pre` naming one of llama.cpp's built-in pre-tokenizer regexes (GPT-2's, Llama-3's, ...).
- "llama": SentencePiece-style BPE -- `tokens` (pieces with `▁`), `scores` (higher merges first),
  `token_type` (normal, unknown, control, user-defined, unused, byte `<0xNN>`), `add_space_prefix`.
Both: `bos/eos/unknown/padding_token_id`, `add_bos_token`, `add_eos_token`, and `tokenizer.chat_template`.

dhad's export also writes the exact `tokenizers` backend (`tokenizer.huggingface.json`, a standard GGUF
key) and its tokenizer_config (`dhad.tokenizer_config`), which llama.cpp ignores: dhad reads a file it
wrote back to exactly the same tokenizer. A GGUF without them (Ollama's library, convert_hf_to_gguf.py)
is rebuilt from llama.cpp's metadata; a pre-tokenizer dhad cannot reproduce is refused by name.
"""
from __future__ import annotations

import json

from dhad.tokenizer.core import Tokenizer, TokenizerError, _bpe_from, _component, _is_byte_piece

HF_CONFIG_KEY = "dhad.tokenizer_config"
# token types (llama.cpp's llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer names whose regex is GPT-2's (llama-vocab.cpp: GPT2, MPT, OLMO, JAIS, ...)
GPT2_PRES = ("gpt-2", "gpt2", "jais", "mpt", "olmo", "phi-2", "jina-es", "jina-de", "roberta-bpe", "trillion")
LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "midm-2.0")


def _pre_of(pre: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json pre-tokenizer, or None."""
    t = pre.get("type")
    if t == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    if t == "Sequence":
        ps = pre.get("pretokenizers") or []
        if len(ps) == 2 and ps[0].get("type") == "Split" and ps[1].get("type") == "ByteLevel" \
                and not ps[1].get("use_regex", True) and (ps[0].get("pattern") or {}).get("Regex") == LLAMA3_REGEX:
            return "llama-bpe"
    return None


def _add_flags(tok: Tokenizer) -> tuple[bool, bool]:
    """Whether encode(..., add_special_tokens=True) puts BOS in front / EOS at the end."""
    plain, full = tok.encode("a"), tok.encode("a", add_special_tokens=True)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    extra = len(full) - len(plain)
    add_bos = extra > 0 and bos is not None and full[0] == bos and full[1:1 + len(plain)] == plain
    add_eos = extra > 0 and eos is not None and full[-1] == eos and full[-1 - len(plain):-1] == plain
    return add_bos, add_eos


def write_tokenizer(w, tok: Tokenizer, vocab_size: int, arch: str) -> None:
    """Add `tok` to a `gguf.GGUFWriter`: llama.cpp's keys, the chat template, and dhad's exact copy."""
    import gguf

    hf = tok.backend
    d = json.loads(hf.to_str())
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"GGUF export needs a BPE tokenizer (llama.cpp's gpt2 or llama kinds), got {model.get('type')}")
    n = tok.vocab_size
    if n > vocab_size:
        raise TokenizerError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    tokens: list[str] = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for t, i in hf.get_vocab(with_added_tokens=True).items():
        tokens[i], types[i] = t, NORMAL
    for i, t in hf.get_added_tokens_decoder().items():
        types[i] = CONTROL if t.special else USER_DEFINED
    byte_level = tok._is_byte_level()
    if byte_level:
        pre = _pre_of(_component(hf.pre_tokenizer))
        if pre is None:
            import warnings
            pre = "gpt-2"
            warnings.warn("llama.cpp has no pre-tokenizer for this tokenizer's regex; the GGUF names GPT-2's "
                          "('gpt-2'): llama.cpp may split some text differently from dhad (dhad reads its own "
                          "exact copy of the tokenizer back from the file)", stacklevel=3)
        if arch == "jais" and pre == "gpt-2":
            pre = "jais"  # the same regex; what convert_hf_to_gguf.py writes for the Jais tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        w.add_token_merges(merges)
    else:
        unk = tok.unk_token_id
        sp = tok.sp_model
        # llama.cpp merges the adjacent pair whose result has the highest score. A tokenizer.json has merges, not
        # scores: a piece made by merge number r scores -r (its rank), any other piece after all of them, by id
        rank: dict[str, int] = {}
        for r, m in enumerate(model.get("merges") or []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            rank.setdefault(a + b, r)
        scores = []
        for i, t in enumerate(tokens):
            if types[i] == NORMAL and _is_byte_piece(t):
                types[i] = BYTE
            if unk is not None and i == unk:
                types[i] = UNKNOWN
            if sp is not None and i < sp.get_piece_size():
                scores.append(float(sp.get_score(i)))
            elif types[i] == NORMAL:
                scores.append(-float(rank.get(t, len(rank) + i)))
            else:
                scores.append(0.0)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(tok.adds_prefix_space)
    if tok.unk_token_id is not None:
        w.add_unk_token_id(tok.unk_token_id)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    add_bos, add_eos = _add_flags(tok)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    w.add_string(gguf.Keys.Tokenizer.HF_JSON, hf.to_str())
    cfg = {k: v for k, v in tok.full_config().items() if k != "chat_template"}
    w.add_string(HF_CONFIG_KEY, json.dumps(cfg, ensure_ascii=False))


def _llama_merges(tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges from piece scores: every split of a normal piece into two pieces of the
    vocabulary, higher-scored pieces first (ties by id), shorter left parts first."""
    order = sorted((i for i, t in enumerate(types) if t == NORMAL), key=lambda i: (-scores[i], i))
    out = []
    for i in order:
        piece = tokens[i]
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                out.append((piece[:k], piece[k:]))
    return out


def tokenizer_from_gguf(meta: dict, exact: bool = True) -> Tokenizer:
    """A dhad Tokenizer from a GGUF file's metadata (`dhad.gguf.read_metadata`). With `exact`, the copy
    dhad's export stores wins; otherwise (and for files without it) llama.cpp's keys are used."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    if exact and meta.get("tokenizer.huggingface.json"):
        cfg = json.loads(meta.get(HF_CONFIG_KEY) or "{}")
        if meta.get("tokenizer.chat_template"):
            cfg["chat_template"] = meta["tokenizer.chat_template"]
        return Tokenizer(hf=HFTokenizer.from_str(meta["tokenizer.huggingface.json"]), config=cfg)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise TokenizerError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    tokens = list(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        from tokenizers.models import BPE
        hf = HFTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False))
        if pre in GPT2_PRES:
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif pre in LLAMA3_PRES:
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            raise TokenizerError(f"GGUF pre-tokenizer {pre!r}: dhad rebuilds the GPT-2 ({', '.join(GPT2_PRES)}) and "
                                 f"Llama-3 ({', '.join(LLAMA3_PRES)}) byte-level pre-tokenizers, not this one")
        hf.decoder = decoders.ByteLevel()
        cfg: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    elif kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
        hf = _bpe_from(vocab, _llama_merges(tokens, scores, types, vocab))
        cfg = {"tokenizer_class": "LlamaTokenizer", "legacy": False,
               "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", True))}
    else:
        raise TokenizerError(f"GGUF tokenizer kind {kind!r} is not supported; dhad reads 'gpt2' and 'llama'")
    for i, t in enumerate(tokens):
        if types[i] in (CONTROL, USER_DEFINED):
            tok = AddedToken(t, special=types[i] == CONTROL, normalized=False)
            (hf.add_special_tokens if types[i] == CONTROL else hf.add_tokens)([tok])
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        if ids[key] is not None and 0 <= ids[key] < len(tokens):
            cfg[name] = tokens[ids[key]]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    ends = [(tokens[ids[k]], ids[k]) if flag and ids[k] is not None else None
            for flag, k in ((add_bos, "bos"), (add_eos, "eos"))]
    if any(ends):
        bos, eos = ends
        single = " ".join(([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else []))
        pair = single + " " + " ".join(([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else []))
        hf.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=[e for e in ends if e])
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return Tokenizer(hf=hf, config=cfg)


def load_gguf_tokenizer(path) -> Tokenizer:
    """The tokenizer of a GGUF file (see `tokenizer_from_gguf`)."""
    try:
        import gguf
    except ImportError:
        raise TokenizerError("reading a GGUF file's tokenizer needs the `gguf` package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001
        raise TokenizerError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "dhad."))}
    return tokenizer_from_gguf(meta)
