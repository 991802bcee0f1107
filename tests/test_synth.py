"""`dhad data synth`: distillation and self-chat through a fake OpenAI-compatible teacher (with injected
429/5xx/timeouts/malformed bodies) and a tiny dhad model; filters, near-dedup, resume, chat schema."""
from __future__ import annotations

import hashlib
import json
import random
import socket
from collections import Counter
from pathlib import Path

import pytest

from dhad.synth.backends import BackendUnavailable, GenParams
from dhad.data.sft import row_to_messages
from dhad.synth.synth import SynthConfig, SynthError, detect_lang, is_refusal, synth
from dhad.synth.translate import sidecar
from test_translate import FakeOpenAI, client, read_jsonl  # noqa: E402  (tests/ is on sys.path under pytest)

EN_WORDS = "river bridge salt wool copper merchant city morning market harbour ship lantern road".split()
AR_WORDS = "النهر الجسر الملح الصوف النحاس التاجر المدينة الصباح السوق الميناء السفينة الفانوس الطريق".split()
LONG_DUP_ANSWER = (
    "The old stone bridge was built by river merchants who needed a dry crossing for their carts. Over two "
    "centuries it carried salt from the coast, wool from the hills and copper from distant mines. Floods damaged "
    "its western arch twice, yet each time the town rebuilt it with money raised at the autumn fair. Today children "
    "fish below its lanterns while traders still cross at dawn, and visitors admire the carved lions guarding both "
    "ends. Historians believe the first wooden span stood slightly upstream, where shallow water made construction "
    "easier, but no trace of it survives beyond a few posts found during a dry summer. A small museum near the "
    "market keeps drawings, tolls ledgers and a model showing how masons raised the central vault without cranes.")
EXISTING = {"instruction": "Name three things merchants traded.", "input": "",
            "output": "Merchants traded salt, wool and copper along the river road."}


def lang_of(text):
    return detect_lang(text)


def answer_text(prompt: str, lang: str) -> str:
    rng = random.Random(hashlib.sha1(prompt.encode()).hexdigest())
    words = AR_WORDS if lang == "ar" else EN_WORDS
    sents = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 9))) for _ in range(3)]
    lead = "إليك الإجابة" if lang == "ar" else "Here is the answer"
    return f"{lead}: " + (". " if lang == "en" else "، ").join(sents) + "."


def fake_teacher(messages, body):
    system, last = messages[0]["content"], messages[-1]["content"]
    if "playing the user" in system or "دور المستخدم" in system:
        lang = lang_of(last)
        n = last.count("\n\n") + 1
        return (f"User: Could you explain part {n} in more detail?" if lang == "en"
                else f"المستخدم: هل يمكنك شرح الجزء {n} بتفصيل أكثر؟")
    # answering: the language the teacher was told to use (the system prompt) unless a trigger says otherwise
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    lang = lang_of(system)
    if "ZZWRONGLANG" in first_user:
        lang = "en" if lang == "ar" else "ar"
    if "ZZREFUSE" in first_user:
        return ("I'm sorry, but I can't help with that request." if lang == "en"
                else "عذراً، لا أستطيع المساعدة في هذا الطلب.")
    if "ZZLOOP" in first_user:
        return ("the river the bridge the salt " * 20).strip()
    if "ZZDUP" in first_user:
        return LONG_DUP_ANSWER
    if first_user == EXISTING["instruction"]:
        return EXISTING["output"]
    return answer_text(first_user + "|" + last, lang)


