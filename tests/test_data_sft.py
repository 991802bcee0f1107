"""`dhad data sft`: exact assistant-only masks for every chat format (multi-turn included), packed and
unpacked rows holding the same examples (and, through the model, the same per-example losses), and
bad rows counted."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from dhad.data.encoder import Encoder
from dhad.data.shards import ShardSet, row_examples, sft_row_to_example
from dhad.data.sft import RowError, SFTConfig, encode_conversation, prepare_sft, row_to_messages
from dhad.prompts import get_format, render
from dhad.tokenizer import train_bpe, train_sentencepiece

EOT = "<|endoftext|>"
WORDS = ("the of and to city river market people history trade book student year great small old new "
         "what where when how tell me about please answer question مدينة النهر السوق الناس التاريخ "
         "ما هي أين متى كيف أخبرني عن").split()

SINGLE = [{"role": "user", "content": "Tell me about the city."},
          {"role": "assistant", "content": "The city is old and great."}]
MULTI = [{"role": "system", "content": "You answer briefly."},
         {"role": "user", "content": "أخبرني عن النهر"},
         {"role": "assistant", "content": "  النهر طويل.  "},
         {"role": "user", "content": "And the market?"},
         {"role": "assistant", "content": "The market is near the river."},
         {"role": "user", "content": "ما هي المدينة؟"},
         {"role": "assistant", "content": "مدينة قديمة"}]


def expected_loss_texts(fmt: str, msgs) -> list[str]:
    """What each assistant turn must contribute to the loss, written from the formats' definitions."""
    out = []
    for m in msgs:
        if m["role"] != "assistant":
            continue
        a = m["content"]
        out.append({"jais": " " + a.strip() + EOT, "jais-legacy": " " + a.strip() + EOT,
                    "llama2": " " + a.strip() + " </s>", "chatml": a + "<|im_end|>"}[fmt])
    return out


def mask_runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(15)) for _ in range(300)]
    d = tmp_path_factory.mktemp("tok")
    train_bpe(texts, 500, special_tokens=(EOT, "<|im_start|>", "<|im_end|>", "<s>", "</s>"),
              chat_template="chatml").save(d)
    return str(d)


@pytest.mark.parametrize("fmt", ["jais", "jais-legacy", "llama2", "chatml"])
@pytest.mark.parametrize("msgs", [SINGLE, MULTI], ids=["single", "multi"])
def test_masks_exact_for_each_format(bpe_dir, fmt, msgs):
    enc = Encoder(bpe_dir)
    ex = encode_conversation(enc, msgs, get_format(fmt))
    runs = mask_runs(ex.ids, ex.mask)
    assert [enc.tok.decode(r) for r in runs] == expected_loss_texts(fmt, msgs)
    full = enc.tok.decode(ex.ids)
    rendered = render(msgs, fmt, add_generation_prompt=False)
    assert (full.replace(EOT, "") if fmt.startswith("jais") else full) == rendered
    # special tokens are single ids, never spelled out in bytes
    stop = {"jais": EOT, "jais-legacy": EOT, "llama2": "</s>", "chatml": "<|im_end|>"}[fmt]
    stop_id = enc.tok.token_to_id(stop)
    n_turns = sum(m["role"] == "assistant" for m in msgs)
    assert sum(1 for t, m in zip(ex.ids, ex.mask) if t == stop_id and m) == n_turns
    if fmt != "chatml":  # ChatML also closes user/system turns with <|im_end|> (not loss)
        assert ex.ids.count(stop_id) == n_turns


def test_sentencepiece_llama2_masks(tmp_path):
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    train_sentencepiece(texts, 400).save(tmp_path)
    enc = Encoder(tmp_path)
    ex = encode_conversation(enc, MULTI, get_format("llama2"))
    runs = mask_runs(ex.ids, ex.mask)
    decoded = [enc.tok.decode(r, skip_special_tokens=True) for r in runs]
    want = [m["content"].strip() for m in MULTI if m["role"] == "assistant"]
    assert [d.strip() for d in decoded] == want                       # the answers, and only them
    assert [r[-1] for r in runs] == [enc.eos_token_id] * 3              # each ends with the </s> id
    assert ex.ids[0] == enc.bos_token_id and ex.ids.count(enc.bos_token_id) == 3  # "<s>" parsed, per turn


