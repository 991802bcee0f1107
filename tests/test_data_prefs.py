"""`dhad data prefs`: every schema, every drop reason counted, responses whole under left truncation,
and the shared hh-rlhf file's deliberately malformed rows found exactly."""
from __future__ import annotations

import json
import random
import re

import pytest

from dhad.cli import main as dhad_main
from dhad.data.encoder import Encoder
from dhad.data.prefs import PrefsConfig, encode_pair, fit_length, prepare_prefs, split_pair
from dhad.data.shards import PrefsSet
from dhad.data.sft import RowError
from dhad.prompts import get_format, render
from dhad.tokenizer import train_bpe

EOT = "<|endoftext|>"
U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    words = "the a river city is old new big small what where why how ما هي المدينة النهر كبير".split()
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    d = tmp_path_factory.mktemp("tok")
    train_bpe(texts, 400, chat_template="jais").save(d)
    return str(d)


def test_schemas():
    p, c, r = split_pair({"prompt": "Why?", "chosen": "Because.", "rejected": "No."})
    assert (p, c, r) == ([U("Why?")], "Because.", "No.")
    p, c, r = split_pair({"prompt": [U("q1"), A("a1"), U("q2")], "chosen": [A("good")], "rejected": [A("bad")]})
    assert p == [U("q1"), A("a1"), U("q2")] and (c, r) == ("good", "bad")
    conv = [U("q1"), A("a1"), U("q2")]
    p, c, r = split_pair({"chosen": conv + [A("good")], "rejected": conv + [A("bad")]})  # common prefix split off
    assert (p, c, r) == (conv, "good", "bad")
    p, c, r = split_pair({"prompt": conv, "chosen": conv + [A("good")], "rejected": conv + [A("bad")]})
    assert (p, c, r) == (conv, "good", "bad")
    hh = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: "
    p, c, r = split_pair({"chosen": hh + "fine, thanks", "rejected": hh + "go away"})
    assert p == [U("hi there"), A("hello"), U("how are you?")] and (c, r) == ("fine, thanks", "go away")
    p, _, _ = split_pair({"prompt": "q", "chosen": "a", "rejected": "b", "system": "S"})
    assert p[0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "identical"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty_answer"),
    ({"prompt": "q", "chosen": "a"}, "missing_fields"),
    ({"chosen": [U("x"), A("a")], "rejected": [U("y"), A("b")]}, "prefixes_differ"),
    ({"chosen": [U("x"), A("a"), U("more"), A("c")], "rejected": [U("x"), A("b")]}, "prefixes_differ"),
    ({"prompt": "q", "chosen": "a\udc80", "rejected": "b"}, "invalid_utf8"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "bad_type"),
])
def test_split_reasons(row, reason):
    with pytest.raises(RowError) as e:
        split_pair(row)
    assert e.value.reason == reason


def test_encoding_matches_the_chat_format(tok_dir):
    enc, fmt = Encoder(tok_dir), get_format("jais")
    prompt = [U("ما هي المدينة؟"), A("المدينة كبير"), U("and the river?")]
    p, c, r = encode_pair(enc, fmt, prompt, "The river is old.", "no")
    dec = enc.tok.decode
    assert dec(p) == render(prompt, fmt, add_generation_prompt=False) + "\n[|AI|]"
    assert dec(c) == " The river is old." + EOT and dec(r) == " no" + EOT
    with pytest.raises(RowError, match="non_alternating"):
        encode_pair(enc, fmt, [U("a"), A("b"), A("c"), U("d")], "x", "y")
    with pytest.raises(RowError, match="prompt_not_ending_with_user"):
        encode_pair(enc, fmt, [U("a"), A("b")], "x", "y")


def test_left_truncation_keeps_responses_whole():
    p, c, r = list(range(1, 101)), [7] * 10, [8] * 20
    q, cut = fit_length(p, c, r, max_len=60, truncation="left", min_prompt=8, bos_id=None)
    assert cut and q == p[-40:] and len(q) + max(len(c), len(r)) == 60
    q, cut = fit_length([1] + p, c, r, max_len=60, truncation="left", min_prompt=8, bos_id=1)
    assert q[0] == 1 and q[1:] == p[-39:]                             # BOS survives truncation
    assert fit_length(p, c, r, max_len=200, truncation="left", min_prompt=8, bos_id=None) == (p, False)
    with pytest.raises(RowError, match="too_long"):
        fit_length(p, c, r, max_len=60, truncation="drop", min_prompt=8, bos_id=None)
    with pytest.raises(RowError, match="too_long"):
        fit_length(p, c, r, max_len=25, truncation="left", min_prompt=8, bos_id=None)