def make_seeds(root: Path) -> dict:
    (root / "seeds").mkdir(parents=True)
    en = [{"id": "dup1", "instruction": "ZZDUP Tell me about the old river bridge.", "lang": "en"},
          {"id": "e1", "instruction": "Describe a morning market.", "input": "in a harbour city", "lang": "en"},
          {"id": "e2", "instruction": "How is salt traded?", "lang": "en"},
          {"id": "refuse", "instruction": "ZZREFUSE Explain the lantern road.", "lang": "en"},
          {"id": "loop", "instruction": "ZZLOOP Describe the river.", "lang": "en"},
          {"id": "exist", "instruction": EXISTING["instruction"], "lang": "en"},
          {"id": "noprompt", "output": "no instruction here"},
          {"id": "dup2", "instruction": "ZZDUP Tell me about the old river bridge, please.", "lang": "en"}]
    ar = [{"instruction": "صف سوق الصباح في المدينة."},
          {"instruction": "كيف كان التجار ينقلون الملح عبر النهر؟"},
          {"instruction": "ZZREFUSE اشرح طريق الفانوس."},
          {"instruction": "ZZWRONGLANG ما قصة الجسر القديم؟"},
          {"messages": [{"role": "system", "content": "كن موجزاً."}, {"role": "user", "content": "ما هو الميناء؟"}]}]
    with open(root / "seeds" / "en.jsonl", "w", encoding="utf-8") as f:
        for r in en:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(root / "seeds" / "ar.jsonl", "wb") as f:
        for i, r in enumerate(ar):
            f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
            if i == 1:
                f.write(b'{"instruction": "\xd8 broken utf-8"}\n')
    (root / "existing.jsonl").write_text(json.dumps(EXISTING) + "\n")
    ids = {f"seeds/en.jsonl#{r['id']}" for r in en if "instruction" in r}
    ids |= {f"seeds/ar.jsonl:{n}" for n in (1, 2, 4, 5, 6)}
    return {"ids": {f"{i}#0" for i in ids}}   # one sample per seed: "<seed id>#0"


def short(r):
    return r["id"].rsplit("#", 1)[0].split("/")[-1]


def cfg(root, out, **kw):
    base = dict(seeds=["seeds"], out=str(out), data_root=str(root), dedup_against=["existing.jsonl"],
                progress=False, gen=GenParams(max_tokens=64, temperature=0.7, seed=0))
    base.update(kw)
    return SynthConfig(**base)


def all_rows(out):
    return read_jsonl(out), read_jsonl(sidecar(out, "rejected.jsonl"))


def test_refusal_detector():
    for t in ["I'm sorry, but I can't help with that.", "As an AI language model, I do not have opinions.",
              "I cannot assist with this request.", "عذراً، لا أستطيع المساعدة في هذا.",
              "بصفتي نموذجاً لغوياً لا أملك آراء.", "كنموذج لغوي، لا يمكنني ذلك.", "لا يمكنني تقديم هذه المعلومات."]:
        assert is_refusal(t), t
    for t in ["I can help with that: here are three ideas.", "I'm sorry to hear that; here is what you can do.",
              "لا أستطيع أن أنسى ذلك اليوم الجميل.", "يمكنني مساعدتك في ذلك بكل سرور.",
              "The model says it cannot fly."]:
        assert not is_refusal(t), t


def test_distill_filters_dedup_and_chat_schema(tmp_path):
    root = tmp_path / "data"
    seeds = make_seeds(root)
    out = tmp_path / "sft.jsonl"
    with FakeOpenAI(answer=fake_teacher) as srv:
        # one conversation at a time, so that dup1 (first in the file) is the one kept
        rep = synth(cfg(root, out, max_inflight=1), client(srv.url, timeout=0.5))
    kept, rej = all_rows(out)
    got = [r["id"] for r in kept + rej]
    assert sorted(got) == sorted(seeds["ids"]) and len(got) == len(set(got))
    why = {short(r): r["rejected"] for r in rej}
    assert why == {"en.jsonl#refuse": "refusal", "ar.jsonl:4": "refusal", "ar.jsonl:5": "language",
                   "en.jsonl#loop": "repetition", "en.jsonl#dup2": "near_duplicate",
                   "en.jsonl#exist": "exact_duplicate"}
    assert rep["rules"] == {"empty": 0, "language": 1, "too_short": 0, "too_long": 0, "refusal": 2, "repetition": 1,
                            "exact_duplicate": 1, "near_duplicate": 1}
    assert rep["seeds"]["read"]["skipped"] == {"invalid_utf8": 1, "no_prompt": 1}
    assert rep["seeds"]["by_lang"] == {"en": 7, "ar": 5} and rep["dedup"]["existing_examples"] == 1
    for r in kept:   # what `dhad data sft` reads, in the seed's language
        msgs = row_to_messages(r)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert detect_lang(msgs[1]["content"]) == r["lang"]
    e1 = next(r for r in kept if short(r) == "en.jsonl#e1")
    assert e1["messages"][0]["content"] == "Describe a morning market.\n\nin a harbour city"
    port = next(r for r in kept if short(r) == "ar.jsonl:6")
    assert port["messages"][0]["content"] == "ما هو الميناء؟" and port["lang"] == "ar"
    errs = Counter(rep["backend"]["errors"])
    for kind in ("http_429", "http_5xx", "malformed"):
        assert errs[kind] == srv.injected[kind]
    assert errs["timeout"] >= srv.injected["timeout"] and rep["conversations"]["failed"] == 0


