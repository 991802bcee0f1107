"""Prompt formats: golden strings from the cards, Jinja == built-in == transformers, errors, SFT segments."""
from __future__ import annotations

import dataclasses
import json

import pytest

from dhad import prompts as P
from dhad.prompts import FORMATS, PromptError, get_format, render, render_segments

Q_EN = "What is the capital of UAE?"
Q_AR = "ما هي عاصمة الامارات؟"

CONVERSATIONS = [
    [{"role": "user", "content": Q_EN}],
    [{"role": "user", "content": Q_AR}],
    [{"role": "system", "content": "You are ALLaM, a bilingual English and Arabic AI assistant."},
     {"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": " Hello! "},
     {"role": "user", "content": Q_AR + " "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "مرحبا"}],
    [{"role": "system", "content": "أنت علام، مساعد ذكاء اصطناعي."}, {"role": "user", "content": "سؤال"}],
]


def hf_tokenizer(template, bos, eos):
    """A transformers tokenizer carrying `template`: its apply_chat_template is the reference."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(WordLevel({"[UNK]": 0, bos: 1, eos: 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token=bos, eos_token=eos, unk_token="[UNK]",
                                   chat_template=template)


# --- golden strings, written out by hand from the model cards -------------------------------

def test_jais_default_system_golden():
    text = render([{"role": "user", "content": Q_EN}], "jais")
    assert text == (
        "### Instruction: Your name is 'Jais', and you are named after Jebel Jais, the highest mountain in UAE. "
        "You were made by 'Inception' in the UAE. You are a helpful, respectful, and honest assistant. "
        "Always answer as helpfully as possible, while being safe. Complete the conversation below between "
        "[|Human|] and [|AI|]:\n### Input: [|Human|] What is the capital of UAE?\n[|AI|]\n### Response :")


def test_jais_custom_system_multiturn_golden():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": " " + Q_AR + " "}]
    assert render(msgs, "jais") == (
        "### Instruction: Be brief.\nComplete the conversation below between [|Human|] and [|AI|]:\n"
        "### Input: [|Human|] Hi\n[|AI|] Hello!\n[|Human|] " + Q_AR + "\n[|AI|]\n### Response :")
    assert render(msgs[:3], "jais", add_generation_prompt=True).endswith("[|AI|] Hello!")  # no prompt after AI


def test_card_prompts_verbatim():
    # The README strings, spacing quirks included ("Instruction:Your", Arabic "Input:[|Human|]").
    en = P.card_prompt(Q_EN, "en")
    assert en.startswith("### Instruction:Your name is 'Jais', and you are named after Jebel Jais")
    assert en.endswith("Complete the conversation between [|Human|] and [|AI|]:\n### Input: [|Human|] "
                       + Q_EN + "\n[|AI|]\n### Response :")
    ar = P.card_prompt(Q_AR, "ar")
    assert ar.startswith("### Instruction:اسمك \"جيس\" وسميت على اسم جبل جيس")
    assert ar.endswith("أكمل المحادثة بين [|Human|] و[|AI|] :\n### Input:[|Human|] " + Q_AR + "\n[|AI|]\n### Response :")
    with pytest.raises(PromptError, match="lang"):
        P.card_prompt("x", "fr")


def test_card_prompts_match_seed_file(shared_data):
    seed = shared_data.parent / "seeds" / "jais-family-card.txt"
    assert seed.is_file(), f"{seed} is part of ../shared (the model cards)"
    text = seed.read_text(encoding="utf-8")
    for name, const in (("prompt_eng", P.JAIS_PROMPT_ENG), ("prompt_ar", P.JAIS_PROMPT_AR)):
        line = next(l for l in text.splitlines() if l.startswith(name + " = "))
        assert json.loads(line[len(name) + 3:]) == const


def test_jais_legacy_golden():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "How are you?"}]
    assert render(msgs, "jais-legacy") == (
        "### Instruction: S\n\nComplete the conversation below between [|Human|] and [|AI|]:\n"
        "### Input: [|Human|] Hello!\n### Response: [|AI|] Hi!\n### Input: [|Human|] How are you?\n### Response: [|AI|]")
    assert render(msgs[1:2], "jais-legacy").startswith("### Instruction: Your name is Jais, and you are named after")


def test_llama2_golden_and_no_default_system():
    assert render([{"role": "user", "content": Q_AR}], "llama2") == f"<s>[INST] {Q_AR} [/INST]"
    msgs = [{"role": "system", "content": "You are ALLaM."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert render(msgs, "llama2") == (
        "<s>[INST] <<SYS>>\nYou are ALLaM.\n<</SYS>>\n\n Hi [/INST] Hello </s><s>[INST] Bye [/INST]")


def test_chatml_golden():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render(msgs, "chatml") == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


# --- Jinja templates agree with the built-ins and with transformers -------------------------

@pytest.mark.parametrize("name", list(FORMATS))
def test_jinja_equals_builtin_equals_transformers(name):
    fmt = FORMATS[name]
    as_jinja = dataclasses.replace(fmt, builtin=None)
    tok = hf_tokenizer(fmt.template, fmt.bos_token, fmt.eos_token)
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            ours = render(msgs, fmt, gen)
            assert render(msgs, as_jinja, gen) == ours
            assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == ours


def test_jais_family_template_from_checkpoint_dir(tmp_path):
    # A Jais-family chat checkpoint: its tokenizer_config chat_template wins; being the published
    # template it is recognised as the built-in format (and keeps its stop strings).
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": P.JAIS_CHAT_TEMPLATE}))
    fmt = get_format(tmp_path)
    assert fmt.name == "jais" and "\n[|Human|]" in fmt.stop_strings
    # Rendered through Jinja (as any checkpoint template is), it gives the built-in's text and segments.
    jinja = dataclasses.replace(fmt, builtin=None)
    for msgs in CONVERSATIONS:
        assert render(msgs, jinja) == render(msgs, "jais")
        assert render_segments(msgs, jinja) == render_segments(msgs, "jais")


def test_custom_checkpoint_template_wins(tmp_path):
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}" \
             "{% if add_generation_prompt %}<assistant>{% endif %}"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "chat_template.jinja").write_text(custom)  # the file newer transformers write
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    fmt = get_format(tmp_path)
    assert fmt.builtin is None
    msgs = CONVERSATIONS[3]
    assert render(msgs, fmt, add_generation_prompt=False) == "<user>a</s><assistant>b</s><user>c</s><assistant>مرحبا</s>"
    assert render(msgs[:3], fmt) == "<user>a</s><assistant>b</s><user>c</s><assistant>"
    segs = render_segments(msgs, fmt)
    assert [t for t, loss in segs if loss] == ["b</s>", "مرحبا</s>"]
    assert "".join(t for t, _ in segs) == render(msgs, fmt, add_generation_prompt=False)


def test_get_format_fallbacks(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}))
    assert get_format(tmp_path).builtin == "llama2"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jais"}))
    assert get_format(tmp_path).builtin == "jais-legacy"  # jais-13b/30b-chat ship no template
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(PromptError, match="no chat_template"):
        get_format(tmp_path)
    with pytest.raises(PromptError, match="unknown chat format"):
        get_format("vicuna")


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("msgs,match", [
    ([], "empty conversation"),
    ([{"role": "system", "content": "s"}], "only a system message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
    ([{"role": "tool", "content": "a"}], "unknown role 'tool'"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([{"role": "user"}], "'role' and 'content'"),
    ("hello", "must be a list"),
])
def test_bad_conversations(name, msgs, match):
    with pytest.raises(PromptError, match=match):
        render(msgs, name)
    with pytest.raises(PromptError, match=match):
        render_segments(msgs, name)


def test_bad_template_raises_prompt_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(PromptError, match="not valid Jinja"):
        get_format(tmp_path)


# --- SFT segments -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FORMATS))
def test_segments_concatenate_to_render_and_mark_answers(name):
    for msgs in CONVERSATIONS:
        segs = render_segments(msgs, name)
        assert "".join(t for t, _ in segs) == render(msgs, name, add_generation_prompt=False)
        loss_text = "".join(t for t, m in segs if m)
        for m in msgs:
            if m["role"] == "assistant":
                assert m["content"].strip() in loss_text
            else:
                assert m["content"].strip() not in loss_text
        # Jinja segmentation (by diffing renders) agrees with the hand-written one.
        assert render_segments(msgs, dataclasses.replace(FORMATS[name], builtin=None)) == segs


def test_segments_end_of_turn():
    msgs = CONVERSATIONS[3]
    assert render_segments(msgs, "llama2")[1] == (" b </s>", True)
    assert (" b<|endoftext|>", True) in render_segments(msgs, "jais", eos_token="<|endoftext|>")
    assert ("b<|im_end|>", True) in render_segments(msgs, "chatml")
    # formats whose template already writes the end of turn get no extra EOS
    assert render_segments(msgs, "chatml", eos_token="<|im_end|>") == render_segments(msgs, "chatml")


@pytest.mark.parametrize("name", list(FORMATS))
def test_answer_as_served_trains_after_the_generation_prompt(name):
    """answer_as_served: the prompt part of the rendering equals what serving sends (render with
    add_generation_prompt=True of the conversation without its last answer), for every format;
    earlier turns keep the template's history layout."""
    for msgs in CONVERSATIONS:
        if msgs[-1]["role"] != "assistant":
            continue
        segs = render_segments(msgs, name, answer_as_served=True)
        k = max(i for i, (_, loss) in enumerate(segs) if loss)
        assert "".join(t for t, _ in segs[:k]) == render(msgs[:-1], name, add_generation_prompt=True)
        assert segs[k][0].strip().startswith(msgs[-1]["content"].strip())  # (+ the end-of-turn text)
        if name != "jais":  # only the Jais-family template writes history answers differently
            assert segs == render_segments(msgs, name)
    two = [{"role": "user", "content": "سؤال"}, {"role": "assistant", "content": "جواب"},
           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    text = "".join(t for t, _ in render_segments(two, "jais", answer_as_served=True))
    assert text.endswith("\n[|AI|] جواب\n[|Human|] q2\n[|AI|]\n### Response : a2")
    with pytest.raises(PromptError, match="built-in chat format"):
        render_segments(two, dataclasses.replace(FORMATS["jais"], builtin=None), answer_as_served=True)


LLAMA3_CONVS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "أنت مساعد مفيد."}, {"role": "user", "content": "  ما هي عاصمة الإمارات؟  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " أهلاً! "},
     {"role": "user", "content": "Translate: good morning\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


@pytest.fixture(scope="module")
def llama3(fixtures_dir):
    from transformers import AutoTokenizer

    import dhad

    d = fixtures_dir / "tokenizers" / "llama3"
    return d, AutoTokenizer.from_pretrained(str(d)), dhad.load_tokenizer(d)


@pytest.mark.parametrize("conv", range(len(LLAMA3_CONVS)))
@pytest.mark.parametrize("gen", [True, False])
def test_llama3_checkpoint_template_matches_apply_chat_template(llama3, conv, gen):
    """The real Llama-3 tokenizer's Jinja chat template: dhad's rendering is byte-identical to transformers'
    apply_chat_template (system, multi-turn, add_generation_prompt), and so are the ids."""
    d, hf, tok = llama3
    msgs = LLAMA3_CONVS[conv]
    text = render(msgs, get_format(d), add_generation_prompt=gen)
    assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert text.startswith("<|begin_of_text|><|start_header_id|>")
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.encode(text) == list(ids)