def test_prepare_prefs_counts_every_drop(tok_dir, tmp_path):
    rows = [json.dumps({"prompt": f"question {i} about the river", "chosen": f"good answer {i}",
                        "rejected": f"bad {i}"}).encode() for i in range(20)]
    rows += [json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}).encode(),                  # identical
             json.dumps({"prompt": "q", "chosen": "   ", "rejected": "x"}).encode(),                # empty
             json.dumps({"prompt": [U("a"), A("b"), A("c"), U("d")], "chosen": "x", "rejected": "y"}).encode(),
             json.dumps({"chosen": [U("x"), A("a")], "rejected": [U("y"), A("b")]}).encode(),     # prefixes differ
             json.dumps({"prompt": "q", "chosen": "x"}).encode(),                                 # missing field
             json.dumps({"prompt": "the " * 600, "chosen": "a " * 300, "rejected": "b"}).encode(),  # too long
             b'{"prompt": "q", "chosen": "\xff", "rejected": "y"}', b"{broken", b""]
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    out = tmp_path / "out"
    rc = dhad_main(["data", "prefs", "--data", str(tmp_path / "p.jsonl"), str(tmp_path / "missing.jsonl"),
                    "--tokenizer", tok_dir, "--out", str(out), "--max-len", "256", "--format", "jais",
                    "--val-fraction", "0.2"])
    assert rc == 0
    rep = json.loads((out / "prefs_report.json").read_text())
    assert rep["dropped"] == {"identical": 1, "empty_answer": 1, "non_alternating": 1, "prefixes_differ": 1,
                              "missing_fields": 1, "too_long": 1}
    assert rep["inputs"]["skipped"] == {"invalid_utf8": 1, "malformed_json": 1, "empty": 1, "missing_file": 1}
    tr, va = PrefsSet.open(out, "train"), PrefsSet.open(out, "validation")
    assert len(tr) + len(va) == 20 and len(va) > 0
    enc = Encoder(tok_dir)
    got = sorted(enc.tok.decode(x["chosen_ids"].tolist()) for ps in (tr, va) for x in ps)
    assert got == sorted(f" good answer {i}{EOT}" for i in range(20))
    assert tr.meta["kind"] == "prefs" and tr.meta["tokenizer_hash"] == enc.hash
    assert rep["group_by"] == "context"
    # --group-by reaches the split: a field no row has falls back to the context, counted
    assert dhad_main(["data", "prefs", "--data", str(tmp_path / "p.jsonl"), "--tokenizer", tok_dir, "--out",
                      str(tmp_path / "out2"), "--max-len", "256", "--format", "jais", "--group-by", "doc"]) == 0
    rep2 = json.loads((tmp_path / "out2" / "prefs_report.json").read_text())
    assert rep2["group_by"] == "doc" and rep2["group_field_missing"] == 20
    # bad tokenizer path: a clear error, exit 2, previous output untouched
    assert dhad_main(["data", "prefs", "--data", str(tmp_path / "p.jsonl"), "--tokenizer", str(tmp_path / "nope"),
                      "--out", str(out)]) == 2
    assert len(PrefsSet.open(out, "train")) == len(tr)