def test_row_schemas_and_reasons():
    alp = row_to_messages({"instruction": "Sum", "input": "1 2", "output": "3"})
    assert alp == [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    sg = row_to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    assert sg[1] == {"role": "assistant", "content": "yo"}
    assert row_to_messages({"messages": SINGLE}, system="S")[0] == {"role": "system", "content": "S"}
    cases = {
        "unknown_schema": {"question": "x"},
        "bad_roles": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "last_turn_not_assistant": {"messages": [{"role": "user", "content": "a"}]},
        "empty_response": {"instruction": "a", "output": "  "},
        "missing_field": {"instruction": "a"},
        "invalid_utf8": {"instruction": "a\ud800", "output": "b"},
    }
    for reason, row in cases.items():
        with pytest.raises(RowError) as e:
            row_to_messages(row)
        assert e.value.reason == reason, (row, e.value)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    rng = random.Random(2)
    d = tmp_path_factory.mktemp("sft")
    rows = []
    for i in range(60):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25)))
        if i % 3 == 0:
            rows.append(json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False))
        else:
            turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 2:
                turns += [{"role": "user", "content": a[::-1]}, {"role": "assistant", "content": q}]
            rows.append(json.dumps({"messages": turns}, ensure_ascii=False))
    bad = ['{"messages": [', '{"instruction": "x", "output": ""}', "",
           json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
           json.dumps({"instruction": " ".join(["long"] * 1500), "output": "y"})]
    lines = [r.encode() for r in rows[:30]] + [b.encode() for b in bad] + [b'{"instruction": "\xff", "output": "a"}'] \
        + [r.encode() for r in rows[30:]]
    (d / "mix.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d


def _examples(out, split):
    ss = ShardSet.open(out, split)
    return ss, [e for i in range(ss.n_rows) for e in row_examples(*ss.row(i))]


def test_packed_unpacked_same_examples_and_bad_rows(bpe_dir, sft_data, tmp_path):
    reports = {}
    for packed in (True, False):
        cfg = SFTConfig(inputs=[str(sft_data)], tokenizer=bpe_dir, out=str(tmp_path / str(packed)), chat_format="jais",
                        seq_len=512, packed=packed, val_fraction=0.0, shuffle=packed, system="Answer briefly.")
        reports[packed] = prepare_sft(cfg)
    r = reports[True]
    assert r["inputs"]["skipped"] == {"malformed_json": 1, "empty": 1, "invalid_utf8": 1}
    assert r["dropped"] == {"empty_response": 1, "bad_roles": 1, "too_long": 1}
    assert r["splits"]["train"]["examples"] == 60
    (ps, pe), (us, ue) = _examples(tmp_path / "True", "train"), _examples(tmp_path / "False", "train")
    key = lambda e: (tuple(e.ids), tuple(e.mask))  # noqa: E731
    assert sorted(map(key, pe)) == sorted(map(key, ue)) and len(pe) == 60
    assert ps.n_rows < us.n_rows == 60 and ps.meta["packed"] and not us.meta["packed"]
    # unpacked keeps input order: example i is row i of the input (independent re-encoding)
    enc = Encoder(bpe_dir)
    first = json.loads((sft_data / "mix.jsonl").read_bytes().splitlines()[0])
    want = encode_conversation(enc, row_to_messages(first, system="Answer briefly."), get_format("jais"))
    assert key(ue[0]) == key(want)


def test_answer_as_served_cli(bpe_dir, sft_data, tmp_path):
    """dhad data sft --answer-as-served: the Jais answer follows the generation prompt serving sends,
    and the prompt tokens before it are exactly the served prompt's."""
    from dhad.cli import main as dhad_main
    out = tmp_path / "served"
    assert dhad_main(["data", "sft", "--data", str(sft_data / "mix.jsonl"), "--tokenizer", bpe_dir, "--out", str(out),
                      "--format", "jais", "--unpacked", "--seq-len", "512", "--val-fraction", "0",
                      "--answer-as-served"]) == 0
    _, ex = _examples(out, "train")
    enc = Encoder(bpe_dir)
    first = row_to_messages(json.loads((sft_data / "mix.jsonl").read_bytes().splitlines()[0]))
    prompts = set()
    for e in ex:
        mask = list(e.mask)
        k = max(j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1]))  # the last answer starts
        prompts.add(enc.tok.decode(list(e.ids[:k])))
    assert all(p.endswith("\n[|AI|]\n### Response :") for p in prompts) and len(prompts) == len(ex)
    assert render(first[:-1], "jais", add_generation_prompt=True) in prompts


