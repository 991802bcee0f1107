"""Tokenizers: round trips, transformers compatibility, Arabic-aware splitting, stats, extension, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhad.prompts import CHATML_TEMPLATE
from dhad.tokenizer import (
    ENDOFTEXT,
    ArabicNormalization,
    Source,
    Tokenizer,
    TokenizerError,
    extend_tokenizer,
    load_tokenizer,
    mix_sources,
    parse_sources,
    read_texts,
    token_stats,
    train_bpe,
    train_sentencepiece,
)

# Hermetic training text (written for this test): MSA with and without harakat, English, digits.
AR = [
    "ذَهَبَ الطَّالِبُ إِلَى المَدْرَسَةِ صَبَاحًا، وَكَتَبَ الدَّرْسَ فِي دَفْتَرِهِ.",
    "ذهب الطالب إلى المدرسة صباحا وكتب الدرس في دفتره.",
    "تقع مدينة العين في دولة الإمارات العربية المتحدة، وعدد سكانها ٧٦٦٬٩٣٦ نسمة.",
    "قال المعلم للطلاب: اقرؤوا الكتاب بعناية، ثم اكتبوا ملخصا عن الفصل الأول.",
    "والكتاب والمكتبة والكاتب والمكتوب كلها من جذر كتب.",
]
EN = [
    "The student went to school in the morning and wrote the lesson in his notebook.",
    "Al Ain is a city in the United Arab Emirates with a population of 766,936 people.",
    "The teacher said: read the book carefully, then write a summary of the first chapter.",
    "It's a long way to the top of Jebel Jais, the highest mountain in the UAE.",
]


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return train_bpe((AR + EN) * 20, vocab_size=600, min_frequency=1)


@pytest.fixture(scope="session")
def saved(tok, tmp_path_factory) -> Path:
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def hf_tok(saved):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(saved))


# --- round trips (hypothesis) -----------------------------------------------------------------

ARABIC_LETTERS = st.characters(min_codepoint=0x0621, max_codepoint=0x064A)
HARAKAT = st.characters(min_codepoint=0x064B, max_codepoint=0x0652)  # tanwin, harakat, shadda, sukun
RTL_MARKS = st.sampled_from(["\u200e", "\u200f", "\u061c", "\u202a", "\u202b", "\u202c", "\u202e", "\u2067", "\u2069",
                             "\u200c", "\u200d", "\u0640"])
EMOJI = st.sampled_from(["😀", "👍🏽", "🇦🇪", "👨‍👩‍👧", "❤️", "🕌"])
DIGITS = st.characters(categories=["Nd"])  # Western, Arabic-Indic, Extended Arabic-Indic, ...
arabic_diacritized = st.lists(st.one_of(ARABIC_LETTERS, HARAKAT, st.just(" "), st.just("،"), st.just("ّ")),
                              min_size=1, max_size=60).map("".join)
mixed = st.lists(st.one_of(ARABIC_LETTERS, HARAKAT, st.characters(min_codepoint=0x20, max_codepoint=0x7E), DIGITS,
                           EMOJI, RTL_MARKS, st.sampled_from([" ", "  ", "\n", "\t", "\r\n"])),
                 min_size=0, max_size=80).map("".join)

PROP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROP
@given(text=st.one_of(arabic_diacritized, mixed, st.text(max_size=60)))
def test_round_trip_and_transformers_agree(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # transformers' fast tokenizer built from the saved files: same ids, same text back
    assert hf_tok(text, add_special_tokens=True)["input_ids"] == ids
    assert hf_tok.decode(ids) == text


def test_autotokenizer_is_fast_with_special_tokens(tok, hf_tok, saved):
    assert hf_tok.is_fast
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 0)
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == hf_tok.pad_token_id == 0
    assert hf_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.encode("a<|im_end|>b")[1] == 2  # specials are recognised in text ...
    assert tok.decode(tok.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"  # ... and skippable
    assert len(hf_tok) == tok.vocab_size == 600
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["chat_template"]


def test_chat_template_renders_through_transformers(tmp_path):
    t = train_bpe(EN * 5, 300, chat_template=CHATML_TEMPLATE)
    t.save(tmp_path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "مرحبا"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nمرحبا<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == load_tokenizer(tmp_path).encode(text)
    assert list(ids).count(1) == 3  # <|im_start|> is one special token, not split


def test_default_chat_template_is_jais_family(saved):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(saved))
    out = hf.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                                 tokenize=False, add_generation_prompt=True)
    # Jais-family chat format (DESIGN.md reference facts)
    assert out == ("### Instruction: S\nComplete the conversation below between [|Human|] and [|AI|]:\n"
                   "### Input: [|Human|] Q\n[|AI|]\n### Response :")


def test_hash_is_content_hash(tok, saved, tmp_path):
    again = load_tokenizer(saved)
    assert again.hash() == tok.hash() and len(tok.hash()) == 16
    again.chat_template = "{{ messages }}"  # the template does not change ids -> same hash
    assert again.hash() == tok.hash()
    assert train_bpe((AR + EN) * 20, vocab_size=601, min_frequency=1).hash() != tok.hash()
    assert load_tokenizer(saved / "tokenizer.json").encode("كتب") == tok.encode("كتب")


# --- Arabic-aware pre-tokenization ------------------------------------------------------------

def test_pretokenizer_keeps_diacritized_words_and_splits_digits(tok):
    pre = tok.backend.pre_tokenizer
    dec = lambda s: bytes(__import__("dhad.tokenizer", fromlist=["x"]).byte_level_decoder()[c] for c in s).decode()
    words = [dec(w) for w, _ in pre.pre_tokenize_str("وَالْكِتَابُ جَمِيلٌ، 2024 ٣٤")]
    # a vocalised word (harakat are Mn) stays one unit, its leading space attached; digits one by one
    assert words == ["وَالْكِتَابُ", " جَمِيلٌ", "،", " ", "2", "0", "2", "4", " ", "٣", "٤"]
    g2 = [dec(w) for w, _ in
          __import__("tokenizers").pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str("وَالْكِتَابُ")]
    assert len(g2) > 1  # GPT-2's pattern would cut that word at its harakat


def test_arabic_normalization_optional(tmp_path):
    text = "أَحْمَدُ إلى مدرسةٍ كـــبيرة على"
    assert ArabicNormalization.parse(None).apply(text) == text  # default: lossless
    n = ArabicNormalization.parse("all")
    assert n.apply(text) == "احمد الي مدرسه كبيره علي"  # hand-folded
    assert n.hf_normalizer().normalize_str(text) == n.apply(text)
    t = train_bpe(AR * 5, 400, normalization=n, min_frequency=1)
    assert t.decode(t.encode(text)) == n.apply(text)
    with pytest.raises(TokenizerError, match="unknown Arabic normalization 'hamza'"):
        ArabicNormalization.parse("tatweel,hamza")


# --- corpora / weights ------------------------------------------------------------------------

def test_language_weights_set_the_mix(tmp_path):
    (tmp_path / "ar.txt").write_text("\n".join(AR * 50), encoding="utf-8")
    (tmp_path / "en.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in EN * 50), encoding="utf-8")
    srcs = parse_sources([f"ar={tmp_path / 'ar.txt'}", f"en={tmp_path / 'en.jsonl'}"], ["ar=3", "en=1"])
    mix = mix_sources(srcs, total_chars=40_000, seed=1)
    ar_chars = sum(len(t) for t in mix if t in AR)
    en_chars = sum(len(t) for t in mix if t in EN)
    assert abs(ar_chars / (ar_chars + en_chars) - 0.75) < 0.01
    # a language with less text than its share is repeated (up-weighted), not truncated
    srcs = [Source("ar", [tmp_path / "ar.txt"], 1.0), Source("en", [tmp_path / "en.jsonl"], 1.0)]
    mix = mix_sources(srcs, total_chars=100_000)
    assert sum(len(t) for t in mix if t in EN) >= 50_000 > len("".join(EN * 50))


def test_stats_hand_computed():
    sp = train_sentencepiece(EN * 20, 300)
    bpe = train_bpe(EN * 20, 300)
    for t in (sp, bpe):
        s = token_stats(t, ["😀"])
        assert s.n_byte_tokens == 4  # U+1F600 is 4 UTF-8 bytes, all unseen in training
        assert s.n_words == 1 and s.n_chars == 1 and s.n_tokens == len(t.encode("😀"))
        s = token_stats(t, EN[:2])
        assert s.n_tokens == sum(len(t.encode(x)) for x in EN[:2])
        assert s.fertility == s.n_tokens / sum(len(x.split()) for x in EN[:2])
        assert s.chars_per_token == sum(map(len, EN[:2])) / s.n_tokens
        assert s.n_byte_tokens == 0


# --- SentencePiece ----------------------------------------------------------------------------

def test_sentencepiece_llama_style(tmp_path):
    sp = train_sentencepiece((AR + EN) * 20, 500)
    assert (sp.token_to_id("<unk>"), sp.bos_token_id, sp.eos_token_id) == (0, 1, 2)
    text = "كتب الطالب 2024 words 😀"
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.encode(text, add_special_tokens=True) == [1] + ids  # Llama: bos prepended
    assert [sp.id_to_token(i) for i in sp.encode("766")][-3:] == ["7", "6", "6"]  # split_digits
    again = load_tokenizer(sp.save(tmp_path))
    assert again.kind == "sentencepiece" and again.encode(text) == ids and again.hash() == sp.hash()


# --- errors -----------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="corpus file not found"):
        list(read_texts(tmp_path / "missing.txt"))
    with pytest.raises(TokenizerError, match="corpus file not found"):
        parse_sources([f"ar={tmp_path / 'missing.jsonl'}"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"bad.jsonl: row 2: field 'text'"):
        list(read_texts(tmp_path / "bad.jsonl"))
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_bpe([], 300)
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_bpe(["", ""], 300)
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_sentencepiece(["\n \n"], 300)
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="empty corpus for ar"):
        mix_sources([Source("ar", [tmp_path / "empty.txt"])], 1000)
    with pytest.raises(TokenizerError, match="smaller than the alphabet.*259"):
        train_bpe(EN, 100)
    with pytest.raises(TokenizerError, match="smaller than the alphabet"):
        train_sentencepiece(EN, 200)
    with pytest.raises(TokenizerError, match="too small for this corpus"):
        train_sentencepiece(AR + EN, 262)  # > bytes + controls, < bytes + controls + characters


def test_donor_with_no_shared_tokens(tok):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"كتاب": 0, "مدرسة": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = Tokenizer(hf=hf)
    with pytest.raises(TokenizerError, match="byte-level BPE"):
        extend_tokenizer(tok, words, 10)
    sp = train_sentencepiece(EN * 20, 300)
    with pytest.raises(TokenizerError, match="share no tokens"):
        extend_tokenizer(sp, words, 10)


# --- extension on the real corpus ---------------------------------------------------------------

def _corpus(root: Path, lang: str, max_chars: int, skip: int = 0) -> list[str]:
    """Per file of corpus/<lang>: texts after the first `skip` characters, up to `max_chars`."""
    out = []
    for p in sorted((root / "corpus" / lang).iterdir()):
        n = 0
        for t in read_texts(p):
            if n >= skip + max_chars:
                break
            if n >= skip:
                out.append(t)
            n += len(t)
    return out


@pytest.fixture(scope="session")
def ext_setup(shared_data):
    en_train = _corpus(shared_data, "english", 300_000)
    ar_train = _corpus(shared_data, "arabic", 300_000)
    base = train_bpe(en_train, 4000)  # English-only base (Llama-2's role)
    donor = train_bpe(en_train + ar_train, 12000)  # bilingual donor (Jais's role)
    return base, donor


@pytest.mark.data
def test_extend_bpe_english_unchanged_arabic_shorter(shared_data, ext_setup):
    base, donor = ext_setup
    ext, rep = extend_tokenizer(base, donor, 6000)
    assert rep.added > 4000 and ext.vocab_size == base.vocab_size + rep.added
    # base ids keep their meaning; new ids follow
    assert all(base.id_to_token(i) == ext.id_to_token(i) for i in range(base.vocab_size))
    assert rep.new_ids == list(range(base.vocab_size, ext.vocab_size))
    # English: identical ids on text of every English file (held-out part, not the training slice)
    en = _corpus(shared_data, "english", 250_000, skip=300_000)
    assert len({t[:40] for t in en}) > 1000
    assert ext.encode_batch(en) == base.encode_batch(en)
    # Arabic: far fewer tokens (the card: ~3x on Llama-2 + 32k Arabic tokens)
    ar = _corpus(shared_data, "arabic", 100_000, skip=300_000)
    n_base, n_ext = sum(map(len, base.encode_batch(ar))), sum(map(len, ext.encode_batch(ar)))
    factor = n_base / n_ext
    print(f"\nBPE base extended with {rep.added} Arabic donor tokens: Arabic tokens {n_base:,} -> {n_ext:,} "
          f"({factor:.2f}x fewer)")
    assert factor >= 2.5
    assert all(ext.decode(ext.encode(t)) == t for t in ar[:50])


@pytest.mark.data
def test_extend_sentencepiece_base(shared_data, ext_setup, tmp_path):
    _, donor = ext_setup
    base = train_sentencepiece(_corpus(shared_data, "english", 150_000), 3000)  # Llama-2-style base
    ar = _corpus(shared_data, "arabic", 100_000, skip=300_000)
    ext, rep = extend_tokenizer(base, donor, 5000, by="frequency", corpus=ar[: len(ar) // 2])
    assert rep.by == "frequency" and rep.added > 3000
    en = _corpus(shared_data, "english", 100_000, skip=300_000)
    assert ext.encode_batch(en) == base.encode_batch(en)
    n_base, n_ext = sum(map(len, base.encode_batch(ar))), sum(map(len, ext.encode_batch(ar)))
    print(f"\nSentencePiece base + {rep.added} Arabic pieces: Arabic tokens {n_base:,} -> {n_ext:,} "
          f"({n_base / n_ext:.2f}x fewer)")
    assert n_base / n_ext >= 2.5
    again = load_tokenizer(ext.save(tmp_path))  # a valid model proto, saved and reloaded
    assert again.encode(ar[0]) == ext.encode(ar[0]) and again.decode(again.encode(ar[0])) == ar[0]


@pytest.mark.data
def test_new_merges_only_touch_arabic_bytes(ext_setup):
    """Why English cannot change: every added merge involves an Arabic-block lead byte (0xD8-0xDB)."""
    from dhad.tokenizer import byte_level_decoder

    base, donor = ext_setup
    ext, rep = extend_tokenizer(base, donor, 2000, by="rank")
    dec = byte_level_decoder()
    merges = json.loads(ext.backend.to_str())["model"]["merges"]
    base_merges = json.loads(base.backend.to_str())["model"]["merges"]
    assert merges[: len(base_merges)] == base_merges
    new = merges[len(base_merges):]
    assert len(new) == rep.added
    for m in new:
        a, b = (m.split(" ") if isinstance(m, str) else m)
        assert any(0xD8 <= dec[c] <= 0xDB for c in a + b)


# --- CLI --------------------------------------------------------------------------------------

def test_cli_train_stats_extend(tmp_path, capsys):
    from dhad.cli import main

    (tmp_path / "ar.txt").write_text("\n".join(AR * 30), encoding="utf-8")
    (tmp_path / "en.txt").write_text("\n".join(EN * 30), encoding="utf-8")
    a, e = f"arabic={tmp_path / 'ar.txt'}", f"english={tmp_path / 'en.txt'}"
    assert main(["tokenizer", "train", "--input", a, "--input", e, "--vocab-size", "500", "--total-chars", "20000",
                 "--min-frequency", "1", "--out", str(tmp_path / "bi")]) == 0
    assert main(["tokenizer", "train", "--input", e, "--vocab-size", "300", "--total-chars", "10000",
                 "--out", str(tmp_path / "en")]) == 0
    assert main(["tokenizer", "extend", str(tmp_path / "en"), str(tmp_path / "bi"), "--add", "200",
                 "--out", str(tmp_path / "ext")]) == 0
    assert main(["tokenizer", "stats", str(tmp_path / "en"), f"bi={tmp_path / 'bi'}", str(tmp_path / "ext"),
                 "--input", a, "--input", e, "--plot", str(tmp_path / "f.png"), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "fertility" in out and (tmp_path / "f.png").stat().st_size > 1000
    rows = {(r["tokenizer"], r["lang"]): r for r in json.loads((tmp_path / "s.json").read_text())}
    assert rows[("ext", "arabic")]["tokens"] < rows[("en", "arabic")]["tokens"]
    assert rows[("ext", "english")]["tokens"] == rows[("en", "english")]["tokens"]
    assert load_tokenizer(tmp_path / "bi").vocab_size == 500
    # user errors: message, exit 2, no traceback
    assert main(["tokenizer", "stats", str(tmp_path / "nope"), "--input", a]) == 2
    assert main(["tokenizer", "train", "--input", a, "--vocab-size", "50", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "smaller than the alphabet" in err and "Traceback" not in err


# --- the one rule: dhad == transformers on real tokenizers --------------------------------------
# Bilingual hard cases: leading/trailing/repeated spaces, newlines and \r, tatweel, harakat, Arabic-Indic
# digits, ZWNJ/ZWJ and bidi marks, emoji, special-token strings in text, text right after a special token,
# empty strings.
HARD = [
    "", " ", "  ", "Hello", " Hello", "  Hello  world  ", "trailing   ", "Hello عربي", "مرحبا بالعالم", " مرحبا",
    "line1\nline2\n\nline3\n", "crlf\r\nnext\r", "\r", "\t tab", "العـــربية ـ", "مَرْحَبًا بِكُمْ يَا أَصْدِقَائِي",
    "٠١٢٣٤٥٦٧٨٩ ۰۱۲ 123 ٣٫١٤", "نص\u200cمع\u200dوصل", "\u200fمرحبا\u200e hello", "\u202bنص\u202c \u2067x\u2069", "\u061c؟",
    "😀 👍🏽 🇦🇪 👨\u200d👩\u200d👧 ❤️", "<s>", "</s>", "<unk>", "<s>Hello", "a<s>b", "a </s> b", "Hello</s>",
    "</s>مرحبا", "<s> مرحبا", "<s>[INST] سؤال؟ [/INST] جواب </s><s>[INST] q", "<|begin_of_text|>Hi", "x<|eot_id|>y",
    "<|start_header_id|>user<|end_header_id|>\n\nمرحبا<|eot_id|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>",
]
SPECIAL_STRINGS = ["<s>", "</s>", "<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>", "<|im_start|>"]
hard_text = st.lists(st.one_of(ARABIC_LETTERS, HARAKAT, st.characters(min_codepoint=0x20, max_codepoint=0x7E), DIGITS,
                               EMOJI, RTL_MARKS, st.sampled_from([" ", "  ", "\n", "\r", "\r\n", "\t"] + SPECIAL_STRINGS)),
                     min_size=0, max_size=40).map("".join)


def _agree(ours: Tokenizer, hf, texts) -> None:
    """ids with and without special tokens, batch encode and decode (both ways) equal transformers'."""
    for add in (True, False):
        want = [hf(t, add_special_tokens=add)["input_ids"] for t in texts]
        assert [ours.encode(t, add_special_tokens=add) for t in texts] == want, add
        assert ours.encode_batch(texts, add_special_tokens=add) == want
    for ids in (hf(t)["input_ids"] for t in texts):
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)


