"""Readers against hostile input: every input unit is yielded or counted under a named reason, the counts
add up, and nothing escapes as an exception — checked on hand-made cases (each a bug that once lost or
crashed data) and by hypothesis on arbitrary bytes / JSON / CSV."""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dhad.data.readers import ReadStats, expand_inputs, read_documents

# every reason a reader may count (readers.py's docstring lists them); a new one must be named there too
REASONS = {"missing_file", "unreadable_file", "unsupported_format", "invalid_utf8", "malformed_json",
           "malformed_row", "not_an_object", "missing_field", "not_text", "empty"}
FILE_LEVEL = {"missing_file", "unsupported_format"}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read(inputs, text_fields=("text",), **kw):
    stats = ReadStats()
    docs = list(read_documents(inputs, stats, text_fields=text_fields, **kw))
    assert stats.records == len(docs)
    assert set(stats.skipped) <= REASONS, stats.skipped
    return docs, stats


def units(stats: ReadStats) -> int:
    """Units (lines / records / rows) the reader accounted for: yielded + skipped, file-level skips aside."""
    return stats.records + sum(v for k, v in stats.skipped.items() if k not in FILE_LEVEL)


# ---------------------------------------------------------------------------------------------
# Hand-made cases

def test_lone_surrogate_row_is_counted_where_it_is(tmp_path):
    """`{"text": "\\ud800"}` is valid JSON but not valid Unicode (it cannot be encoded, cleaned or tokenized):
    the reader counts it as invalid_utf8 at file:line and goes on; a valid surrogate *pair* is text."""
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "good one"}\n{"text": "bad \\ud800 one"}\n{"meta": {"k\\udfff": 1}, "text": "bad key"}\n'
                 '{"text": "pair \\ud83d\\ude00 ok"}\n', encoding="utf-8")
    for tf in (("text",), None):
        docs, stats = read([(str(f), "s")], text_fields=tf)
        assert [d.origin.rsplit(":", 1)[1] for d in docs] == ["1", "4"]
        assert stats.skipped == {"invalid_utf8": 2}
        assert stats.examples["invalid_utf8"] == [f"{f}:2 (lone surrogate in text)",
                                                  f"{f}:3 (lone surrogate in meta.k\\udfff (key))"]
        json.dumps(stats.to_dict(), ensure_ascii=False).encode("utf-8")   # the report can be written and printed
    assert docs[1].row["text"] == "pair \U0001F600 ok"


def test_unterminated_csv_quote_costs_one_row(tmp_path):
    """An unterminated quote used to swallow every following row into one document, uncounted."""
    f = tmp_path / "t.csv"
    f.write_text('id,text\n1,first row\n2,"unterminated\n3,third row\n4,"quoted, with comma"\n5,fifth\n'
                 '6,"stray" quote\n7,"multi\nline field"\n8,last\n', encoding="utf-8")
    docs, stats = read([(str(f), "s")])
    assert [(d.origin.rsplit(":", 1)[1], d.text) for d in docs] == [
        ("2", "first row"), ("4", "third row"), ("5", "quoted, with comma"), ("6", "fifth"),
        ("8", "multi\nline field"), ("10", "last")]
    assert stats.skipped == {"malformed_row": 2}
    assert [e.split(" ")[0] for e in stats.examples["malformed_row"]] == [f"{f}:3", f"{f}:7"]
    # at the end of the file, too
    f.write_text('id,text\n1,ok\n2,"never closed\n', encoding="utf-8")
    docs, stats = read([(str(f), "s")])
    assert [d.text for d in docs] == ["ok"] and stats.skipped == {"malformed_row": 1}
    assert "unexpected end of data" in stats.examples["malformed_row"][0]


def test_non_string_text_is_not_text_not_empty(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": 12345}\n{"text": ["a"]}\n{"text": null}\n{"text": "  "}\n{"other": 1}\n'
                 '{"text": 1, "title": "a title"}\n', encoding="utf-8")
    docs, stats = read([(str(f), "s")], text_fields=("text", "title"))
    assert [d.text for d in docs] == ["a title"]
    assert stats.skipped == {"not_text": 2, "empty": 2, "missing_field": 1}
    assert stats.examples["not_text"][0].startswith(f"{f}:1 ")


