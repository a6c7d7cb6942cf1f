"""The OpenAI-compatible API as types: request and response bodies, stream chunks and the one error body.

Requests are validated by pydantic, so the OpenAPI schema documents every bound. Types are strict as
OpenAI's are: an integer field takes only integers (not "5", 5.0 or true), a boolean only true/false, a
float field any finite number. Every text field refuses lone surrogates (JSON can spell them as
"\\ud800"; no tokenizer or UTF-8 encoder accepts them). Each request type turns itself into the
engine's sampling parameters (`sampling_params`), with one priority: the request's own fields, then
the server's defaults, then OpenAI's defaults (the ones declared here).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag
from pydantic_core import PydanticCustomError

from .params import SamplingParams

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_PROMPTS = 64

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    found = None if text.isascii() else _LONE_SURROGATE.search(text)
    if found:
        raise PydanticCustomError(
            "lone_surrogate", "text must be valid Unicode: lone surrogate U+{code} at character {position}",
            {"code": f"{ord(found.group()):04X}", "position": found.start()},
        )
    return text


def non_empty_stop(text: str) -> str:
    if not text:
        raise PydanticCustomError("string_too_short", "stop strings must not be empty (an empty one would stop at once)")
    return text


def decimal_token_id(key: str) -> str:
    if not (key.isascii() and key.isdigit()):
        raise PydanticCustomError("token_id_key", "logit_bias keys are token ids written in decimal digits, like \"50256\"")
    return key


def printable(text: str) -> str:
    """`text` with any lone surrogate written as an escape, so an error quoting client input always encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def brief(text: str, limit: int = 80) -> str:
    """A client-given string quoted for an error message, cut short: a 4 MB model name must not make a 4 MB error."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


Text = Annotated[str, AfterValidator(valid_unicode)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]

STRICT = ConfigDict(strict=True)
# Clients send fields we do not use (user, service_tier, ...); OpenAI ignores them too.
STRICT_IGNORING_EXTRA = ConfigDict(strict=True, extra="ignore")


def _prompt_form(value) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        first = value[0] if value else 0
        return "texts" if isinstance(first, str) else "token_id_lists" if isinstance(first, list) else "token_ids"
    return None


def _one_or_many(value) -> str | None:
    return "one" if isinstance(value, str) else "many" if isinstance(value, list) else None


Prompt = Annotated[
    Annotated[Text, Tag("text")]
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS), Tag("texts")]
    | Annotated[TokenIds, Tag("token_ids")]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("token_id_lists")],
    Discriminator(_prompt_form, custom_error_type="prompt_type",
                  custom_error_message="prompt must be a string, a list of strings, a list of token ids or a list of such lists"),
]
StopString = Annotated[Text, AfterValidator(non_empty_stop)]
Stop = Annotated[
    Annotated[StopString, Tag("one")] | Annotated[list[StopString], Field(max_length=MAX_STOP), Tag("many")],
    Discriminator(_one_or_many, custom_error_type="stop_type", custom_error_message="stop must be a string or a list of strings"),
]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, plus vLLM's extras)."""

    model_config = STRICT_IGNORING_EXTRA

    model: Text | None = None
    temperature: Finite = Field(1.0, ge=0, le=2)
    top_p: Finite = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off")
    min_p: Finite = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: Finite = Field(0.0, ge=-2, le=2)
    frequency_penalty: Finite = Field(0.0, ge=-2, le=2)
    # Bounded away from 0: dividing logits by a denormal penalty overflows them to infinity.
    repetition_penalty: Finite = Field(1.0, ge=0.01, le=10)
    logit_bias: dict[Annotated[str, AfterValidator(decimal_token_id)], Annotated[Finite, Field(ge=-100, le=100)]] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    user: Text | None = None
    # (the logit_bias given, its ids as ints): converted once per request, not once per prompt (64 x 65,536 keys: 3 s)
    _token_bias: tuple = PrivateAttr((None, {}))

    def _sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int, defaults: SamplingFields
                         ) -> SamplingParams:
        """The one place sampling fields are filled: each field the request set, else the server's, else OpenAI's."""
        def pick(name: str):
            return getattr(self if name in self.model_fields_set else defaults, name)

        stop = pick("stop")
        stop_ids = list(pick("stop_token_ids") or [])
        outside = next((i for i in stop_ids if i >= vocab_size), None)
        if outside is not None:
            raise APIError(400, f"token id {outside} is outside the vocabulary [0, {vocab_size})", "stop_token_ids")
        given = pick("logit_bias") or {}
        if self._token_bias[0] is not given:
            bias = {}
            for key, value in given.items():  # keys are decimal digits (decimal_token_id)
                if int(key) >= vocab_size:
                    raise APIError(400, f"logit_bias key {brief(key)} is not a token id in [0, {vocab_size})", "logit_bias")
                bias[int(key)] = value
            self._token_bias = (given, bias)
        bias = self._token_bias[1]
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
            min_p=pick("min_p"), presence_penalty=pick("presence_penalty"), frequency_penalty=pick("frequency_penalty"),
            repetition_penalty=pick("repetition_penalty"), logit_bias=bias, seed=pick("seed"),
            stop=[stop] if isinstance(stop, str) else list(stop or []), stop_token_ids=stop_ids,
            ignore_eos=pick("ignore_eos"), logprobs=logprobs, skip_special_tokens=pick("skip_special_tokens"),
        )


