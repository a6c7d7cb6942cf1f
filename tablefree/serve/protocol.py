"""The OpenAI-compatible request bodies (validated by pydantic, so the OpenAPI schema documents every bound).

Types are strict as OpenAI's are: an integer field takes only integers (not "5", 5.0 or true), a
boolean only true/false, a float field any finite number. Every text field refuses lone surrogates
(JSON can spell them as "\\ud800"; no tokenizer or UTF-8 encoder accepts them).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic_core import PydanticCustomError

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


def decimal_token_id(key: str) -> str:
    if not (key.isascii() and key.isdigit()):
        raise PydanticCustomError("token_id_key", "logit_bias keys are token ids written in decimal digits, like \"50256\"")
    return key


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
Stop = Annotated[
    Annotated[Text, Tag("one")] | Annotated[list[Text], Field(max_length=MAX_STOP), Tag("many")],
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


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None


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


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """A client error a route raises; the app renders it as an ErrorResponse with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_