def test_selfchat_multi_turn_interrupted_and_resumed(tmp_path):
    root = tmp_path / "data"
    seeds = make_seeds(root)
    out = tmp_path / "chat.jsonl"
    with FakeOpenAI(answer=fake_teacher) as srv:
        r1 = synth(cfg(root, out, seeds=["seeds/en.jsonl"], mode="selfchat", turns=3, limit=2), client(srv.url))
        with open(out, "ab") as f:
            f.write(b'{"id": "seeds/en.jsonl#e2#0", "messages": [{"role": "us')   # torn by a crash
        r2 = synth(cfg(root, out, mode="selfchat", turns=3), client(srv.url))
    kept, rej = all_rows(out)
    got = [r["id"] for r in kept + rej]
    assert sorted(got) == sorted(seeds["ids"]) and len(got) == len(set(got))
    assert r1["conversations"]["generated"] == 2 and r2["conversations"]["already_done"] == 2
    assert r2["resume"]["kept_file"]["dropped_bytes"] > 0
    # the dedup index was rebuilt from run 1's output: dup2 (run 2) is a near-duplicate of dup1 (run 1)
    assert {short(r): r["rejected"] for r in rej}["en.jsonl#dup2"] == "near_duplicate"
    for r in kept:
        msgs = row_to_messages(r)
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
        for m in msgs[2::2]:   # generated user turns: label stripped, in the conversation's language
            assert not m["content"].startswith(("User:", "المستخدم:")) and detect_lang(m["content"]) == r["lang"]
    assert r1["assistant_turns"] == 3 * r1["conversations"]["kept"]


def test_bad_input(tmp_path):
    root = tmp_path / "data"
    make_seeds(root)
    with pytest.raises(SynthError, match="unknown source 'sedes'"):
        synth(cfg(root, tmp_path / "o.jsonl", seeds=["sedes"]), client("http://127.0.0.1:9/v1"))
    (root / "empty.jsonl").write_bytes(b"")
    with pytest.raises(SynthError, match=r"no seed prompts in .*empty\.jsonl"):
        synth(cfg(root, tmp_path / "o.jsonl", seeds=["empty.jsonl"]), client("http://127.0.0.1:9/v1"))
    with pytest.raises(SynthError, match="unknown mode"):
        synth(cfg(root, tmp_path / "o.jsonl", mode="chat"), client("http://127.0.0.1:9/v1"))
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(16)
    try:
        with pytest.raises(BackendUnavailable, match="never answered"):
            synth(cfg(root, tmp_path / "o.jsonl"),
                  client(f"http://127.0.0.1:{sink.getsockname()[1]}/v1", timeout=0.3, max_retries=1, concurrency=2))
    finally:
        sink.close()
    assert read_jsonl(tmp_path / "o.jsonl") == []
    rep = json.loads(sidecar(tmp_path / "o.jsonl", "report.json").read_text())   # a stopped run keeps its counts
    assert rep["status"] == "stopped" and "never answered" in rep["error"] and rep["seeds"]["used"] == 12