_REAL: dict = {}


def _real(path: Path):
    """(dhad, transformers) tokenizers of a directory, loaded once per session."""
    if str(path) not in _REAL:
        from transformers import AutoTokenizer

        _REAL[str(path)] = (load_tokenizer(path), AutoTokenizer.from_pretrained(str(path)))
    return _REAL[str(path)]


@pytest.mark.parametrize("name", ["llama2-style", "llama3"])
def test_real_tokenizers_match_transformers(fixtures_dir, name):
    ours, hf = _real(fixtures_dir / "tokenizers" / name)
    _agree(ours, hf, HARD)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.vocab_size == len(hf)


@PROP
@given(text=hard_text)
def test_real_tokenizers_match_transformers_property(fixtures_dir, text):
    for name in ("llama2-style", "llama3"):
        _agree(*_real(fixtures_dir / "tokenizers" / name), [text])


def test_llama2_style_leading_space_follows_transformers(fixtures_dir):
    """The README's subtlety: for `legacy: true` Llama tokenizers transformers 5 and the `tokenizers` library
    (and SentencePiece) disagree on a leading space and on text right after a special token. dhad follows
    transformers: no second `▁` where the text already starts with a space (docs/tokenizers.md)."""
    from tokenizers import Tokenizer as HF

    d = fixtures_dir / "tokenizers" / "llama2-style"
    ours, raw = load_tokenizer(d), HF.from_file(str(d / "tokenizer.json"))
    assert ours.encode(" Hello", add_special_tokens=True) == [1, 22557]            # transformers 5
    assert raw.encode(" Hello").ids == [1, 28705, 22557]                            # tokenizers / SentencePiece
    assert ours.encode("a </s> b") == [264, 28705, 2, 287] != raw.encode("a </s> b", add_special_tokens=False).ids
    assert ours.encode("Hello عربي", add_special_tokens=True) == raw.encode("Hello عربي").ids  # elsewhere equal