@pytest.mark.parametrize("ext,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_files_are_read_in_folders_and_by_name(tmp_path, ext, opener):
    """A .jsonl.gz used to be skipped silently in a folder and read as (invalid UTF-8) text when named."""
    (tmp_path / "d" / "src").mkdir(parents=True)
    rows = [{"text": f"row {i} نص"} for i in range(5)]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    with opener(tmp_path / "d" / "src" / f"a.jsonl{ext}", "wb") as g:
        g.write(data)
    with opener(tmp_path / "d" / "src" / f"b.csv{ext}", "wb") as g:
        g.write(b"text\nfrom csv\n")
    (tmp_path / "d" / "src" / "c.zip").write_bytes(b"PK\x03\x04")
    docs, stats = read(expand_inputs([str(tmp_path / "d")]))
    assert [d.text for d in docs] == [r["text"] for r in rows] + ["from csv"]
    assert {d.source for d in docs} == {"src"}
    assert stats.files == 2 and stats.skipped == {"unsupported_format": 1}   # c.zip: counted, named
    assert "c.zip" in stats.examples["unsupported_format"][0]
    docs, stats = read([(str(tmp_path / "d" / "src" / f"a.jsonl{ext}"), "x")], text_fields=None)
    assert [d.row for d in docs] == rows and not stats.skipped


def test_truncated_archive_keeps_the_lines_before_and_says_where(tmp_path):
    buf = io.BytesIO()
    with gzip.open(buf, "wb") as g:
        g.write(b"".join(json.dumps({"text": f"line {i}"}).encode() + b"\n" for i in range(2000)))
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    docs, stats = read([(str(f), "s")])
    assert 0 < len(docs) < 2000 and [d.text for d in docs] == [f"line {i}" for i in range(len(docs))]
    assert stats.skipped == {"unreadable_file": 1}
    assert stats.examples["unreadable_file"][0].startswith(f"{f}:")


def test_json_file_shapes(tmp_path):
    cases = {b'[{"text": "a"}, 5, {"text": "b"}]': (["a", "b"], {"not_an_object": 1}),
             b'{"data": [{"text": "a"}], "version": 1}': (["a"], {}),
             b'{"data": "not a list", "text": "whole"}': (["whole"], {}),
             b'5': ([], {"not_an_object": 1}),
             b'"text"': ([], {"not_an_object": 1}),
             b'[' * 100_000: ([], {"malformed_json": 1}),             # too deep for json: read as JSON lines
             b'1' * 5000: ([], {"malformed_json": 1}),                # too many digits for int()
             b'{"text": "a"}\n{"text": "b"}\n[1]\n': (["a", "b"], {"not_an_object": 1})}   # JSON lines
    for raw, (texts, skipped) in cases.items():
        (tmp_path / "f.json").write_bytes(raw)
        docs, stats = read([(str(tmp_path / "f.json"), "s")])
        assert [d.text for d in docs] == texts and dict(stats.skipped) == skipped, raw[:40]


def test_corrupt_parquet_is_counted(tmp_path):
    pa = pytest.importorskip("pyarrow")   # the `test` extra installs it; the reader itself counts it as unsupported
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a", "b", None, "d"], "n": [1, 2, 3, 4]}), tmp_path / "ok.parquet")
    docs, stats = read([(str(tmp_path / "ok.parquet"), "s")])
    assert [d.text for d in docs] == ["a", "b", "d"] and stats.skipped == {"empty": 1}
    raw = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "bad.parquet").write_bytes(raw[:20] + b"\x00" * 40 + raw[60:])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    docs, stats = read([(str(tmp_path / "bad.parquet"), "s"), (str(tmp_path / "junk.parquet"), "s")])
    assert stats.skipped["unreadable_file"] >= 1 and units(stats) >= 1


# ---------------------------------------------------------------------------------------------
# Property-based: arbitrary input, no exception, every unit yielded or counted, counts add up

# text with the characters that break readers: lone surrogates, NUL, line/paragraph separators, quotes
nasty_text = st.text(st.one_of(st.characters(), st.sampled_from(
    ["\ud800", "\udfff", "\x00", "\r", "\u2028", "\u0085", '"', ",", "\t", "\ufeff", "ـ", "\u064e"])), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | nasty_text,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(nasty_text, kids, max_size=4), max_leaves=12)