def test_rows_record_the_model_id_the_endpoint_resolved(tmp_path):
    """`dhad data synth --endpoint URL` without --teacher-model: rows and report name the model GET /models
    gave, not the URL."""
    import argparse
    from dhad.synth.cli import add_synth_arguments, run_synth
    root = tmp_path / "data"
    make_seeds(root)
    out = tmp_path / "s.jsonl"
    sp = argparse.ArgumentParser()
    add_synth_arguments(sp)
    with FakeOpenAI(answer=fake_teacher, faults=None) as srv:
        assert run_synth(sp.parse_args(["--data", str(root / "seeds" / "en.jsonl"), "--out", str(out),
                                        "--endpoint", srv.url, "--no-progress", "--limit", "3"])) == 0
    rows = sum(all_rows(out), [])
    assert len(rows) == 3 and {r["teacher"] for r in rows} == {"fake-teacher"}
    assert json.loads(sidecar(out, "report.json").read_text())["teacher"] == "fake-teacher"


def test_selfchat_through_the_engine(tmp_path):
    import torch
    from dhad.config import Config
    from dhad.synth.backends import EngineBackend
    from dhad.model import Transformer
    from dhad.tokenizer import train_bpe
    torch.manual_seed(0)
    from dhad.synth.synth import ANSWER_SYSTEM, USER_SIM_SYSTEM
    texts = [" ".join(EN_WORDS) * 5, " ".join(AR_WORDS) * 5, *ANSWER_SYSTEM.values(), *USER_SIM_SYSTEM.values()]
    tok = train_bpe(texts * 3, vocab_size=512, min_frequency=1)
    model = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    root = tmp_path / "data"
    seeds = make_seeds(root)
    out = tmp_path / "chat.jsonl"
    be = EngineBackend(model, tok, max_batch_size=4)
    try:
        kw = dict(mode="selfchat", turns=2, gen=GenParams(max_tokens=8, temperature=0.8, seed=1), dedup_against=[])
        r1 = synth(cfg(root, out, limit=5, **kw), be)
        r2 = synth(cfg(root, out, **kw), be)
    finally:
        be.close()
    kept, rej = all_rows(out)
    got = [r["id"] for r in kept + rej]
    assert sorted(got) == sorted(seeds["ids"]) and len(got) == len(set(got))
    assert r1["conversations"]["generated"] == 5 and r2["conversations"]["already_done"] == 5
    assert r1["backend"]["completion_tokens"] > 0 and r1["backend"]["ok"] >= 5
    for r in kept + rej:   # every row is a well-formed conversation, rejected ones say why
        assert [m["role"] for m in r["messages"]][:2] == ["user", "assistant"]
    assert all(r["rejected"] in ("empty", "language", "too_short", "repetition", "near_duplicate") for r in rej)


@pytest.mark.data
def test_real_seed_files(tmp_path, shared_data):
    instruct = shared_data / "corpus" / "instruct"
    out = tmp_path / "sft.jsonl"
    with FakeOpenAI(answer=fake_teacher, faults=None) as srv:
        rep = synth(SynthConfig(seeds=[str(instruct / "selfinstruct_seed_tasks_en.jsonl"),
                                       str(instruct / "cidar_human_eval_prompts.jsonl")],
                                out=str(out), progress=False, dedup_against=[str(instruct / "alpaca_en_demo_1k.jsonl")]),
                    client(srv.url))
    assert rep["seeds"]["by_lang"] == {"en": 175, "ar": 100}   # self-instruct says lang en; CIDAR detected as Arabic
    kept, rej = all_rows(out)
    assert len(kept) + len(rej) == 275 and rep["dedup"]["existing_examples"] == 999
    assert Counter(r["lang"] for r in kept) == Counter({"en": 175, "ar": 100}) - Counter(r["lang"] for r in rej)
    assert all(row_to_messages(r) for r in kept)