def test_bos_from_the_post_processor(fixtures_dir, tmp_path):
    """Meta's Llama-3 tokenizer.json adds <|begin_of_text|> with a TemplateProcessing post-processor and its
    tokenizer_config has no add_bos_token: encode(..., add_special_tokens=True) must keep that BOS."""
    from tokenizers import Tokenizer as HF
    from tokenizers import processors
    from transformers import AutoTokenizer

    src = fixtures_dir / "tokenizers" / "llama3"
    hf = HF.from_file(str(src / "tokenizer.json"))
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    hf.save(str(tmp_path / "tokenizer.json"))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    assert "add_bos_token" not in cfg
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    ours, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.encode("Hello عربي", add_special_tokens=True) == [128000, 9906, 113775, 14900]
    assert ours.encode("Hello عربي") == [9906, 113775, 14900]
    _agree(ours, ref, HARD)
    # with a tokenizer.json, transformers 5 ignores the config's add_bos_token: the post-processor decides
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}), encoding="utf-8")
    ours, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.encode("Hello", add_special_tokens=True) == ref("Hello")["input_ids"] == [128000, 9906]


def test_jais_style_gpt2_bpe_matches_transformers(tmp_path):
    """A Jais-family-style tokenizer: GPT-2 byte-level BPE (GPT-2's own pre-tokenizer regex), <|endoftext|> as
    bos/eos/pad/unk, PreTrainedTokenizerFast, no BOS added."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator((AR + EN) * 20, trainers.BpeTrainer(vocab_size=600, special_tokens=[ENDOFTEXT],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "clean_up_tokenization_spaces": False}))
    ours, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (0, 0, 0)
    assert ours.encode("كتب", add_special_tokens=True) == ours.encode("كتب")
    _agree(ours, ref, HARD + AR + EN)


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    """A SentencePiece-only model dhad trains (tokenizer.model + tokenizer_config with add_bos_token: true)."""
    sp = train_sentencepiece((AR + EN) * 20, 500, user_defined_symbols=["[INST]"])
    return sp.save(tmp_path_factory.mktemp("sp"))


def test_sentencepiece_only_matches_transformers(sp_dir):
    cfg = json.loads((sp_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and not (sp_dir / "tokenizer.json").exists()
    ours, hf = _real(sp_dir)
    assert ours.kind == "sentencepiece"
    _agree(ours, hf, HARD + AR + EN)
    # special-token strings in text are one id each, never the byte pieces <0x3C> s <0x3E>
    assert ours.encode("<s>[INST] كتب [/INST] جواب </s>")[:2] == [1, ours.token_to_id("[INST]")]
    assert ours.encode("x </s>")[-1] == 2


@PROP
@given(text=hard_text)
def test_sentencepiece_only_matches_transformers_property(sp_dir, text):
    _agree(*_real(sp_dir), [text])


def test_add_bos_and_eos_token_flags(tmp_path):
    """tokenizer_config's add_bos_token/add_eos_token decide for a tokenizer.model; next to a tokenizer.json
    transformers 5 ignores them (the file's post-processor decides), and so does dhad."""
    from transformers import AutoTokenizer

    sp = train_sentencepiece(EN * 20, 300)
    sp.config.update(add_bos_token=False, add_eos_token=True)
    sp.save(tmp_path / "sp")
    bpe = train_bpe(EN * 5, 300)
    bpe.config.update(add_bos_token=True, add_eos_token=True)
    bpe.save(tmp_path / "bpe")
    for d, want in (("sp", lambda ids: ids + [2]), ("bpe", lambda ids: ids)):
        ours, hf = load_tokenizer(tmp_path / d), AutoTokenizer.from_pretrained(str(tmp_path / d))
        assert ours.encode("The book", add_special_tokens=True) == want(ours.encode("The book"))
        _agree(ours, hf, HARD + EN)


def test_lone_surrogates_are_a_tokenizer_error(tok, sp_dir):
    for t in (tok, load_tokenizer(sp_dir)):
        with pytest.raises(TokenizerError, match=r"U\+D800 at position 3 is a lone surrogate"):
            t.encode("abc\ud800def")
        with pytest.raises(TokenizerError, match=r"text 1: .*U\+DFFF at position 0"):
            t.encode_batch(["ok", "\udfff"], add_special_tokens=True)
        with pytest.raises(TokenizerError, match="must be a str, got NoneType"):
            t.encode(None)
        assert t.decode(t.encode("\U0010ffff\ufffe")) == "\U0010ffff\ufffe"  # valid (if unusual) code points encode


def test_encode_pieces_prefix_equals_whole_prompt(sp_dir, tok):
    """The first piece of a rendered chat is encode(prompt) exactly; later pieces get no dummy prefix."""
    sp = load_tokenizer(sp_dir)
    prompt, answer = "<s>[INST] كتب الطالب [/INST]", " الدرس </s>"
    pieces = sp.encode_pieces([prompt, answer])
    assert pieces[0] == sp.encode(prompt)
    assert sp.decode(pieces[0] + pieces[1]) == prompt + answer
    assert pieces[1] == sp.encode_continuation(answer)
    # a continuation gets no dummy-prefix "▁" (its own leading space is kept)
    assert sp.id_to_token(sp.encode("الدرس")[0]).startswith("\u2581")
    assert not sp.id_to_token(sp.encode_continuation("الدرس")[0]).startswith("\u2581")
    assert sp.decode(sp.encode("x") + sp.encode_continuation("الدرس")) == "xالدرس"
    assert tok.encode_pieces(["<|im_start|>user\nhi", " there"]) == [tok.encode("<|im_start|>user\nhi"), tok.encode(" there")]


# --- the Jais-adapted recipe on the real Llama-2-style base ---------------------------------------

def _file_texts(path: Path, max_chars: int, skip: int = 0) -> list[str]:
    out, n = [], 0
    for t in read_texts(path):
        if n >= skip + max_chars:
            break
        if n >= skip:
            out.append(t)
        n += len(t)
    return out


def _per_word(tok: Tokenizer, texts: list[str]) -> float:
    return sum(map(len, tok.encode_batch(texts))) / sum(len(t.split()) for t in texts)


@pytest.mark.data
def test_extend_real_llama2_base_with_learned_arabic_tokens(shared_data, fixtures_dir, tmp_path, capsys):
    """`dhad tokenizer extend BASE --learn-from arabic=...` on the real 32k base: Arabic needs >= 2.5x fewer
    tokens per word on held-out text (MSA Wikipedia, not learned on), English is unchanged, every base id keeps
    its token, and transformers loads the result and encodes as dhad does. (docs/tokenizers.md has the 32k run.)"""
    from transformers import AutoTokenizer

    from dhad.cli import main

    ar_dir, en_dir = shared_data / "corpus" / "arabic", shared_data / "corpus" / "english"
    base_dir = fixtures_dir / "tokenizers" / "llama2-style"
    learn = f"arabic={ar_dir / 'saudinewsnet_2015-07-23_and_25.jsonl'},{ar_dir / 'arzwiki_20181020_egyptian.jsonl'}"
    assert main(["tokenizer", "extend", str(base_dir), "--learn-from", learn, "--learn-chars", "4e6", "--add", "8000",
                 "--out", str(tmp_path / "ext")]) == 0
    assert "32000 -> 40000 tokens" in capsys.readouterr().out
    base, ext = load_tokenizer(base_dir), load_tokenizer(tmp_path / "ext")
    ar = _file_texts(ar_dir / "wikipedia_paragraphs_xquad_arcd.jsonl", 300_000)
    en = _file_texts(en_dir / "wikitext2_test.txt", 300_000) + _file_texts(en_dir / "c4_demo_llamafactory.jsonl", 200_000)
    before, after = _per_word(base, ar), _per_word(ext, ar)
    print(f"\nArabic tokens/word {before:.3f} -> {after:.3f} ({before / after:.2f}x fewer); English "
          f"{_per_word(base, en):.3f} -> {_per_word(ext, en):.3f}")
    assert before / after >= 2.5
    assert ext.encode_batch(en, add_special_tokens=True) == base.encode_batch(en, add_special_tokens=True)
    assert all(ext.id_to_token(i) == base.id_to_token(i) for i in range(base.vocab_size))
    assert ext.vocab_size == 40000 and all(ext.id_to_token(i) for i in range(32000, 40000))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "ext"))
    mixed = [a[:60] + " <s> " + e[:60] + "</s>" for a, e in zip(ar, en)][:100]
    sample = ar[:200] + en[:100] + mixed
    assert [ext.encode(t, add_special_tokens=True) for t in sample] == [hf(t)["input_ids"] for t in sample]
    assert all(ext.decode(ext.encode(t)) == t for t in ar[:200])