def test_printed_report_counts_every_line_once(tok_dir, tmp_path, capsys):
    """Read-level and pair-level counts used to be merged into one dict before printing, so invalid_utf8
    (bad bytes on one line, a lone surrogate in another row) showed one count; --max-rows N read N + 1."""
    good = [json.dumps({"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}).encode()
            for i in range(3)]
    lines = [good[0], b'{"prompt": "q", "chosen": "\xff", "rejected": "y"}', good[1],
             b'{"prompt": "q\\udc00", "chosen": "a", "rejected": "b"}', b'{"prompt": "q", "chosen": "x", "rejected": "x"}',
             good[2]]
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    args = ["data", "prefs", "--data", str(f), "--tokenizer", tok_dir, "--format", "jais", "--max-len", "0"]
    assert dhad_main(args + ["--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    counts = {(m[1], m[2]): int(m[3]) for m in re.finditer(r"^  (skipped|dropped) (\S+)\s+(\d+)", printed, re.M)}
    assert counts == {("skipped", "invalid_utf8"): 2, ("dropped", "identical"): 1}
    assert "pairs: 3 written, 1 dropped" in printed
    assert json.loads((tmp_path / "out" / "prefs_report.json").read_text())["rows"] == {"read": 4, "used": 3,
                                                                                       "dropped": 1}
    assert dhad_main(args + ["--out", str(tmp_path / "out2"), "--max-rows", "2"]) == 0
    assert "read: 1 files, 2 rows" in capsys.readouterr().out


@pytest.mark.data
def test_real_hh_rlhf_malformed_rows(shared_data, tok_dir, tmp_path):
    f = shared_data / "preference" / "en" / "hh_rlhf_harmless_test.jsonl"
    rep = prepare_prefs(PrefsConfig(inputs=[str(f)], tokenizer=tok_dir, out=str(tmp_path), chat_format="jais",
                                    max_len=None))
    # MANIFEST: empty `chosen` at idx 86, 516, 925, 1103; two assistant turns in a row at 667, 763, 1319, 1849
    assert rep["dropped"] == {"empty_answer": 4, "non_alternating": 4}
    rows = f.read_text(encoding="utf-8").splitlines()
    idx = lambda reason: {json.loads(rows[int(e.split(":")[1]) - 1])["idx"]  # noqa: E731
                          for e in rep["dropped_examples"][reason]}
    assert idx("empty_answer") == {86, 516, 925, 1103}
    assert idx("non_alternating") == {667, 763, 1319, 1849}
    n = sum(s["pairs"] for s in rep["splits"].values())
    assert n == 2307 - 8


# ---------------------------------------------------------------------------------------------
# Group-aware split: all pairs about one paragraph / conversation land in one split

def test_prompt_context():
    from dhad.data.prefs import prompt_context
    par = "The river is old.\n\nIt is long."
    assert prompt_context([U(par + "\n\nHow old is the river?")]) == [U(par)]      # paragraph + question
    assert prompt_context([U(par + "\n\n- كم عمر النهر؟\n")]) == [U(par)]         # ARCD's "- question"
    assert prompt_context([U("q1"), A("a1"), U("q2")]) == [U("q1"), A("a1")]     # the conversation so far
    assert prompt_context([U("just a question")]) == [U("just a question")]      # its own group
    sys_ = {"role": "system", "content": "Be brief."}
    assert prompt_context([sys_, U("just a question")]) == [sys_, U("just a question")]
    assert prompt_context([sys_, U("q1"), A("a1"), U("q2")]) == [U("q1"), A("a1")]  # a shared system prompt groups nothing


def _qa_rows(n_par, seed):
    """Derived-QA-shaped rows: several questions per paragraph, each pair's answers mirrored in another
    pair of the same paragraph (the shared data's construction), plus independent single questions."""
    rng = random.Random(seed)
    words = "the a river city is old new big small ما هي المدينة النهر كبير".split()
    rows = []
    for p in range(n_par):
        par = " ".join(rng.choice(words) for _ in range(10)) + f" {p}"
        answers = [f"answer {p}.{q}" for q in range(rng.randint(1, 5))]
        for q, a in enumerate(answers):
            other = answers[(q + 1) % len(answers)] if len(answers) > 1 else f"wrong {p}"
            rows.append({"prompt": [U(f"{par}\n\nquestion {q} about {p}?")], "chosen": a, "rejected": other,
                         "doc": f"d{p // 2}", "paragraph": par})
    for i in range(n_par // 2):
        rows.append({"prompt": f"standalone question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"})
    return rows


def _split_rows(tok_dir, tmp_path, rows, name, **kw):
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / name
    rep = prepare_prefs(PrefsConfig(inputs=[str(f)], tokenizer=tok_dir, out=str(out), chat_format="jais",
                                    max_len=None, **kw))
    enc = Encoder(tok_dir)
    chosen = {s: [enc.tok.decode(x["chosen_ids"].tolist()) for x in PrefsSet.open(out, s)]
              for s in ("train", "validation")}
    return rep, chosen


def test_group_split_keeps_paragraphs_together(tok_dir, tmp_path):
    rows = _qa_rows(160, 3)
    para_of = {f" {r['chosen']}{EOT}": r.get("paragraph", r["chosen"]) for r in rows}
    n_groups = len(set(para_of.values()))
    rep, chosen = _split_rows(tok_dir, tmp_path, rows, "a", val_fraction=0.2, seed=5)
    assert rep["group_by"] == "context"
    tr, va = ({para_of[c] for c in chosen[s]} for s in ("train", "validation"))
    assert not tr & va                                                    # no paragraph in both splits
    assert len(chosen["train"]) + len(chosen["validation"]) == len(rows)
    assert rep["splits"]["train"]["groups"] + rep["splits"]["validation"]["groups"] == n_groups == len(tr | va)
    # the validation share of groups is a Binomial(n_groups, 0.2) draw: within 3 standard deviations
    sd = (n_groups * 0.2 * 0.8) ** 0.5
    assert abs(len(va) - 0.2 * n_groups) < 3 * sd
    assert 0.1 < len(chosen["validation"]) / len(rows) < 0.3              # pairs: roughly as asked too
    # deterministic: the same input and seed give the same split; another seed another split
    _, again = _split_rows(tok_dir, tmp_path, rows, "b", val_fraction=0.2, seed=5)
    assert again == chosen
    _, other = _split_rows(tok_dir, tmp_path, rows, "c", val_fraction=0.2, seed=6)
    assert set(other["validation"]) != set(chosen["validation"])
    # the old behaviour, by whole prompt, puts paragraphs in both splits (what the default now prevents)
    _, by_prompt = _split_rows(tok_dir, tmp_path, rows, "d", val_fraction=0.2, seed=5, group_by="prompt")
    assert {para_of[c] for c in by_prompt["train"]} & {para_of[c] for c in by_prompt["validation"]}


def test_group_split_by_field(tok_dir, tmp_path):
    rows = _qa_rows(80, 4)
    doc_of = {f" {r['chosen']}{EOT}": r.get("doc") for r in rows}
    rep, chosen = _split_rows(tok_dir, tmp_path, rows, "f", val_fraction=0.3, seed=1, group_by="doc")
    tr = {doc_of[c] for c in chosen["train"] if doc_of[c]}
    va = {doc_of[c] for c in chosen["validation"] if doc_of[c]}
    assert tr and va and not tr & va                                      # one document, one split
    assert rep["group_field_missing"] == 40                               # the standalone rows: by context
    assert len(chosen["train"]) + len(chosen["validation"]) == len(rows)


@pytest.mark.data
def test_real_derived_pairs_split_by_paragraph(shared_data, tok_dir, tmp_path):
    f = shared_data / "preference" / "derived" / "xquad_qa_pairs_en.jsonl"
    rows = [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines()]
    # MANIFEST: prompt = paragraph + "\n\n" + question; several questions per paragraph
    pars = {r["prompt"][-1]["content"].rsplit("\n\n", 1)[0] for r in rows}
    rep = prepare_prefs(PrefsConfig(inputs=[str(f)], tokenizer=tok_dir, out=str(tmp_path), chat_format="jais",
                                    max_len=None, val_fraction=0.1, seed=0))
    enc = Encoder(tok_dir)
    got = {}
    for s in ("train", "validation"):
        prompts = [enc.tok.decode(x["prompt_ids"].tolist()) for x in PrefsSet.open(tmp_path, s)]
        got[s] = {p for p in pars if any(p in t for t in prompts)}
    assert got["train"] | got["validation"] == pars
    assert not got["train"] & got["validation"]                           # no paragraph in both splits
    n = rep["splits"]["train"]["pairs"] + rep["splits"]["validation"]["pairs"]
    assert n == len(rows)
    groups = rep["splits"]["train"]["groups"] + rep["splits"]["validation"]["groups"]
    assert groups == len(pars) and 0.03 < rep["splits"]["validation"]["pairs"] / n < 0.2