rows = st.one_of(st.fixed_dictionaries({"text": nasty_text}, optional={"id": json_values, "x": json_values}),
                 json_values)


def encode_row(value, ascii_escapes: bool) -> bytes:
    """JSON for a line: escaped (\\ud800 stays an escape) or raw UTF-8 (a lone surrogate becomes bytes no
    UTF-8 decoder accepts)."""
    return json.dumps(value, ensure_ascii=ascii_escapes).encode("utf-8", "surrogatepass")


line_st = st.one_of(
    st.tuples(rows, st.booleans()).map(lambda vb: encode_row(*vb)),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),   # arbitrary bytes, one line
    st.sampled_from([b"", b"   ", b"\r", b"{", b"[1, 2]", b"null", b'{"text": "x"', b"\xef\xbb\xbf{}"]))


def valid_text(v) -> str | None:
    """The text a correct reader must yield for a generated row (None: it must be counted instead)."""
    if not isinstance(v, dict) or not isinstance(v.get("text"), str) or not v["text"].strip():
        return None
    try:
        json.dumps(v, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate anywhere in the row
        return None
    return v["text"]


@FAST
@given(st.lists(st.one_of(line_st, st.tuples(st.just("ROW"), rows, st.booleans())), max_size=25),
       st.sampled_from(["", ".gz"]), st.sampled_from([("text",), None]))
def test_jsonl_any_bytes(tmp_path_factory, lines, comp, tf):
    want = {}
    raw = []
    for i, x in enumerate(lines, 1):
        if isinstance(x, tuple):             # a row we know: its text must come out exactly, at its line
            _, v, esc = x
            raw.append(encode_row(v, esc))
            if valid_text(v) is not None:
                want[i] = v
        else:
            raw.append(x)
    f = tmp_path_factory.mktemp("j") / f"a.jsonl{comp}"
    data = b"\n".join(raw) + (b"\n" if raw else b"")
    f.write_bytes(gzip.compress(data) if comp else data)
    docs, stats = read([(str(f), "s")], text_fields=tf)
    assert units(stats) == len(raw)                       # every line: yielded or counted, once
    got = {int(d.origin.rsplit(":", 1)[1]): d for d in docs}
    assert len(got) == len(docs)
    for i, v in want.items():   # (compared as JSON: NaN != NaN)
        assert i in got and (json.dumps(got[i].row) == json.dumps(v) if tf is None else got[i].text == v["text"])
    for d in docs:                                        # whatever is yielded is valid text
        json.dumps(d.row, ensure_ascii=False).encode("utf-8")
        d.text.encode("utf-8")
    for reason, where in stats.examples.items():         # every example names the file and a line
        assert all(re.match(re.escape(str(f)) + r":\d+", w) for w in where), (reason, where)


@FAST
@given(st.lists(json_values, max_size=12), st.booleans())
def test_json_array_any_values(tmp_path_factory, values, wrap):
    f = tmp_path_factory.mktemp("j") / "a.json"
    f.write_bytes(encode_row({"data": values} if wrap else values, ascii_escapes=True))
    docs, stats = read([(str(f), "s")])
    assert units(stats) == len(values)
    assert [d.text for d in docs] == [valid_text(v) for v in values if valid_text(v) is not None]


csv_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=25)   # any text a CSV can hold


@FAST
@given(st.lists(st.one_of(st.tuples(st.just("ROW"), csv_text), st.just("BROKEN")), max_size=20),
       st.sampled_from([",", "\t"]))