# --- model config <-> tokenizer -----------------------------------------------------------------

def test_saved_model_config_uses_the_tokenizer_ids(tok, tmp_path):
    """A Llama preset (bos 1 / eos 2) trained with a dhad BPE (everything <|endoftext|> = 0) is saved with the
    tokenizer's ids, and a directory whose config disagrees warns once, naming both values."""
    import warnings

    import dhad
    from dhad.config import Config
    from dhad.model import Transformer

    model = Transformer(Config.from_name("tiny-llama", vocab_size=tok.vocab_size, block_size=32)).init_weights(0)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    out = dhad.save_model(model, tmp_path / "m", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 0, 0) == \
        (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dhad.load_model(out)  # consistent: no warning
    cfg["eos_token_id"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"config eos_token_id = 2 but the tokenizer's eos_token is id 0 \('<\|endoftext\|>'\)"):
        dhad.load_model(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dhad.load_model(out)  # once


# --- one encoding: server == generate == SFT ----------------------------------------------------

@pytest.mark.parametrize("kind", ["sentencepiece-llama2", "bpe-jais"])
def test_server_generate_and_sft_send_the_same_ids(kind, tmp_path, monkeypatch):
    """For one conversation the served prompt (`dhad serve`'s backend), `dhad.generate` and the prompt part of
    the SFT example are the same ids, = encode(render(messages)); raw prompts get the tokenizer's BOS."""
    import dhad
    import dhad.generate as G
    from dhad.config import Config
    from dhad.data.encoder import Encoder
    from dhad.data.sft import encode_conversation
    from dhad.model import Transformer
    from dhad.prompts import get_format, render
    from dhad.serve.backend import load_backend

    if kind == "sentencepiece-llama2":
        t = train_sentencepiece((AR + EN) * 20, 500, chat_template="llama2")
        preset, answer_as_served = "tiny-llama", False
    else:
        t = train_bpe((AR + EN) * 20, 600, min_frequency=1, chat_template="jais")
        preset, answer_as_served = "tiny-jais", True  # Jais SFT follows the served generation prompt
    model = Transformer(Config.from_name(preset, vocab_size=t.vocab_size, block_size=256)).init_weights(0)
    d = dhad.save_model(model, tmp_path / "m", tokenizer=t)
    msgs = [{"role": "system", "content": "أجب باختصار."}, {"role": "user", "content": "  ما هي عاصمة الإمارات؟ "}]
    fmt = get_format(d)
    tok = dhad.load_tokenizer(d)
    want = tok.encode(render(msgs, fmt, add_generation_prompt=True))
    if kind == "sentencepiece-llama2":
        assert want[0] == tok.bos_token_id and want.count(tok.bos_token_id) == 1  # "<s>" in the text: one id
    served = load_backend(d).chat_prompt(msgs)
    seen = []
    real = G.generate_ids
    monkeypatch.setattr(G, "generate_ids", lambda m, ids, *a, **k: seen.append(list(ids[0])) or real(m, ids, *a, **k))
    G.generate_text(model, tok, msgs, max_new_tokens=1)
    ex = encode_conversation(Encoder(d), msgs + [{"role": "assistant", "content": "أبوظبي"}], fmt,
                             answer_as_served=answer_as_served)
    sft_prompt = ex.ids[:ex.mask.index(1)]
    assert served == seen[0] == sft_prompt == want
    # a raw prompt (completions, `dhad generate` without --chat): BOS exactly where the tokenizer adds one
    raw = "كتب الطالب"
    G.generate_text(model, tok, raw, max_new_tokens=1)
    assert seen[1] == load_backend(d).encode(raw, add_special_tokens=True) == tok.encode(raw, add_special_tokens=True)
    assert (seen[1][0] == tok.bos_token_id) == (kind == "sentencepiece-llama2")
