"""Chat prompt formats of the Jais-family, Jais-adapted / ALLaM and dhad's own models.

Interface (used by SFT data preparation, `dhad chat`, the server and `dhad.generate`):

    render(messages, fmt, add_generation_prompt=True) -> str
    render_segments(messages, fmt, *, eos_token=None, answer_as_served=False) -> list[(text, is_loss)]
    get_format(name_or_model_dir) -> ChatFormat
    card_prompt(question, lang="en") -> str        # the Jais card's README `prompt_eng` / `prompt_ar`

`messages` is a list of ``{"role": "system"|"user"|"assistant", "content": str}``: an optional
system message first, then user/assistant turns that alternate, starting with the user.

Design choices:
- Every built-in format exists twice: as a small Python renderer (what dhad runs) and as a Jinja
  ``chat_template`` string (what dhad writes into tokenizer_config.json so transformers' and vLLM's
  ``apply_chat_template`` give the same text). The tests check the two agree with each other and
  with transformers' own Jinja rendering.
- A checkpoint's own ``chat_template`` wins over any built-in: `get_format(model_dir)` renders it
  with Jinja exactly as transformers does (sandboxed, ``trim_blocks``/``lstrip_blocks``,
  ``raise_exception``, the tokenizer's special tokens as variables).
- `render_segments` returns the same text cut into pieces, flagging the pieces the SFT loss counts
  (the assistant's answer and the format's own end-of-turn text, e.g. `` </s>`` or ``<|im_end|>``);
  the concatenation is exactly ``render(messages, fmt, add_generation_prompt=False)``.
  The Jais templates end an answer with nothing (the model stops by emitting ``<|endoftext|>``,
  which the template never renders), so SFT code passes ``eos_token=`` to get that token appended,
  loss-counted, after every answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "PromptError", "ChatFormat", "FORMATS", "render", "render_segments", "get_format", "validate_messages",
    "card_prompt", "JAIS_CHAT_TEMPLATE", "JAIS_LEGACY_CHAT_TEMPLATE", "LLAMA2_CHAT_TEMPLATE", "CHATML_TEMPLATE", "format_from_template",
    "JAIS_DEFAULT_SYSTEM", "JAIS_LEGACY_DEFAULT_SYSTEM", "JAIS_PROMPT_ENG", "JAIS_PROMPT_AR",
]


class PromptError(ValueError):
    """A conversation a format cannot render (bad roles, empty, wrong types) or a bad format name."""


# ---------------------------------------------------------------------------------------------
# Texts from the model cards.

# Jais-family-*-chat tokenizer_config.json `chat_template`: the default system instruction used
# when the conversation has no system message (note: 'Jais' in single quotes, "below between").
JAIS_DEFAULT_SYSTEM = (
    "Your name is 'Jais', and you are named after Jebel Jais, the highest mountain in UAE. "
    "You were made by 'Inception' in the UAE. You are a helpful, respectful, and honest assistant. "
    "Always answer as helpfully as possible, while being safe."
)

# The Jais-family README prompts (`prompt_eng`, `prompt_ar`), verbatim, including their quirks:
# no space after "### Instruction:", "Complete the conversation between" (no "below"), and the
# Arabic one has no space after "### Input:". They differ from what the chat_template renders;
# both are kept because the card uses one and the tokenizer ships the other.
JAIS_PROMPT_ENG = (
    "### Instruction:Your name is 'Jais', and you are named after Jebel Jais, the highest mountain in UAE. "
    "You were made by 'Inception' in the UAE. You are a helpful, respectful, and honest assistant. "
    "Always answer as helpfully as possible, while being safe. "
    "Complete the conversation between [|Human|] and [|AI|]:\n### Input: [|Human|] {Question}\n[|AI|]\n### Response :"
)
JAIS_PROMPT_AR = (
    "### Instruction:اسمك \"جيس\" وسميت على اسم جبل جيس اعلى جبل في الامارات. تم بنائك بواسطة Inception في الإمارات. "
    "أنت مساعد مفيد ومحترم وصادق. أجب دائمًا بأكبر قدر ممكن من المساعدة، مع الحفاظ على البقاء أمناً. "
    "أكمل المحادثة بين [|Human|] و[|AI|] :\n### Input:[|Human|] {Question}\n[|AI|]\n### Response :"
)

# Older jais-13b-chat / jais-30b-chat prompt: "### Instruction: {system}\n\nComplete the conversation
# below between [|Human|] and [|AI|]:\n### Input: [|Human|] {q}\n### Response: [|AI|]". The cards'
# system text is long, model-specific (13B vs 30B, MBZUAI vs Core42) safety text; we default to
# its first sentence plus the "helpful, respectful and honest" sentence it contains, and users who
# want the exact card text pass it as the system message.
JAIS_LEGACY_DEFAULT_SYSTEM = (
    "Your name is Jais, and you are named after Jebel Jais, the highest mountain in UAE. "
    "You are a helpful, respectful and honest assistant."
)


def card_prompt(question: str, lang: str = "en") -> str:
    """The Jais-family README prompt for one question (``prompt_eng`` / ``prompt_ar``.format_map)."""
    if lang not in ("en", "ar"):
        raise PromptError(f"card_prompt: lang must be 'en' or 'ar', got {lang!r}")
    return (JAIS_PROMPT_ENG if lang == "en" else JAIS_PROMPT_AR).format_map({"Question": question})


# ---------------------------------------------------------------------------------------------
# Jinja chat templates (what tokenizer_config.json ships).

# Jais-family-*-chat tokenizer_config.json, verbatim up to `messages[-1]['role` (the source we
# could read was truncated there); the tail is the only completion consistent with the README
# prompts: "\n[|AI|]\n### Response :" when the last message is not the assistant's.
JAIS_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = '### Instruction: ' + messages[0]['content'] + "
    "'\nComplete the conversation below between [|Human|] and [|AI|]:\n### Input:'%}"
    "{% else %}{% set loop_messages = messages %}"
    "{% set system_message = '### Instruction: Your name is \\'Jais\\', and you are named after Jebel Jais, "
    "the highest mountain in UAE. You were made by \\'Inception\\' in the UAE. You are a helpful, respectful, "
    "and honest assistant. Always answer as helpfully as possible, while being safe. Complete the conversation "
    "below between [|Human|] and [|AI|]:\n### Input:' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = system_message %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.index0 == 0 %}{{ content + ' [|Human|] ' + message['content'] }}"
    "{% else %}{{ '\n[|Human|] ' + content.strip() }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ '\n[|AI|] ' + content.strip() }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\n[|AI|]\n### Response :' }}{% endif %}"
)

# dhad's template for the older jais-13b-chat / jais-30b-chat format (those checkpoints ship none).
JAIS_LEGACY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}"
    "{% set system_message = '" + JAIS_LEGACY_DEFAULT_SYSTEM + "' %}{% endif %}"
    "{{ '### Instruction: ' + system_message + '\n\nComplete the conversation below between [|Human|] and [|AI|]:\n' }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.index0 > 0 %}{{ '\n' }}{% endif %}"
    "{{ '### Input: [|Human|] ' + message['content'].strip() }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n### Response: [|AI|] ' + message['content'].strip() }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\n### Response: [|AI|]' }}{% endif %}"
)

# Llama-2 chat (ALLaM, Jais-adapted): "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>".
# No default system prompt (the ALLaM card: "optimized to function without a predefined system prompt").
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# ChatML for models dhad trains itself (<|im_start|>/<|im_end|> are added special tokens).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Names other modules look up as f"{name.upper()}_CHAT_TEMPLATE".
CHATML_CHAT_TEMPLATE = CHATML_TEMPLATE
ALLAM_CHAT_TEMPLATE = LLAMA2_CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------
# Formats.

@dataclass(frozen=True)
class ChatFormat:
    """A chat format: how to render a conversation, and when generation should stop.

    ``builtin`` names a Python renderer below; ``None`` means: render ``template`` with Jinja
    (a checkpoint's own chat_template). ``stop_strings`` are texts that end an assistant turn
    besides the EOS token (the next turn's header), a guard for small models that skip EOS.
    """
    name: str
    template: str
    bos_token: str = ""
    eos_token: str = ""
    stop_strings: tuple[str, ...] = ()
    builtin: str | None = None
    # True when the template itself renders text after every answer (" </s>", "<|im_end|>"):
    # then SFT needs no extra EOS.
    ends_turn_with_text: bool = False

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        return render(messages, self, add_generation_prompt)

    def segments(self, messages, *, eos_token: str | None = None):
        return render_segments(messages, self, eos_token=eos_token)


FORMATS: dict[str, ChatFormat] = {
    "jais": ChatFormat("jais", JAIS_CHAT_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                       stop_strings=("\n[|Human|]",), builtin="jais"),
    "jais-legacy": ChatFormat("jais-legacy", JAIS_LEGACY_CHAT_TEMPLATE, bos_token="<|endoftext|>",
                              eos_token="<|endoftext|>", stop_strings=("\n### Input:",), builtin="jais-legacy"),
    "llama2": ChatFormat("llama2", LLAMA2_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>",
                         stop_strings=("[INST]",), builtin="llama2", ends_turn_with_text=True),
    "chatml": ChatFormat("chatml", CHATML_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                         stop_strings=("<|im_end|>", "<|im_start|>"), builtin="chatml", ends_turn_with_text=True),
}
# Aliases by family: ALLaM and Jais-adapted use the Llama-2 chat format.
ALIASES = {"allam": "llama2", "jais-adapted": "llama2", "llama-2": "llama2", "jais-family": "jais",
           "jais-13b": "jais-legacy", "jais-30b": "jais-legacy"}
ROLES = ("system", "user", "assistant")


def validate_messages(messages) -> list[dict]:
    """Check a conversation: list of {role, content}; optional system first; user/assistant alternate.

    Returns the messages as plain dicts. Raises `PromptError` naming the offending message.
    """
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise PromptError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise PromptError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise PromptError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        msgs.append({"role": role, "content": content})
    if not msgs:
        raise PromptError("empty conversation: at least one user message is needed")
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not turns:
        raise PromptError("conversation has only a system message: at least one user message is needed")
    offset = len(msgs) - len(turns)
    for j, m in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            where = "only the first message may be 'system'" if m["role"] == "system" else \
                "roles must alternate user/assistant/user/..."
            raise PromptError(f"message {j + offset}: expected role {want!r}, got {m['role']!r} ({where})")
    return msgs


def _split_system(msgs):
    if msgs[0]["role"] == "system":
        return msgs[0]["content"], msgs[1:]
    return None, msgs


# Each renderer returns (segments, generation_prompt) where segments cover the conversation.
def _jais(msgs, fmt):
    system, turns = _split_system(msgs)
    head = ("### Instruction: " + system + "\nComplete the conversation below between [|Human|] and [|AI|]:\n### Input:"
            if system is not None else
            "### Instruction: " + JAIS_DEFAULT_SYSTEM + " Complete the conversation below between [|Human|] and [|AI|]:\n### Input:")
    segs = []
    for j, m in enumerate(turns):
        if m["role"] == "user":
            # Template quirk kept: the first user message is not stripped, later ones are.
            segs.append((head + " [|Human|] " + m["content"] if j == 0 else "\n[|Human|] " + m["content"].strip(), False))
        else:
            segs += [("\n[|AI|]", False), (" " + m["content"].strip(), True)]
    return segs, "\n[|AI|]\n### Response :"


def _jais_legacy(msgs, fmt):
    system, turns = _split_system(msgs)
    system = JAIS_LEGACY_DEFAULT_SYSTEM if system is None else system
    segs = [("### Instruction: " + system + "\n\nComplete the conversation below between [|Human|] and [|AI|]:\n", False)]
    for j, m in enumerate(turns):
        if m["role"] == "user":
            segs.append((("\n" if j else "") + "### Input: [|Human|] " + m["content"].strip(), False))
        else:
            segs += [("\n### Response: [|AI|]", False), (" " + m["content"].strip(), True)]
    return segs, "\n### Response: [|AI|]"


def _llama2(msgs, fmt):
    system, turns = _split_system(msgs)
    segs = []
    for j, m in enumerate(turns):
        if m["role"] == "user":
            content = m["content"]
            if j == 0 and system is not None:
                content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
            segs.append((fmt.bos_token + "[INST] " + content.strip() + " [/INST]", False))
        else:  # the model writes " answer </s>" after "[/INST]": all of it is loss
            segs.append((" " + m["content"].strip() + " " + fmt.eos_token, True))
    return segs, ""


def _chatml(msgs, fmt):
    segs = []
    for m in msgs:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segs.append(("<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n", False))
    return segs, "<|im_start|>assistant\n"


_RENDERERS = {"jais": _jais, "jais-legacy": _jais_legacy, "llama2": _llama2, "chatml": _chatml}


def _as_format(fmt) -> ChatFormat:
    if isinstance(fmt, ChatFormat):
        return fmt
    if isinstance(fmt, str):
        return get_format(fmt)
    raise PromptError(f"format must be a name ({', '.join(FORMATS)}), a model directory or a ChatFormat, got {fmt!r}")


def _merge(segs):
    out = []
    for text, loss in segs:
        if not text:
            continue
        if out and out[-1][1] == loss:
            out[-1] = (out[-1][0] + text, loss)
        else:
            out.append((text, loss))
    return out


def render(messages, fmt, add_generation_prompt: bool = True) -> str:
    """The prompt text for a conversation in format ``fmt`` (name, model dir or ChatFormat).

    Special tokens (``<s>`` in Llama-2, ``<|im_start|>`` in ChatML) appear as text: encode the
    result without adding a BOS again (HF tokenizers parse added special tokens in text).
    """
    fmt = _as_format(fmt)
    msgs = validate_messages(messages)
    if fmt.builtin is None:
        return _jinja_render(fmt, msgs, add_generation_prompt)
    segs, gen = _RENDERERS[fmt.builtin](msgs, fmt)
    text = "".join(t for t, _ in segs)
    if add_generation_prompt and msgs[-1]["role"] != "assistant":
        text += gen
    return text


def render_segments(messages, fmt, *, eos_token: str | None = None,
                    answer_as_served: bool = False) -> list[tuple[str, bool]]:
    """The conversation as ordered ``(text, is_loss)`` pieces; True = assistant output the SFT loss counts.

    ``"".join(text for text, _ in pieces) == render(messages, fmt, add_generation_prompt=False)``.
    With ``eos_token`` (e.g. ``"<|endoftext|>"``) and a format whose template renders nothing
    after an answer (the Jais formats), that token is appended, loss-counted, after every answer,
    so the model learns to stop; the join then differs from `render` by exactly those tokens.

    ``answer_as_served``: the final assistant turn follows the format's *generation prompt* instead
    of its history header -- the context the model gets when served. Only the Jais-family template
    differs: it writes past answers as "\n[|AI|] answer" but prompts for a new one with
    "\n[|AI|]\n### Response :"; for the other formats the text is unchanged.
    """
    fmt = _as_format(fmt)
    msgs = validate_messages(messages)
    if fmt.builtin is not None:
        segs, gen = _RENDERERS[fmt.builtin](msgs, fmt)
        if answer_as_served and msgs[-1]["role"] == "assistant":
            head, _ = _RENDERERS[fmt.builtin](msgs[:-1], fmt)
            tail = segs[len(head):]  # the last answer: [(header, False), (answer, True), ...]
            n = next(i for i, (_, loss) in enumerate(tail) if loss)
            segs = head + [(gen, False)] + tail[n:]
    else:
        if answer_as_served:
            raise PromptError(f"answer_as_served needs a built-in chat format, not the Jinja template {fmt.name!r}")
        segs = _jinja_segments(fmt, msgs)
    if eos_token and not fmt.ends_turn_with_text:
        out = []
        for text, loss in segs:
            out.append((text, loss))
            if loss and not text.endswith(eos_token):
                out.append((eos_token, True))
        segs = out
    return _merge(segs)


# ---------------------------------------------------------------------------------------------
# Jinja: render a checkpoint's chat_template the way transformers' apply_chat_template does.

_JINJA_CACHE: dict[str, object] = {}


def _compile(template: str):
    if template in _JINJA_CACHE:
        return _JINJA_CACHE[template]
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # transformers' `{% generation %}…{% endgeneration %}` marks assistant text; rendering
        # just emits the body (render_segments finds assistant text by diffing instead).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    # Same environment as transformers.utils.chat_template_utils._compile_jinja_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        compiled = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise PromptError(f"chat_template is not valid Jinja: {e}") from None
    _JINJA_CACHE[template] = compiled
    return compiled


def _jinja_render(fmt: ChatFormat, msgs: list[dict], add_generation_prompt: bool) -> str:
    import jinja2
    try:
        return _compile(fmt.template).render(
            messages=msgs, add_generation_prompt=add_generation_prompt,
            bos_token=fmt.bos_token, eos_token=fmt.eos_token)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"chat_template ({fmt.name}) refused the conversation: {e}") from None


def _jinja_segments(fmt: ChatFormat, msgs: list[dict]) -> list[tuple[str, bool]]:
    """Cut a Jinja rendering into pieces by rendering growing prefixes of the conversation.

    The text an assistant message adds is render(msgs[:i+1]) minus render(msgs[:i]); inside it the
    answer (and any spaces just before it, which byte-level/SentencePiece tokens absorb) through
    the end-of-turn EOS text, if the template writes one, is loss.
    """
    full = _jinja_render(fmt, msgs, False)
    segs, pos = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _jinja_render(fmt, msgs[:i], False)
        upto = _jinja_render(fmt, msgs[:i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)) or len(before) < pos:
            raise PromptError(f"chat_template ({fmt.name}) does not render conversations incrementally; "
                              "cannot mark assistant turns for the loss")
        delta = upto[len(before):]
        answer = m["content"].strip()
        a = delta.find(answer) if answer else len(delta.rstrip())
        if a < 0:
            raise PromptError(f"chat_template ({fmt.name}): cannot find assistant message {i} in its rendering")
        start = a
        while start > 0 and delta[start - 1] == " ":
            start -= 1
        end = a + len(answer)
        if fmt.eos_token:
            e = delta.find(fmt.eos_token, end)
            if e >= 0 and not delta[end:e].strip(" \n"):
                end = e + len(fmt.eos_token)
        segs.append((full[pos:len(before) + start], False))
        segs.append((delta[start:end], True))
        pos = len(before) + end
    segs.append((full[pos:], False))
    return _merge(segs)


def _token_str(tok) -> str:
    if isinstance(tok, dict):  # AddedToken serialisation {"content": "<s>", ...}
        return tok.get("content", "")
    return tok or ""


def format_from_template(template: str, bos_token: str = "", eos_token: str = "", name: str = "chat_template") -> ChatFormat:
    """A ChatFormat that renders ``template`` with Jinja (checked to compile).

    A template identical to a built-in one gets that built-in format (same text, plus its stop strings).
    """
    for f in FORMATS.values():
        if f.template == template:
            return replace(f, bos_token=bos_token or f.bos_token, eos_token=eos_token or f.eos_token)
    _compile(template)
    stops = (eos_token,) if eos_token else ()
    return ChatFormat(name, template, bos_token=bos_token, eos_token=eos_token, stop_strings=stops,
                      builtin=None,
                      ends_turn_with_text="eos_token" in template or (bool(eos_token) and eos_token in template))


def get_format(name_or_model_dir) -> ChatFormat:
    """A built-in format by name, or the format of a model directory.

    For a directory: its own ``chat_template`` (tokenizer_config.json, or the chat_template.jinja
    file newer transformers write) wins; without one, config.json's ``model_type`` picks the
    family's published format ("jais" checkpoints without a template are the older jais-13b/30b
    chat models -> "jais-legacy"; "llama" -> "llama2").
    """
    if isinstance(name_or_model_dir, ChatFormat):
        return name_or_model_dir
    key = str(name_or_model_dir)
    if key in FORMATS or key in ALIASES:
        return FORMATS[ALIASES.get(key, key)]
    d = Path(key)
    if not d.is_dir():
        raise PromptError(f"unknown chat format {key!r}: expected one of {', '.join(FORMATS)} or a model directory")
    tc = {}
    tc_path = d / "tokenizer_config.json"
    if tc_path.is_file():
        try:
            tc = json.loads(tc_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PromptError(f"{tc_path}: not valid JSON ({e})") from None
    bos, eos = _token_str(tc.get("bos_token")), _token_str(tc.get("eos_token"))
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        return format_from_template(template, bos, eos, name=f"chat_template:{d.name}")
    model_type = None
    if (d / "config.json").is_file():
        try:
            model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
        except json.JSONDecodeError as e:
            raise PromptError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    base = {"jais": "jais-legacy", "llama": "llama2"}.get(model_type)
    if base is None:
        raise PromptError(f"{d}: no chat_template in tokenizer_config.json and model_type {model_type!r} has no "
                          f"known format; pass one of {', '.join(FORMATS)}")
    fmt = FORMATS[base]
    return replace(fmt, bos_token=bos or fmt.bos_token, eos_token=eos or fmt.eos_token)