def test_csv_rows_survive_broken_neighbours(tmp_path_factory, items, delim):
    """Rows written by the csv module (any text: quotes, delimiters, line breaks) come back exactly; a row
    with an unterminated quote costs itself only. (After a broken row, a row the writer had to quote could
    be taken for its continuation — ``4,","`` closes the open quote as well-formed CSV — and no parser can
    tell, so rows after the first broken one keep to text that needs no quoting.)"""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delim)   # lineterminator \r\n: the writer quotes any field holding \r or \n
    w.writerow(["id", "text"])
    want, broken, line, seen_broken = [], [], 2, False
    for k, it in enumerate(items):
        if it == "BROKEN":
            buf.write(f'{k}{delim}"never closed\r\n')
            broken.append(line)
            line += 1
            seen_broken = True
            continue
        text = it[1]
        if seen_broken:
            text = re.sub(r'["\r\n' + delim + "]", "", text)
        start = buf.tell()
        w.writerow([k, text])
        if text.strip():
            want.append((line, text))
        line += buf.getvalue()[start:].count("\n")
    f = tmp_path_factory.mktemp("c") / ("a.tsv" if delim == "\t" else "a.csv")
    f.write_text(buf.getvalue(), encoding="utf-8", newline="")
    docs, stats = read([(str(f), "s")])
    got = [(int(d.origin.rsplit(":", 1)[1]), d.text) for d in docs]
    assert got == want
    assert stats.skipped.get("malformed_row", 0) == len(broken)
    assert [int(e.split(" ")[0].rsplit(":", 1)[1]) for e in stats.examples.get("malformed_row", [])] == broken[:5]
    assert units(stats) == len(items)


@FAST
@given(st.binary(max_size=300), st.sampled_from([".csv", ".tsv", ".txt", ".md", ".json", ".jsonl", ".parquet",
                                                 ".jsonl.gz", ".csv.bz2", ".txt.xz", ".bin"]),
       st.sampled_from([("text",), None]), st.sampled_from(["paragraph", "line", "file"]))
def test_any_bytes_any_reader(tmp_path_factory, raw, suffix, tf, mode):
    f = tmp_path_factory.mktemp("b") / f"x{suffix}"
    f.write_bytes(raw)
    docs, stats = read([(str(f), "s")], text_fields=tf, txt_mode=mode, max_chars=50)
    for d in docs:
        d.text.encode("utf-8")
        if d.row is not None:
            json.dumps(d.row, ensure_ascii=False, default=str).encode("utf-8")
    if suffix in (".txt", ".md") and tf is not None:     # text: every valid non-blank line is in a document
        lines = raw.split(b"\n")
        good = [x.decode("utf-8") for x in lines if _utf8(x) and x.strip()]
        body = "\n".join(d.text for d in docs)
        assert all(x.strip("\ufeff\r").strip() in body for x in good if x.strip("\ufeff\r").strip())


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------------------------------
# Through the pipelines: `dhad data prepare | sft | prefs` on arbitrary rows — no exception but NoInput
# (nothing written, no folder left), and every line is a read skip, a row drop, or in the shards

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from dhad.tokenizer import train_bpe
    words = "the river city old market bridge salt النهر المدينة السوق الجسر a b c 1 2 3".split()
    texts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(12)) for i in range(200)]
    d = tmp_path_factory.mktemp("tok")
    train_bpe(texts, 300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
              chat_template="chatml").save(d)
    return str(d)


PIPE = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
msg_st = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": nasty_text})
sft_row = st.one_of(
    st.fixed_dictionaries({"instruction": nasty_text, "output": nasty_text},
                          optional={"input": json_values, "system": json_values}),
    st.fixed_dictionaries({"messages": st.lists(msg_st, max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "x"]), "value": nasty_text}), max_size=4)}),
    json_values)
pref_row = st.one_of(
    st.fixed_dictionaries({"prompt": nasty_text | st.lists(msg_st, max_size=3), "chosen": nasty_text | json_values,
                           "rejected": nasty_text | st.lists(msg_st, max_size=3)}),
    st.fixed_dictionaries({"chosen": nasty_text | st.lists(msg_st, max_size=3),
                           "rejected": nasty_text | st.lists(msg_st, max_size=3)}),
    json_values)


def write_lines(path, items) -> int:
    raw = [x if isinstance(x, bytes) else encode_row(*x) for x in items]
    path.write_bytes(b"\n".join(raw) + (b"\n" if raw else b""))
    return len(raw)


def clean(s) -> bool:
    """A string the pipelines must keep: non-blank, valid Unicode."""
    return isinstance(s, str) and bool(s.strip()) and valid_text({"text": s}) is not None