def room_to_generate(prompt_tokens: int, requested: int | None, max_model_len: int, prompt_field: str = "prompt",
                     requested_field: str = "max_tokens") -> int:
    """New tokens a prompt of `prompt_tokens` may have: `requested` if the context holds it, all the room left if None.

    The fields are the request's own names for the prompt and the number asked for, which its errors name.
    """
    if prompt_tokens == 0:
        raise APIError(400, "the prompt is empty; give at least one token", prompt_field)
    if prompt_tokens > max_model_len or (prompt_tokens == max_model_len and requested != 0):
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, the model's context is {max_model_len}: no room to "
                            "generate", prompt_field)
    room = max_model_len - prompt_tokens
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                            f"{prompt_tokens} and {requested_field} asks for {requested} more", requested_field)
    return requested


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None

    def sampling_params(self, prompt_tokens: int, *, vocab_size: int, max_model_len: int,
                        defaults: SamplingFields) -> SamplingParams:
        """Parameters for one of this request's prompts (of `prompt_tokens` tokens); `defaults`: the server's fields."""
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 only makes sense with echo=true (scoring the prompt)", "max_tokens")
        params = self._sampling_params(room_to_generate(prompt_tokens, self.max_tokens, max_model_len), self.logprobs,
                                       vocab_size, defaults)
        params.prompt_logprobs = self.echo and self.logprobs is not None
        return params


class TextPart(BaseModel):
    model_config = STRICT_IGNORING_EXTRA

    type: Literal["text"]
    text: Text


Content = Annotated[
    Annotated[Text, Tag("one")] | Annotated[list[TextPart], Tag("many")],
    Discriminator(_one_or_many, custom_error_type="content_type",
                  custom_error_message="content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts"),
]


class ChatMessage(BaseModel):
    """One turn. system and developer give instructions; tool (and the deprecated function) carry a tool's result."""

    model_config = STRICT_IGNORING_EXTRA

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content | None = None
    name: Text | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    # Accepted so that a request using them gets a clear 400 rather than a silently plain answer.
    tools: list[dict] | None = None
    response_format: dict | None = None

    def sampling_params(self, prompt_tokens: int, *, vocab_size: int, max_model_len: int,
                        defaults: SamplingFields) -> SamplingParams:
        """Parameters for the rendered conversation (of `prompt_tokens` tokens); `defaults`: the server's fields."""
        requested_field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        room = room_to_generate(prompt_tokens, getattr(self, requested_field), max_model_len, "messages", requested_field)
        top = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(room, top, vocab_size, defaults)


class TokenizeRequest(BaseModel):
    model_config = STRICT_IGNORING_EXTRA

    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = STRICT_IGNORING_EXTRA

    model: Text | None = None
    tokens: list[TokenId]




# ---- responses ----
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of the text (the prompt's too with echo): its text, logprob, alternatives and character offset."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None for a prompt's first token, which nothing predicts
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A /v1/completions body, and each chunk of its stream (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tablefree"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"


# ---- errors ----
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_body(message: str, type_: str, status: int, param: str | None = None) -> dict:
    """The one error body every failure is answered with, quoting client input printably."""
    error = ErrorBody(message=printable(message), type=type_, param=None if param is None else printable(param), code=status)
    return ErrorResponse(error=error).model_dump()


class APIError(Exception):
    """A client error a route raises; the app renders it as `error_body` with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def body(self) -> dict:
        return error_body(self.message, self.type, self.status, self.param)