def printed_counts(text: str) -> dict:
    """{(verb, reason): count} from the printed report's "  skipped|dropped REASON  N  e.g. ..." lines."""
    return {(m[1], m[2]): int(m[3]) for m in re.finditer(r"^  (skipped|dropped) (\S+)\s+(\d+)", text, re.M)}


def test_printed_report_counts_every_line_once(bpe_dir, tmp_path, capsys):
    """The printed report merged read-level and row-level counts into one dict, so a reason both have
    (invalid_utf8: a line of bad bytes, a row with a lone surrogate) was printed once, with one count;
    --max-rows N read N + 1 rows."""
    from dhad.cli import main as dhad_main
    good = [json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}).encode() for i in range(4)]
    lines = [good[0], b'{"instruction": "x\xff", "output": "y"}', good[1], b'{"instruction": "a\\ud800", "output": "b"}',
             b'{"instruction": "q", "output": "  "}', b"", good[2], b'{"messages": [', good[3]]
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    args = ["data", "sft", "--data", str(f), "--tokenizer", bpe_dir, "--format", "chatml", "--seq-len", "128"]
    assert dhad_main(args + ["--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    counts = printed_counts(printed)
    assert counts == {("skipped", "invalid_utf8"): 2, ("skipped", "empty"): 1, ("skipped", "malformed_json"): 1,
                      ("dropped", "empty_response"): 1}
    assert sum(counts.values()) == len(lines) - len(good) and "rows: 4 used, 1 dropped" in printed
    r = json.loads((tmp_path / "out" / "sft_report.json").read_text())
    assert r["rows"] == {"read": 5, "used": 4, "dropped": 1}
    assert dhad_main(args + ["--out", str(tmp_path / "out3"), "--max-rows", "3"]) == 0
    assert "read: 1 files, 3 rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "out3" / "sft_report.json").read_text())["rows"]["read"] == 3


def test_packed_and_unpacked_give_same_per_example_losses(bpe_dir, sft_data, tmp_path):
    import torch
    from dhad.config import Config
    from dhad.model import Transformer
    for packed in (True, False):
        prepare_sft(SFTConfig(inputs=[str(sft_data)], tokenizer=bpe_dir, out=str(tmp_path / str(packed)),
                              chat_format="chatml", seq_len=128, packed=packed, val_fraction=0.0))
    for name in ("tiny-llama", "tiny-jais"):  # RoPE and ALiBi
        torch.manual_seed(0)
        model = Transformer(Config.from_name(name)).eval()
        model.init_weights()
        losses = {}
        for packed in (True, False):
            ss = ShardSet.open(tmp_path / str(packed), "train")
            rows = [ss.row(i) for i in range(ss.n_rows)]
            x, y, s = (torch.as_tensor(np.stack(a)) for a in zip(*(sft_row_to_example(*r) for r in rows)))
            with torch.no_grad():
                logits = model(x, segment_ids=s).float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                                    reduction="none").view_as(y)
            per = {}
            for b, (t, m, seg) in enumerate(rows):
                for k in np.unique(seg[seg > 0]):
                    sel = torch.as_tensor(seg == k)
                    ids = tuple(t[seg == k].tolist())
                    per[ids] = float(nll[b][sel].sum())
            losses[packed] = per
        assert losses[True].keys() == losses[False].keys() and len(losses[True]) >= 40
        for k in losses[True]:
            assert losses[True][k] == pytest.approx(losses[False][k], rel=1e-4, abs=1e-4), name


@pytest.mark.data
def test_sft_real_instruct_files(shared_data, bpe_dir, tmp_path):
    inst = shared_data / "corpus" / "instruct"
    r = prepare_sft(SFTConfig(inputs=[str(inst / "cidar_human_eval_prompts.jsonl"),
                                      str(inst / "selfinstruct_seed_tasks_en.jsonl"), str(inst / "arcd_qa.jsonl")],
                              tokenizer=bpe_dir, out=str(tmp_path), chat_format="chatml", seq_len=2048, max_rows=400))
    assert r["dropped"]["missing_field"] == 100  # cidar's 100 eval prompts have no `output` (MANIFEST)
    assert r["splits"]["train"]["examples"] > 200 and r["splits"]["train"]["fill"] > 0.8
