"""Request and response schemas of `dhad serve`.

Two request families:
  * the ALLaM card's endpoint: ``POST /score`` with
    ``{"input_data": {"input_string": [{"role", "content"}...], "parameters": {...}}}`` answering
    ``{"output": "..."}``; the parameters use transformers' generation names (the cards use exactly
    these: temperature, top_p, do_sample, max_new_tokens; the Jais card adds repetition_penalty and
    min_length).
  * the OpenAI API (``/v1/chat/completions``, ``/v1/completions``) with OpenAI's names
    (max_tokens, stop, seed, stream) plus vLLM's usual extras (top_k, repetition_penalty, min_tokens).

Every model forbids unknown fields and runs in pydantic's strict mode: a typo'd parameter or a
string where a number belongs is a clear 422, never silently ignored or coerced. Numbers must be
finite (``NaN``/``Infinity``, which Python's JSON parser accepts, are 422); text must be valid
Unicode (a lone surrogate from a JSON escape such as ``"\\ud800"`` is 422) and at most
`MAX_TEXT_CHARS` characters per field; lists are bounded. Limits that depend on the served model
(max_new_tokens above the server's limit, prompt longer than the context) are checked by the app,
which knows them, and answered with 400.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

# ALLaM card: "maxOutputTokens 4096". The server's limit defaults to this and can be lowered/raised.
DEFAULT_MAX_NEW_TOKENS_LIMIT = 4096
MAX_TEXT_CHARS = 1 << 20  # one message or prompt (the body limit, 8 MB by default, bounds the whole request)


def _valid_unicode(s: str) -> str:
    """Text the tokenizer and the JSON encoder can take: no lone surrogates (U+D800..U+DFFF)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"contains a lone surrogate (U+{ord(s[e.start]):04X}) at character {e.start}; "
                             "text must be valid Unicode") from None
    return s


def _whole(v):
    """JSON Schema's integers include 14.0 (a number with no fraction); JSON encoders write them so."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _int(**bounds):
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


def _text(max_chars: int, min_chars: int = 0):
    return Annotated[str, Field(min_length=min_chars, max_length=max_chars), AfterValidator(_valid_unicode)]


Text = _text(MAX_TEXT_CHARS)

_STRICT = ConfigDict(extra="forbid", strict=True)

# Finite floats only: JSON parsers accept NaN/Infinity, sampling must never see them.
Temperature = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = _int(ge=0, le=1_000_000)
Penalty = Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)]
TokenCount = _int(ge=0, le=1_000_000)
PositiveTokenCount = _int(ge=1, le=1_000_000)
# RFC 8259 §6: integers beyond 2**53 - 1 are not exchanged reliably (JavaScript clients round them).
Seed = _int(ge=0, le=2**53 - 1)
TokenId = _int(ge=0, le=2**31 - 1)
StopString = _text(256, min_chars=1)
Stop = StopString | Annotated[list[StopString], Field(max_length=16)]


class ChatMessage(BaseModel):
    """One turn of a conversation (the cards' ``input_string`` items)."""

    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: Text


# ---------------------------------------------------------------------------------------------
# The card's endpoint: POST /score


class ScoreParameters(BaseModel):
    """transformers' generation parameters, as the ALLaM and Jais cards pass them."""

    model_config = _STRICT
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    do_sample: bool | None = None
    max_new_tokens: PositiveTokenCount | None = None
    max_length: PositiveTokenCount | None = None  # total (prompt + answer), as transformers; the Jais card: 2048
    min_new_tokens: TokenCount | None = None
    min_length: TokenCount | None = None  # total, as transformers; the Jais card: input_len + 4
    repetition_penalty: Penalty | None = None
    stop: Stop | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    seed: Seed | None = None


class ScoreInput(BaseModel):
    model_config = _STRICT
    input_string: Annotated[list[ChatMessage], Field(min_length=1, max_length=512)]
    parameters: ScoreParameters = Field(default_factory=ScoreParameters)


class ScoreRequest(BaseModel):
    """``{"input_data": {"input_string": [...], "parameters": {...}}}`` (ALLaM card, "Sample input")."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "input_data": {
                        "input_string": [{"role": "user", "content": "كيف أجهز كوب شاهي؟"}],
                        "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200},
                    }
                }
            ]
        },
    )
    input_data: ScoreInput
    model: _text(256) | None = None  # dhad's addition: a served model id (a LoRA adapter); default the base


class ScoreResponse(BaseModel):
    output: str


# ---------------------------------------------------------------------------------------------
# OpenAI API


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class OpenAIMessage(BaseModel):
    """A chat message as the OpenAI API sends it; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=64)]
    name: _text(64) | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both OpenAI endpoints. n other than 1, penalties other than 0 and logprobs are
    refused with 400 (the schema accepts them, as OpenAI's does)."""

    model_config = _STRICT
    model: _text(256) | None = None
    max_tokens: PositiveTokenCount | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: TopP | None = None
    n: _int(ge=1, le=128) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] | None = None
    user: _text(256) | None = None
    # vLLM-style extras (the openai client sends them through `extra_body`)
    top_k: TopK | None = None
    repetition_penalty: Penalty | None = None
    min_tokens: TokenCount | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[OpenAIMessage], Field(min_length=1, max_length=512)]
    max_completion_tokens: PositiveTokenCount | None = None
    logprobs: bool | None = None


class CompletionRequest(_SamplingFields):
    prompt: _text(MAX_TEXT_CHARS, min_chars=1) | Annotated[list[_text(MAX_TEXT_CHARS, min_chars=1)],
                                                           Field(min_length=1, max_length=1)]
    echo: bool = False
    logprobs: _int(ge=0, le=20) | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dhad"
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for the base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    running: int | None = None
    queued: int | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which the official client parses into its exceptions."""

    error: ErrorDetail
