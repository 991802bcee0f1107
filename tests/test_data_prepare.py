"""`dhad data prepare` end to end: every surviving document lands once (EOS after each), bad data is
counted not fatal, workers do not change the output, mixtures hit their quotas, failures keep old output."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from dhad.data import prepare as prep
from dhad.data.clean import clean_text
from dhad.data.filters import FilterConfig, check
from dhad.data.readers import NoInput
from dhad.data.shards import ShardSet, ShardWriter
from dhad.tokenizer import train_bpe

EN_WORDS = ("the of and to in that with have be city river market people history trade travel book student "
            "year great small old new north south mountain village road water light house garden school "
            "teacher morning evening story letter friend family summer winter green stone bridge").split()
AR_WORDS = ("في من على إلى أن عن مع هذا هذه التي كان المدينة النهر السوق الناس التاريخ التجارة الكتاب "
            "الطالب السنة الجبل القرية الطريق الماء البيت الحديقة المدرسة المعلم الصباح المساء القصة "
            "الرسالة الصديق العائلة الصيف الشتاء الحجر الجسر").split()


def make_doc(rng: random.Random, words, n_sent: int) -> str:
    sents = []
    for _ in range(n_sent):
        sents.append(" ".join(rng.choice(words) for _ in range(rng.randint(8, 14))) + ".")
    return " ".join(sents)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    en = [make_doc(rng, EN_WORDS, rng.randint(3, 8)) for _ in range(40)]
    ar = [make_doc(rng, AR_WORDS, rng.randint(3, 8)) for _ in range(40)]
    (root / "english").mkdir()
    rows = [json.dumps({"text": t}).encode() for t in en]
    rows.insert(5, json.dumps({"text": en[0]}).encode())                              # exact duplicate
    rows.insert(9, json.dumps({"text": en[1].upper()}).encode())                      # exact (case) duplicate
    words = en[2].split()
    words[3] = "bridge" if words[3] != "bridge" else "stone"
    rows.insert(12, json.dumps({"text": " ".join(words)}).encode())                   # near duplicate
    rows.insert(3, b'{"text": "unterminated')                                         # malformed JSON
    rows.insert(7, b'{"text": "bad byte \xff here"}')                                 # invalid UTF-8
    rows.insert(8, b"")                                                                # empty line
    rows.insert(15, json.dumps({"text": "too short"}).encode())                       # filter: too_short
    (root / "english" / "web.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    paras = ar[:]
    paras[4] = paras[4] + "\nجميع الحقوق محفوظة"                                      # boilerplate line
    (root / "arabic").mkdir()
    (root / "arabic" / "news.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    texts = en + ar
    tok_dir = root.parent / (root.name + "_tok")
    train_bpe(texts, 400).save(tok_dir)
    return {"root": root, "tok": str(tok_dir), "en": en, "ar": ar}


def run(corpus, out, **kw):
    cfg = prep.PrepareConfig(inputs=[str(corpus["root"]), str(corpus["root"] / "missing.jsonl")],
                             data_root=str(corpus["root"]), tokenizer=corpus["tok"], out=str(out),
                             workers=kw.pop("workers", 1), progress=False, val_fraction=0.1, **kw)
    return prep.prepare(cfg)


def all_docs(out):
    from dhad.tokenizer import load_tokenizer
    tok = load_tokenizer(ShardSet.open(out, "train").meta["extra"]["tokenizer"])
    docs = {}
    for split in ("train", "validation"):
        ss = ShardSet.open(out, split)
        stream = ss.window(0, ss.n_tokens)
        assert (stream == ss.meta["eos_token_id"]).sum() == ss.n_docs  # exactly one EOS per document
        docs[split] = []
        for i in range(ss.n_docs):
            d = ss.doc(i)
            assert d[-1] == ss.meta["eos_token_id"]
            docs[split].append(tok.decode(d[:-1].tolist()))
    return docs


def test_prepare_end_to_end(corpus, tmp_path):
    report = run(corpus, tmp_path / "out")
    inp = report["inputs"]
    assert inp["skipped"] == {"malformed_json": 1, "invalid_utf8": 1, "empty": 1, "missing_file": 1}
    rules = report["rules"]
    assert rules["exact_duplicate"]["docs"] == 2 and rules["near_duplicate"]["docs"] == 1
    assert rules["too_short"]["docs"] == 1
    assert report["cleaning"]["boilerplate_lines"] == 1
    # independent expectation: each distinct generated document once, cleaned
    expect = sorted(clean_text(t)[0] for t in corpus["en"] + corpus["ar"])
    assert all(check(t, FilterConfig()) is None for t in expect)
    docs = all_docs(tmp_path / "out")
    assert sorted(docs["train"] + docs["validation"]) == expect      # nothing lost, nothing duplicated
    assert docs["validation"] and not set(docs["train"]) & set(docs["validation"])
    assert rules["kept"]["docs"] == len(expect)
    ss = ShardSet.open(tmp_path / "out", "train")
    assert set(ss.sources) == {"english", "arabic"} and ss.meta["tokenizer_hash"]
    assert ss.meta["dtype"] == "uint16" and ss.meta["kind"] == "pretrain"
    table = prep.format_report(report)
    assert "exact_duplicate" in table and "missing_file" in table


def test_two_workers_give_identical_shards(corpus, tmp_path):
    run(corpus, tmp_path / "w1", workers=1, tasks=1)
    run(corpus, tmp_path / "w2", workers=2, tasks=3)   # datatrove's local executor: a pool of 2 processes
    for split in ("train", "validation"):
        a, b = ShardSet.open(tmp_path / "w1", split), ShardSet.open(tmp_path / "w2", split)
        np.testing.assert_array_equal(a.window(0, a.n_tokens), b.window(0, b.n_tokens))
        np.testing.assert_array_equal(a.doc_starts, b.doc_starts)


def test_mixture_quotas(corpus, tmp_path):
    r0 = run(corpus, tmp_path / "natural")
    avail = {s: m["available"] for s, m in r0["mixture"].items()}
    total = 2 * sum(avail.values())
    r = run(corpus, tmp_path / "mixed", mix={"english": 3, "arabic": 1}, total_tokens=total)
    mix = r["mixture"]
    maxdoc = max(len(t) for t in corpus["en"] + corpus["ar"])  # tokens <= chars for this BPE
    assert abs(mix["english"]["tokens"] - 0.75 * total) <= maxdoc
    assert abs(mix["arabic"]["tokens"] - 0.25 * total) <= maxdoc
    assert mix["english"]["epochs"] > 1                            # upsampled by repetition
    ss = ShardSet.open(tmp_path / "mixed", "train")
    assert ss.sources == {"english": mix["english"]["tokens"], "arabic": mix["arabic"]["tokens"]}
    # without total_tokens: the largest mixture that repeats nothing
    r2 = run(corpus, tmp_path / "norepeat", mix={"english": 1, "arabic": 1})
    assert max(m["epochs"] for m in r2["mixture"].values()) <= 1.0
    assert prep.parse_mix("jais-family") == {"english": 283, "arabic": 141, "code": 56}
    assert prep.parse_mix("english=2, arabic=1,code:0.4") == {"english": 2, "arabic": 1, "code": 0.4}
    with pytest.raises(ValueError, match="SOURCE=WEIGHT"):
        prep.parse_mix("english")


def test_failure_keeps_previous_output(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(corpus, out)
    before = ShardSet.open(out, "train").window(0, 50).tolist()
    calls = {"n": 0}
    orig = ShardWriter.add

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError("disk full")
        return orig(self, *a, **k)

    monkeypatch.setattr(ShardWriter, "add", flaky)
    with pytest.raises(OSError):
        run(corpus, out)
    monkeypatch.undo()
    assert ShardSet.open(out, "train").window(0, 50).tolist() == before
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "train", "validation"]
    with pytest.raises(NoInput, match="missing_file"):
        prep.prepare(prep.PrepareConfig(inputs=[str(tmp_path / "nothing.jsonl")], tokenizer=corpus["tok"],
                                        out=str(out), workers=1, progress=False))
    assert ShardSet.open(out, "train").window(0, 50).tolist() == before


@pytest.mark.data
def test_prepare_real_corpus_sample(shared_data, tmp_path):
    corpus = shared_data / "corpus"
    files = []
    for src, rel in (("arabic", "arabic/saudinewsnet_2015-07-23_and_25.jsonl"),
                     ("english", "english/c4_demo_llamafactory.jsonl")):  # first 150 rows of each
        with open(corpus / rel, "rb") as f:
            head = b"".join(line for line, _ in zip(f, range(150)))
        (tmp_path / f"{src}.jsonl").write_bytes(head)
        files.append(f"{src}={tmp_path / (src + '.jsonl')}")
    texts = [json.loads(line)["text"] for f in files for line in open(f.split("=", 1)[1], encoding="utf-8")][::3]
    train_bpe(texts, 800).save(tmp_path / "tok")
    report = prep.prepare(prep.PrepareConfig(inputs=files, tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "out"),
                                             workers=1, progress=False,
                                             filters=FilterConfig(scripts={"arabic": "arabic", "english": "latin"})))
    by = report["by_source"]
    assert by["arabic"]["docs_kept"] > 100 and by["english"]["docs_kept"] > 50
    assert report["splits"]["train"] > 10_000 and report["splits"]["validation"] > 0
    ss = ShardSet.open(tmp_path / "out", "train")
    assert ss.meta["tokenizer_hash"] == report["tokenizer"]["hash"]


def test_bad_rows_never_stop_prepare(corpus, tmp_path, capsys):
    """One row with a lone surrogate used to stop `dhad data prepare` (exit 2 from dedup.exact_key, no
    file:line, nothing written); an unterminated CSV quote swallowed the rows after it; `{"text": 12345}`
    counted as "empty"; --max-rows N read N + 1 records. Each is now one counted row, named where it is."""
    from dhad.cli import main as dhad_main
    d = tmp_path / "in"
    d.mkdir()
    good = corpus["en"][:6]
    lines = [json.dumps({"text": t}) for t in good[:3]]
    lines.insert(1, '{"text": "' + good[3][:40] + ' \\ud800 ' + good[3][40:] + '"}')
    lines.insert(3, '{"text": 12345}')
    (d / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "b.csv").write_text(f'id,text\n1,"{good[4]}\n2,{good[5]}\n3,"{good[0]} again"\n', encoding="utf-8")
    out = tmp_path / "out"
    assert dhad_main(["data", "prepare", "--data", str(d), "--tokenizer", corpus["tok"], "--out", str(out),
                      "--workers", "1", "--no-progress", "--min-words", "5", "--no-near-dedup"]) == 0
    printed = capsys.readouterr().out
    rep = prep.load_report(out)
    assert rep["inputs"]["records"] == 5 and rep["inputs"]["skipped"] == {"invalid_utf8": 1, "not_text": 1,
                                                                          "malformed_row": 1}
    ex = rep["inputs"]["skipped_examples"]
    assert ex["invalid_utf8"] == [f"{d / 'a.jsonl'}:2 (lone surrogate in text)"]
    assert ex["malformed_row"][0].startswith(f"{d / 'b.csv'}:2 (")
    assert re.search(r"skipped invalid_utf8\s+1\s+e\.g\. .*a\.jsonl:2", printed)
    assert rep["rules"]["kept"]["docs"] == 5                 # good[0..2], good[5], good[0] again
    assert dhad_main(["data", "prepare", "--data", str(d / "a.jsonl"), "--tokenizer", corpus["tok"], "--out",
                      str(tmp_path / "out2"), "--workers", "1", "--no-progress", "--max-rows", "2"]) == 0
    assert prep.load_report(tmp_path / "out2")["inputs"]["records"] == 2


def test_failed_prepare_leaves_no_output_folder(corpus, tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(NoInput):
        prep.prepare(prep.PrepareConfig(inputs=[str(tmp_path / "nothing.jsonl")], tokenizer=corpus["tok"],
                                        out=str(out), workers=1, progress=False))
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="names no source"):   # a failure after the shards were staged
        run(corpus, out, mix={"klingon": 1})
    assert not (tmp_path / "new").exists()