def run_or_noinput(fn, cfg, out):
    from dhad.data.readers import NoInput
    try:
        return fn(cfg)
    except NoInput:
        assert not out.exists()          # a run that read nothing leaves no (empty) output folder behind
        return None


@PIPE
@given(st.lists(st.one_of(st.tuples(sft_row, st.booleans()), line_st), max_size=12))
def test_sft_any_rows(tok_dir, tmp_path_factory, items):
    from dhad.data.shards import ShardSet
    from dhad.data.sft import SFTConfig, prepare_sft
    d = tmp_path_factory.mktemp("sft")
    n = write_lines(d / "rows.jsonl", items)
    good = sum(1 for x in items if isinstance(x, tuple) and isinstance(x[0], dict) and clean(x[0].get("instruction"))
               and clean(x[0].get("output")) and valid_text({**x[0], "text": "t"}) is not None)
    out = d / "out" / "sft"
    r = run_or_noinput(prepare_sft, SFTConfig(inputs=[str(d / "rows.jsonl")], tokenizer=tok_dir, out=str(out),
                                              chat_format="chatml", packed=False, progress=False), out)
    if r is None:
        assert good == 0
        return
    inp = r["inputs"]
    assert inp["records"] + sum(inp["skipped"].values()) == n
    assert r["rows"] == {"read": inp["records"], "used": r["rows"]["used"], "dropped": sum(r["dropped"].values())}
    assert r["rows"]["read"] == r["rows"]["used"] + r["rows"]["dropped"] and r["rows"]["used"] >= good
    assert sum(ShardSet.open(out, s).n_rows for s in ("train", "validation")) == r["rows"]["used"]


@PIPE
@given(st.lists(st.one_of(st.tuples(pref_row, st.booleans()), line_st), max_size=12))
def test_prefs_any_rows(tok_dir, tmp_path_factory, items):
    from dhad.data.prefs import PrefsConfig, prepare_prefs
    from dhad.data.shards import PrefsSet
    d = tmp_path_factory.mktemp("prefs")
    n = write_lines(d / "rows.jsonl", items)
    good = sum(1 for x in items if isinstance(x, tuple) and isinstance(x[0], dict)
               and all(clean(x[0].get(k)) for k in ("prompt", "chosen", "rejected"))
               and x[0]["chosen"].strip() != x[0]["rejected"].strip())
    out = d / "out"
    r = run_or_noinput(prepare_prefs, PrefsConfig(inputs=[str(d / "rows.jsonl")], tokenizer=tok_dir, out=str(out),
                                                  chat_format="chatml", max_len=None), out)
    if r is None:
        assert good == 0
        return
    inp = r["inputs"]
    assert inp["records"] + sum(inp["skipped"].values()) == n
    assert r["rows"]["read"] == inp["records"] == r["rows"]["used"] + r["rows"]["dropped"]
    assert r["rows"]["used"] >= good
    assert sum(len(PrefsSet.open(out, s)) for s in ("train", "validation")) == r["rows"]["used"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.tuples(rows, st.booleans()), line_st), max_size=10))
def test_prepare_any_rows(tok_dir, tmp_path_factory, items):
    from dhad.data.filters import FilterConfig
    from dhad.data.prepare import PrepareConfig, prepare
    from dhad.data.shards import ShardSet
    d = tmp_path_factory.mktemp("pre")
    n = write_lines(d / "rows.jsonl", items)
    good = sum(1 for x in items if isinstance(x, tuple) and valid_text(x[0]) is not None)
    out = d / "out"
    r = run_or_noinput(prepare, PrepareConfig(inputs=[str(d / "rows.jsonl")], tokenizer=tok_dir, out=str(out),
                                              workers=1, progress=False, val_fraction=0.3,
                                              filters=FilterConfig(min_words=1)), out)
    if r is None:
        assert good == 0
        return
    inp = r["inputs"]
    assert inp["records"] + sum(inp["skipped"].values()) == n
    assert sum(v["docs"] for v in r["rules"].values()) == r["documents"] >= inp["records"]
    kept = r["rules"].get("kept", {}).get("docs", 0)
    assert sum(ShardSet.open(out, s).n_docs for s in ("train", "validation")) == kept
